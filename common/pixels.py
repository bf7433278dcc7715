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
  antialiasing (``torch.nn.functional.interpolate``); pixel spacing is kept as a feature.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from . import errors as E
from .decoders import decode_failure

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
        except Exception as exc:  # noqa: BLE001 - every decoder failure is a reject with a reason
            raise decode_failure(exc, _syntax_name(ds)) from None
    if index is not None and arr.ndim >= 3 and arr.shape[0] > 1 and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        arr = arr[0]
    return arr


def _syntax_name(ds: Dataset) -> str:
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return getattr(uid, "name", "") or "transfer syntax unknown"


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def to_float(ds: Dataset, arr: np.ndarray, color: str = "luminance") -> np.ndarray:
    """Modality LUT, MONOCHROME1 inversion and colour handling; returns a float32 2D array."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if photometric == "PALETTE COLOR" or samples > 1 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
            if color == "reject":
                raise E.RejectedFile(E.COLOR_REJECTED, photometric)
            if photometric == "PALETTE COLOR":
                try:
                    arr = apply_color_lut(arr, ds)
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
            except Exception as exc:  # noqa: BLE001 - a broken LUT is a reject
                raise E.RejectedFile(E.DECODE_FAILED, f"ModalityLUT {type(exc).__name__}") from None
            if photometric == "MONOCHROME1":
                lo, hi = _stored_range(ds)
                ends = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=arr.dtype if arr.dtype.kind in "iu" else np.int64), ds), dtype=np.float64)
                out = (np.float32(ends.min() + ends.max()) - out).astype(np.float32)
    if out.ndim != 2:
        raise E.RejectedFile(E.BAD_GEOMETRY, f"pixel array has {out.ndim} dimensions")
    if not np.isfinite(out).all():
        raise E.RejectedFile(E.BAD_PIXELS, "non-finite values")
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased resize of a 2D float32 array to ``size`` x ``size``."""
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


def full_depth_pixels(ds: Dataset, size: int, multiframe: str = "middle", color: str = "luminance") -> np.ndarray:
    return resize(to_float(ds, decode(ds, multiframe), color), size)
