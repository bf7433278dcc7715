"""The warm worker: one long-lived process per site that answers the coordinator's messages.

``dicomfl site start`` runs it beside the SuperNode (both supervised by the daemon). It imports
torch once, opens the site's data once per run (from the site cache), keeps the site's trainer
(its split tensors) between rounds, and serves a :class:`~dicomfl.client.handler.SiteHandler`
over a Unix socket that only the site's own user can open. The ClientApp that Flower starts for
each message (:mod:`dicomfl.client.app`) is a thin forwarder (:mod:`.forwarder`)
that hands the message over and returns the reply; it imports neither torch nor the data path.

Channel (this module; the forwarder uses the same functions)
-------------------------------------------------------------
* **Where**: ``<state_dir>/run/worker.sock``, the socket mode 0600 in a directory mode 0700. A
  Unix socket path is limited to 107 bytes (``sun_path``); a longer one moves to
  ``$XDG_RUNTIME_DIR/dicomfl/<hash>/worker.sock`` (when that is a directory of this user, mode
  0700), else ``/tmp/dicomfl-<uid>/<hash>/worker.sock``, where ``<hash>`` names the state dir
  (16 hex digits of its SHA-256). Every directory on that path that dicomfl makes is 0700 and must
  belong to this user (one planted by someone else is refused, not used). The worker also checks
  each peer's uid (``SO_PEERCRED``).
* **Frames**: ``b"DFW1"`` | kind (1 byte) | payload length (8 bytes, big-endian) | payload. A
  request is a ``H`` frame (JSON, at most 64 KiB: the node config the message was addressed
  with, and the forwarder's pid and whether torch was loaded in it, for the site log) followed by
  an ``M`` frame (the Flower ``Message`` as Flower's own protobuf, ``flwr.common.serde``). The
  answer is one ``R`` frame (the reply ``Message``, same encoding) or one ``E`` frame (JSON
  ``{"error": "<code>"}``: the request was refused). One request per connection.
* **Limits**: a payload over ``max_frame`` (default 2 GiB - 1, protobuf's own ceiling) is refused
  from its length field, before anything is read or allocated; a bad magic, an unknown kind, bad
  JSON or a message that does not parse is refused with an ``E`` frame; a peer that stalls for
  ``io_timeout_s`` is dropped. None of it stops the worker.
* **One at a time**: requests are read concurrently (at most ``max_connections``; more are refused
  with ``busy``) but handled strictly one after the other; a second request waits for the first.

What the worker does with a message is exactly what the in-process ClientApp does
(:class:`SiteHandler`): the same checks, the same reply, the same error codes; the privacy
boundary is unchanged. It serves only the site it was started for: a request addressed to
another site config is refused (``wrong-site``).

The worker writes ``<state_dir>/worker.json`` (its pid and socket) when it is ready and logs each
message (with the forwarder's pid) in the site log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from . import flower_adapter as flower

log = logging.getLogger("dicomfl.site.worker")

MAGIC = b"DFW1"
HELLO, MESSAGE, REPLY, ERROR = b"H", b"M", b"R", b"E"
KINDS = frozenset({HELLO, MESSAGE, REPLY, ERROR})
_HEADER = struct.Struct(">4scQ")
MAX_HELLO = 64 * 1024
MAX_FRAME = 2**31 - 1  # protobuf's own limit for one message
SUN_PATH_MAX = 107  # bytes of a Unix socket path (108 with the terminating NUL)
SOCKET_NAME = "worker.sock"
STATUS_NAME = "worker.json"


class FrameError(Exception):
    """A refused frame or request; ``code`` is what the peer is told (a short word, no text)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


# ------------------------------------------------------------------------------------ framing
def write_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    sock.sendall(_HEADER.pack(MAGIC, kind, len(payload)))
    if payload:
        sock.sendall(payload)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise FrameError("truncated", f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, expect: frozenset[bytes] | set[bytes], max_size: int) -> tuple[bytes, bytes]:
    """The next frame as ``(kind, payload)``; :class:`FrameError` for anything else. The length is
    checked against ``max_size`` before a byte of the payload is read."""
    head = _read_exact(sock, _HEADER.size)
    magic, kind, n = _HEADER.unpack(head)
    if magic != MAGIC:
        raise FrameError("bad-frame", "bad magic")
    if kind not in expect:
        raise FrameError("bad-frame", f"unexpected kind {kind!r}")
    if n > max_size:
        raise FrameError("frame-too-large", f"{n} bytes > {max_size}")
    return kind, _read_exact(sock, n) if n else b""


def encode_message(msg: Message) -> bytes:
    return flower.message_to_bytes(msg)


def decode_message(payload: bytes) -> Message:
    try:
        return flower.message_from_bytes(payload)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes were, they are not a message
        raise FrameError("bad-message", type(exc).__name__) from None


# ------------------------------------------------------------------------------- socket path
def _private_dir(path: Path, *, fix_mode: bool) -> Path:
    """``path`` as a directory of this user with mode 0700 (made if missing). A symlink, another
    owner or (unless ``fix_mode``) a looser mode is refused."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path}: not a directory (or a symlink)")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path}: belongs to uid {st.st_uid}, not to this user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        if not fix_mode:
            raise PermissionError(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, expected 700")
        os.chmod(path, 0o700)
    return path


def _fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) <= SUN_PATH_MAX


def socket_path(state_dir: Path, *, make: bool = True) -> Path:
    """Where the worker of the site with this ``state_dir`` listens (see the module doc). With
    ``make`` the private directories are created (and checked)."""
    state_dir = Path(state_dir).resolve()
    primary = state_dir / "run" / SOCKET_NAME
    if _fits(primary):
        if make:
            state_dir.mkdir(parents=True, exist_ok=True)
            _private_dir(primary.parent, fix_mode=True)
        return primary
    tag = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    bases = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        bases.append((Path(xdg), Path(xdg) / "dicomfl"))
    bases.append((Path("/tmp"), Path("/tmp") / f"dicomfl-{os.getuid()}"))
    for root, base in bases:
        candidate = base / tag / SOCKET_NAME
        if not _fits(candidate):
            continue
        if root != Path("/tmp"):
            try:
                st = os.stat(root)
            except OSError:
                continue
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
                continue  # not this user's private runtime dir
        if make:
            _private_dir(base, fix_mode=False)
            _private_dir(base / tag, fix_mode=False)
        return candidate
    raise PermissionError(f"no socket path of at most {SUN_PATH_MAX} bytes for {state_dir}")


def worker_status_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATUS_NAME


def read_worker_status(state_dir: Path) -> dict | None:
    """The running worker's ``{"pid", "socket", "started"}``, or None."""
    try:
        return json.loads(worker_status_path(state_dir).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------- server
Handle = Callable[[Message, dict], Message]


class WorkerServer:
    """Serves ``handle(message, hello) -> reply`` on a Unix socket, one message at a time.

    Parameters
    ----------
    path : Path
        The socket; its directory must exist and be private (see :func:`socket_path`).
    handle : callable
        ``(message, hello) -> reply``; ``hello`` is the request's ``H`` frame (a dict).
    check_hello : callable, optional
        Raises :class:`FrameError` for a request this worker must not serve (e.g. ``wrong-site``).
    max_frame, io_timeout_s, max_connections
        Limits: the largest message, how long a peer may stall, how many requests may wait.
    """

    def __init__(self, path: Path, handle: Handle, *, check_hello: Callable[[dict], None] | None = None,
                 max_frame: int = MAX_FRAME, io_timeout_s: float = 60.0, max_connections: int = 4,
                 logger: logging.Logger | None = None) -> None:
        self.path = Path(path)
        self.handle = handle
        self.check_hello = check_hello or (lambda hello: None)
        self.max_frame = max_frame
        self.io_timeout_s = io_timeout_s
        self.log = logger or log
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = threading.Lock()
        self._sock: socket.socket | None = None
        self.handled = 0

    def bind(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise PermissionError(f"{self.path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise PermissionError(f"{self.path}: another worker is listening there")
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            finally:
                probe.close()
            self.path.unlink()  # a dead worker's; the directory is ours alone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()
        except OSError:
            pass

    def serve_forever(self, stop: threading.Event) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        while not stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, "busy")
                continue
            threading.Thread(target=self._serve_slot, args=(conn,), daemon=True).start()

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self.serve_connection(conn)
        finally:
            self._slots.release()

    def _refuse(self, conn: socket.socket, code: str) -> None:
        self.log.warning("worker: refused a request: %s", code)
        try:
            conn.settimeout(1.0)
            write_frame(conn, ERROR, json.dumps({"error": code}).encode())
        except OSError:
            pass
        finally:
            conn.close()

    def _peer_ok(self, conn: socket.socket) -> bool:
        try:
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
        except (OSError, AttributeError):
            return True  # no SO_PEERCRED here: the socket's mode 0600 is the guard
        return uid == os.getuid()

    def serve_connection(self, conn: socket.socket) -> None:
        """Read one request, handle it when no other is being handled, write the reply. Never raises."""
        try:
            if not self._peer_ok(conn):
                raise FrameError("not-allowed", "peer uid differs")
            conn.settimeout(self.io_timeout_s)
            _, raw = read_frame(conn, {HELLO}, MAX_HELLO)
            try:
                hello = json.loads(raw)
            except ValueError:
                raise FrameError("bad-hello", "not JSON") from None
            if not isinstance(hello, dict):
                raise FrameError("bad-hello", "not an object")
            self.check_hello(hello)
            _, body = read_frame(conn, {MESSAGE}, self.max_frame)
            msg = decode_message(body)
            with self._busy:  # one message at a time
                reply = self.handle(msg, hello)
                self.handled += 1
            write_frame(conn, REPLY, encode_message(reply))
        except FrameError as exc:
            self.log.warning("worker: refused a request: %s", exc)
            self._send_error(conn, exc.code)
        except OSError as exc:  # includes timeouts: a stalled or vanished peer
            self.log.warning("worker: connection dropped: %s", type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the worker
            self.log.error("worker: request failed: %s: %s", type(exc).__name__, exc)
            self._send_error(conn, "internal")
        finally:
            conn.close()

    def _send_error(self, conn: socket.socket, code: str) -> None:
        try:
            conn.settimeout(1.0)
            write_frame(conn, ERROR, json.dumps({"error": code}).encode())
        except OSError:
            pass


# -------------------------------------------------------------------------------- the worker
def _warm_resolver(site_yaml: Path):
    """A :class:`SiteResolver` for this one site: its data opened once per run and kept."""
    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest
    from dicomfl.common.logs import site_logger

    from ..handler import SiteResolver
    from ..trainer import SiteTrainer

    class WarmSite(SiteResolver):
        def __init__(self) -> None:
            super().__init__()
            self.site_yaml = str(site_yaml)
            self.run_id: int | None = None
            self._data = None

        def open_data(self) -> int:
            """Open the site's data now (from the site cache), so the first message finds it warm."""
            site = load_site_config(self.site_yaml)
            self._data = ingest(site).data
            return len(self._data.labels)

        def for_run(self, run_id: int) -> None:
            """A new run opens the site's data afresh (new images may have arrived); within a run
            the data and the trainers stay."""
            if self.run_id is not None and run_id != self.run_id:
                self._trainers.clear()
                self._data = None
            self.run_id = run_id

        def load(self, site_config: str, model_cfg):
            site = load_site_config(site_config)
            if self._data is None:
                self._data = ingest(site).data
            return SiteTrainer(site, model_cfg, data=self._data,
                               logger=site_logger(site.site.state_dir, site.site.name))

    return WarmSite()


def same_site(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def run_worker(site_yaml: Path, sock_path: Path | None = None, stop: threading.Event | None = None,
               runtime_api: str | None = None, secret_file: Path | None = None, task_poll_s: float = 0.1,
               wake_socket: Path | None = None) -> int:
    """Load the site, bind the socket, serve until SIGTERM/SIGINT (or ``stop``).

    With ``runtime_api`` (and the SuperExec ``secret_file``) the worker also takes the SuperNode's
    ClientApp tasks itself (:mod:`.tasks`), one at a time with the socket's requests;
    with ``wake_socket`` the SuperNode wakes it there when a message has arrived.
    """
    from dicomfl.common.config import load_site_config
    from dicomfl.common.logs import site_logger

    site_yaml = Path(site_yaml).resolve()
    cfg = load_site_config(site_yaml)
    state = cfg.site.state_dir
    slog = site_logger(state, cfg.site.name)
    t0 = time.perf_counter()
    from ..handler import SiteHandler  # torch, once for the life of the worker

    resolver = _warm_resolver(site_yaml)
    handler = SiteHandler(resolver)
    try:
        n = resolver.open_data()
        slog.info("worker: site data opened (%d images) in %.2f s", n, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - each message will report it with a code; the worker stays
        slog.error("worker: could not open the site's data yet: %s: %s", type(exc).__name__, exc)

    def check_hello(hello: dict) -> None:
        nc = hello.get("node-config")
        wanted = nc.get("site-config") if isinstance(nc, dict) else None
        if wanted is not None and not (isinstance(wanted, str) and same_site(wanted, str(site_yaml))):
            raise FrameError("wrong-site", "the request names another site config")

    def handle(msg: Message, hello: dict) -> Message:
        app = hello.get("clientapp") if isinstance(hello.get("clientapp"), dict) else {}
        pid = app.get("pid") if isinstance(app.get("pid"), int) else -1
        torch_there = app.get("torch") if isinstance(app.get("torch"), bool) else None
        age = app.get("age")
        age = f"{float(age):.2f} s" if isinstance(age, (int, float)) and not isinstance(age, bool) and 0 <= age < 1e7 else "?"
        slog.info("worker (pid %d): %s message from ClientApp pid %d (torch imported in the ClientApp: %s; "
                  "it started %s before)", os.getpid(), str(msg.metadata.message_type)[:32], pid, torch_there, age)
        resolver.for_run(int(msg.metadata.run_id))
        context = Context(run_id=int(msg.metadata.run_id), node_id=int(msg.metadata.dst_node_id),
                          node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
        return handler.handle(msg, context)

    path = Path(sock_path) if sock_path is not None else socket_path(state)
    server = WorkerServer(path, handle, check_hello=check_hello, logger=slog)
    server.bind()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, frame: stop.set())
    loop = None
    if runtime_api is not None:
        from .secret import read_superexec_secret
        from .tasks import TaskLoop

        def handle_task(msg: Message, context: Context) -> Message:
            with server._busy:  # one message at a time, with the socket's requests
                slog.info("worker (pid %d): %s message taken from the SuperNode (%s)", os.getpid(),
                          str(msg.metadata.message_type)[:32], "woken" if loop.woken else "asked")
                resolver.for_run(int(msg.metadata.run_id))
                local = Context(run_id=int(msg.metadata.run_id), node_id=int(msg.metadata.dst_node_id),
                                node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
                return handler.handle(msg, local)

        from .wakeup import Wakeup

        wakeup = None
        if wake_socket is not None:
            try:
                wakeup = Wakeup(wake_socket)
            except OSError as exc:  # the worker still finds its tasks by asking
                slog.warning("worker: no wake-up socket at %s (%s); asking for tasks every %.2f s", wake_socket,
                             exc.strerror or type(exc).__name__, task_poll_s)
        loop = TaskLoop(runtime_api, handle_task, read_superexec_secret(secret_file), task_poll_s, slog, wakeup=wakeup)
        threading.Thread(target=loop.serve_forever, args=(stop,), name="tasks", daemon=True).start()
        slog.info("worker takes the SuperNode's tasks at %s every %.2f s when idle%s", runtime_api, task_poll_s,
                  f", or when woken at {wake_socket}" if wakeup is not None else "")
    status = worker_status_path(state)
    tmp = status.with_name(f".{status.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "socket": str(path), "started": time.time()}))
    os.replace(tmp, status)
    slog.info("worker ready (pid %d) on %s after %.2f s", os.getpid(), path, time.perf_counter() - t0)
    try:
        server.serve_forever(stop)
    finally:
        server.close()
        if loop is not None and loop.wakeup is not None:
            loop.wakeup.close()
        st = read_worker_status(state)
        if st is not None and st.get("pid") == os.getpid():
            status.unlink(missing_ok=True)
        slog.info("worker (pid %d) stopped after %d message(s)", os.getpid(),
                  server.handled + (loop.handled if loop is not None else 0))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dicomfl.client.transport.warm",
                                 description="The site's warm worker (started by `dicomfl site start`).")
    ap.add_argument("site_yaml", type=Path)
    ap.add_argument("--socket", type=Path, default=None, help="default: from the site's state_dir")
    ap.add_argument("--runtime-api", default=None, help="take the SuperNode's tasks at this host:port")
    ap.add_argument("--secret-file", type=Path, default=None, help="the SuperExec secret (with --runtime-api)")
    ap.add_argument("--task-poll-s", type=float, default=0.1)
    ap.add_argument("--wake-socket", type=Path, default=None, help="where the SuperNode wakes the worker (with --runtime-api)")
    args = ap.parse_args(argv)
    if (args.runtime_api is None) != (args.secret_file is None):
        ap.error("--runtime-api and --secret-file go together")
    if args.wake_socket is not None and args.runtime_api is None:
        ap.error("--wake-socket needs --runtime-api")
    from dicomfl.common.errors import DicomflError

    try:
        return run_worker(args.site_yaml, args.socket, runtime_api=args.runtime_api, secret_file=args.secret_file,
                          task_poll_s=args.task_poll_s, wake_socket=args.wake_socket)
    except (DicomflError, PermissionError) as exc:
        print(f"dicomfl worker: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
