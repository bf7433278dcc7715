"""dicomfl.common.codestream: the codestream's own header against the DICOM header, no decoding."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit

from dicomfl.common import errors as E
from dicomfl.common.codestream import (
    CODESTREAM_MISMATCH,
    CodestreamHeader,
    check_codestream,
    read_j2k_header,
    read_jpeg_header,
    read_rle_header,
)
from dicomfl.common.errors import RejectedFile

from . import crashers as C

BIG = 10**9

# pydicom test files that the check rejects, and why: their codestream is broken too (no
# plugin decodes them either).
KNOWN_BAD = {"JPEG2000-embedded-sequence-delimiter.dcm": "J2K SIZ tiles"}


def rejection(ds, max_pixels: int = BIG) -> RejectedFile:
    with pytest.raises(RejectedFile) as info:
        check_codestream(ds, max_pixels)
    return info.value


def encapsulated_corpus() -> list[Path]:
    from pydicom.data import get_testdata_files

    out = []
    for f in sorted(get_testdata_files()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if ds.file_meta.TransferSyntaxUID.is_encapsulated:
                out.append(Path(f))
        except Exception:
            continue
    return out


# --------------------------------------------------------------------------------------------
# Real files


def test_every_encapsulated_test_file_of_pydicom_passes(recwarn):
    files = encapsulated_corpus()
    assert len(files) > 50
    for path in files:
        ds = pydicom.dcmread(path)
        if path.name in KNOWN_BAD:
            exc = rejection(ds)
            assert (exc.reason, exc.detail) == (CODESTREAM_MISMATCH, KNOWN_BAD[path.name])
        else:
            check_codestream(ds, BIG)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("crashers")
    return C.all_crashers(d)


@pytest.mark.parametrize("name, detail", [
    ("j2k_rgb", "PhotometricInterpretation vs SamplesPerPixel"),
    ("j2k_ybr_full_422", "PhotometricInterpretation vs SamplesPerPixel"),
    ("jpeg_sof_p255", "JPEG SOF0 precision vs transfer syntax"),
    ("j2k_bomb", "J2K SIZ vs Rows/Columns"),
    ("jp2_zero_box", "JP2 box length"),
])
def test_crashers_with_a_header_tell_are_rejected(files, name, detail):
    exc = rejection(pydicom.dcmread(files[name]))
    assert (exc.reason, exc.detail) == (CODESTREAM_MISMATCH, detail)


@pytest.mark.parametrize("name", ["jpeg_lossless_bs7", "rle_offset", "rle_rows"])
def test_crashers_with_sane_headers_pass_and_need_the_worker(files, name):
    # Their headers are consistent: only crash isolation (dicomfl.common.workers) stops these.
    check_codestream(pydicom.dcmread(files[name]), BIG)


def test_bomb_is_rejected_without_the_memory_a_decode_takes(files):
    """In a subprocess under an address-space limit: the check rejects the bomb with no growth
    of the resident set, where a decode of the same file under the same limit fails after
    growing it by hundreds of MB."""
    out = C.run_bare({
        "check": C.BareJob(files["j2k_bomb"], as_limit=C.BOMB_AS_LIMIT, what="check"),
        "decode": C.BareJob(files["j2k_bomb"], as_limit=C.BOMB_AS_LIMIT, what="decode"),
    })
    check, decode = out["check"], out["decode"]
    assert check.returncode == 0 and check.result["type"] == "RejectedFile", check
    assert check.result["reason"] == CODESTREAM_MISMATCH
    assert check.result["hwm_growth"] < 16 * 2**20, check
    assert decode.returncode == 0 and decode.result["outcome"] == "raised", decode
    assert decode.result["hwm_growth"] > 200 * 2**20, decode


def test_a_bomb_in_a_later_frame_is_found():
    ds = pydicom.dcmread(C.testfile("emri_small_jpeg_2k_lossless.dcm"))  # 10 frames of 64 x 64
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    siz = frames[6].index(b"\xff\x51")
    big = struct.pack(">II", 30000, 30000)
    frames[6] = frames[6][:siz + 6] + big + frames[6][siz + 14:siz + 22] + big + frames[6][siz + 30:]  # image, tile
    ds.PixelData = encapsulate(frames)
    check_codestream(pydicom.dcmread(C.testfile("emri_small_jpeg_2k_lossless.dcm")), BIG)
    assert rejection(ds).detail == "J2K SIZ vs Rows/Columns"


def test_header_disagreements():
    ds = pydicom.dcmread(C.testfile("MR_small_jp2klossless.dcm"))
    ds.Rows = 32
    assert rejection(ds).detail == "J2K SIZ vs Rows/Columns"

    ds = pydicom.dcmread(C.testfile("MR_small_jp2klossless.dcm"))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
    assert rejection(ds).detail == "J2K SIZ components vs SamplesPerPixel"

    ds = pydicom.dcmread(C.testfile("MR_small_jp2klossless.dcm"))
    ds.BitsAllocated = 8  # the codestream holds 16-bit samples
    assert rejection(ds).detail == "J2K SIZ precision vs BitsAllocated"

    ds = pydicom.dcmread(C.testfile("SC_rgb_jpeg_dcmtk.dcm"))
    ds.Columns = 99
    assert rejection(ds).detail == "JPEG SOF0 vs Rows/Columns"

    ds = pydicom.dcmread(C.testfile("MR_small_jpeg_ls_lossless.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    assert rejection(ds).detail == "JPEG-LS SOF55 vs transfer syntax"

    ds = pydicom.dcmread(C.testfile("MR_small_RLE.dcm"))  # 16-bit grey: 2 segments
    ds.BitsAllocated = 8
    assert rejection(ds).detail == "RLE header segment count vs SamplesPerPixel/BitsAllocated"

    ds = pydicom.dcmread(C.testfile("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    assert rejection(ds).detail == "no codestream check for this transfer syntax"


def test_size_and_geometry_from_the_header():
    ds = pydicom.dcmread(C.testfile("emri_small_RLE.dcm"))  # 10 x 64 x 64
    check_codestream(ds, 10 * 64 * 64)
    exc = rejection(ds, 10 * 64 * 64 - 1)
    assert exc.reason == E.TOO_LARGE and exc.detail == "Rows*Columns*NumberOfFrames*SamplesPerPixel over max_pixels"

    native = pydicom.dcmread(C.testfile("MR_small.dcm"))
    check_codestream(native, 64 * 64)  # not encapsulated: the budget only
    assert rejection(native, 64 * 64 - 1).reason == E.TOO_LARGE

    del native.Rows
    assert (rejection(native).reason, rejection(native).detail) == (E.BAD_GEOMETRY, "Rows/Columns")

    check_codestream(pydicom.dcmread(C.testfile("MR_small.dcm"), stop_before_pixels=True), 1)


def test_messages_quote_no_header_value(files):
    ds = pydicom.dcmread(files["j2k_bomb"])
    ds.PatientName = "LEAK^PATIENT"
    text = str(rejection(ds))
    assert "LEAK" not in text and "65000" not in text and "64" not in text


# --------------------------------------------------------------------------------------------
# The parsers, on made-up headers


def siz(x=64, y=48, comps=1, xo=0, yo=0, xt=None, yt=None, xto=0, yto=0, ssiz=15, sub=1, lsiz=None):
    body = struct.pack(">HIIIIIIIIH", 0, x, y, xo, yo, x if xt is None else xt, y if yt is None else yt, xto, yto, comps)
    body += bytes([ssiz, sub, sub]) * comps
    return b"\xff\x4f\xff\x51" + struct.pack(">H", lsiz or 2 + len(body)) + body + b"\xff\x52\x00\x0c" + bytes(10)


def box(kind: bytes, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) + 8 if length is None else length) + kind + payload


JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def test_j2k_siz():
    assert read_j2k_header(siz()) == CodestreamHeader("J2K SIZ", 48, 64, 1, 16)
    assert read_j2k_header(siz(x=74, y=58, xo=10, yo=10, comps=3, ssiz=7)) == CodestreamHeader("J2K SIZ", 48, 64, 3, 8)
    assert read_j2k_header(siz(x=1000, y=1000, xt=64, yt=64)).rows == 1000


def test_j2k_jp2_wrapper():
    wrapped = JP2_SIGNATURE + box(b"ftyp", b"jp2 " + bytes(8)) + box(b"jp2h", bytes(30)) + box(b"jp2c", siz())
    assert read_j2k_header(wrapped).columns == 64
    # a 64-bit XLBox length, and a jp2c box that runs to the end (LBox 0)
    xl = JP2_SIGNATURE + struct.pack(">I", 1) + b"ftyp" + struct.pack(">Q", 20) + b"jp2 " + box(b"jp2c", siz(), 0)
    assert read_j2k_header(xl).rows == 48


@pytest.mark.parametrize("frame, detail", ids=lambda v: v if isinstance(v, str) else "", argvalues=[
    (b"", "no J2K SOC marker"),
    (b"\xff\xd8" + siz()[2:], "no J2K SOC marker"),
    (b"\xff\x4f\xff\x52" + siz()[4:], "no J2K SIZ marker"),
    (siz()[:30], "J2K SIZ length"),
    (siz(lsiz=40), "J2K SIZ length"),
    (siz(lsiz=44), "J2K SIZ Csiz"),
    (siz(comps=0), "J2K SIZ length"),
    (siz(comps=2, lsiz=41), "J2K SIZ Csiz"),
    (siz(xo=64), "J2K SIZ geometry"),
    (siz(xt=0), "J2K SIZ geometry"),
    (siz(x=65000, y=65000, xt=64, yt=64), "J2K SIZ tiles"),
    (siz(sub=2), "J2K SIZ subsampling"),
    (siz(ssiz=40), "J2K SIZ Ssiz"),
    (JP2_SIGNATURE + box(b"ftyp", bytes(12), 0) + box(b"jp2c", siz()), "JP2 box length"),
    (JP2_SIGNATURE + box(b"ftyp", bytes(12), 4) + box(b"jp2c", siz()), "JP2 box length"),
    (JP2_SIGNATURE + box(b"ftyp", bytes(12), 1000) + box(b"jp2c", siz()), "JP2 box length"),
    (JP2_SIGNATURE + box(b"ftyp", bytes(12)), "no JP2 jp2c box"),
    (JP2_SIGNATURE + box(b"free", b"") * 100 + box(b"jp2c", siz()), "no JP2 jp2c box"),
])
def test_j2k_malformed(frame, detail):
    with pytest.raises(RejectedFile) as info:
        read_j2k_header(frame)
    assert (info.value.reason, info.value.detail) == (CODESTREAM_MISMATCH, detail)


def seg(marker: int, payload: bytes, length: int | None = None) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2 if length is None else length) + payload


def sof(marker=0xC0, p=8, y=48, x=64, nf=3) -> bytes:
    return seg(marker, struct.pack(">BHHB", p, y, x, nf) + bytes(3 * nf))


SOI, SOS = b"\xff\xd8", seg(0xDA, bytes(10))


def test_jpeg_sof():
    app = seg(0xE0, b"JFIF\x00" + bytes(9))
    frame = SOI + app + b"\xff\xff" + seg(0xDB, bytes(65)) + sof() + SOS + b"\x12\x34"
    assert read_jpeg_header(frame) == CodestreamHeader("JPEG SOF0", 48, 64, 3, 8)
    assert read_jpeg_header(SOI + sof(0xC3, p=16, nf=1) + SOS) == CodestreamHeader("JPEG SOF3", 48, 64, 1, 16)
    assert read_jpeg_header(SOI + sof(0xF7, p=12, nf=1) + SOS).marker == "JPEG-LS SOF55"
    assert read_jpeg_header(SOI + b"\xff\xd0" + sof() + SOS).rows == 48  # standalone marker


@pytest.mark.parametrize("frame, detail", ids=lambda v: v if isinstance(v, str) else "", argvalues=[
    (b"", "no JPEG SOI marker"),
    (b"\xff\x4f" + sof(), "no JPEG SOI marker"),
    (SOI + SOS + sof(), "no JPEG SOF marker"),
    (SOI + seg(0xE0, bytes(4)), "no JPEG SOF marker"),
    (SOI + b"\xff\xd9", "no JPEG SOF marker"),
    (SOI + b"\x00\x00" + sof(), "JPEG marker segments"),
    (SOI + seg(0xE0, bytes(4), length=1) + sof(), "JPEG marker segment length"),
    (SOI + seg(0xE0, bytes(4), length=400) + sof(), "JPEG marker segment length"),
    (SOI + b"\xff\xe0\x00", "JPEG marker segment length"),
    (SOI + sof()[:8], "JPEG marker segment length"),
    (SOI + seg(0xC0, bytes(4)), "JPEG SOF0 length"),
    (SOI + sof(y=0), "JPEG SOF0 dimensions"),
    (SOI + seg(0xC1, struct.pack(">BHHB", 8, 4, 4, 3) + bytes(3)), "JPEG SOF1 length"),
])
def test_jpeg_malformed(frame, detail):
    with pytest.raises(RejectedFile) as info:
        read_jpeg_header(frame)
    assert (info.value.reason, info.value.detail) == (CODESTREAM_MISMATCH, detail)


def rle(*offsets: int, count: int | None = None, size: int = 500) -> bytes:
    words = [len(offsets) if count is None else count, *offsets] + [0] * (15 - len(offsets))
    return struct.pack("<16I", *words) + bytes(size - 64)


def test_rle_header():
    assert read_rle_header(rle(64, 200, 300)) == [64, 200, 300]


@pytest.mark.parametrize("frame, detail", ids=lambda v: v if isinstance(v, str) else "", argvalues=[
    (rle(64)[:63], "RLE header length"),
    (rle(64, count=0), "RLE header segment count"),
    (rle(64, count=16), "RLE header segment count"),
    (rle(60, 200), "RLE header segment offsets"),
    (rle(64, 200, 200), "RLE header segment offsets"),
    (rle(64, 300, 200), "RLE header segment offsets"),
    (rle(64, 500), "RLE header segment offsets"),
])
def test_rle_malformed(frame, detail):
    with pytest.raises(RejectedFile) as info:
        read_rle_header(frame)
    assert (info.value.reason, info.value.detail) == (CODESTREAM_MISMATCH, detail)
