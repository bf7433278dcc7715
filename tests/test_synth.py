"""The generated cohort: real DICOM (pydicom and dcmtk agree), ingestion round trip with the
expected rejects, no fake PHI in any ingestion output, determinism, and a site confounder that
a single-site model leans on."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest

from dicomfl.common.config import load_site_config
from dicomfl.common.ingest import ingest, read_rejects_map
from dicomfl.workbench.synth import synth

from .phi import found_in, identifying_values

BAD = {"TRUNC01": "truncated", "NOPIX01": "no-pixel-data", "BURNED01": "burned-in-annotation",
       "SR01": "non-image-sop-class", "export-notes.txt": "not-dicom"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    r = subprocess.run([sys.executable, "-m", "dicomfl.workbench.cli", "synth", str(out), "--sites", "3",
                        "--per-site", "60", "--seed", "7", "--image-size", "32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def _good_files(cohort):
    return sorted(p for p in cohort.rglob("*") if p.is_file() and "/dicom/" in str(p) and "/BAD/" not in str(p))


def test_layout_and_configs(cohort):
    for s in ("site-a", "site-b", "site-c"):
        for f in ("labels.csv", "site.key", "site.yaml"):
            assert (cohort / s / f).is_file()
        load_site_config(cohort / s / "site.yaml")
    assert (cohort / "run.yaml").is_file() and (cohort / "coordinator.yaml").is_file()
    from dicomfl.workbench.bench import load_bench_config

    bench = load_bench_config(cohort / "bench.yaml")  # the default grid: converged budget, paired comparisons
    assert (bench.rounds, bench.replicates, bench.seeds) == (25, 1000, [0, 1, 2]) and len(bench.sites) == 3
    readme = (cohort / "README.md").read_text()
    assert "| site-b | Borealis Imaging |" in readme and "MONOCHROME1" in readme
    files = _good_files(cohort)
    assert len(files) == 180
    assert any(not f.name.endswith(".dcm") for f in files) and any(f.name.endswith(".dcm") for f in files)


def test_every_good_file_reads_without_warnings_in_pydicom(cohort):
    syntaxes = set()
    for f in _good_files(cohort):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.dcmread(f)
            ds.pixel_array  # noqa: B018
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        assert ds.PatientName and ds.PatientBirthDate and ds.InstitutionName and ds.AccessionNumber
        assert 0x00111010 in ds  # private tag holding the name
    assert len(syntaxes) == 3


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk is installed by .ci/run")
def test_dcmtk_reads_every_good_file(cohort):
    files = [str(f) for f in _good_files(cohort)]
    r = subprocess.run(["dcmftest", *files], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("yes:") == len(files)
    for f in files:
        d = subprocess.run(["dcmdump", "-q", "+L", f], capture_output=True, text=True)
        assert d.returncode == 0 and d.stderr == "", (f, d.stderr[:200])


def test_ingest_round_trip_and_no_fake_phi_anywhere(cohort):
    phi: set[str] = set()
    for f in _good_files(cohort):
        phi |= identifying_values(pydicom.dcmread(f))
    phi |= {l.split(",")[0] for s in ("site-a", "site-b", "site-c") for l in (cohort / s / "labels.csv").read_text().splitlines()[1:]}
    for s in ("site-a", "site-b", "site-c"):
        cfg = load_site_config(cohort / s / "site.yaml")
        res = ingest(cfg)
        rep = res.report
        assert rep.accepted == 60 and rep.labelled == 60 and rep.rejected == 5
        assert rep.rejected_by_reason == {v: 1 for v in BAD.values()}
        # Rejected files are named by reference; only the operator's map (0600) holds their paths.
        paths = read_rejects_map(cfg.site.state_dir)
        assert all(r["file"].startswith("file:") and "/" not in r["file"] for r in rep.rejects)
        assert {paths[r["file"]].split("/")[-1]: r["reason"] for r in rep.rejects} == BAD
        assert set(np.unique(res.data.labels)) == {0, 1}
        # patients never straddle splits
        by_patient = {}
        for p, sp in zip(res.data.patients, res.data.split):
            assert by_patient.setdefault(p, sp) == sp
        blobs = [json.dumps(rep.to_json()).encode()]
        blobs += [p.read_bytes() for p in cfg.site.state_dir.rglob("*") if p.is_file()]
        leaked = [v for v in phi if any(found_in(v, b) for b in blobs)]
        assert not leaked, leaked[:5]
    assert len(phi) > 500


def test_same_seed_same_pixels_and_labels(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth(a, sites=2, per_site=6, seed=3)
    synth(b, sites=2, per_site=6, seed=3)

    def digest(root):
        h = hashlib.sha256()
        for f in sorted(root.rglob("IM*")):
            h.update(pydicom.dcmread(f).PixelData)
        for s in ("site-a", "site-b"):
            h.update((root / s / "labels.csv").read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b)
    c = tmp_path / "c"
    synth(c, sites=2, per_site=6, seed=4)
    assert digest(c) != digest(a)


def test_test_fraction_is_written_to_each_site_config(tmp_path):
    """A benchmark cohort: big test splits (the precision of a site's AUROC), from --test-fraction."""
    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest
    from dicomfl.common.splits import TEST

    synth(tmp_path / "big", sites=1, per_site=90, seed=2, image_size=16, test_fraction=0.6)
    cfg = load_site_config(tmp_path / "big" / "site-a" / "site.yaml")
    assert (cfg.splits.val, cfg.splits.test) == (0.15, 0.6)
    data = ingest(cfg).data
    assert 0.45 < len(data.subset(TEST)) / len(data.labels) < 0.75  # patients are split, not images
    synth(tmp_path / "plain", sites=1, per_site=6, seed=2)
    assert "splits" not in (tmp_path / "plain" / "site-a" / "site.yaml").read_text()  # the site default
    with pytest.raises(ValueError, match="--test-fraction"):
        synth(tmp_path / "bad", sites=1, per_site=6, test_fraction=0.9)


def test_single_site_model_leans_on_its_confounder(tmp_path):
    """A simple classifier on image statistics (not the CNN): trained on one site it scores high at
    home and loses clearly at the other sites; trained on all sites it holds up everywhere."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    out = tmp_path / "c"
    synth(out, sites=3, per_site=240, seed=11, image_size=32)
    data = {}
    for s in ("site-a", "site-b", "site-c"):
        res = ingest(load_site_config(out / s / "site.yaml"))
        imgs = res.data.images
        lo = np.percentile(imgs, 1, axis=(1, 2), keepdims=True)
        hi = np.percentile(imgs, 99, axis=(1, 2), keepdims=True)
        x = ((imgs - lo) / (hi - lo + 1e-6)).reshape(len(imgs), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(imgs), -1)
        x = np.concatenate([x, imgs.reshape(len(imgs), -1).mean(1, keepdims=True) / (np.abs(imgs).max() + 1)], 1)
        y = res.data.labels
        half = len(y) // 2
        data[s] = (x[:half], y[:half], x[half:], y[half:])

    def fit(sites):
        X = np.concatenate([data[s][0] for s in sites])
        Y = np.concatenate([data[s][1] for s in sites])
        return LogisticRegression(C=10.0, max_iter=5000).fit(X, Y)

    gaps, away = [], []
    for home in data:
        m = fit([home])
        auc_home = roc_auc_score(data[home][3], m.predict_proba(data[home][2])[:, 1])
        auc_away = np.mean([roc_auc_score(data[o][3], m.predict_proba(data[o][2])[:, 1]) for o in data if o != home])
        gaps.append(auc_home - auc_away)
        away.append(auc_away)
    pooled = fit(list(data))
    pooled_aucs = [roc_auc_score(data[s][3], pooled.predict_proba(data[s][2])[:, 1]) for s in data]
    print("single-site gaps", np.round(gaps, 3), "away", np.round(away, 3), "pooled", np.round(pooled_aucs, 3))
    assert np.mean(gaps) > 0.2  # single-site models lose clearly away from home
    assert np.mean(pooled_aucs) > np.mean(away) + 0.1  # training across sites generalises better


def test_fast_writer_writes_exactly_what_pydicom_writes(tmp_path):
    """The per-site writer (cached encodings of repeated elements) is byte-identical to dcmwrite."""
    import copy

    from dicomfl.workbench import synth as S

    pat = {"id": "X1", "name": "Doe^Jane", "sex": "F", "birth": S.dt.date(1950, 1, 1),
           "first_study": S.dt.date(2022, 1, 1), "referrer": "Ref^Doc", "house": 12, "age": 70.0}
    rng = np.random.default_rng(0)
    for p in S.PROFILES:
        w = S._Writer(S.SYNTAXES[p.syntax])
        for k in range(3):  # the second and third files reuse the cached encodings
            ds = S._image_dataset(p, S._base_dataset(p, 0, pat, 0, k, np.random.default_rng(k)),
                                  S.phantom(rng, p.matrix, bool(k % 2), False, p), "PA")
            a, b = copy.deepcopy(ds), copy.deepcopy(ds)
            S._save(a, tmp_path / f"{p.name}-{k}-ref", S.SYNTAXES[p.syntax], ds.SOPClassUID)
            w.save(b, tmp_path / f"{p.name}-{k}-fast", ds.SOPClassUID)
            assert (tmp_path / f"{p.name}-{k}-ref").read_bytes() == (tmp_path / f"{p.name}-{k}-fast").read_bytes()
            got = pydicom.dcmread(tmp_path / f"{p.name}-{k}-fast")
            assert got.file_meta.MediaStorageSOPInstanceUID == got.SOPInstanceUID == ds.SOPInstanceUID
