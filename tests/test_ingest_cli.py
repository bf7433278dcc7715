"""Ingestion end to end through the CLI: config errors, bad input, labels join, cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomfl.common.config import load_site_config
from dicomfl.common.errors import ConfigError
from dicomfl.common.ingest import ingest, read_rejects_map

from .conftest import write_site

DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]


def _run(*args, **kw):
    return subprocess.run([*DICOMFL, *args], capture_output=True, text=True, timeout=300, **kw)


def _small_site(tmp_path: Path) -> Path:
    d = tmp_path / "export" / "STUDY1" / "SERIES1"
    d.mkdir(parents=True)
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"]):
        shutil.copy(get_testdata_file(name), d / f"IM{i:04d}")  # no extension, like PACS exports
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (d / "TRUNC").write_bytes(data[: len(data) // 2])
    (d / "EMPTY").write_bytes(b"")
    (d / "notes.txt").write_text("not dicom")
    return tmp_path / "export"


def test_config_errors_name_the_key_and_exit_2(tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("site: {name: a, dicom_dir: nowhere, secret_file: k, state_dir: s, colour: red}\n")
    r = _run("ingest", str(bad))
    assert r.returncode == 2
    assert "site.colour: unknown key" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="site.dicom_dir"):
        cfg = tmp_path / "s2.yaml"
        cfg.write_text("site: {name: a, dicom_dir: nowhere, secret_file: k, state_dir: s}\n")
        load_site_config(cfg)


def test_bad_input_is_rejected_per_file_and_work_goes_on(tmp_path):
    export = _small_site(tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nSTUDY1/SERIES1/IM0000,1\nSTUDY1/SERIES1/IM0001,0\nSTUDY1/SERIES1/IM0001,1\n")
    site = write_site(tmp_path, export, site={"labels": str(labels)}, preprocess={"image_size": 64})
    rep_path = tmp_path / "report.json"
    r = _run("ingest", str(site), "--report", str(rep_path))
    assert r.returncode == 0, r.stderr
    rep = json.loads(rep_path.read_text())
    assert rep["seen"] == 7 and rep["accepted"] == 3 and rep["rejected"] == 4
    assert rep["rejected_by_reason"] == {
        "empty-file": 1, "non-image-sop-class": 1, "not-dicom": 1, "truncated": 1,
    }
    # named by a site-local reference; the operator's map (0600) says which path it is
    refs = {rel: ref for ref, rel in read_rejects_map(tmp_path / "state").items()}
    assert f"rejected {refs['STUDY1/SERIES1/TRUNC']}: truncated" in r.stderr
    assert "STUDY1" not in r.stderr + r.stdout + json.dumps(rep)
    assert {x["file"] for x in rep["rejects"]} == set(refs.values())
    assert rep["labelled"] == 1  # IM0001 had conflicting labels: dropped
    assert any("row 4" in p for p in rep["label_problems"])
    assert (tmp_path / "state" / "logs" / "ingest.log").read_text().count("rejected") >= 3


def test_absurd_dimensions_capped(tmp_path):
    export = _small_site(tmp_path)
    site = write_site(tmp_path, export, preprocess={"max_pixels": 1000})
    res = ingest(load_site_config(site), use_cache=False)
    assert res.report.rejected_by_reason.get("too-large") == 4


def test_cache_warm_run_decodes_nothing_and_sees_changes(tmp_path):
    export = _small_site(tmp_path)
    cfg = load_site_config(write_site(tmp_path, export, preprocess={"image_size": 32}))
    cold = ingest(cfg)
    assert cold.report.decoded == 7
    warm = ingest(cfg)
    assert warm.report.decoded == 0 and warm.report.cache_hits == 7
    np.testing.assert_array_equal(cold.data.images, warm.data.images)
    np.testing.assert_array_equal(cold.data.features, warm.data.features)
    # a changed file is decoded again; the rest comes from the cache
    target = export / "STUDY1" / "SERIES1" / "IM0001"
    ds = pydicom.dcmread(target)
    ds.PixelData = (ds.pixel_array[::-1].copy()).tobytes()
    ds.save_as(target)
    os.utime(target, ns=(1, 1))
    again = ingest(cfg)
    assert again.report.decoded == 1 and again.report.cache_hits == 6
    # a different pipeline setting invalidates the whole cache
    cfg.preprocess.image_size = 16
    assert ingest(cfg).report.decoded == 7


def test_label_join_by_accession_number(tmp_path):
    export = _small_site(tmp_path)
    acc = str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).get("AccessionNumber", ""))
    ds = pydicom.dcmread(export / "STUDY1" / "SERIES1" / "IM0001")
    ds.AccessionNumber = "ACC77"
    ds.save_as(export / "STUDY1" / "SERIES1" / "IM0001")
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nACC77,1\nNOPE,0\n")
    cfg = load_site_config(write_site(tmp_path, export, site={"labels": str(labels), "label_key": "accession_number"}))
    res = ingest(cfg)
    assert res.report.labelled == 1 and res.report.label_rows_unmatched == 1
    assert sorted(res.data.labels.tolist()).count(1) == 1
    assert acc == "" or acc not in json.dumps(res.report.to_json())
