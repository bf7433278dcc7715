"""Metadata features: a fixed, versioned schema shared by every site.

Every site turns the *de-identified* header into the same vector, with fixed transforms (no
per-site statistics, which would have to be shared). Each numeric feature contributes a value and
a missing indicator; each categorical feature a one-hot over its categories plus ``other`` (a
value never seen when the schema was written) and ``missing``. Patient age is computed from the
original header *before* de-identification removes the dates (see :func:`patient_age_years`) and
is used only when the site retains patient characteristics.

Never features: anything identifying, and site proxies (institution, station, device serial,
manufacturer, model, software version) that would let a model recognise the hospital.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

SCHEMA_VERSION = 1


def _get(ds: Dataset, keyword: str):
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - unreadable value counts as missing
        return None
    if value is None or value == "":
        return None
    return value


def _float(value) -> float | None:
    try:
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0]
        f = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return f if math.isfinite(f) else None


def _spacing(ds: Dataset) -> float | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = _get(ds, kw)
        if v is not None:
            try:
                vals = [float(x) for x in (v if hasattr(v, "__len__") and not isinstance(v, str) else [v])]
                vals = [x for x in vals if math.isfinite(x) and x > 0]
                if vals:
                    return sum(vals) / len(vals)
            except (TypeError, ValueError):
                continue
    return None


def _exposure_mas(ds: Dataset) -> float | None:
    v = _float(_get(ds, "Exposure"))
    if v is not None:
        return v
    v = _float(_get(ds, "ExposureInuAs"))
    if v is not None:
        return v / 1000.0
    ma, ms = _float(_get(ds, "XRayTubeCurrent")), _float(_get(ds, "ExposureTime"))
    if ma is not None and ms is not None:
        return ma * ms / 1000.0
    return None


@dataclass(frozen=True)
class Numeric:
    name: str
    extract: Callable[[Dataset], float | None]
    transform: Callable[[float], float]


@dataclass(frozen=True)
class Categorical:
    name: str
    keyword: str
    categories: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()


def _kw(keyword: str) -> Callable[[Dataset], float | None]:
    return lambda ds: _float(_get(ds, keyword))


def _clip(lo: float, hi: float) -> Callable[[float], float]:
    return lambda x: min(max(x, lo), hi)


NUMERIC: tuple[Numeric, ...] = (
    Numeric("patient_age_years", lambda ds: None, lambda x: min(max(x, 0.0), 120.0) / 100.0),
    Numeric("pixel_spacing_mm", _spacing, lambda x: min(x, 5.0)),
    Numeric("slice_thickness_mm", _kw("SliceThickness"), lambda x: min(max(x, 0.0), 50.0) / 10.0),
    Numeric("kvp", _kw("KVP"), lambda x: min(max(x, 0.0), 200.0) / 100.0),
    Numeric("exposure_mas", _exposure_mas, lambda x: math.log1p(min(max(x, 0.0), 1e5)) / 5.0),
    Numeric("bits_stored", _kw("BitsStored"), lambda x: min(max(x, 0.0), 32.0) / 16.0),
    Numeric("rows", _kw("Rows"), lambda x: min(max(x, 0.0), 16384.0) / 4096.0),
    Numeric("columns", _kw("Columns"), lambda x: min(max(x, 0.0), 16384.0) / 4096.0),
    Numeric("frames", lambda ds: _float(_get(ds, "NumberOfFrames")) or 1.0, lambda x: math.log1p(max(x, 1.0)) / 5.0),
    Numeric("pixel_signed", _kw("PixelRepresentation"), _clip(0.0, 1.0)),
    Numeric("rescale_intercept", _kw("RescaleIntercept"), lambda x: max(min(x, 4096.0), -4096.0) / 1024.0),
    Numeric("rescale_slope", _kw("RescaleSlope"), lambda x: max(min(x, 100.0), -100.0)),
)

CATEGORICAL: tuple[Categorical, ...] = (
    Categorical("modality", "Modality", ("CR", "DX", "CT", "MR", "MG", "US", "PT", "NM", "XA", "RF", "OT", "SC")),
    Categorical("view_position", "ViewPosition", ("AP", "PA", "LATERAL"),
                (("LL", "LATERAL"), ("RL", "LATERAL"), ("LAT", "LATERAL"), ("LLD", "LATERAL"), ("RLD", "LATERAL"))),
    Categorical("body_part", "BodyPartExamined", ("CHEST", "ABDOMEN", "HEAD", "PELVIS", "SPINE", "EXTREMITY", "BREAST"),
                (("BRAIN", "HEAD"), ("SKULL", "HEAD"), ("THORAX", "CHEST"), ("LSPINE", "SPINE"), ("CSPINE", "SPINE"),
                 ("TSPINE", "SPINE"), ("HAND", "EXTREMITY"), ("KNEE", "EXTREMITY"), ("FOOT", "EXTREMITY"))),
    Categorical("photometric", "PhotometricInterpretation", ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR", "PALETTE COLOR"),
                (("YBR_FULL", "YBR"), ("YBR_FULL_422", "YBR"), ("YBR_RCT", "YBR"), ("YBR_ICT", "YBR"), ("YBR_PARTIAL_420", "YBR"))),
    Categorical("patient_sex", "PatientSex", ("M", "F", "O")),
)


def feature_names() -> list[str]:
    names: list[str] = []
    for n in NUMERIC:
        names += [n.name, f"{n.name}__missing"]
    for c in CATEGORICAL:
        names += [f"{c.name}={v}" for v in c.categories] + [f"{c.name}=other", f"{c.name}=missing"]
    return names


N_FEATURES = len(feature_names())


def patient_age_years(original: Dataset) -> float | None:
    """Age in years from Patient's Age, else (study/acquisition/content date - birth date).

    Runs on the original header, before dates are removed; the dates themselves go no further.
    """
    age = _get(original, "PatientAge")
    if age is not None:
        s = str(age).strip().upper()
        try:
            n, unit = float(s[:-1]), s[-1]
            factor = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}.get(unit)
            if factor is not None:
                return n * factor
        except (ValueError, IndexError):
            pass
    birth = _get(original, "PatientBirthDate")
    for kw in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        when = _get(original, kw)
        if birth is not None and when is not None:
            try:
                b = _dt.datetime.strptime(str(birth)[:8], "%Y%m%d").date()
                w = _dt.datetime.strptime(str(when)[:8], "%Y%m%d").date()
            except ValueError:
                return None
            years = (w - b).days / 365.25
            return years if 0 <= years <= 130 else None
    return None


def extract(ds: Dataset, age_years: float | None = None) -> np.ndarray:
    """The schema-v1 feature vector of a de-identified dataset (float32, length N_FEATURES)."""
    out: list[float] = []
    for n in NUMERIC:
        v = age_years if n.name == "patient_age_years" else n.extract(ds)
        if v is None:
            out += [0.0, 1.0]
        else:
            out += [float(n.transform(v)), 0.0]
    for c in CATEGORICAL:
        onehot = [0.0] * (len(c.categories) + 2)
        raw = _get(ds, c.keyword)
        if raw is None or not str(raw).strip():
            onehot[-1] = 1.0
        else:
            v = str(raw).strip().upper()
            v = dict(c.aliases).get(v, v)
            if v.startswith("YBR") and c.name == "photometric":
                v = "YBR"
            idx = c.categories.index(v) if v in c.categories else len(c.categories)
            onehot[idx] = 1.0
        out += onehot
    return np.asarray(out, dtype=np.float32)


def modality_of(ds: Dataset) -> str:
    m = _get(ds, "Modality")
    return str(m).strip().upper() if m is not None and str(m).strip() else "unknown"
