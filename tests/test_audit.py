"""The cross-site shortcut audit: the sites' numbers (common/audit.py), their meta-analysis and
flags (server/audit.py), and ``dicomfl synth --shortcut`` (a planted acquisition-field shortcut)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomfl.common import audit as A
from dicomfl.common.features import N_FEATURES, feature_names
from dicomfl.common.fedstats import feature_groups
from dicomfl.server import audit as S

NAMES = feature_names()
GROUPS = feature_groups()


def _site(rng: np.random.Generator, n: int, prevalence: float, shifts: dict[str, float], base: dict[str, float]):
    """Arrays of one made-up site: (features, labels, stats, images). Each numeric feature in
    ``base`` is present, drawn N(base, 0.05^2) and moved by ``shifts[f]`` x 0.05 on positives;
    every other numeric feature is missing; view_position is AP or PA at random."""
    y = (rng.random(n) < prevalence).astype(np.int64)
    f = np.zeros((n, N_FEATURES), np.float32)
    for name in ("patient_age_years", "pixel_spacing_mm", "slice_thickness_mm", "kvp", "exposure_mas", "bits_stored",
                 "rows", "columns", "frames", "pixel_signed", "rescale_intercept", "rescale_slope"):
        value, missing = GROUPS[name]
        if name in base:
            f[:, value] = base[name] + 0.05 * rng.standard_normal(n) + 0.05 * shifts.get(name, 0.0) * y
        else:
            f[:, missing] = 1.0
    ap = rng.random(n) < 0.5
    f[ap, NAMES.index("view_position=AP")] = 1.0
    f[~ap, NAMES.index("view_position=PA")] = 1.0
    f[:, NAMES.index("modality=DX")] = 1.0
    images = rng.normal(1000.0, 50.0, (n, 8, 8)).astype(np.float32)
    stats = np.stack([np.median(images.reshape(n, -1), axis=1),
                      np.percentile(images.reshape(n, -1), 99, axis=1) - np.percentile(images.reshape(n, -1), 1, axis=1)],
                     axis=1).astype(np.float32)
    return f, y, stats, images


BASE = {"kvp": 1.0, "exposure_mas": 0.4, "rows": 0.06, "pixel_spacing_mm": 0.7}


def test_site_numbers_combine_to_the_pooled_computation():
    """Each site's n/mean/var of every feature, combined, are the pooled data's own (no DP); the
    site's Hedges' g and log odds ratio are the textbook formulas on its raw values."""
    rng = np.random.default_rng(0)
    sites = [_site(rng, n, p, {"kvp": s}, BASE) for n, p, s in ((80, 0.3, 2.0), (120, 0.5, -1.0), (60, 0.4, 0.0))]
    replies = [A.site_audit(*s)[0] for s in sites]
    pooled, sigma = A.site_audit(*(np.concatenate([s[i] for s in sites]) for i in range(4)))
    assert sigma is None
    assert set(pooled) == A.audit_keys()
    for f in A.audit_features():
        n, mean, var = S.pooled_moments(*([r[A.audit_key(f, k)] for r in replies] for k in ("n", "mean", "var")))
        assert n == pooled[A.audit_key(f, "n")]
        if n:
            assert mean == pytest.approx(pooled[A.audit_key(f, "mean")], rel=1e-9, abs=1e-9)
            assert var == pytest.approx(pooled[A.audit_key(f, "var")], rel=1e-7, abs=1e-9)  # E[u2] - E[u]2 in float64
    n_tot = sum(r["audit.label.n"] for r in replies)
    assert n_tot == pooled["audit.label.n"] == 260
    assert sum(r["audit.label.n"] * r["audit.label.mean"] for r in replies) / n_tot == pytest.approx(pooled["audit.label.mean"])

    f, y, stats, images = sites[0]
    x = np.clip(f[:, GROUPS["kvp"][0]].astype(np.float64), 0.0, 2.0)
    x1, x0 = x[y == 1], x[y == 0]
    n1, n0 = len(x1), len(x0)
    sp = math.sqrt(((n1 - 1) * x1.var(ddof=1) + (n0 - 1) * x0.var(ddof=1)) / (n1 + n0 - 2))
    g = (1 - 3 / (4 * (n1 + n0) - 9)) * (x1.mean() - x0.mean()) / sp
    assert replies[0]["audit.kvp.effect"] == pytest.approx(g, abs=1e-9)
    assert replies[0]["audit.kvp.se"] == pytest.approx(math.sqrt((n1 + n0) / (n1 * n0) + g * g / (2 * (n1 + n0))), abs=1e-9)
    ap = f[:, NAMES.index("view_position=AP")] > 0.5
    a, b, c, d = ((y == 1) & ap).sum() + .5, ((y == 1) & ~ap).sum() + .5, ((y == 0) & ap).sum() + .5, ((y == 0) & ~ap).sum() + .5
    assert replies[0]["audit.view_position=AP.effect"] == pytest.approx(math.log(a * d / (b * c)), abs=1e-9)
    assert replies[0]["audit.view_position=AP.se"] == pytest.approx(math.sqrt(1 / a + 1 / b + 1 / c + 1 / d), abs=1e-9)
    # a level present everywhere, or a feature missing everywhere: not estimable (se 0)
    assert replies[0]["audit.modality=DX.se"] == 0 and replies[0]["audit.frames.se"] == 0
    assert replies[0]["audit.frames.n"] == 0
    # the image statistics come from the cached rows: mean intensity, robust range, field of view
    assert replies[0]["audit.image_mean.mean"] == pytest.approx(images.astype(np.float64).mean(), rel=1e-9)
    assert replies[0]["audit.image_range.mean"] == pytest.approx(stats[:, 1].astype(np.float64).mean(), rel=1e-6)
    fov = np.clip(f[:, GROUPS["rows"][0]].astype(np.float64) * 4096 * f[:, GROUPS["pixel_spacing_mm"][0]], 0, 1000)
    assert replies[0]["audit.field_of_view_mm.mean"] == pytest.approx(fov.mean(), rel=1e-9)
    assert replies[0]["audit.image_noise.n"] == 80


def test_random_effects_matches_a_dersimonian_laird_reference():
    y = np.array([0.42, -0.15, 1.10, 0.30])
    se = np.array([0.20, 0.25, 0.30, 0.15])
    v = se ** 2
    w = 1 / v
    fe = (w * y).sum() / w.sum()
    q = (w * (y - fe) ** 2).sum()
    df = len(y) - 1
    tau2 = max(0.0, (q - df) / (w.sum() - (w ** 2).sum() / w.sum()))
    ws = 1 / (v + tau2)
    re = (ws * y).sum() / ws.sum()
    re_se = 1 / math.sqrt(ws.sum())
    m = S.random_effects(y, se)
    assert m.k == 4
    assert m.pooled == pytest.approx(re, abs=1e-9)
    assert m.se == pytest.approx(re_se, abs=1e-9)
    assert m.ci_low == pytest.approx(re - S.Z95 * re_se, abs=1e-9)
    assert m.ci_high == pytest.approx(re + S.Z95 * re_se, abs=1e-9)
    assert m.q == pytest.approx(q, abs=1e-9)
    assert m.tau2 == pytest.approx(tau2, abs=1e-9)
    assert m.i2 == pytest.approx(max(0.0, (q - df) / q), abs=1e-9)
    # homogeneous studies (Q < k - 1): tau2 truncated at 0, I2 = 0, the fixed-effect estimate
    h = S.random_effects([0.5, 0.52, 0.49], [0.1, 0.1, 0.1])
    assert h.tau2 == 0 and h.i2 == 0 and h.pooled == pytest.approx(0.5033333333333333, abs=1e-12)
    assert h.se == pytest.approx(0.1 / math.sqrt(3), abs=1e-12)
    assert h.ci_low == pytest.approx(h.pooled - S.Z95 * h.se, abs=1e-12)


def _replies(shift_by_site: list[dict[str, float]], n: int = 150, prevalence=(0.4, 0.4, 0.4)):
    rng = np.random.default_rng(1)
    return {f"site-{i}": A.site_audit(*_site(rng, n, p, shifts, BASE))[0]
            for i, (shifts, p) in enumerate(zip(shift_by_site, prevalence))}


def test_a_sign_flip_is_flagged_and_a_consistent_feature_kept(tmp_path):
    # kvp: strong +, strong -, nothing; exposure: strongly predictive the same way everywhere
    replies = _replies([{"kvp": 2.0, "exposure_mas": 1.5}, {"kvp": -2.0, "exposure_mas": 1.5},
                        {"kvp": 0.0, "exposure_mas": 1.5}])
    res = S.combine(replies)
    kvp, exp = res.features["kvp"], res.features["exposure_mas"]
    assert kvp.shortcut and kvp.sign_disagreement and kvp.meta.i2 >= S.I2_MIN
    assert kvp.strong_positive == ["site-0"] and kvp.strong_negative == ["site-1"] and kvp.absent == ["site-2"]
    assert not exp.flagged and exp.meta.pooled > 1.0 and exp.meta.ci_low > 0
    assert res.shortcuts == ["kvp"] and res.proxies == []  # same label rate everywhere: no proxy
    assert S.features_to_drop(res) == ["kvp"] == S.features_to_drop(res, "drop")
    assert S.features_to_drop(res, "warn") == [] == S.features_to_drop(res, "keep")
    with pytest.raises(ValueError, match="features.shortcuts"):
        S.features_to_drop(res, "maybe")
    assert "site-specific shortcut" in kvp.reason()
    png = S.forest_plots(res, tmp_path)
    assert png == [tmp_path / "forest-kvp.png"] and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # strong at one site and absent at the other two: flagged as well
    one = S.combine(_replies([{"kvp": 2.5}, {}, {}]))
    assert one.shortcuts == ["kvp"] and not one.features["kvp"].sign_disagreement

    # a site-constant feature whose sites differ in label rate: a site proxy (its level drops the group)
    rng = np.random.default_rng(2)
    proxy = {}
    for i, (p, spacing) in enumerate(((0.2, 0.6), (0.5, 0.8), (0.7, 1.0))):
        f, y, st, im = _site(rng, 200, p, {}, BASE)
        f[:, GROUPS["pixel_spacing_mm"][0]] = spacing
        f[:, GROUPS["rows"][0]] = 0.0625  # 256 rows
        proxy[f"site-{i}"] = A.site_audit(f, y, st, im)[0]
    pr = S.combine(proxy)
    assert pr.label_rates_differ and pr.features["pixel_spacing_mm"].proxy
    assert pr.features["pixel_spacing_mm"].between_share == pytest.approx(1.0)
    assert "pixel_spacing_mm" in S.features_to_drop(pr) and "kvp" not in S.features_to_drop(pr)
    assert "pixel_spacing_mm" not in S.features_to_drop(pr, kinds=("shortcut",))
    # constant within each site (rows x spacing here): no within-site effect to estimate
    assert pr.features["field_of_view_mm"].sites == [] and pr.features["field_of_view_mm"].meta is None


def test_a_bad_reply_is_left_out_with_one_line():
    replies = _replies([{"kvp": 2.0}, {"kvp": -2.0}, {}])
    replies["site-1"] = dict(replies["site-1"], **{"audit.kvp.se": float("nan")})
    replies["site-2"] = {k: v for k, v in replies["site-2"].items() if k != "audit.label.mean"}
    res = S.combine(replies)
    assert res.sites == ["site-0"]
    assert res.refused == {"site-1": "audit.kvp.se: missing or not a finite number",
                           "site-2": "audit.label.mean: missing or not a finite number"}
    assert not res.flagged  # one site: no heterogeneity to see


def test_dp_release_is_calibrated_and_post_processed():
    rng = np.random.default_rng(3)
    f, y, st, im = _site(rng, 3000, 0.4, {"kvp": 2.0}, BASE)
    exact = A.site_sums(f, y, st, im)
    noisy, sigma = A.noisy_sums(exact, 2.0, np.random.default_rng(4))
    assert sigma == 2.0
    d = len(A.audit_features())
    assert A.sensitivity(d) == math.sqrt(3 * d + 1)
    # the noise of every number has std sigma x sensitivity (checked on the un-clamped label counts)
    draws = [A.noisy_sums(exact, 2.0, np.random.default_rng(k))[0].sum for k in range(200)]
    resid = np.stack(draws) - exact.sum[None]
    far = (exact.sum > 300) & (exact.count - exact.sum > 300)  # sums far from their clamps [0, count]
    assert far.sum() >= 4
    inner = resid[:, far]
    assert inner.std() == pytest.approx(2.0 * A.sensitivity(d), rel=0.1)
    assert (noisy.count >= 0).all() and (noisy.sum <= noisy.count).all() and (noisy.sum >= 0).all()
    assert (noisy.sumsq <= noisy.sum + 1e-9).all()
    # the SEs of a noisy reply carry the DP noise too (post-processing of the released sums)
    plain = A.summarize(noisy)
    inflated = A.with_noise_se(plain, noisy, 2.0, np.random.default_rng(6))
    ses = [k for k in plain if k.endswith(".se") and plain[k] > 0]
    assert ses and all(inflated[k] > plain[k] for k in ses)
    assert {k: v for k, v in inflated.items() if not k.endswith(".se")} == {k: v for k, v in plain.items() if not k.endswith(".se")}
    reply, used = A.site_audit(f, y, st, im, sigma=2.0, rng=np.random.default_rng(5))
    assert used == 2.0 and set(reply) == A.audit_keys()
    A.parse_reply(reply)  # a noisy reply is still a well-formed one
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise multiplier"):
            A.noisy_sums(exact, bad)


def _dicom_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and ("dicom" in p.relative_to(out).parts or p.name == "labels.csv"):
            h.update(str(p.relative_to(out)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


#: The DICOM files and labels of ``synth(sites=3, per_site=12, seed=3, image_size=16)`` as written
#: by the generator before ``--shortcut`` existed (main at e082932): the default stays byte-identical.
DEFAULT_DIGEST = "c3383676c9e90a40162daea4e9a7ec3aa2c336004b93f3a9a7919f106675a112"


def test_synth_default_unchanged_and_shortcut_changes_only_its_field(tmp_path):
    from typer.testing import CliRunner

    from dicomfl.workbench.cli import app
    from dicomfl.workbench.synth import synth

    synth(tmp_path / "default", sites=3, per_site=12, seed=3, image_size=16)
    assert _dicom_digest(tmp_path / "default") == DEFAULT_DIGEST
    synth(tmp_path / "kvp", sites=3, per_site=12, seed=3, image_size=16, shortcut="kvp:+,-,0")
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*")
                   if p.is_file() and "dicom" in p.parts and "BAD" not in p.parts)
    assert len(files) == 36
    for rel in files:
        a, b = pydicom.dcmread(tmp_path / "default" / rel), pydicom.dcmread(tmp_path / "kvp" / rel)
        assert a.KVP != b.KVP or rel.parts[0] == "site-c"
        del a.KVP, b.KVP
        assert a == b and a.PixelData == b.PixelData
    assert (tmp_path / "default" / "site-a" / "labels.csv").read_bytes() == (tmp_path / "kvp" / "site-a" / "labels.csv").read_bytes()
    assert "`KVP` goes with the label" in (tmp_path / "kvp" / "README.md").read_text()

    for bad, says in (("exposure:+,-", "one sign (+, - or 0) per site"), ("vendor:+,-,0", "FIELD:SIGNS"),
                      ("exposure", "FIELD:SIGNS")):
        r = CliRunner().invoke(app, ["synth", str(tmp_path / "bad"), "--shortcut", bad])
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def _cohort_audit(out: Path, shortcut: str | None) -> S.AuditResult:
    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest
    from dicomfl.workbench.synth import synth

    r = synth(out, sites=3, per_site=60, seed=0, image_size=16, shortcut=shortcut)
    replies = {}
    for s in r.sites:
        (out / s["name"] / "site.key").write_text(hashlib.sha256(f"dicomfl-test-key/{s['name']}".encode()).hexdigest())
        data = ingest(load_site_config(out / s["name"] / "site.yaml"), use_cache=True, workers=1).data
        replies[s["name"]], sigma = A.site_audit_of(data)
        assert sigma is None
    return S.combine(replies)


def test_the_audit_flags_the_planted_field_of_a_synth_cohort(tmp_path):
    """From the ingested caches: the planted header field is the one schema feature flagged as a
    shortcut (and dropped); the default cohort flags no schema feature as one. The image statistics (warn-only) flag
    the default cohort's own planted pixel confounders (site-b's collimation border raises the
    mean intensity of its positives), the same on both cohorts: their pixels are the same."""
    planted = _cohort_audit(tmp_path / "shortcut", "exposure:+,-,0")
    exp = planted.features["exposure_mas"]
    assert exp.shortcut and exp.sign_disagreement
    assert exp.strong_positive == ["site-a"] and exp.strong_negative == ["site-b"] and exp.absent == ["site-c"]
    assert S.features_to_drop(planted) == ["exposure_mas"]
    assert [f for f in planted.shortcuts if A.schema_feature(f) is not None] == ["exposure_mas"]
    # a site proxy (flagged when the sites' label rates differ, as at some seeds) is a pure site
    # identifier here: constant within every site, so its effect is estimable nowhere
    assert all(fa.sites == [] for fa in planted.flagged if fa.proxy and fa.schema_feature is not None)

    default = _cohort_audit(tmp_path / "default", None)
    assert [f for f in default.shortcuts if A.schema_feature(f) is not None] == []
    assert S.features_to_drop(default, kinds=("shortcut",)) == []
    assert all(fa.sites == [] for fa in default.flagged if fa.proxy and fa.schema_feature is not None)
    image_flags = {fa.feature for fa in default.flagged}
    assert image_flags <= set(A.IMAGE_STATS)
    assert image_flags == {fa.feature for fa in planted.flagged if fa.schema_feature is None}
    assert default.features["image_mean"].strong_positive == ["site-b"]
