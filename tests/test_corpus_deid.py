"""Real corpora: every file is accepted or rejected with a reason, and for every accepted file
no identifying value of the original header survives anywhere ingestion writes or returns."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from dicomfl.common.config import load_site_config
from dicomfl.common.deid import Deidentifier
from dicomfl.common.features import N_FEATURES
from dicomfl.common.ingest import ingest, process_file
from dicomfl.common.reader import read_dataset

from .conftest import write_site
from .phi import dataset_text, found_in, identifying_values


@pytest.fixture(scope="module")
def corpus_run(corpus_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    cfg = load_site_config(write_site(tmp, corpus_dir))
    deid = Deidentifier(cfg.secret_key, cfg.deid)
    per_file = {}
    for f in sorted(corpus_dir.iterdir()):
        data = f.read_bytes()
        rec, img, feats = process_file(data, f.name, "content-key", cfg, deid)
        entry = {"record": rec, "image": img, "features": feats}
        if rec.status == "accepted":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                original = read_dataset(data)
                entry["phi"] = identifying_values(original)
                deidentified = read_dataset(data)
                deid.apply(deidentified, deid.patient_pseudonym(deidentified, "x"))
                entry["deid"] = deidentified
        per_file[f.name] = entry
    result = ingest(cfg)
    return cfg, per_file, result


def test_every_file_accepted_or_rejected_with_reason(corpus_run):
    _, per_file, result = corpus_run
    assert len(per_file) > 250
    reasons = Counter()
    for name, e in per_file.items():
        rec = e["record"]
        assert rec.status in ("accepted", "rejected"), name
        if rec.status == "rejected":
            assert rec.reason and rec.reason != "internal-error", (name, rec.reason, rec.detail)
            reasons[rec.reason] += 1
        else:
            assert e["image"].dtype == np.float32 and e["image"].shape == (128, 128)
            assert np.isfinite(e["image"]).all()
            assert e["features"].dtype == np.float32 and e["features"].shape == (N_FEATURES,)
    accepted = sum(e["record"].status == "accepted" for e in per_file.values())
    assert accepted >= 140
    # The corpus holds each kind of reject the ingestion must recognise.
    for reason in ("non-image-sop-class", "no-pixel-data", "burned-in-annotation", "not-dicom", "no-decoder"):
        assert reasons[reason] > 0, reason
    rep = result.report
    assert rep.seen == len(per_file) and rep.accepted + rep.rejected == rep.seen
    assert sum(rep.rejected_by_reason.values()) == rep.rejected


def test_no_identifying_value_survives_deidentification(corpus_run):
    _, per_file, _ = corpus_run
    leaks = []
    checked = 0
    for name, e in per_file.items():
        if "deid" not in e:
            continue
        ds = e["deid"]
        text = dataset_text(ds)
        for value in e["phi"]:
            checked += 1
            if value in text:
                leaks.append((name, value[:3] + "..."))
        # No private element survives, at any depth.
        def walk(d):
            for elem in d:
                assert not elem.tag.is_private, (name, str(elem.tag))
                assert (elem.tag.group & 0xFF00) not in (0x5000, 0x6000), (name, str(elem.tag))
                if elem.VR == "SQ":
                    for item in elem.value:
                        walk(item)
        walk(ds)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.PatientID.startswith("p")
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if kw in ds:
                assert str(ds.data_element(kw).value).startswith("2.25."), (name, kw)
    assert checked > 500
    assert not leaks, leaks[:20]


def test_nothing_identifying_in_cache_or_report(corpus_run, tmp_path):
    cfg, per_file, result = corpus_run
    phi = set()
    for e in per_file.values():
        phi |= e.get("phi", set())
    assert len(phi) > 300
    blobs = []
    for p in (cfg.site.state_dir / "cache").rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes())
    blobs.append(json.dumps(result.report.to_json()).encode())
    for p in (cfg.site.state_dir / "logs").rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes())
    found = [v for v in phi if any(found_in(v, b) for b in blobs)]
    assert not found, [v[:3] + "..." for v in found]
    # Features are numbers only, computed from the de-identified header.
    assert result.data.features.dtype == np.float32
    assert result.data.images.dtype == np.float32
