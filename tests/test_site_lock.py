"""One daemon per site: ``dicomfl site start`` holds an exclusive lock on its ``state_dir``.

Real processes: a running daemon (SuperNode, warm worker; the SuperLink it dials is a closed
port, which the SuperNode retries), a second ``site start`` on the same ``state_dir``, and a
third after the first is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dicomfl.client.daemon import LOCK_NAME
from dicomfl.client.transport.secret import SECRET_NAME
from dicomfl.client.transport.warm import socket_path
from dicomfl.common.supervise import stop_group

CLI = [sys.executable, "-m", "dicomfl.workbench.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site(tmp: Path) -> Path:
    site = tmp / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "site.key").write_text(os.urandom(32).hex())
    (site / "site.key").chmod(0o600)
    cfg = {"site": {"name": "site-x", "dicom_dir": "dicom", "secret_file": "site.key", "state_dir": "state",
                    "label_key": "study_instance_uid"},
           "federation": {"superlink": f"127.0.0.1:{_free_port()}", "insecure": True, "port": _free_port()}}
    (site / "site.yaml").write_text(yaml.safe_dump(cfg))
    return site / "site.yaml"


def _start(yaml_path: Path, out: Path) -> subprocess.Popen:
    with open(out, "wb") as fh:
        return subprocess.Popen([*CLI, "site", "start", str(yaml_path)], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_holding(proc: subprocess.Popen, state: Path, out: Path, timeout: float = 60.0) -> None:
    """Until the daemon ``proc`` has its pid in the lock and has written its SuperExec secret."""
    secret = socket_path(state, make=False).parent / SECRET_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, out.read_text(errors="replace")[-2000:]
        lock = state / LOCK_NAME
        if lock.is_file() and lock.read_text().strip() == str(proc.pid) and secret.is_file():
            return
        time.sleep(0.2)
    raise AssertionError(f"the daemon did not take its lock within {timeout:g} s")


def _files(state: Path) -> dict[str, tuple[bytes, int]]:
    """Every file the daemon keeps (state_dir and the worker's private run folder), with its bytes
    and mtime."""
    run = socket_path(state, make=False).parent
    out = {}
    for root in {state, run}:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def test_a_second_daemon_on_the_same_state_dir_exits_2_and_changes_nothing(tmp_path):
    site = _site(tmp_path)
    state = site.parent / "state"
    first = _start(site, tmp_path / "first.out")
    third = None
    try:
        _wait_holding(first, state, tmp_path / "first.out")
        time.sleep(1.0)  # let the first daemon's children write what they write at start
        run = socket_path(state, make=False).parent
        secret_before = (run / SECRET_NAME).read_bytes()
        daemon_log = state / "logs" / "daemon.log"
        log_before = daemon_log.read_bytes()
        second = subprocess.run([*CLI, "site", "start", str(site)], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert second.returncode == 2, second.stderr
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "in use" in lines[0], second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        # Nothing the first daemon wrote was touched: its secret, its lock, its log.
        assert (run / SECRET_NAME).read_bytes() == secret_before
        assert (state / LOCK_NAME).read_text().strip() == str(first.pid)
        assert daemon_log.read_bytes() == log_before
        assert first.poll() is None
        # SIGKILL: the kernel releases the lock; a new daemon takes it (and writes its own secret).
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        third = _start(site, tmp_path / "third.out")
        _wait_holding(third, state, tmp_path / "third.out")
        assert (state / LOCK_NAME).read_text().strip() == str(third.pid)
    finally:
        stop_group(first)
        if third is not None:
            stop_group(third)
    assert third.returncode == 0, (tmp_path / "third.out").read_text(errors="replace")[-2000:]


def test_the_lock_is_taken_before_anything_is_written(tmp_path):
    """A lock held by another process (here a plain ``flock``): ``site start`` writes no secret,
    no socket folder and no log, and names the holder's pid."""
    import fcntl

    site = _site(tmp_path)
    state = site.parent / "state"
    state.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(state / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, b'%d\\n' % os.getpid())\n"
                               "print('held', flush=True)\n"
                               "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([*CLI, "site", "start", str(site)], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert sorted(p.name for p in state.iterdir()) == [LOCK_NAME]
        assert not (socket_path(state, make=False).parent / SECRET_NAME).exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # Released with its holder's death: the lock can be taken again at once.
    fd = os.open(state / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
