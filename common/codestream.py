"""Check a compressed codestream's own header against the DICOM header, before anything decodes.

A decoder sizes its buffers from the codestream, not from the DICOM header: a 6 kB JPEG 2000
file whose SIZ marker says 65000 x 65000 makes OpenJPEG allocate about 9 GB, although Rows and
Columns say 64 x 64. :func:`check_codestream` reads only the few header bytes each encapsulated
frame starts with -- no decoder, no allocation beyond the frame's own bytes -- and rejects a file
whose codestream disagrees with Rows/Columns/SamplesPerPixel/PhotometricInterpretation, whose
image is over a pixel budget, or whose header cannot be parsed strictly:

* JPEG 2000 (Part 1, Part 2 and HTJ2K): the SIZ marker segment, which must directly follow SOC
  (ISO/IEC 15444-1 A.5.1), optionally inside a JP2 box wrapper (the ``jp2c`` box);
* JPEG (baseline, extended, lossless): the first SOFn marker segment (ISO/IEC 10918-1 B.2.2);
* JPEG-LS: the SOF55 (0xFFF7) marker segment (ISO/IEC 14495-1 C.2.2);
* RLE Lossless: the 64-byte RLE header of each frame (DICOM PS3.5 G.5).

The parser is a hand-written reader of marker segment *headers* with strict bounds; it never
reads entropy-coded data and never loops without advancing. (pylibjpeg-openjpeg's
``get_parameters`` would read the SIZ values too, but it hands the crafted bytes to OpenJPEG's
own header reader in-process, which is what we are guarding against; pydicom's own header
helpers are lenient and, for a JP2 wrapper with a zero-length box, never return.)

Every message names markers and DICOM keywords only -- never a header value.

Transfer syntaxes that are not encapsulated (native, deflated) get the pixel-budget check only.
Encapsulated syntaxes with no header reader here (MPEG, HEVC, JPEG XL, retired JPEG processes)
are rejected: there is nothing to check them against, and pydicom has no decoder for them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000,
    UID,
    HTJ2K,
    JPEG2000Lossless,
    JPEG2000MC,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from . import errors as E
from .errors import CODESTREAM_MISMATCH, RejectedFile

__all__ = ["CODESTREAM_MISMATCH", "CodestreamHeader", "check_codestream", "read_j2k_header",
           "read_jpeg_header", "read_rle_header"]

# The reason codes raised here live in errors.py: CODESTREAM_MISMATCH (re-exported), TOO_LARGE and
# BAD_GEOMETRY.

J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC,
                          HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})

#: Allowed JPEG sample precision per transfer syntax (ISO/IEC 10918-1 B.2.2, PS3.5 8.2.1).
_JPEG_PRECISION: dict[UID, frozenset[int]] = {
    JPEGBaseline8Bit: frozenset({8}),
    JPEGExtended12Bit: frozenset({8, 12}),
    JPEGLossless: frozenset(range(2, 17)),
    JPEGLosslessSV1: frozenset(range(2, 17)),
}

#: Samples per pixel that each Photometric Interpretation implies (PS3.3 C.7.6.3.1.2).
_PI_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1,
    "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_PARTIAL_422": 3, "YBR_PARTIAL_420": 3,
    "YBR_ICT": 3, "YBR_RCT": 3, "HSV": 3, "ARGB": 4, "CMYK": 4,
}

_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JP2_MAX_BOXES = 64
# SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JLS_SOF55 = 0xF7
_RLE_HEADER = 64


@dataclass(frozen=True, slots=True)
class CodestreamHeader:
    """What a frame's codestream header declares.

    Attributes
    ----------
    marker : str
        The marker segment read, for messages: ``"J2K SIZ"``, ``"JPEG SOF3"``,
        ``"JPEG-LS SOF55"``.
    rows, columns : int
        Image height and width.
    components : int
        Number of components (samples per pixel).
    precision : int
        Bits per sample (the largest over the components).
    """

    marker: str
    rows: int
    columns: int
    components: int
    precision: int


def _bad(detail: str) -> RejectedFile:
    return RejectedFile(CODESTREAM_MISMATCH, detail)


def _u16(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 2], "big")


def _u32(buf: bytes, at: int) -> int:
    return int.from_bytes(buf[at:at + 4], "big")


def _jp2_codestream(frame: bytes) -> tuple[int, int]:
    """``(start, end)`` of the raw J2K codestream: the ``jp2c`` box's payload, or the frame."""
    if not frame.startswith(_JP2_SIGNATURE):
        return 0, len(frame)
    n, at = len(frame), len(_JP2_SIGNATURE)
    for _ in range(_JP2_MAX_BOXES):
        if at + 8 > n:
            break
        length, box, header = _u32(frame, at), frame[at + 4:at + 8], 8
        if length == 1:  # XLBox: a 64-bit length follows
            if at + 16 > n:
                raise _bad("JP2 box length")
            length, header = int.from_bytes(frame[at + 8:at + 16], "big"), 16
        elif length == 0:  # "to the end of the file": only the codestream box may do that
            if box != b"jp2c":
                raise _bad("JP2 box length")
            length = n - at
        if length < header or at + length > n:
            raise _bad("JP2 box length")
        if box == b"jp2c":
            return at + header, at + length
        at += length
    raise _bad("no JP2 jp2c box")


def read_j2k_header(frame: bytes) -> CodestreamHeader:
    """Read the SIZ marker segment of a JPEG 2000 frame (raw codestream or JP2-wrapped).

    Parameters
    ----------
    frame : bytes
        One encapsulated frame.

    Returns
    -------
    CodestreamHeader

    Raises
    ------
    RejectedFile
        ``codestream-mismatch``: no SOC/SIZ, a SIZ out of bounds, or values the standard forbids
        (empty image, more than 65535 tiles, 0 or more than 16384 components, subsampled
        components, precision over 38 bits).
    """
    s, end = _jp2_codestream(frame)
    if frame[s:s + 2] != b"\xff\x4f":
        raise _bad("no J2K SOC marker")
    if frame[s + 2:s + 4] != b"\xff\x51":
        raise _bad("no J2K SIZ marker")
    if s + 6 > end:
        raise _bad("J2K SIZ length")
    lsiz = _u16(frame, s + 4)
    if lsiz < 41 or s + 4 + lsiz > end:
        raise _bad("J2K SIZ length")
    p = s + 6  # after the marker and Lsiz
    xsiz, ysiz, xosiz, yosiz = (_u32(frame, p + 2 + 4 * k) for k in range(4))
    xtsiz, ytsiz, xtosiz, ytosiz = (_u32(frame, p + 18 + 4 * k) for k in range(4))
    csiz = _u16(frame, p + 34)
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz:
        raise _bad("J2K SIZ Csiz")
    if (xsiz <= xosiz or ysiz <= yosiz or xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz
            or ytosiz > yosiz or xtosiz + xtsiz <= xosiz or ytosiz + ytsiz <= yosiz):
        raise _bad("J2K SIZ geometry")
    tiles = math.ceil((xsiz - xtosiz) / xtsiz) * math.ceil((ysiz - ytosiz) / ytsiz)
    if tiles > 65535:
        raise _bad("J2K SIZ tiles")
    precision = 0
    for c in range(csiz):
        ssiz, xrsiz, yrsiz = frame[p + 36 + 3 * c:p + 39 + 3 * c]
        bits = (ssiz & 0x7F) + 1
        if bits > 38:
            raise _bad("J2K SIZ Ssiz")
        if xrsiz != 1 or yrsiz != 1:
            raise _bad("J2K SIZ subsampling")
        precision = max(precision, bits)
    return CodestreamHeader("J2K SIZ", ysiz - yosiz, xsiz - xosiz, csiz, precision)


def read_jpeg_header(frame: bytes) -> CodestreamHeader:
    """Read the first SOFn (JPEG) or SOF55 (JPEG-LS) marker segment of a frame.

    Walks the marker segments from SOI, with fill bytes and standalone markers, and stops at
    the first frame header; it never goes past SOS into entropy-coded data.

    Parameters
    ----------
    frame : bytes
        One encapsulated frame.

    Returns
    -------
    CodestreamHeader
        ``marker`` is ``"JPEG SOFn"`` or ``"JPEG-LS SOF55"``.

    Raises
    ------
    RejectedFile
        ``codestream-mismatch``: no SOI, no SOF before SOS/EOI, a segment out of bounds, or a
        frame height of 0 (set later by a DNL marker, which no DICOM decoder needs).
    """
    n = len(frame)
    if frame[:2] != b"\xff\xd8":
        raise _bad("no JPEG SOI marker")
    i = 2
    while True:
        if i >= n:
            raise _bad("no JPEG SOF marker")
        if frame[i] != 0xFF:
            raise _bad("JPEG marker segments")
        while i < n and frame[i] == 0xFF:  # the marker's 0xFF plus any fill bytes
            i += 1
        if i >= n:
            raise _bad("no JPEG SOF marker")
        marker = frame[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):  # stuffing, SOI, EOI, SOS before any SOF
            raise _bad("no JPEG SOF marker")
        if i + 2 > n:
            raise _bad("JPEG marker segment length")
        length = _u16(frame, i)
        if length < 2 or i + length > n:
            raise _bad("JPEG marker segment length")
        if marker in _JPEG_SOF or marker == _JLS_SOF55:
            name = "JPEG-LS SOF55" if marker == _JLS_SOF55 else f"JPEG SOF{marker - 0xC0}"
            if length < 8:
                raise _bad(f"{name} length")
            precision, rows, columns, nf = frame[i + 2], _u16(frame, i + 3), _u16(frame, i + 5), frame[i + 7]
            if nf == 0 or length != 8 + 3 * nf:
                raise _bad(f"{name} length")
            if rows == 0 or columns == 0:
                raise _bad(f"{name} dimensions")
            return CodestreamHeader(name, rows, columns, nf, precision)
        i += length


def read_rle_header(frame: bytes) -> list[int]:
    """Read the RLE header of one frame and return its segment offsets.

    Parameters
    ----------
    frame : bytes
        One encapsulated RLE frame (exactly one fragment, PS3.5 G.5).

    Returns
    -------
    list of int
        The offsets of the segments in use, each within the frame, strictly increasing.

    Raises
    ------
    RejectedFile
        ``codestream-mismatch``: a frame shorter than the header, 0 or more than 15 segments,
        or offsets that are not increasing or point outside the frame.
    """
    if len(frame) < _RLE_HEADER:
        raise _bad("RLE header length")
    words = [int.from_bytes(frame[4 * k:4 * k + 4], "little") for k in range(16)]
    count, offsets = words[0], words[1:words[0] + 1]
    if not 1 <= count <= 15:
        raise _bad("RLE header segment count")
    if offsets[0] < _RLE_HEADER or any(b <= a for a, b in zip(offsets, offsets[1:])) \
            or offsets[-1] >= len(frame):
        raise _bad("RLE header segment offsets")
    return offsets


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_codestream(ds: Dataset, max_pixels: int) -> None:
    """Reject ``ds`` when its codestream disagrees with its header or is too large -- no decoding.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A dataset read with its Pixel Data.
    max_pixels : int
        Largest Rows * Columns * NumberOfFrames * SamplesPerPixel accepted.

    Raises
    ------
    RejectedFile
        ``too-large``: the header declares more than ``max_pixels`` samples.
        ``bad-pixel-geometry``: Rows, Columns, SamplesPerPixel or BitsAllocated absent or
        not positive.
        ``codestream-mismatch``: a frame's codestream header cannot be parsed strictly, or
        declares other dimensions than Rows/Columns, another number of components than
        SamplesPerPixel (or than PhotometricInterpretation implies), a precision over
        BitsAllocated or outside what the transfer syntax allows; an RLE header whose segment
        count is not SamplesPerPixel * ceil(BitsAllocated / 8); an encapsulation pydicom
        cannot split into frames; a compressed transfer syntax with no header reader here.

    Notes
    -----
    Datasets without Pixel Data pass. Every frame is checked (a crafted file can hide a bomb
    in a later frame); frames are split exactly as pydicom's decoders split them.
    """
    if "PixelData" not in ds:
        return
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples, bits_allocated = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated")
    frames = _int(ds, "NumberOfFrames", 1)
    if not rows or not columns or rows < 1 or columns < 1:
        raise RejectedFile(E.BAD_GEOMETRY, "Rows/Columns")
    if not samples or samples < 1:
        raise RejectedFile(E.BAD_GEOMETRY, "SamplesPerPixel")
    if not bits_allocated or bits_allocated < 1:
        raise RejectedFile(E.BAD_GEOMETRY, "BitsAllocated")
    frames = max(1, frames or 1)  # pydicom decodes 0 or an invalid value as one frame
    if rows * columns * frames * samples > max_pixels:
        raise RejectedFile(E.TOO_LARGE, "Rows*Columns*NumberOfFrames*SamplesPerPixel over max_pixels")

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        raise _bad("no TransferSyntaxUID")
    syntax = UID(syntax)
    if not syntax.is_encapsulated:
        return
    if syntax not in J2K_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES | {RLELossless}:
        raise _bad("no codestream check for this transfer syntax")

    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    pi_samples = _PI_SAMPLES.get(pi)
    if pi_samples is not None and pi_samples != samples:
        raise _bad("PhotometricInterpretation vs SamplesPerPixel")

    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    checked = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for frame in generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=extended):
                _check_frame(frame, syntax, rows, columns, samples, bits_allocated)
                checked += 1
    except (RejectedFile, MemoryError):
        raise
    except Exception:  # pydicom could not split the items: it could not decode them either
        raise _bad("encapsulation") from None
    if checked == 0:
        raise _bad("no frames")


def _check_frame(frame: bytes, syntax: UID, rows: int, columns: int, samples: int,
                 bits_allocated: int) -> None:
    """Check one encapsulated frame's codestream header against the DICOM header values."""
    if syntax == RLELossless:
        offsets = read_rle_header(frame)
        if len(offsets) != samples * math.ceil(bits_allocated / 8):
            raise _bad("RLE header segment count vs SamplesPerPixel/BitsAllocated")
        return
    if syntax in J2K_SYNTAXES:
        header = read_j2k_header(frame)
    else:
        header = read_jpeg_header(frame)
        is_ls = header.marker == "JPEG-LS SOF55"
        if is_ls != (syntax in JPEG_LS_SYNTAXES):
            raise _bad(f"{header.marker} vs transfer syntax")
        allowed = _JPEG_PRECISION.get(syntax, frozenset(range(2, 17)))
        if header.precision not in allowed:
            raise _bad(f"{header.marker} precision vs transfer syntax")
    if (header.rows, header.columns) != (rows, columns):
        raise _bad(f"{header.marker} vs Rows/Columns")
    if header.components != samples:
        raise _bad(f"{header.marker} components vs SamplesPerPixel")
    if header.precision > bits_allocated:
        raise _bad(f"{header.marker} precision vs BitsAllocated")
