"""What the intake's store may hold (issue #26): a quota, a free-space floor, and no silent overwrite.

Real dcmtk ``storescu`` against a real :class:`~dicomfl.client.intake.IntakeServer` on loopback:

* past ``max_store_gb`` (counted at start, kept as a running total) an instance gets 0xA700,
  and is accepted again once the store shrinks;
* on a real, small tmpfs, an instance that would leave less than ``min_free_gb`` free gets 0xA700,
  as does one the full file system cannot hold (ENOSPC); nothing partial is left, and the same
  ``storescu`` succeeds once space is freed;
* a re-sent instance with a stored SOP Instance UID but other bytes is refused and the stored file
  kept; the identical re-send is acknowledged with nothing rewritten.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomfl.client.intake import IntakeSection, IntakeServer, intake_path, iter_intake_files, read_status

from .test_intake import needs_dcmtk, run_tool, write_study
from .tmpfs import small_tmpfs

GIB = 1 << 30
REFUSED = "Received Store Response (Refused: OutOfResources)"
STORED = "Received Store Response (Success)"
ALLOWED = [{"ae_title": "STORESCU", "host": "127.0.0.1"}]


@pytest.fixture
def servers() -> Iterator:
    """Start IntakeServers on given folders (OS-chosen port) and stop them all afterwards."""
    started: list[IntakeServer] = []

    def _start(dicom_dir: Path, state_dir: Path, **settings) -> IntakeServer:
        settings.setdefault("port", 0)
        settings.setdefault("allowed", ALLOWED)
        settings.setdefault("min_free_gb", 0)
        server = IntakeServer(IntakeSection(**settings), dicom_dir, state_dir)
        server.start()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop(timeout_s=5)


def push(server: IntakeServer, *files: Path) -> subprocess.CompletedProcess[str]:
    host, port = server.address
    return run_tool("storescu", "-v", "-nh", "-aet", "STORESCU", "-aec", "DICOMFL", host, str(port), *map(str, files))


def responses(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[3:] for line in res.stderr.splitlines() if "Received Store Response" in line]


def leftovers(dicom_dir: Path) -> list[Path]:
    """Hidden temp files (a write cut short) anywhere in the store."""
    return [p for p in (dicom_dir / "intake").rglob(".*")]


# --------------------------------------------------------------------------- quota


@needs_dcmtk
def test_quota_refuses_with_a700_counts_the_store_at_start_and_resumes(servers, tmp_path, caplog) -> None:
    study = write_study(tmp_path / "outbox", n=5)
    # The stored size of each instance (storescu sends the data set; the SCP writes its own meta).
    probe = servers(tmp_path / "probe" / "dicom", tmp_path / "probe" / "state")
    assert push(probe, *study).returncode == 0
    sizes = [intake_path(probe.dicom_dir, pydicom.dcmread(p).SOPInstanceUID).stat().st_size for p in study]
    quota = sum(sizes[:3]) + min(sizes) // 2  # room for three instances and half of a fourth

    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    server = servers(dicom_dir, state_dir, max_store_gb=quota / GIB)
    caplog.set_level("WARNING", logger="dicomfl.client.intake")
    res = push(server, *study)
    assert responses(res) == [STORED] * 3 + [REFUSED] * 2, res.stderr
    lines = [r.getMessage() for r in caplog.records if r.name == "dicomfl.client.intake" and r.levelno >= 30]
    assert len(lines) == 1 and "refused: store-quota-reached (status 0xA700)" in lines[0]  # once a minute
    assert len(list(iter_intake_files(dicom_dir))) == 3 and not leftovers(dicom_dir)
    st = server.counters()
    assert (st["written"], st["out_of_space"], st["rejected"], st["store_bytes"]) == (3, 2, 2, sum(sizes[:3]))
    assert responses(push(server, study[0])) == [STORED]  # an identical re-send needs no space
    server.stop()

    # A restart counts what the store holds: still no room for the fourth.
    server = servers(dicom_dir, state_dir, max_store_gb=quota / GIB)
    assert responses(push(server, study[3])) == [REFUSED]
    # The store shrinks (an operator moves a file away): the quota lets instances in again, found
    # by the recount that refusals make (at most once per RECOUNT_INTERVAL_S), never per instance.
    intake_path(dicom_dir, pydicom.dcmread(study[0]).SOPInstanceUID).unlink()
    deadline = time.monotonic() + 60
    while True:
        res = push(server, study[3])
        if responses(res) == [STORED] or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert responses(res) == [STORED], res.stderr
    assert any("space available again" in r.getMessage() for r in caplog.records)
    server.stop()
    st = read_status(state_dir)
    assert st["out_of_space"] >= 3 and st["written"] == 4 and st["failed"] == 0
    log = (state_dir / "intake" / "status.json").read_text()
    assert "DOE" not in log


# --------------------------------------------------------------------------- free-space floor


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Path]:
    """A real 8 MiB tmpfs as the site's DICOM folder."""
    with small_tmpfs(tmp_path / "dicom") as mnt:
        yield mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: Path, leave: int) -> Path:
    """Fill the file system until at most ``leave`` bytes are free."""
    filler = mnt / "filler"
    with open(filler, "ab") as fh:
        try:
            while _free(mnt) > leave:
                fh.write(b"\0" * min(64 << 10, max(4096, _free(mnt) - leave)))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@needs_dcmtk
def test_free_space_floor_and_a_full_disk_on_a_real_tmpfs(small_fs, servers, tmp_path) -> None:
    dicom_dir, state_dir = small_fs, tmp_path / "state"
    small = write_study(tmp_path / "small", n=1)[0]
    big = write_study(tmp_path / "big", n=1, size=724)[0]  # ~1 MiB of pixels
    floor = 2 << 20
    server = servers(dicom_dir, state_dir, min_free_gb=floor / GIB)
    assert responses(push(server, small)) == [STORED]

    filler = _fill(dicom_dir, leave=floor + (1 << 20) - (64 << 10))  # the big one would cross the floor
    res = push(server, big)
    assert responses(res) == [REFUSED], res.stderr
    big_path = intake_path(dicom_dir, pydicom.dcmread(big).SOPInstanceUID)
    assert not big_path.exists() and not leftovers(dicom_dir)
    assert server.counters()["out_of_space"] == 1

    filler.unlink()  # space returns: the same storescu is accepted, checked on its C-STORE
    res = push(server, big)
    assert responses(res) == [STORED], res.stderr
    assert big_path.stat().st_size > 1 << 20
    big_path.unlink()
    server.stop()

    # No floor, a full file system: the write fails with ENOSPC, is answered 0xA700 and its temp
    # file is removed; once space is freed the same storescu succeeds.
    server = servers(dicom_dir, state_dir, min_free_gb=0)
    filler = _fill(dicom_dir, leave=256 << 10)
    res = push(server, big)
    assert responses(res) == [REFUSED], res.stderr
    assert not big_path.exists() and not leftovers(dicom_dir)
    filler.unlink()
    res = push(server, big)
    assert responses(res) == [STORED], res.stderr
    server.stop()
    st = read_status(state_dir)
    assert (st["out_of_space"], st["failed"], st["written"]) == (2, 0, 3)


def test_floor_and_quota_keys_are_validated() -> None:
    assert IntakeSection(port=0).min_free_gb == 1.0 and IntakeSection(port=0).max_store_gb is None
    for bad in ({"min_free_gb": -1}, {"max_store_gb": 0}, {"max_store_gb": float("nan")}, {"min_free_gb": "x"}):
        with pytest.raises(ValueError):
            IntakeSection(port=0, **bad)


# --------------------------------------------------------------------------- same UID, other bytes


def _same_uid_pair(folder: Path) -> tuple[Path, Path]:
    """Two files from pydicom's test corpus (CT_small.dcm) that carry one SOP Instance UID but
    differ in their pixels."""
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    first, second = folder / "first.dcm", folder / "second.dcm"
    ds.save_as(first)
    pixels = ds.pixel_array.copy()
    pixels[0, :8] = np.arange(8, dtype=pixels.dtype)  # a few pixels changed, same size
    ds.PixelData = pixels.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(second)
    assert first.read_bytes() != second.read_bytes()
    return first, second


@needs_dcmtk
def test_same_uid_other_bytes_is_refused_and_the_stored_file_kept(servers, tmp_path, caplog) -> None:
    first, second = _same_uid_pair(tmp_path / "outbox")
    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    server = servers(dicom_dir, state_dir)
    assert responses(push(server, first)) == [STORED]
    stored = intake_path(dicom_dir, pydicom.dcmread(first).SOPInstanceUID)
    before = (stored.read_bytes(), stored.stat().st_mtime_ns)

    with caplog.at_level("WARNING", logger="dicomfl.client.intake"):
        res = push(server, second)
    assert responses(res) == ["Received Store Response (Error: CannotUnderstand)"], res.stderr  # 0xC111
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and r.levelno >= 30]
    assert len(lines) == 1 and f"same-uid-other-content, stored as {stored.stem[:12]}" in lines[0]
    uid = str(pydicom.dcmread(first).SOPInstanceUID)
    assert uid not in lines[0] and "CompressedSamples" not in lines[0]

    assert responses(push(server, first)) == [STORED]  # the identical re-send: idempotent
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before
    assert list(iter_intake_files(dicom_dir)) == [stored] and not leftovers(dicom_dir)
    server.stop()
    st = read_status(state_dir)
    assert (st["received"], st["written"], st["duplicates"], st["conflicts"], st["rejected"]) == (3, 1, 1, 1, 1)
