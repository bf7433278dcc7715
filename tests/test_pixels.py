"""Pixels at full depth: equal to pydicom's own modality LUT output (MONOCHROME1 inverted)."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UncompressedTransferSyntaxes

from dicomfl.common import errors as E
from dicomfl.common.pixels import decode, resize, to_float

from .conftest import corpus_files


def _uncompressed_grayscale():
    out = []
    for f in corpus_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, force=True)
                ts = ds.file_meta.get("TransferSyntaxUID")
                if ts not in UncompressedTransferSyntaxes or "PixelData" not in ds:
                    continue
                if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
                    continue
                if ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2"):
                    continue
                ds.pixel_array  # noqa: B018 - must decode
                out.append(f)
        except Exception:  # noqa: BLE001 - files pydicom cannot decode are not this test's subject
            continue
    return out


FILES = _uncompressed_grayscale()


def test_there_are_enough_uncompressed_files():
    assert len(FILES) >= 20
    mono1 = [f for f in FILES if pydicom.dcmread(f, force=True).PhotometricInterpretation == "MONOCHROME1"]
    assert mono1, "corpus should contain MONOCHROME1 images"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_float_pixels_equal_pydicom_modality_lut(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        got = to_float(ds, decode(ds))
    assert got.dtype == np.float32
    if ds.PhotometricInterpretation == "MONOCHROME1":
        # inverted as documented: (lo + hi) - x over the representable range
        s = got + expected
        assert np.allclose(s, s.flat[0])
        assert not np.array_equal(got, expected) or expected.min() == expected.max()
    else:
        np.testing.assert_array_equal(got, expected)


def test_full_bit_depth_is_kept():
    """A 16-bit CT keeps more than 256 distinct values after the pipeline (no 8-bit step)."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    img = to_float(ds, decode(ds))
    assert len(np.unique(img)) > 256
    out = resize(img, 64)
    assert out.dtype == np.float32 and out.shape == (64, 64)
    assert len(np.unique(out)) > 256


def test_multiframe_middle_frame():
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # 10 frames
    n = int(ds.NumberOfFrames)
    middle = decode(ds, "middle")
    np.testing.assert_array_equal(middle, ds.pixel_array[n // 2])
    np.testing.assert_array_equal(decode(ds, "first"), ds.pixel_array[0])


def test_colour_to_luminance_or_reject():
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    arr = decode(ds)
    lum = to_float(ds, arr, "luminance")
    assert lum.ndim == 2
    np.testing.assert_allclose(lum, (arr[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.float32), rtol=1e-6)
    with pytest.raises(E.RejectedFile) as exc:
        to_float(ds, arr, "reject")
    assert exc.value.reason == E.COLOR_REJECTED
