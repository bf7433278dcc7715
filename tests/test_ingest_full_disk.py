"""A full disk under the site's state_dir (a real, small tmpfs): ingestion ends with one line and
exit 2, caches no verdict, and a later run accepts every good file. Also: an ingestion run by the
library shows in ``site status``, and a worker killed by an operator's signal is deferred."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from .tmpfs import small_tmpfs
import yaml

from dicomfl.common.config import load_site_config
from dicomfl.common.errors import DEFERRED, INTERRUPTED, StorageError
from dicomfl.common.ingest import ingest
from dicomfl.common.workers import IsolatedPool, WorkerFailure

DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]
GOOD = 20


def _run(*args):
    return subprocess.run([*DICOMFL, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fullcohort")
    r = _run("synth", str(out), "--sites", "1", "--per-site", str(GOOD), "--image-size", "64")
    assert r.returncode == 0, r.stderr
    return out / "site-a"


@pytest.fixture
def small_fs(tmp_path):
    with small_tmpfs(tmp_path / "state") as mnt:
        yield mnt


def _site_on(cohort: Path, state: Path, tmp_path: Path) -> Path:
    raw = yaml.safe_load((cohort / "site.yaml").read_text())
    for k in ("dicom_dir", "labels", "secret_file"):
        raw["site"][k] = str((cohort / raw["site"][k]).resolve())
    raw["site"]["state_dir"] = str(state)
    raw.setdefault("ingest", {})["workers"] = 2
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _fill(mnt: Path, leave: int) -> Path:
    """Fill the file system, then give back ``leave`` bytes."""
    filler = mnt / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


def test_a_full_disk_is_one_line_exit_2_and_the_next_run_loses_nothing(cohort, small_fs, tmp_path):
    site = _site_on(cohort, small_fs, tmp_path)
    filler = _fill(small_fs, 0)
    r = _run("ingest", str(site))
    both = r.stdout + r.stderr
    assert r.returncode == 2, both
    assert "Traceback" not in both and "Logging error" not in both
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    m = re.fullmatch(rf"dicomfl: error: {re.escape(str(small_fs))}: no space left on device; (\d+) files deferred, "
                     r"run ingest again when space is freed", lines[0])
    assert m and int(m.group(1)) >= 1, lines[0]
    filler.unlink()
    r = _run("ingest", str(site), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((small_fs / "reports" / "ingest.json").read_text())
    assert rep["accepted"] == GOOD and rep["deferred"] == 0
    assert "decoder-crash" not in rep["rejected_by_reason"] and DEFERRED not in rep["rejected_by_reason"]


@pytest.mark.parametrize("leave_kib", [64, 200, 400])
def test_a_disk_that_fills_mid_ingest_defers_and_leaves_no_bad_cache_entry(cohort, small_fs, tmp_path, leave_kib):
    site = _site_on(cohort, small_fs, tmp_path)
    cfg = load_site_config(site)
    ref = ingest(cfg.model_copy(update={"site": cfg.site.model_copy(update={"state_dir": tmp_path / "ref"})}),
                 use_cache=False)
    filler = _fill(small_fs, leave_kib << 10)
    try:
        first = ingest(cfg)
    except StorageError as exc:
        assert "no space left on device" in str(exc) and "\n" not in str(exc)
        first = None
    filler.unlink()
    again = ingest(cfg)
    assert again.report.accepted == GOOD and again.report.deferred == 0, again.report.rejected_by_reason
    assert "decoder-crash" not in again.report.rejected_by_reason
    # Whatever the full run published is read back exactly as a fresh decode makes it.
    np.testing.assert_array_equal(np.asarray(again.data.images), np.asarray(ref.data.images))
    np.testing.assert_array_equal(np.asarray(again.data.features), np.asarray(ref.data.features))
    assert list(again.data.labels) == list(ref.data.labels)
    if leave_kib < 300:  # less than the images need: that run must have stopped
        assert first is None
    if first is not None:
        assert first.report.accepted == GOOD


def test_an_ingestion_run_by_the_library_shows_in_site_status(cohort, tmp_path):
    site = _site_on(cohort, tmp_path / "state", tmp_path)
    r = _run("site", "status", str(site))
    assert r.returncode == 0 and "ingest: never run" in r.stdout, r.stdout + r.stderr
    ingest(load_site_config(site))  # as the site's warm worker does in a round
    r = _run("site", "status", str(site))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"ingest: \S+: {GOOD + 5} files, {GOOD} accepted", r.stdout) or \
        re.search(rf"ingest: \S+: \d+ files, {GOOD} accepted", r.stdout), r.stdout
    mode = (tmp_path / "state" / "reports" / "ingest.json").stat().st_mode & 0o777
    assert mode == 0o600


def _mark_and_sleep(spec):
    path, seconds = spec
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def _killer(marker: Path, times: int, sig: int) -> threading.Thread:
    def run():
        for _ in range(times):
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not marker.exists():
                return
            pid = int(marker.read_text())
            marker.unlink()
            os.kill(pid, sig)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_worker_killed_by_an_operator_is_deferred_not_a_crash(tmp_path, sig):
    marker = tmp_path / "pid"
    with IsolatedPool(_mark_and_sleep, workers=1, timeout_s=120) as pool:
        t = _killer(marker, 2, sig)  # killed on the item, and again when it runs on a fresh worker
        got = list(pool.imap([(str(marker), 30)]))
        t.join(10)
        assert got == [(0, WorkerFailure(DEFERRED, INTERRUPTED))]
        t = _killer(marker, 1, sig)  # killed once: it runs again on a fresh worker and finishes
        got = list(pool.imap([(str(marker), 0.5)]))
        t.join(10)
        assert got == [(0, 0.5)]
