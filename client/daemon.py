"""``dicomfl site start``: the site daemon — a supervised Flower SuperNode and the site's warm worker.

Two children (three with DICOM intake), each in its own process group, each restarted with its own back-off if it exits:

* the **warm worker** (:mod:`dicomfl.client.transport.warm`): imports torch once, opens the site's data once
  per run, keeps the trainers, and serves the site's handler on a private Unix socket
  (``<state_dir>/run/worker.sock``, or a short private path when that one is too long for a
  socket). Its output goes to ``<state_dir>/logs/worker.log``; what it does, to ``site.log``.
* the **SuperNode** (Flower's, through :mod:`dicomfl.client.transport.supernode`, which caps its idle wait
  at ``federation.idle_poll_s``), with the federation's CA certificate, the site's authentication
  key, no runtime dependency installation (its default) and a node config naming this site's
  config. With ``federation.message_path: direct`` (the default) it runs in ``process``
  isolation: no SuperExec, no per-message process; the worker takes its tasks over its Runtime
  API (:mod:`dicomfl.client.transport.tasks`), signed with a secret this daemon writes at each start, and
  the SuperNode wakes it when a message has arrived (``wake.sock`` beside the worker's socket). With
  ``forwarder``, Flower's SuperExec starts a ClientApp per message that only forwards to the worker
  (:mod:`dicomfl.client.transport.forwarder`); the SuperExec then looks for new messages every 0.25 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; an operator's own value in the environment wins) instead
  of Flower's default 1 s. Output: ``<state_dir>/logs/supernode.log``.

With ``site.intake`` in the config, a third child is the site's DICOM Storage SCP
(:mod:`dicomfl.client.intake`), restarted like the others if it exits (a port another program
holds is retried with the back-off).

On SIGTERM every process group stops.

**One daemon per site.** Before it writes anything into ``state_dir`` (the SuperExec secret, the
worker's socket, logs) the daemon takes an exclusive ``flock`` on ``<state_dir>/daemon.lock`` and
writes its pid there; it holds the lock for its life, and the kernel releases it when the daemon
dies, however it dies (the lock file itself stays, holding the last pid; it proves nothing
alone). A second ``dicomfl site start`` on the same ``state_dir`` finds the lock taken, exits 2
with one line naming the running daemon's pid, and changes nothing: without the lock it would
overwrite the SuperExec secret, and the first daemon's worker would be refused (HTTP 401) by its
own SuperNode from its next restart on. The children never inherit the lock's descriptor.
Other commands that write into ``state_dir`` (``dicomfl ingest``, ``dicomfl privacy``) do not
take this lock: they may run beside the daemon, and serialize with its worker through the locks
of what they write (the cache's ``flock``, held by one ingestion at a time; the privacy ledger's,
one private round or release at a time).

``federation.warm_worker: false`` in site.yaml runs the SuperNode alone, as before the
warm worker: the ClientApp then handles each message in the process Flower starts for it
(importing torch and opening the site's data every time). It is there for comparison
(``benchmarks/round_bench.py``) and as a fallback, not for normal use.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path

from dicomfl.common.config import SiteConfig
from dicomfl.common.errors import ConfigError, DicomflError, printable
from dicomfl.common.supervise import Child, child_env, supervise_all

from .transport.forwarder import WORKER_SOCKET
from .transport.secret import write_superexec_secret
from .transport.wakeup import WAKE_NAME
from .transport.warm import socket_path

log = logging.getLogger("dicomfl.site")

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.25"
WORKER_BACKOFF_S = 1.0  # a message may be waiting: the worker comes back fast (then backs off)
LOCK_NAME = "daemon.lock"
_held: dict[Path, int] = {}  # state_dir -> the descriptor holding its lock (this process's)


class SiteInUse(DicomflError):
    """Another site daemon holds this ``state_dir`` (the CLI prints the one line and exits 2)."""


def lock_state_dir(state_dir: Path) -> int:
    """Take the site's daemon lock (``<state_dir>/daemon.lock``, exclusive, never waiting) and
    write this process's pid into it; held until the process exits. Raises :class:`SiteInUse`
    naming the holder's pid when another process holds it. A second call in the same process
    returns the descriptor it already holds."""
    state_dir = Path(state_dir).resolve()
    if state_dir in _held:
        return _held[state_dir]
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"{printable(str(path))}: cannot open the site daemon's lock ({type(exc).__name__})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            held_by = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        who = f"pid {int(held_by)}" if held_by.isdigit() else "another process"
        raise SiteInUse(f"{printable(str(state_dir))}: site.state_dir is in use by a running site daemon ({who}); "
                        f"stop it first, or give this site its own state_dir") from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"{printable(str(path))}: cannot lock ({type(exc).__name__})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[state_dir] = fd
    return fd


def wake_path(cfg: SiteConfig, worker_socket: Path | None, secret: Path | None) -> Path | None:
    """Where the SuperNode wakes the worker (message_path direct with ``federation.wake_worker``):
    ``wake.sock`` in the worker socket's private directory."""
    if worker_socket is None or secret is None or not cfg.federation.wake_worker:
        return None
    return Path(worker_socket).parent / WAKE_NAME


def supernode_command(cfg: SiteConfig, worker_socket: Path | None = None, secret: Path | None = None) -> list[str]:
    """Flower's SuperNode (through :mod:`dicomfl.client.transport.supernode`, which caps its idle wait).

    With ``secret`` (message_path direct) it runs in ``process`` isolation: no SuperExec, no
    per-message process; the warm worker takes its tasks, woken by the SuperNode when a message has
    arrived (``federation.wake_worker``). Else Flower starts a ClientApp per message, which
    forwards to ``worker_socket`` when one is given.
    """
    f = cfg.federation
    node_config = f'site-config="{Path(cfg.source).resolve()}"'
    if worker_socket is not None and secret is None:
        node_config += f' {WORKER_SOCKET}="{worker_socket}"'
    wake = wake_path(cfg, worker_socket, secret)
    cmd = [sys.executable, "-m", "dicomfl.client.transport.supernode", "--idle-s", f"{f.idle_poll_s:g}",
           *(["--wake", str(wake)] if wake is not None else []), "--",
           "--superlink", f.superlink, "--port", str(f.port), "--node-config", node_config]
    if secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if f.insecure:
        cmd.append("--insecure")
    else:
        if f.root_certificates is None:
            raise ConfigError(f"{cfg.source}: federation.root_certificates: required unless federation.insecure is true")
        cmd += ["--root-certificates", str(f.root_certificates)]
    if f.auth_private_key is not None:
        if f.insecure:
            raise ConfigError(f"{cfg.source}: federation.auth_private_key: SuperNode authentication needs TLS")
        cmd += ["--auth-supernode-private-key", str(f.auth_private_key)]
    return cmd


def worker_command(cfg: SiteConfig, sock: Path, secret: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dicomfl.client.transport.warm", str(Path(cfg.source).resolve()), "--socket", str(sock)]
    if secret is not None:
        f = cfg.federation
        cmd += ["--runtime-api", f"127.0.0.1:{f.port}", "--secret-file", str(secret), "--task-poll-s", f"{f.task_poll_s:g}"]
        wake = wake_path(cfg, sock, secret)
        if wake is not None:
            cmd += ["--wake-socket", str(wake)]
    return cmd


def intake_command(cfg: SiteConfig) -> list[str]:
    """The site's DICOM Storage SCP (:func:`dicomfl.client.intake.serve`), a supervised child of
    its own: a PACS can push while the site trains. It logs to ``<state_dir>/logs/intake.log``."""
    return [sys.executable, "-m", "dicomfl.client.intake", str(Path(cfg.source).resolve())]


def start(cfg: SiteConfig) -> int:
    """Run the site daemon until SIGTERM (see the module's doc); raises :class:`SiteInUse` if
    another daemon holds ``state_dir``."""
    for key in ("root_certificates", "auth_private_key"):
        p = getattr(cfg.federation, key)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{cfg.source}: federation.{key}: file not found: {p}")
    state = cfg.site.state_dir
    lock_state_dir(state)  # before anything is written into state_dir (the CLI takes it before its log)
    warm = cfg.federation.warm_worker
    sock = None
    if warm:
        try:
            sock = socket_path(state)
        except PermissionError as exc:
            raise ConfigError(f"{cfg.source}: site.state_dir: no private place for the worker's socket: {exc}") from None
    secret = write_superexec_secret(sock.parent) if sock is not None and cfg.federation.message_path == "direct" else None
    cmd = supernode_command(cfg, sock, secret)
    env = child_env({"FLWR_HOME": str(state / "flwr-home")})
    env.setdefault(SUPEREXEC_POLL_ENV, SUPEREXEC_POLL_S)
    logs = state / "logs"
    backoff = cfg.federation.restart_backoff_s
    children = [Child("SuperNode", cmd, env, logs / "supernode.log", backoff_s=backoff)]
    if sock is not None:
        log.info("site %s: connecting to %s; worker socket %s", cfg.site.name, cfg.federation.superlink, sock)
        children.insert(0, Child("worker", worker_command(cfg, sock, secret), child_env(), logs / "worker.log",
                                 backoff_s=min(backoff, WORKER_BACKOFF_S)))
    else:
        log.warning("site %s: connecting to %s without a warm worker (federation.warm_worker: false): each message "
                    "starts torch afresh", cfg.site.name, cfg.federation.superlink)
    if cfg.site.intake is not None:
        i = cfg.site.intake
        log.info("site %s: DICOM intake %s on %s:%d", cfg.site.name, i.ae_title, i.host, i.port)
        children.append(Child("intake", intake_command(cfg), child_env(), logs / "intake-process.log", backoff_s=backoff))
    return supervise_all(children)
