"""Run a Flower process as a supervised child: its own process group, its output in a log file,
restarted when it dies (with a back-off), and stopped — the whole group, including the
``flower-superexec`` children that outlive a plain SIGTERM to the parent — on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dicomfl.supervise")


def start_group(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")
    try:
        # Its own process group (so it can be stopped as a whole) in the daemon's session (so a
        # killed daemon's session can be found and cleaned), dying with the daemon where Linux allows.
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                process_group=0, preexec_fn=_die_with_parent)
    finally:
        fh.close()


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def session_pids(sid: int) -> list[int]:
    """Every live (non-zombie) process in session ``sid`` (Linux /proc); empty elsewhere."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(d.name)) != sid:
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":
            out.append(int(d.name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL a whole session: what a crashed machine looks like to everyone else."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``timeout`` seconds."""
    if proc.poll() is None or _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
            time.sleep(0.1)
        if proc.poll() is None or _group_alive(proc.pid):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _guarded_after_start(fn, proc, name: str) -> None:
    try:
        fn(proc)
    except Exception as exc:  # noqa: BLE001 - keep the daemon up; the log says why
        log.error("%s: start-up step failed: %s", name, exc)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this Python's bin folder first on PATH (Flower starts
    ``flower-superexec`` and ``flwr-clientapp`` by name, and the venv need not be activated)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "") if env.get("PATH") else bindir
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.2)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supervise(
    cmd: list[str], env: dict[str, str], log_path: Path, *, name: str, backoff_s: float = 5.0,
    after_start: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Run ``cmd`` until SIGTERM/SIGINT, restarting it when it exits. Returns the exit status (0 on a clean stop)."""
    stopping = {"flag": False}

    def _stop(signum, frame):  # noqa: ARG001
        stopping["flag"] = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    proc = None
    try:
        delay = backoff_s
        while not stopping["flag"]:
            proc = start_group(cmd, env, log_path)
            log.info("%s started (pid %d); output in %s", name, proc.pid, log_path)
            if after_start is not None:
                # In a thread, so a stop request is honoured while it waits for the port.
                threading.Thread(target=_guarded_after_start, args=(after_start, proc, name), daemon=True).start()
            started = time.monotonic()
            while proc.poll() is None and not stopping["flag"]:
                time.sleep(0.2)
            if stopping["flag"]:
                break
            code = proc.returncode
            stop_group(proc, timeout=5)
            if time.monotonic() - started > 60:
                delay = backoff_s
            log.warning("%s exited with status %s; restarting in %.0f s", name, code, delay)
            t_end = time.monotonic() + delay
            while time.monotonic() < t_end and not stopping["flag"]:
                time.sleep(0.2)
            delay = min(delay * 2, 60.0)
        return 0
    finally:
        if proc is not None:
            stop_group(proc)
            log.info("%s stopped", name)
        for s, h in old.items():
            signal.signal(s, h)
