"""Pixels at full depth as float32.

Policy (documented, tested):

* Stored values are decoded by pydicom (plugins: gdcm, pylibjpeg-openjpeg, pylibjpeg-rle; pydicom's
  own RLE/native). Signed data stays signed; BitsStored < BitsAllocated is masked by pydicom.
* The Modality LUT is applied (Rescale Slope/Intercept or a Modality LUT Sequence), as
  ``pydicom.pixels.apply_modality_lut``; the result is float32, never quantized.
* MONOCHROME1 is inverted so that higher always means brighter/denser, as
  ``out = (lo + hi) - x`` where ``lo``/``hi`` are the modality-LUT outputs of the smallest and largest
  representable stored values (from BitsStored and PixelRepresentation). This is exact and
  reversible; pydicom never does it for you.
* Multi-frame: one sample per file, the middle frame (``preprocess.multiframe: middle``) or the
  first; only that frame is decoded.
* Colour (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT) becomes one
  luminance channel with ITU-R BT.601 weights, or is rejected (``preprocess.color: reject``).
* Resizing to ``image_size`` x ``image_size`` stretches to square with bilinear interpolation and
  antialiasing (Pillow's float32 resampling: the same triangle filter, widened by the scale
  factor when shrinking, as ``torch.nn.functional.interpolate(..., antialias=True)``, whose
  output it matches to float32 rounding; it keeps torch out of the ingestion workers, so none
  of them pays torch's import time and memory); pixel spacing is kept as a feature.
* Per-image robust-scaling statistics (:func:`robust_stats`) are computed here, at ingest, so
  that training scales each image it reads with two numbers instead of re-sorting it.

Reject details name DICOM keywords and registered transfer syntax names only: never a value
read from the file (a Photometric Interpretation, an unregistered UID, a frame count).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import UID_dictionary

from . import errors as E
from .decoders import decode_failure
from .normalize import HIGH_PCT, LOW_PCT

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _frame_index(ds: Dataset, policy: str) -> int | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames <= 1:
        return None
    return frames // 2 if policy == "middle" else 0


@contextlib.contextmanager
def native_stderr_silenced():
    """Native decoders (OpenJPEG, GDCM) write diagnostics straight to file descriptor 2; keep
    those off the console while they run (the reject reason says what failed)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def decode(ds: Dataset, multiframe: str = "middle") -> np.ndarray:
    """Stored values of the selected frame, as pydicom returns them (2D or 2D x samples)."""
    index = _frame_index(ds, multiframe)
    with warnings.catch_warnings(), native_stderr_silenced():
        warnings.simplefilter("ignore")
        try:
            if index is None:
                arr = ds.pixel_array
            else:
                arr = pixel_array(ds, index=index)
        except MemoryError:
            raise  # over the worker's memory: its own reason (worker-memory), retried next time
        except Exception as exc:  # noqa: BLE001 - every decoder failure is a reject with a reason
            raise decode_failure(exc, _syntax_name(ds)) from None
    if index is not None and arr.ndim >= 3 and arr.shape[0] > 1 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        arr = arr[0]
    return arr


def _syntax_name(ds: Dataset) -> str:
    """The registered name of the file's transfer syntax (a constant of the standard), else the
    keyword: an unregistered UID is a value from the file and never goes into a detail."""
    try:
        uid = str(ds.file_meta.get("TransferSyntaxUID") or "") if hasattr(ds, "file_meta") else ""
    except Exception:  # noqa: BLE001 - unreadable value
        uid = ""
    entry = UID_dictionary.get(uid)
    if entry is not None and entry[1] == "Transfer Syntax":
        return entry[0]
    return "TransferSyntaxUID"


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def to_float(ds: Dataset, arr: np.ndarray, color: str = "luminance", check_finite: bool = True) -> np.ndarray:
    """Modality LUT, MONOCHROME1 inversion and colour handling; returns a float32 2D array.

    ``check_finite=False`` leaves the check for non-finite values to the caller (who checks the
    smaller, resized image: a non-finite pixel makes every output pixel it reaches non-finite)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if photometric == "PALETTE COLOR" or samples > 1 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
            if color == "reject":
                raise E.RejectedFile(E.COLOR_REJECTED, "PhotometricInterpretation")
            if photometric == "PALETTE COLOR":
                try:
                    arr = apply_color_lut(arr, ds)
                except MemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise E.RejectedFile(E.DECODE_FAILED, f"PALETTE COLOR {type(exc).__name__}") from None
            if arr.ndim == 3 and arr.shape[-1] >= 3:
                out = arr[..., :3].astype(np.float64) @ _LUMA
            else:
                out = arr.astype(np.float64)
            out = out.astype(np.float32)
        else:
            try:
                out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken LUT is a reject
                raise E.RejectedFile(E.DECODE_FAILED, f"ModalityLUT {type(exc).__name__}") from None
            if photometric == "MONOCHROME1":
                lo, hi = _stored_range(ds)
                ends = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=arr.dtype if arr.dtype.kind in "iu" else np.int64), ds), dtype=np.float64)
                out = (np.float32(ends.min() + ends.max()) - out).astype(np.float32)
    if out.ndim != 2:
        raise E.RejectedFile(E.BAD_GEOMETRY, "pixel array dimensions")
    if check_finite and not np.isfinite(out).all():
        raise E.RejectedFile(E.BAD_PIXELS, "non-finite values")
    return out


#: Freed Pillow image blocks a process keeps for reuse (see :func:`keep_image_blocks`).
IMAGE_BLOCKS_KEPT = 4


def keep_image_blocks(blocks: int = IMAGE_BLOCKS_KEPT) -> None:
    """Let Pillow keep ``blocks`` freed image blocks for the next images instead of returning
    each one to the system (its block allocator's pool, documented as ``PILLOW_BLOCKS_MAX``;
    off by default). Without it, whether each :func:`resize` maps fresh memory and faults in
    every page again depends on when the process frees its other large arrays: an ingestion
    worker that returns its image through a reply slot (and frees it at once) faults in every
    page of every resize and spends more CPU time on it (benchmarks/results/ingest-2026-11-23.md,
    section 2). At most ``blocks`` x 16 MB (Pillow's block size) stay allocated. Called once in
    each ingestion worker."""
    Image.core.set_blocks_max(blocks)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of a 2D float32 array to ``size`` x ``size`` (float32)."""
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    src = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32))  # 2D float32: mode "F"
    return np.asarray(src.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def full_depth_pixels(ds: Dataset, size: int, multiframe: str = "middle", color: str = "luminance") -> np.ndarray:
    """The selected frame at full depth, as float32, resized to ``size`` x ``size``.

    Non-finite values are looked for after the resize (on size^2 pixels rather than the source's
    rows x columns): every source pixel has a positive weight in some output pixel, so a NaN or
    an infinity anywhere in the source shows up there."""
    out = resize(to_float(ds, decode(ds, multiframe), color, check_finite=False), size)
    if not np.isfinite(out).all():
        raise E.RejectedFile(E.BAD_PIXELS, "non-finite values")
    return out


def _select(a: np.ndarray, lo: int, hi: int, ks: list[int]) -> None:
    """Partition ``a[lo:hi]`` in place so that every index in ``ks`` (sorted, within
    ``[lo, hi)``) holds the value a full sort would put there, one single-pivot
    ``ndarray.partition`` per index (``np.partition`` with several ``kth`` at once is slower than
    a sort here), each on the part left between the indices already placed."""
    if not ks:
        return
    m = len(ks) // 2
    k = ks[m]
    a[lo:hi].partition(k - lo)
    _select(a, lo, k, ks[:m])
    _select(a, k + 1, hi, ks[m + 1:])


def _percentiles(flat: np.ndarray, qs: tuple[float, ...]) -> list[np.float64]:
    """``numpy.percentile(flat, qs)`` (method "linear") of a float32 vector without NaN.

    The order statistics come from :func:`_select` (a partition per percentile is linear time,
    a sort of the whole vector is not) and the value after each from a
    ``min`` of the part above it, which a partition leaves between that index and the next one
    placed; the interpolation below is NumPy's own (the "linear" virtual index ``(n - 1) * q``,
    then ``_lerp``), operation for operation, so the result is the same to the bit (tested
    against ``np.percentile``).
    """
    n = len(flat)
    picks = []
    for q in qs:
        virtual = np.float64(n - 1) * (np.float64(q) / np.float64(100))  # "linear": (n - 1) * q
        prev = int(np.floor(virtual))
        if virtual >= n - 1:
            prev = n - 1
        picks.append((virtual, prev, min(prev + 1, n - 1)))
    placed = sorted({prev for _, prev, _ in picks})
    s = np.array(flat, dtype=np.float32, copy=True)
    _select(s, 0, n, placed)
    bounds = dict(zip(placed, placed[1:] + [n - 1]))  # each placed index -> the next one (or the end)
    out = []
    for virtual, prev, nxt in picks:
        a = s[prev]
        b = a if nxt == prev else (s[nxt] if nxt in bounds else s[nxt:bounds[prev] + 1].min())
        gamma = virtual - np.float64(prev)
        diff = b - a  # float32, as in NumPy
        if gamma >= 0.5:
            out.append(np.float64(b) - np.float64(diff) * (np.float64(1) - gamma))
        else:
            out.append(np.float64(a) + np.float64(diff) * gamma)
    return out


def robust_stats(img: np.ndarray) -> np.ndarray:
    """``[median, p99 - p1]`` of one image as float32: with them,
    ``clip((x - median) / (p99 - p1), -3, 3)`` is :func:`dicomfl.common.normalize.robust_scale`
    of that image, bit for bit (same percentiles, same float32 arithmetic; a flat image gets an
    infinite scale, hence zeros)."""
    lo, med, hi = _percentiles(np.asarray(img, dtype=np.float32).reshape(-1), (LOW_PCT, 50.0, HIGH_PCT))
    scale = np.float32(hi - lo)
    if scale <= 0:
        scale = np.float32(np.inf)
    return np.array([np.float32(med), scale], dtype=np.float32)
