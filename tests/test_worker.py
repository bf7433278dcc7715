"""The site's warm worker and the ClientApp forwarder: the channel between them (frames, limits,
permissions, one message at a time), the forwarder's error replies, that the forwarder stays light,
that the worker's replies equal the in-process handler's, and the daemon's two-child supervision;
and, in small, the coordinator's side of "rounds in seconds": replies collected as they come
(server/gridpoll.py), interrupted runs resumed by the coordinator service and followed by
``dicomfl run`` (server/coordinator.py, server/runner.py).

The end-to-end path (real SuperLink, SuperNodes, TLS, authentication) is in test_deployment.py.
"""

from __future__ import annotations

import json
import shutil
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from dicomfl.client.transport import forwarder
from dicomfl.client.transport import warm as worker
from dicomfl.client.transport.warm import ERROR, HELLO, MESSAGE, REPLY, WorkerServer, read_frame, write_frame
from dicomfl.common import protocol as P
from dicomfl.workbench.flower_adapter import stamp_message_id, task_identity

ROOT = Path(__file__).resolve().parents[1]


def _message(kind: str = "train", n: int = 4, mid: str = "m-1") -> Message:
    task_identity()
    content = RecordDict({P.CONFIG: ConfigRecord({"run": "t", "server-round": 1}),
                          P.ARRAYS: P.to_record({"w": np.arange(n, dtype=np.float32)})})
    msg = Message(content, dst_node_id=7, message_type=kind)
    stamp_message_id(msg, mid)
    return msg


def _echo(msg: Message, hello: dict) -> Message:
    """A stand-in handler: the arrays back, doubled, and a metric."""
    w = P.from_record(msg.content[P.ARRAYS])
    return Message(RecordDict({P.ARRAYS: P.to_record({k: v * 2 for k, v in w.items()}),
                               P.METRICS: MetricRecord({"num-examples": 3.0})}), reply_to=msg)


class Running:
    """A WorkerServer on a socket under ``tmp``, served by a thread, stopped on exit."""

    def __init__(self, tmp: Path, handle=_echo, **kw) -> None:
        self.path = worker.socket_path(tmp / "state")
        self.server = WorkerServer(self.path, handle, **kw)
        self.server.bind()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve_forever, args=(self.stop,), daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()

    def context(self, wait_s: float = 5.0, site_config: str = "") -> Context:
        return Context(run_id=1, node_id=7, node_config={forwarder.WORKER_SOCKET: str(self.path),
                                                         forwarder.WORKER_WAIT: wait_s, "site-config": site_config},
                       state=RecordDict(), run_config={})

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.path))
        return s

    def ok(self) -> bool:
        """The server still answers a proper request."""
        reply = forwarder.forward(_message(), self.context())
        return reply.has_content() and float(reply.content[P.METRICS]["num-examples"]) == 3.0


def _error_of(sock: socket.socket) -> str:
    kind, payload = read_frame(sock, {REPLY, ERROR}, 1 << 20)
    assert kind == ERROR
    return json.loads(payload)["error"]


# ---------------------------------------------------------------------------------- the channel
def test_a_message_goes_through_and_the_reply_comes_back(tmp_path):
    with Running(tmp_path) as w:
        msg = _message()
        reply = forwarder.forward(msg, w.context())
        assert reply.has_content() and not reply.has_error()
        assert np.array_equal(P.from_record(reply.content[P.ARRAYS])["w"], np.arange(4, dtype=np.float32) * 2)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.message_type == "train"
        assert w.server.handled == 1


def test_the_socket_is_0600_in_a_0700_directory_of_this_user(tmp_path):
    with Running(tmp_path) as w:
        st = os.lstat(w.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        d = os.lstat(w.path.parent)
        assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.getuid()
        assert w.path == (tmp_path / "state").resolve() / "run" / "worker.sock"


def test_a_state_dir_too_long_for_a_socket_path_moves_to_a_short_private_one(tmp_path, monkeypatch, request):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "state"
    assert len(str(deep / "run" / "worker.sock")) > worker.SUN_PATH_MAX
    # A short runtime dir of its own (tmp_path itself may be long, e.g. under pytest-xdist).
    runtime = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    os.chmod(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    p = worker.socket_path(deep)
    assert len(os.fsencode(str(p))) <= worker.SUN_PATH_MAX and p.is_relative_to(runtime / "dicomfl")
    for d in (p.parent, p.parent.parent):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    assert worker.socket_path(deep) == p  # the daemon and the worker agree on it
    # Without a private runtime dir: /tmp/dicomfl-<uid>/<hash>/, also 0700.
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    q = worker.socket_path(deep)
    assert q.parent.parent == Path(f"/tmp/dicomfl-{os.getuid()}")
    assert stat.S_IMODE(os.lstat(q.parent).st_mode) == 0o700
    # A directory on that path made by someone else (here: too open) is refused, not used.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    other = tmp_path / ("f" * 70) / ("g" * 60)
    planted = runtime / "dicomfl"
    os.chmod(planted, 0o755)
    try:
        with pytest.raises(PermissionError):
            worker.socket_path(other)
    finally:
        os.chmod(planted, 0o700)
    with Running(tmp_path / ("d" * 60) / ("e" * 60)) as w:  # and a worker really listens there
        assert w.ok()


def test_garbage_is_refused_and_the_worker_goes_on(tmp_path):
    with Running(tmp_path) as w:
        with w.raw() as s:  # not a frame at all
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
            assert _error_of(s) == "bad-frame"
        with w.raw() as s:  # a frame of an unknown kind
            s.sendall(struct.pack(">4scQ", b"DFW1", b"Z", 3) + b"abc")
            assert _error_of(s) == "bad-frame"
        with w.raw() as s:  # a hello that is not JSON
            write_frame(s, HELLO, b"\xff\xfe not json")
            assert _error_of(s) == "bad-hello"
        with w.raw() as s:  # a proper hello, then bytes that are not a Flower message
            write_frame(s, HELLO, b"{}")
            write_frame(s, MESSAGE, os.urandom(200))
            assert _error_of(s) == "bad-message"
        with w.raw() as s:  # cut off in the middle of a frame
            s.sendall(struct.pack(">4scQ", b"DFW1", HELLO, 100) + b"{")
        assert w.ok()
        assert w.server.handled == 1  # only the proper request reached the handler


def test_oversize_frames_are_refused_from_their_length(tmp_path):
    with Running(tmp_path, max_frame=4096) as w:
        with w.raw() as s:  # a hello over 64 KiB
            s.sendall(struct.pack(">4scQ", b"DFW1", HELLO, 10**6))
            assert _error_of(s) == "frame-too-large"
        with w.raw() as s:  # a message claiming 1 TiB: refused before a byte of it is read
            write_frame(s, HELLO, b"{}")
            s.sendall(struct.pack(">4scQ", b"DFW1", MESSAGE, 1 << 40))
            assert _error_of(s) == "frame-too-large"
        reply = forwarder.forward(_message(n=5000), w.context())  # a real message over the limit
        assert reply.has_error() and reply.error.code == P.ERR_INTERNAL
        assert w.ok() and w.server.handled == 1


def test_a_second_connection_while_busy_waits_its_turn(tmp_path):
    spans = []

    def slow(msg, hello):
        t0 = time.monotonic()
        time.sleep(0.6)
        spans.append((t0, time.monotonic()))
        return _echo(msg, hello)

    with Running(tmp_path, handle=slow) as w:
        replies = []
        threads = [threading.Thread(target=lambda i=i: replies.append(forwarder.forward(_message(mid=f"m-{i}"), w.context())))
                   for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.1)  # the second connects while the first is being handled
        for t in threads:
            t.join(10)
        assert len(replies) == 2 and all(r.has_content() for r in replies)
        (a0, a1), (b0, b1) = sorted(spans)
        assert b0 >= a1  # one message at a time
    # More waiting requests than the worker takes are refused, not queued without bound.
    with Running(tmp_path / "capped", handle=slow, max_connections=1) as w:
        t = threading.Thread(target=lambda: forwarder.forward(_message(), w.context()))
        t.start()
        time.sleep(0.2)
        with w.raw() as s:
            assert _error_of(s) == "busy"
        t.join(10)


def test_a_stalled_peer_is_dropped(tmp_path):
    with Running(tmp_path, io_timeout_s=0.3) as w:
        with w.raw() as s:
            s.sendall(struct.pack(">4scQ", b"DFW1", HELLO, 10))  # and then nothing
            time.sleep(0.6)
        assert w.ok()


# -------------------------------------------------------------------------------- the forwarder
def _site_yaml(tmp: Path) -> Path:
    from .conftest import write_site

    (tmp / "dicom").mkdir(exist_ok=True)
    return write_site(tmp, tmp / "dicom", site={"name": "site-x"})


def test_an_unreachable_worker_gives_an_error_code_and_a_reference_only(tmp_path):
    site = _site_yaml(tmp_path)
    sock = tmp_path / "state" / "run" / "worker.sock"
    ctx = Context(run_id=1, node_id=7, node_config={forwarder.WORKER_SOCKET: str(sock), forwarder.WORKER_WAIT: 0.3,
                                                    "site-config": str(site)}, state=RecordDict(), run_config={})
    t0 = time.monotonic()
    reply = forwarder.forward(_message(), ctx)
    assert time.monotonic() - t0 < 5
    assert reply.has_error() and reply.error.code == P.ERR_INTERNAL
    assert P.ERROR_REASON_RE.match(reply.error.reason) and str(sock) not in reply.error.reason
    ref = reply.error.reason.rsplit("=", 1)[1]
    site_log = (tmp_path / "state" / "logs" / "site.log").read_text()
    assert f"ref={ref}" in site_log and "worker.sock" in site_log  # the full text stays at the site


def test_a_worker_that_dies_mid_message_gives_an_error_reply(tmp_path):
    path = worker.socket_path(tmp_path / "state")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def die():
        conn, _ = srv.accept()
        read_frame(conn, {HELLO}, 1 << 16)
        read_frame(conn, {MESSAGE}, 1 << 30)
        conn.close()  # gone before a reply

    t = threading.Thread(target=die, daemon=True)
    t.start()
    ctx = Context(run_id=1, node_id=7, node_config={forwarder.WORKER_SOCKET: str(path)}, state=RecordDict(), run_config={})
    reply = forwarder.forward(_message(), ctx)
    srv.close()
    assert reply.has_error() and reply.error.code == P.ERR_INTERNAL and P.ERROR_REASON_RE.match(reply.error.reason)


def test_error_replies_pass_only_in_the_protocol_s_form(tmp_path):
    def protocol_error(msg, hello):
        return Message(Error(code=P.ERR_NO_DATA, reason=P.error_reason(P.ERR_NO_DATA, "0123456789ab")), reply_to=msg)

    def leaky_error(msg, hello):
        return Message(Error(code=7, reason="cannot read /data/DOE^JOHN/IM1"), reply_to=msg)

    with Running(tmp_path / "a", handle=protocol_error) as w:
        r = forwarder.forward(_message(), w.context())
        assert r.error.code == P.ERR_NO_DATA and r.error.reason.endswith("ref=0123456789ab")
    with Running(tmp_path / "b", handle=leaky_error) as w:
        r = forwarder.forward(_message(), w.context())
        assert r.error.code == P.ERR_INTERNAL and "DOE" not in r.error.reason and P.ERROR_REASON_RE.match(r.error.reason)


def test_a_request_for_another_site_is_refused_with_a_config_error(tmp_path):
    def check(hello):
        if hello.get("node-config", {}).get("site-config") != "/sites/mine.yaml":
            raise worker.FrameError("wrong-site")

    with Running(tmp_path, check_hello=check) as w:
        r = forwarder.forward(_message(), w.context(site_config="/sites/other.yaml"))
        assert r.has_error() and r.error.code == P.ERR_CONFIG
        assert forwarder.forward(_message(), w.context(site_config="/sites/mine.yaml")).has_content()


def test_the_clientapp_process_imports_neither_torch_nor_the_data_path():
    code = textwrap.dedent("""
        import sys
        import flwr.supernode.runtime.run_clientapp  # what flwr-clientapp itself loads
        import dicomfl.client.app, dicomfl.client.transport.forwarder, tests.faultapps
        heavy = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "dicomfl.common.model",
                 "dicomfl.common.train", "dicomfl.common.ingest", "dicomfl.client.handler", "dicomfl.client.trainer"))]
        print(heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------ the real worker, in process
def test_the_worker_s_replies_equal_the_in_process_handler_s(cohort, tmp_path):
    """The worker (real SiteHandler, the site's data opened once) answers a train and an evaluate
    message exactly as the in-process handler does, and keeps its trainer between messages."""
    import torch

    from dicomfl.client.handler import SiteHandler
    from dicomfl.common.config import load_site_config
    from dicomfl.common.model import ModelConfig, build_model, get_weights

    from .test_federation import MODEL

    site_yaml = cohort / "site-a" / "site.yaml"
    state = load_site_config(site_yaml).site.state_dir
    weights = get_weights(build_model(ModelConfig(**MODEL), seed=3))
    cfg = {"run": "w", "server-round": 1, "num-rounds": 1, "local-epochs": 1, "local-steps": 0, "dp": False,
           "target-epsilon": 0.0, "delta": 1e-5, "seed": 0, "model": json.dumps(MODEL)}

    def messages():
        task_identity()
        train = Message(RecordDict({P.ARRAYS: P.to_record(weights), P.CONFIG: ConfigRecord(cfg)}), dst_node_id=7,
                        message_type="train")
        ev = Message(RecordDict({P.CONFIG: ConfigRecord(cfg), P.MODEL_PREFIX + "global": P.to_record(weights)}),
                     dst_node_id=7, message_type="evaluate")
        stamp_message_id(train, "t-1")
        stamp_message_id(ev, "e-1")
        return train, ev

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stop = threading.Event()
    sock = worker.socket_path(tmp_path / "w")
    t = threading.Thread(target=worker.run_worker, args=(site_yaml, sock, stop), daemon=True)
    try:
        t.start()
        deadline = time.monotonic() + 60
        while (st := worker.read_worker_status(state)) is None or st.get("socket") != str(sock):
            assert time.monotonic() < deadline and t.is_alive(), "the worker did not start"
            time.sleep(0.1)
        ctx = Context(run_id=5, node_id=7, node_config={forwarder.WORKER_SOCKET: str(sock), "site-config": str(site_yaml)},
                      state=RecordDict(), run_config={})
        via_worker = [forwarder.forward(m, ctx) for m in messages()]
        local = SiteHandler()
        lctx = Context(run_id=5, node_id=7, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
        in_process = [local.handle(m, lctx) for m in messages()]
    finally:
        stop.set()
        t.join(10)
        torch.set_num_threads(threads)
    for a, b in zip(via_worker, in_process):
        assert a.has_content() and b.has_content()
        assert sorted(a.content.keys()) == sorted(b.content.keys())
        for key in a.content.keys():
            ra, rb = a.content[key], b.content[key]
            if isinstance(ra, ArrayRecord):
                wa, wb = P.from_record(ra), P.from_record(rb)
                assert all(np.array_equal(wa[k], wb[k]) for k in wa)
            elif isinstance(ra, MetricRecord):
                assert {k: v for k, v in ra.items() if k != "train-seconds"} == \
                       {k: v for k, v in rb.items() if k != "train-seconds"}
            else:
                assert dict(ra) == dict(rb)
    log = (state / "logs" / "site.log").read_text()
    assert f"worker ready (pid {os.getpid()})" in log and "torch imported in the ClientApp: True" in log


# -------------------------------------------------------------------------- supervision
SUPERVISOR = """\
import sys
import tempfile
from pathlib import Path
from dicomfl.common.supervise import Child, child_env, supervise_all

tmp = Path(sys.argv[1])
child = [sys.executable, "-c", '''
import os, subprocess, sys, time
with open(sys.argv[1], "a") as fh:
    print(os.getpid(), file=fh)
if sys.argv[2] == "grandchild":
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1] + ".g", "a") as fh:
        print(g.pid, file=fh)
time.sleep(600)
''']
sys.exit(supervise_all([
    Child("a", child + [str(tmp / "a.pids"), "-"], child_env(), tmp / "a.log", backoff_s=0.2),
    Child("b", child + [str(tmp / "b.pids"), "grandchild"], child_env(), tmp / "b.log", backoff_s=0.2),
]))
"""


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_daemon_supervises_two_children_each_restarted_and_both_stopped(tmp_path):
    script = tmp_path / "sup.py"
    script.write_text(SUPERVISOR)
    sup = subprocess.Popen([sys.executable, str(script), str(tmp_path)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _until(lambda: len(_pids(tmp_path / "a.pids")) == 1 and len(_pids(tmp_path / "b.pids.g")) == 1, 30, "both children")
        a1, b1 = _pids(tmp_path / "a.pids")[0], _pids(tmp_path / "b.pids")[0]
        os.kill(a1, signal.SIGKILL)  # one child dies: it alone is started again
        _until(lambda: len(_pids(tmp_path / "a.pids")) == 2, 30, "a restarted")
        a2 = _pids(tmp_path / "a.pids")[1]
        assert _alive(a2) and a2 != a1 and _pids(tmp_path / "b.pids") == [b1] and _alive(b1)
        g = _pids(tmp_path / "b.pids.g")[0]
        sup.send_signal(signal.SIGTERM)  # both process groups stop, grandchildren included
        assert sup.wait(timeout=30) == 0
        _until(lambda: not any(_alive(p) for p in (a2, b1, g)), 15, "the children to be gone")
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
        for p in _pids(tmp_path / "a.pids") + _pids(tmp_path / "b.pids") + _pids(tmp_path / "b.pids.g"):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# ------------------------------------------------------------- the coordinator's side, in small
class _PollGrid:
    """A grid with push/pull whose replies become available at given times."""

    def __init__(self, ready_after: dict[int, float]) -> None:
        self.ready_after = ready_after
        self.t0 = None
        self.pulls = 0
        self.msgs = {}

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        ids = []
        for i, m in enumerate(messages):
            stamp_message_id(m, f"id-{i}")
            self.msgs[m.metadata.message_id] = m
            ids.append(m.metadata.message_id if m.metadata.dst_node_id in self.ready_after else None)
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        out = []
        for mid in ids:
            m = self.msgs[mid]
            if now >= self.ready_after[m.metadata.dst_node_id]:
                out.append(Message(RecordDict(), reply_to=m))
        return out


def test_send_and_collect_yields_replies_as_they_come_and_stops_at_the_timeout():
    from dicomfl.server.gridpoll import send_and_collect

    task_identity()
    grid = _PollGrid({1: 0.0, 2: 0.3, 3: 99.0})  # node 3 never answers in time; node 4 could not be pushed
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3, 4)]
    t0 = time.monotonic()
    got = []
    for reply in send_and_collect(grid, msgs, timeout=1.0, poll_interval=0.05):
        got.append((reply.metadata.src_node_id, round(time.monotonic() - t0, 1)))
    took = time.monotonic() - t0
    assert [n for n, _ in got] == [1, 2] and got[1][1] < 0.9  # node 2's reply soon after it arrived, not at the end
    assert 0.95 <= took < 3.0 and grid.pulls >= 10
    # Every reply in: no waiting for the timeout.
    grid = _PollGrid({1: 0.0, 2: 0.2})
    t0 = time.monotonic()
    assert len(list(send_and_collect(grid, [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)],
                                     timeout=30, poll_interval=0.05))) == 2
    assert time.monotonic() - t0 < 1.0


class _FlakyGrid(_PollGrid):
    """Its first ``failures`` pulls fail (as a busy SuperLink's "database is locked" did)."""

    def __init__(self, ready_after, failures: int) -> None:
        super().__init__(ready_after)
        self.failures = failures
        self.times = []

    def pull_messages(self, ids):
        self.times.append(time.monotonic())
        if len(self.times) <= self.failures:
            raise RuntimeError("database is locked")
        return super().pull_messages(ids)


def test_a_failed_pull_is_asked_again_later_and_the_round_goes_on():
    from dicomfl.server.gridpoll import send_and_collect

    task_identity()
    grid = _FlakyGrid({1: 0.0}, failures=3)
    msgs = [Message(RecordDict(), dst_node_id=1, message_type="train")]
    assert len(list(send_and_collect(grid, msgs, timeout=30, poll_interval=0.05))) == 1
    gaps = [b - a for a, b in zip(grid.times, grid.times[1:])]
    assert len(gaps) == 3 and gaps[0] >= 0.09 and gaps[2] >= 0.35  # 0.1, 0.2, 0.4 s: backing off, not hammering


class _UnavailableGrid(_PollGrid):
    """Flower's grid when a site sent a reply's head and never its objects: an error reply of
    its own, from the coordinator's node, in place of the site's."""

    def pull_messages(self, ids):
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        out = []
        for reply in super().pull_messages(ids):
            if reply.metadata.src_node_id == 2:
                err = Message(error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="Reply message objects are unavailable"),
                              reply_to=self.msgs[reply.metadata.reply_to_message_id])
                err.metadata.__dict__["_src_node_id"] = 0  # as Flower's grid makes it: from its own node
                reply = err
            out.append(reply)
        return out


def test_flowers_own_error_in_place_of_a_sites_reply_is_counted_as_that_sites():
    from dicomfl.server.gridpoll import send_and_collect

    task_identity()
    grid = _UnavailableGrid({1: 0.0, 2: 0.0})
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
    got = {r.metadata.src_node_id: r for r in send_and_collect(grid, msgs, timeout=5, poll_interval=0.05)}
    assert set(got) == {1, 2} and not got[1].has_error()
    assert got[2].has_error() and got[2].error.code == 3  # MESSAGE_UNAVAILABLE, now from node 2


def test_the_coordinator_asks_again_soon_for_reply_objects_not_yet_at_the_superlink():
    """Flower's grid waits 1 s, 2 s, ... for a reply's objects that the SuperNode is still
    pushing; while a round is out the coordinator's grid module asks again after 0.05 s, never more
    than the poll interval apart, and never past the round's end, however many replies stall.
    Flower's own function, other keyword defaults, in this module only, restored afterwards."""
    import flwr.superlink.grid.http_grid as http_grid
    import flwr.supercore.inflatable.inflatable_utils as objects

    from dicomfl.server.flower_adapter import quick_object_pulls, restore_object_pulls

    grid = http_grid.HttpGrid.__new__(http_grid.HttpGrid)  # the module is what matters, not a connection
    saved = http_grid.pull_objects
    try:
        assert quick_object_pulls(grid, 0.25) and quick_object_pulls(grid, 0.25).func is objects.pull_objects
        assert objects.pull_objects is saved  # other users of Flower's function are not touched
        # It still pulls: an object missing twice comes on the third ask.
        tries = []

        def pull(object_id):
            tries.append(object_id)
            if len(tries) < 3:
                raise objects.ObjectUnavailableError(object_id)
            return b"x"

        assert http_grid.pull_objects(["a"], pull) == {"a": b"x"} and len(tries) == 3

        def never(object_id):
            raise objects.ObjectUnavailableError(object_id)

        # Three replies whose objects never come, pulled one after the other: all given up by the
        # round's deadline (1 s from now), not 1 s each.
        quick_object_pulls(grid, 0.25, deadline=time.monotonic() + 1.0)
        t0 = time.monotonic()
        for _ in range(3):
            with pytest.raises(objects.ObjectPullError):
                http_grid.pull_objects(["a"], never)
        assert time.monotonic() - t0 < 2.5
        restore_object_pulls(grid)
        assert http_grid.pull_objects is saved
    finally:
        http_grid.pull_objects = saved
    assert quick_object_pulls(_PollGrid({1: 0.0}), 0.25) is None  # a grid whose module has no such function


def test_send_and_collect_falls_back_to_send_and_receive_on_a_grid_without_push_pull():
    from dicomfl.server.gridpoll import send_and_collect

    class Plain:
        def send_and_receive(self, messages, *, timeout=None):
            self.timeout = timeout
            return [Message(RecordDict(), reply_to=m) for m in messages]

    task_identity()
    g = Plain()
    msgs = [Message(RecordDict(), dst_node_id=1, message_type="train")]
    stamp_message_id(msgs[0], "p-1")
    assert len(list(send_and_collect(g, msgs, timeout=7, poll_interval=0.1))) == 1 and g.timeout == 7


def _coord(tmp: Path):
    from dicomfl.common.config import CoordinatorConfig

    cfg = CoordinatorConfig.model_validate({"coordinator": {"state_dir": str(tmp / "coord"), "tls": False,
                                                            "supernode_auth": False}})
    return cfg


def _run_cfg(tmp: Path, rounds: int = 3):
    import yaml

    from dicomfl.common.config import load_run_config

    p = tmp / "run.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": "r", "rounds": rounds, "min_sites": 1, "out_dir": str(tmp / "out")},
                                 "model": {"mode": "metadata"}}))
    return load_run_config(p, check_files=False)


def _checkpoint(out: Path, rnd: int) -> None:
    d = out / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    (d / "latest.json").write_text(json.dumps({"round": rnd, "path": f"round-{rnd:04d}"}))


def test_the_coordinator_resumes_recorded_runs_and_gives_up_on_one_that_makes_no_progress(tmp_path, monkeypatch):
    from dicomfl.server import coordinator, runner

    cfg, run = _coord(tmp_path), _run_cfg(tmp_path)
    rec = runner.record_path(cfg, run)
    runner.update_record(rec, status=runner.RUNNING, run_yaml=str(run.source), clientapp="tests.faultapps:app",
                         out_dir=str(run.out_dir))
    runner.update_record(runner.runs_dir(cfg) / "done.json", status=runner.FINISHED, run_yaml=str(run.source))
    assert runner.pending_runs(cfg) == [rec]
    _checkpoint(run.out_dir, 1)
    calls = []

    def fake_submit(r, c, **kw):
        calls.append(kw)
        return 1  # interrupted again: the record stays "running"

    monkeypatch.setattr(runner, "submit", fake_submit)
    monkeypatch.setattr(coordinator.Resumer, "_wait_for_sites", lambda self, n: n)
    r = coordinator.Resumer(cfg)
    for _ in range(coordinator.MAX_IDLE_RESUMES):
        r.resume_one(rec)
    assert [c["resume"] for c in calls] == [True] * coordinator.MAX_IDLE_RESUMES
    assert {c["clientapp"] for c in calls} == {"tests.faultapps:app"}  # the ClientApp it was submitted with
    assert [x["after_round"] for x in runner.read_record(rec)["resumes"]] == [1, 1, 1]
    r.resume_one(rec)  # no new checkpoint over MAX_IDLE_RESUMES resumes: given up, not resubmitted forever
    assert len(calls) == coordinator.MAX_IDLE_RESUMES and runner.read_record(rec)["status"] == runner.FAILED
    assert runner.pending_runs(cfg) == []


def test_dicomfl_run_follows_a_run_the_coordinator_resumes(tmp_path, monkeypatch):
    from dicomfl.server import runner

    cfg, run = _coord(tmp_path), _run_cfg(tmp_path, rounds=2)
    rec = runner.record_path(cfg, run)
    runner.update_record(rec, status=runner.RUNNING)
    run.out_dir.mkdir(parents=True)
    log = run.out_dir / "flwr-run.log"
    log.write_text("[dicomfl] round 1/2: training\n")
    monkeypatch.setattr(runner, "service_alive", lambda coord: True)
    lines = []

    def resume_elsewhere():
        time.sleep(0.3)
        with open(log, "a") as fh:
            fh.write("noise\n[dicomfl] resuming after round 1\n[dicomfl] round 2/2: training\n")
        (run.out_dir / "metrics.json").write_text(json.dumps({"rounds": 2}))
        runner.update_record(rec, status=runner.FINISHED)

    t = threading.Thread(target=resume_elsewhere)
    t.start()
    assert runner.follow_run(run, cfg, echo=lines.append, timeout=20, poll_s=0.05) == 0
    t.join()
    assert lines == ["resuming after round 1", "round 2/2: training"]  # only what came after, progress lines only


def test_flwr_run_that_fails_before_starting_says_why_and_one_that_hangs_is_bounded(tmp_path, monkeypatch):
    """The CI failure of the NaN test printed nothing: `flwr run` had failed before the run started.
    Now its last lines are echoed; and a `flwr run` that hangs ends at ``timeout`` (124)."""
    from dicomfl.server import flwrcli, runner

    cfg, run = _coord(tmp_path), _run_cfg(tmp_path)
    failing = tmp_path / "flwr-failing"
    failing.write_text("#!/bin/sh\necho 'Using SuperLink: dicomfl'\necho 'Cannot load ClientApp tests.faultapps:app'\nexit 1\n")
    hanging = tmp_path / "flwr-hanging"
    hanging.write_text("#!/bin/sh\necho 'Successfully started run 1'\nexec sleep 60\n")
    for f in (failing, hanging):
        f.chmod(0o755)
    lines: list[str] = []
    monkeypatch.setattr(flwrcli, "flwr_bin", lambda: str(failing))
    assert runner._stream(run, cfg, resume=False, evaluate_only=None, echo=lines.append, timeout=30,
                          clientapp="x:app") == 0
    assert any("flwr run failed (status 1) before the run started" in x for x in lines)
    assert any("Cannot load ClientApp tests.faultapps:app" in x for x in lines)
    monkeypatch.setattr(flwrcli, "flwr_bin", lambda: str(hanging))
    t0 = time.monotonic()
    assert runner._stream(run, cfg, resume=False, evaluate_only=None, echo=lines.append, timeout=1.5,
                          clientapp="x:app") == 124
    assert time.monotonic() - t0 < 15
