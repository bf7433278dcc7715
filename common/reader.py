"""Read one DICOM file from bytes and check that it is an image we can use.

Rejections carry a stable reason code (see :mod:`errors`) and a detail made only of tag keywords
and exception type names, never of values (not even a dimension or a frame count). pydicom's warnings, which can quote element values,
are captured and counted, never printed.
"""

from __future__ import annotations

import io
import warnings

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID_dictionary,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from . import errors as E

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_dataset(data) -> Dataset:
    """Parse a dataset from file bytes or a read-only file mapping (``mmap``), with or without the
    Part 10 preamble. A mapping is parsed in place: the file's bytes are never copied whole (only
    each element's value, as pydicom reads it)."""
    if not len(data):
        raise E.RejectedFile(E.EMPTY_FILE)
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(source, force=True)
        except InvalidDicomError:
            raise E.RejectedFile(E.UNREADABLE, "InvalidDicomError") from None
        except (EOFError, OSError) as exc:
            raise E.RejectedFile(E.TRUNCATED, type(exc).__name__) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure is a reject, never a crash
            raise E.RejectedFile(E.UNREADABLE, type(exc).__name__) from None
    if len(ds) == 0:
        raise E.RejectedFile(E.UNREADABLE, "no elements")
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # A raw dataset without file meta: record how pydicom actually parsed it.
        implicit, little = ds.original_encoding
        if little is not None:
            meta.TransferSyntaxUID = (
                ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            ) if little else ExplicitVRBigEndian
    return ds


def _get(ds: Dataset, keyword: str, default=None):
    try:
        return ds.get(keyword, default)
    except Exception:  # noqa: BLE001 - an unreadable value counts as absent
        return default


def sop_class_is_image(uid: str | None) -> bool | None:
    """True/False for a known SOP class, None when unknown or absent."""
    if not uid:
        return None
    entry = UID_dictionary.get(str(uid))
    if entry is None:
        return None
    name = entry[0]
    return "Image Storage" in name


def check_image(ds: Dataset, max_pixels: int) -> None:
    """Reject files that are not usable images, from the header alone (no pixel decode)."""
    if str(_get(ds, "BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise E.RejectedFile(E.BURNED_IN, "BurnedInAnnotation=YES")
    sop = _get(ds, "SOPClassUID") or (ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None)
    is_image = sop_class_is_image(sop)
    if is_image is False:
        raise E.RejectedFile(E.NON_IMAGE, "SOPClassUID")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise E.RejectedFile(E.NO_PIXEL_DATA, "PixelData absent")
    try:
        rows = int(_get(ds, "Rows", 0) or 0)
        cols = int(_get(ds, "Columns", 0) or 0)
        frames = int(_get(ds, "NumberOfFrames", 1) or 1)
        samples = int(_get(ds, "SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise E.RejectedFile(E.BAD_GEOMETRY, "Rows/Columns/NumberOfFrames") from None
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise E.RejectedFile(E.BAD_GEOMETRY, "Rows/Columns")
    if rows * cols * frames * samples > max_pixels:
        raise E.RejectedFile(E.TOO_LARGE, "Rows*Columns*NumberOfFrames*SamplesPerPixel over max_pixels")
