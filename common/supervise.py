"""Run programs as supervised children: each in its own process group with its output in a log
file, each restarted with its own back-off when it dies, and all stopped — every whole group,
including the ``flower-superexec`` children that outlive a plain SIGTERM to the SuperNode — on
SIGTERM/SIGINT. The site daemon supervises two (the SuperNode and the site's warm worker), the
coordinator one (the SuperLink).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("dicomfl.supervise")


#: An SGR escape sequence (colours, bold): Flower's console handler colours every level name and
#: has no switch to turn that off (``flwr.supercore.logger.ConsoleHandler(colored=True)``).
ANSI_SGR = re.compile(rb"\x1b\[[0-9;]*m")
_ANSI_SGR_TEXT = re.compile(ANSI_SGR.pattern.decode())
#: The longest piece of a child's output written at once (a line longer than this is split).
MAX_LINE = 1 << 16


def strip_colours(data: bytes | str) -> bytes | str:
    """``data`` (bytes or text) without terminal colour codes: a log file is read with less, grep
    and log collectors."""
    if isinstance(data, str):
        return _ANSI_SGR_TEXT.sub("", data)
    return ANSI_SGR.sub(b"", data)


def _copy_output(pipe, fh) -> None:
    """Copy a child's output to its log file line by line, colour codes removed, until every
    process holding the pipe (the child and what it started) has closed it."""
    try:
        for line in iter(lambda: pipe.readline(MAX_LINE), b""):
            try:
                fh.write(strip_colours(line))
                fh.flush()
            except OSError:
                pass  # a full disk drops output, as the log handlers do; the child is not blocked
    finally:
        pipe.close()
        fh.close()


def start_group(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, its output (stdout and stderr) appended to
    ``log_path`` (mode 0600) without colour codes by a thread of this process (``proc.log_copier``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab", opener=lambda p, flags: os.open(p, flags, 0o600))
    os.fchmod(fh.fileno(), 0o600)  # a child's output (e.g. a library warning) is the site's own
    try:
        # Its own process group (so it can be stopped as a whole) in the daemon's session (so a
        # killed daemon's session can be found and cleaned), dying with the daemon where Linux allows.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0, preexec_fn=_die_with_parent)
    except BaseException:
        fh.close()
        raise
    copier = threading.Thread(target=_copy_output, args=(proc.stdout, fh), name=f"log:{log_path.name}", daemon=True)
    copier.start()
    proc.log_copier = copier
    return proc


def _join_copier(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Wait (a bounded time: a detached grandchild, e.g. flower-superexec, may hold the pipe open)
    until a stopped child's last output is in its log file."""
    copier = getattr(proc, "log_copier", None)
    if copier is not None:
        copier.join(timeout)


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


def pid_alive(pid) -> bool:
    """Whether ``pid`` is a live process (a zombie is not; a process of another user is)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return True


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
    _join_copier(proc)


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


@dataclass
class Child:
    """One supervised program: its command, environment, log file and restart back-off.

    ``backoff_s`` is the first wait before a restart; it doubles on each quick death (up to 60 s)
    and starts over once the child has stayed up for 60 s. ``after_start(proc)`` runs in a thread
    after each start (so a stop request is honoured while it waits, e.g. for a port).
    """

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    backoff_s: float = 5.0
    after_start: Callable[[subprocess.Popen], None] | None = None
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _delay: float = field(default=0.0, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _dead: subprocess.Popen | None = field(default=None, init=False, repr=False)  # exited; its group being stopped
    _kill_at: float = field(default=0.0, init=False, repr=False)
    _restart_at: float | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        self.proc = start_group(self.cmd, self.env, self.log_path)
        self._started = time.monotonic()
        self._restart_at = None
        log.info("%s started (pid %d); output in %s", self.name, self.proc.pid, self.log_path)
        if self.after_start is not None:
            threading.Thread(target=_guarded_after_start, args=(self.after_start, self.proc, self.name),
                             daemon=True).start()

    def step(self, now: float) -> None:
        """One supervision step, never blocking: notice an exit, clean up its group, restart when due."""
        if self.proc is not None and self.proc.poll() is not None:
            code, self._dead, self.proc = self.proc.returncode, self.proc, None
            if now - self._started > 60:
                self._delay = self.backoff_s
            self._delay = self._delay or self.backoff_s
            log.warning("%s exited with status %s; restarting in %.1f s", self.name, code, self._delay)
            self._restart_at = now + self._delay
            self._delay = min(self._delay * 2, 60.0)
            _signal_group(self._dead.pid, signal.SIGTERM)  # what it left behind (e.g. flower-superexec)
            self._kill_at = now + 5.0
        if self._dead is not None:
            if not _group_alive(self._dead.pid):
                self._dead = None
            elif now >= self._kill_at:
                _signal_group(self._dead.pid, signal.SIGKILL)
        if self.proc is None and self._dead is None and self._restart_at is not None and now >= self._restart_at:
            self.start()

    def groups(self) -> list[subprocess.Popen]:
        return [p for p in (self.proc, self._dead) if p is not None]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_groups(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM every child's process group at once, then SIGKILL what is left after ``timeout`` s."""
    live = [p for p in procs if p.poll() is None or _group_alive(p.pid)]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None or _group_alive(p.pid) for p in live):
        time.sleep(0.1)
    for p in live:
        if p.poll() is None or _group_alive(p.pid):
            _signal_group(p.pid, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        _join_copier(p)


def supervise_all(children: list[Child], *, poll_s: float = 0.2) -> int:
    """Run every child until SIGTERM/SIGINT, each restarted with its own back-off when it exits;
    on the signal every child's whole process group is stopped. Returns 0 on a clean stop."""
    stopping = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        stopping.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for c in children:
            c._delay = c.backoff_s
            if not stopping.is_set():
                c.start()
        while not stopping.wait(poll_s):
            now = time.monotonic()
            for c in children:
                c.step(now)
        return 0
    finally:
        procs = [p for c in children for p in c.groups()]
        if procs:
            stop_groups(procs)
        for c in children:
            if c.proc is not None:
                log.info("%s stopped", c.name)
        for s, h in old.items():
            signal.signal(s, h)


def supervise(
    cmd: list[str], env: dict[str, str], log_path: Path, *, name: str, backoff_s: float = 5.0,
    after_start: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Run ``cmd`` until SIGTERM/SIGINT, restarting it when it exits. Returns the exit status (0 on a clean stop)."""
    return supervise_all([Child(name, cmd, env, log_path, backoff_s=backoff_s, after_start=after_start)])
