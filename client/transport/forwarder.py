"""The ClientApp's side of the site's warm worker: hand a message to the worker, return its reply.

Flower starts a fresh ``flwr-clientapp`` process for every message. In a site daemon that process
only forwards: it encodes the message with Flower's own protobuf serde, sends it over the worker's
Unix socket (named by the node config key ``worker-socket``, which ``dicomfl site start`` sets),
and returns the reply. It imports neither torch nor dicomfl's data path (model, training,
ingestion), so it costs Flower's own start-up and nothing more; the worker
(:mod:`dicomfl.client.transport.warm`) holds torch, the site's data and the trainers between messages.

If the worker cannot be reached (it is restarting: the forwarder waits up to ``worker-wait-s``
seconds, default 60, for its socket), the connection breaks, or the worker refuses the request,
the reply is a Flower ``Error`` with a dicomfl code (:data:`~dicomfl.common.protocol.ERR_INTERNAL`,
or ``ERR_CONFIG`` when the socket belongs to another site) and a reference; the full text goes to
the site's own log, never to the coordinator. An error reply from the worker passes only if its
code and reason have the protocol's form.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import time

from flwr.app import Context, Error, Message

from dicomfl.common import protocol as P

from .warm import ERROR, HELLO, MAX_FRAME, MESSAGE, REPLY, FrameError, decode_message, encode_message, read_frame, write_frame

WORKER_SOCKET = "worker-socket"  # node config: the worker's socket path (set by the site daemon)
WORKER_WAIT = "worker-wait-s"  # node config: how long to wait for a restarting worker (seconds)
DEFAULT_WAIT_S = 60.0
DEFAULT_TTL_S = 12 * 3600.0  # Flower's default message TTL

log = logging.getLogger("dicomfl.site")


class WorkerUnavailable(Exception):
    """The worker could not be reached or refused the request (``code``: the protocol error code)."""

    def __init__(self, text: str, code: int = P.ERR_INTERNAL) -> None:
        super().__init__(text)
        self.code = code


def connect(path: str, wait_s: float) -> socket.socket:
    """A connection to the worker's socket, waiting up to ``wait_s`` for it to (re)appear."""
    deadline = time.monotonic() + max(0.0, wait_s)
    delay = 0.05
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            s.close()
            if time.monotonic() + delay > deadline:
                raise WorkerUnavailable(f"worker socket {path}: {type(exc).__name__} after {wait_s:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except OSError:
            s.close()
            raise


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere): what Flower's start of
    a ``flwr-clientapp`` process costs a message, for the site log."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def _seconds_left(msg: Message) -> float:
    """What is left of the message's time to live (the longest a reply can still be useful)."""
    try:
        left = float(msg.metadata.created_at) + float(msg.metadata.ttl) - time.time()
    except (TypeError, ValueError):
        return DEFAULT_TTL_S
    return left if 1.0 <= left <= 10 * DEFAULT_TTL_S else (1.0 if left < 1.0 else DEFAULT_TTL_S)


def exchange(msg: Message, node_config: dict) -> Message:
    """Send ``msg`` to the worker named in ``node_config`` and return the reply the worker made."""
    path = node_config.get(WORKER_SOCKET)
    if not isinstance(path, str) or not path:
        raise WorkerUnavailable(f"node config: {WORKER_SOCKET} is not set", P.ERR_CONFIG)
    try:
        wait_s = float(node_config.get(WORKER_WAIT, DEFAULT_WAIT_S))
    except (TypeError, ValueError):
        wait_s = DEFAULT_WAIT_S
    hello = {"v": 1, "node-config": {"site-config": str(node_config.get("site-config", ""))},
             "clientapp": {"pid": os.getpid(), "torch": "torch" in sys.modules, "age": process_age_s()}}
    with connect(path, wait_s) as sock:
        sock.settimeout(60.0)
        write_frame(sock, HELLO, json.dumps(hello).encode())
        try:
            write_frame(sock, MESSAGE, encode_message(msg))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker refused after the hello and closed: its ERROR frame is still to be read
        sock.settimeout(_seconds_left(msg))  # the worker may train for a long time
        try:
            kind, payload = read_frame(sock, {REPLY, ERROR}, MAX_FRAME)
        except FrameError as exc:
            raise WorkerUnavailable(f"worker reply: {exc}") from None
    if kind == ERROR:
        try:
            code = str(json.loads(payload).get("error", "?"))[:40]
        except (ValueError, AttributeError):
            code = "?"
        raise WorkerUnavailable(f"worker refused the request: {code}",
                                P.ERR_CONFIG if code == "wrong-site" else P.ERR_INTERNAL)
    return decode_message(payload)


def forward(msg: Message, context: Context) -> Message:
    """The reply to ``msg``, made by the site's worker; an error code and a reference if it fails."""
    try:
        reply = exchange(msg, dict(context.node_config))
    except Exception as exc:  # noqa: BLE001 - nothing of an exception's text may cross the boundary
        code = exc.code if isinstance(exc, WorkerUnavailable) else P.ERR_INTERNAL
        return _error_reply(msg, context, code, f"{type(exc).__name__}: {exc}")
    if reply.has_error():
        err = reply.error
        if int(err.code) in P.ERROR_CODES and P.ERROR_REASON_RE.match(str(err.reason or "")):
            return Message(Error(code=int(err.code), reason=str(err.reason)), reply_to=msg)
        return _error_reply(msg, context, P.ERR_INTERNAL, f"worker sent an error outside the protocol (code {err.code})")
    if not reply.has_content():
        return _error_reply(msg, context, P.ERR_INTERNAL, "worker sent a reply without content")
    return Message(reply.content, reply_to=msg)


def _error_reply(msg: Message, context: Context, code: int, text: str) -> Message:
    ref = secrets.token_hex(6)
    _site_log(context).error("ClientApp (pid %d): %s message not handled (ref=%s): %s", os.getpid(),
                             str(msg.metadata.message_type)[:32], ref, text)
    return Message(Error(code=code, reason=P.error_reason(code, ref)), reply_to=msg)


def _site_log(context: Context) -> logging.Logger:
    """The site's own log (``<state_dir>/logs/site.log``); this process's stderr if it cannot be found."""
    try:
        from dicomfl.common.config import load_site_config
        from dicomfl.common.logs import site_logger

        site = load_site_config(str(context.node_config["site-config"]), check_files=False)
        return site_logger(site.site.state_dir, site.site.name)
    except Exception:  # noqa: BLE001 - logging must not fail the reply
        return log
