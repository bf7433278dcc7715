"""``dicomfl site status`` shows an ingestion that the site's warm worker ran during a round,
not only one run by ``dicomfl ingest``: the ingestion itself writes ``reports/ingest.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dicomfl.client.transport.warm import _warm_resolver
from dicomfl.common.config import ModelConfig
from dicomfl.workbench.synth import synth

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(mode="fused", image_size=16, width=4, depth=1, meta_hidden=8, head_hidden=8)


def _status(site_yaml: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dicomfl.workbench.cli", "site", "status", str(site_yaml), *extra],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


def test_site_status_reports_an_ingestion_the_warm_worker_ran_in_a_round(tmp_path):
    synth(tmp_path / "cohort", sites=1, per_site=6, seed=3, image_size=16)
    site_yaml = next((tmp_path / "cohort").glob("*/site.yaml"))
    dicom = site_yaml.parent / "dicom"
    n_files = sum(1 for p in dicom.rglob("*") if p.is_file())
    assert "ingest: never run" in _status(site_yaml).stdout

    # A train message of run 1 reaches the site's warm worker: it opens the site's data for the
    # run (this is where the worker ingests), exactly as its handler does.
    site = _warm_resolver(site_yaml)
    site.for_run(1)
    trainer = site.load(str(site_yaml), MODEL)
    accepted = len(trainer.data().labels)
    assert accepted > 0

    st = json.loads(_status(site_yaml, "--json").stdout)["ingest"]
    assert st is not None and st["at"]
    assert st["seen"] == n_files
    assert st["accepted"] + st["rejected"] == n_files
    assert st["decoded"] == n_files and st["cache_hits"] == 0
    lines = _status(site_yaml).stdout
    assert f"ingest: {st['at']}: {n_files} files, {st['accepted']} accepted" in lines

    # New images arrive between runs (here: one that is not DICOM); run 2 opens the data afresh
    # and the status follows that ingestion, not the first.
    (dicom / "arrived-later.txt").write_bytes(b"not a DICOM file")
    site.for_run(2)
    site.load(str(site_yaml), MODEL)
    st2 = json.loads(_status(site_yaml, "--json").stdout)["ingest"]
    assert st2["seen"] == n_files + 1
    assert st2["rejected"] == st["rejected"] + 1
    assert st2["rejected_by_reason"].get("not-dicom", 0) == st["rejected_by_reason"].get("not-dicom", 0) + 1
    assert st2["accepted"] == st["accepted"]
    assert st2["cache_hits"] == n_files
