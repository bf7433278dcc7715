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


@pytest.mark.parametrize("shape, size", [((512, 512), 256), ((300, 257), 64), ((64, 64), 128), ((37, 100), 32),
                                         ((2000, 1500), 128)])
def test_resize_matches_torch_antialiased_bilinear(shape, size):
    """Pillow's float resampling (used so that ingestion workers need no torch) gives torch's
    antialiased bilinear resize to float32 rounding."""
    import torch
    import torch.nn.functional as F

    img = np.random.default_rng(0).normal(1000, 300, shape).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(img)[None, None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)[0, 0].numpy()
    got = resize(img, size)
    assert got.dtype == np.float32 and got.shape == (size, size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_robust_stats_give_robust_scale_bit_for_bit():
    from dicomfl.common.normalize import CLIP, robust_scale
    from dicomfl.common.pixels import _percentiles, robust_stats

    rng = np.random.default_rng(3)
    for n in [*range(1, 40), 99, 100, 101, 4096, 65536]:  # every small size: the interpolation's edge cases
        for x in (rng.normal(0, 1, n), np.round(rng.normal(0, 3, n)), np.full(n, 3.5)):
            x = x.astype(np.float32)
            assert np.array_equal(np.array(_percentiles(x, (1.0, 50.0, 99.0))),
                                  np.percentile(x.reshape(1, -1), [1, 50, 99], axis=1).ravel()), n
    imgs = (rng.normal(1000, 300, (40, 37, 41)) * rng.uniform(0.1, 5, (40, 1, 1))).astype(np.float32)
    imgs[3] = 7.0  # flat: zeros
    st = np.stack([robust_stats(i) for i in imgs])
    out = (imgs - st[:, 0, None, None]) / st[:, 1, None, None]
    np.clip(out, -CLIP, CLIP, out=out)
    assert np.array_equal(out, robust_scale(imgs)) and np.all(out[3] == 0)


@pytest.mark.parametrize("shape, size", [((2048, 2048), 256), ((512, 512), 256), ((64, 64), 128), ((37, 100), 32)])
def test_a_non_finite_pixel_anywhere_survives_the_resize(shape, size):
    """full_depth_pixels looks for NaN/inf after the resize: every source pixel must reach it."""
    rng = np.random.default_rng(5)
    h, w = shape
    spots = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, 0), (0, w // 2)]
    spots += [tuple(rng.integers(0, (h, w))) for _ in range(10)]
    for k, (i, j) in enumerate(spots):
        x = rng.normal(0, 1, shape).astype(np.float32)
        x[i, j] = (np.nan, np.inf, -np.inf)[k % 3]
        assert not np.isfinite(resize(x, size)).all(), (i, j)
