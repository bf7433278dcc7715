"""The warm worker's direct path to the SuperNode (dicomfl.client.transport.tasks) and the SuperNode
shell that caps its idle wait (dicomfl.client.transport.supernode), against a real Flower SuperNode started in
process isolation on loopback (no SuperLink needed: its Runtime API serves the worker either way).
The full path, messages included, runs in tests/test_deployment.py."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from dicomfl.client.transport import supernode as shell
from dicomfl.client.transport.secret import SECRET_BYTES
from dicomfl.client.transport.secret import read_superexec_secret as read_secret
from dicomfl.client.transport.secret import write_superexec_secret as write_secret
from dicomfl.client.transport.tasks import WOKEN_MIN_GAP_S, WOKEN_POLL_S, TaskLoop
from dicomfl.client.transport.wakeup import Wakeup, wake
from dicomfl.common.supervise import free_port, stop_group


def test_the_secret_is_private_and_fresh(tmp_path):
    a = write_secret(tmp_path / "run")
    first = read_secret(a)
    assert len(first) == SECRET_BYTES and (a.stat().st_mode & 0o777) == 0o600
    assert (a.parent.stat().st_mode & 0o777) == 0o700
    assert read_secret(write_secret(tmp_path / "run")) != first
    (tmp_path / "short").write_bytes(b"x")
    with pytest.raises(ValueError):
        read_secret(tmp_path / "short")


def test_the_shell_caps_only_the_supernode_loops_waits():
    import flwr.supernode.start_client_internal as loop

    import flwr.supercore.inflatable.inflatable_utils as objects

    saved, saved_pull = loop.time, loop.pull_objects
    try:
        assert shell.cap_idle_wait(0.2)  # the Flower this project pins has the loop dicomfl knows
        assert loop.time.cap == 0.2 and loop.time.monotonic is time.monotonic
        assert time.sleep is not loop.time.sleep  # nothing else in the process is touched
        # Objects not yet at the SuperLink are asked for again after 0.05 s, at most 0.2 s apart
        # (Flower's own: 1 s, doubling up to 10 s); the function is Flower's own.
        assert loop.pull_objects.func is objects.pull_objects
        assert loop.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.2, "max_tries_per_object": None,
                                              "max_time": shell.PULL_MAX_S}
        assert objects.pull_objects is saved_pull  # other users of Flower's function are not touched
    finally:
        loop.time, loop.pull_objects = saved, saved_pull


def test_the_shells_clock_caps_the_idle_wait_and_shortens_the_looks_at_its_own_memory(monkeypatch):
    slept = []

    class Recorder:
        @staticmethod
        def sleep(s):
            slept.append(s)

    monkeypatch.setattr(shell, "time", Recorder)
    clock = shell._CappedClock(0.25)
    clock.sleep(3)  # the loop's idle wait: it asks the SuperLink again after this
    clock.sleep(0.5)  # the loop's wait for a reply in its own memory: no request, so short
    clock.sleep(0.01)
    clock.sleep(1.0)
    assert slept == [0.25, shell.LOCAL_WAIT_S, 0.01, 0.25] and shell.LOCAL_WAIT_S <= 0.05


def test_the_shell_changes_nothing_in_a_supernode_loop_of_another_shape(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    saved = loop.time
    monkeypatch.setattr(loop, "pull_objects", lambda object_ids, pull_object_fn: {})  # no back-off keywords
    assert not shell.cap_idle_wait(0.2)
    assert loop.time is saved


@pytest.mark.parametrize("argv", [[], ["--idle-s", "0"], ["--idle-s", "0.01", "--"], ["--idle-s", "nan", "--"],
                                  ["--idle-s", "0.2", "x"], ["--idle-s", "0.2", "--wake", "", "--"],
                                  ["--idle-s", "0.2", "--wake", "--"], ["--wake", "/tmp/w", "--idle-s", "0.2", "--"],
                                  ["--idle-s", "0.2", "--wake", "--", "--"], ["--idle-s", "0.2", "--wake", "w.sock", "--"],
                                  ["--idle-s", "0.2", "--wake", " /tmp/w", "--"]])
def test_the_shell_refuses_bad_arguments(argv, capsys):
    assert shell.main(argv) == 2
    assert "\n" == capsys.readouterr().err[-1:]


@pytest.fixture()
def supernode(tmp_path):
    """A SuperNode in process isolation through the shell, its Runtime API on a free port; no
    SuperLink (it keeps trying to connect, which does not stop its Runtime API)."""
    secret = write_secret(tmp_path / "run")
    port = free_port()
    log = tmp_path / "supernode.log"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    with open(log, "wb") as fh:
        p = subprocess.Popen([sys.executable, "-m", "dicomfl.client.transport.supernode", "--idle-s", "0.25", "--",
                              "--insecure", "--superlink", f"127.0.0.1:{free_port()}", "--port", str(port),
                              "--isolation", "process", "--superexec-auth-secret-file", str(secret)],
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        yield f"127.0.0.1:{port}", read_secret(secret), log
    finally:
        stop_group(p, timeout=10)


def _acquire(address: str, secret: bytes):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    loop = TaskLoop(address, lambda m, c: m, secret, 0.1, logging.getLogger("test"))
    client = loop._client([SuperExecAuthHttpInterceptor(master_secret=secret,
                                                        protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    try:
        return client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    finally:
        client.close()


def _wait_up(address: str, secret: bytes, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _acquire(address, secret)
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_only_the_holder_of_the_secret_takes_the_sites_tasks(supernode, caplog):
    address, secret, log = supernode
    assert not _wait_up(address, secret).HasField("task")  # signed: answered (no task waiting)
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as err:  # another local user without the secret
        _acquire(address, bytes(SECRET_BYTES))
    assert err.value.response.status_code == 401
    assert "idle wait capped at 0.25 s" in log.read_text()
    # A worker holding a wrong secret is refused but not stopped (Flower's own retry would SIGINT it).
    stop = threading.Event()
    wrong = TaskLoop(address, lambda m, c: m, bytes(SECRET_BYTES), 0.05, logging.getLogger("dicomfl.test.tasks"))
    t = threading.Thread(target=wrong.serve_forever, args=(stop,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="dicomfl.test.tasks"):
        t.start()
        deadline = time.monotonic() + 30
        while not any("gives no task" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive() and wrong.handled == 0
    assert any("gives no task (HTTP 401)" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ the wake-up


def test_a_wake_up_reaches_the_worker_at_once_and_a_burst_wakes_it_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    w = Wakeup(run / "wake.sock")
    try:
        assert (os.stat(run / "wake.sock").st_mode & 0o777) == 0o600
        assert not w.wait(0.05)  # nothing sent: it waited
        assert wake(run / "wake.sock")
        t0 = time.monotonic()
        assert w.wait(5.0) and time.monotonic() - t0 < 1.0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as junk:
            junk.sendto(os.urandom(60000), str(run / "wake.sock"))  # another process of the site's user: junk
        sent = [wake(run / "wake.sock") for _ in range(50)]  # and a burst, past the socket's queue
        assert sent[0] and not all(sent)  # a full queue refuses the rest at once (the SuperNode never blocks)
        assert w.wait(1.0)
        assert not w.wait(0.05)  # ... wakes it once: every datagram waiting was read
    finally:
        w.close()
    assert not (run / "wake.sock").exists()
    assert not wake(run / "wake.sock")  # no worker there (restarting): no error, no block
    assert not wake(tmp_path / "no-such-dir" / "wake.sock")


def test_a_new_worker_replaces_a_stale_wake_socket_and_the_old_one_leaves_it_alone(tmp_path):
    path = tmp_path / "wake.sock"
    old = Wakeup(path)
    old.sock.close()  # the old worker was SIGKILLed: its socket file stays, nobody is bound to it
    new = Wakeup(path)  # the new one replaces it
    try:
        assert wake(path) and new.wait(2.0)
        os.rename(path, tmp_path / "moved.sock")  # someone moved it and put another socket there
        other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        other.bind(str(path))
        assert not new.intact()
        new.close()  # closing must not remove a socket file that is not its own
        assert path.is_socket()
        other.close()
    finally:
        new.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(OSError):  # a file that is not a socket is never deleted
        Wakeup(path)
    assert path.read_text() == "not a socket"
    path.unlink()
    live = Wakeup(path)
    try:
        with pytest.raises(OSError):  # a socket another worker is bound to is not taken over
            Wakeup(path)
        assert wake(path) and live.wait(2.0)
    finally:
        live.close()


def _fake_tasks(loop, tasks: list[bool]):
    """``loop`` against a fake Runtime API: each AcquireTask answers the next of ``tasks`` (True: a
    task), then stops the loop; returns the stop event and the recorded asks (monotonic times)."""
    stop, asks = threading.Event(), []

    class Res:
        def __init__(self, task):
            self.token = "t" if task else ""
            self.task = task

        def HasField(self, name):
            return self.task

    class Client:
        def AcquireTask(self, request):
            asks.append(time.monotonic())
            if not tasks:
                stop.set()
                return Res(False)
            return Res(tasks.pop(0))

        def close(self):
            pass

    loop._client = lambda interceptors: Client()
    loop.run_task = lambda token: None
    return stop, asks


def test_a_lost_wake_up_sends_the_loop_back_to_polling_and_a_removed_socket_is_bound_again(tmp_path, caplog):
    path = tmp_path / "wake.sock"
    loop = TaskLoop("127.0.0.1:1", None, bytes(SECRET_BYTES), 0.05, logging.getLogger("dicomfl.test.wake"),
                    wakeup=Wakeup(path))
    loop.wakes = 1  # the SuperNode has woken it before
    path.unlink()  # then someone removed the socket file: wake-ups no longer arrive
    stop, asks = _fake_tasks(loop, [False, True])  # nothing; then, after a backstop wait, a task waiting
    try:
        with caplog.at_level(logging.INFO, logger="dicomfl.test.wake"):
            loop.serve_forever(stop)
        assert loop.wakes == 0  # asks every poll_s again until woken
        assert any("removed or replaced; bound it again" in r.getMessage() for r in caplog.records)
        assert loop.wakeup.intact() and wake(path) and loop.wakeup.wait(2.0)  # and the new socket works
    finally:
        loop.wakeup.close()


def test_a_flood_of_wake_ups_cannot_make_the_worker_ask_more_often_than_its_floor(tmp_path):
    path = tmp_path / "wake.sock"
    loop = TaskLoop("127.0.0.1:1", None, bytes(SECRET_BYTES), 0.1, logging.getLogger("test"), wakeup=Wakeup(path))
    stop, asks = _fake_tasks(loop, [False] * 30)
    flooding = threading.Event()

    def flood():
        while not flooding.is_set():
            wake(path)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        loop.serve_forever(stop)
    finally:
        flooding.set()
        t.join(5)
        loop.wakeup.close()
    gaps = [b - a for a, b in zip(asks, asks[1:])]
    assert len(asks) == 31 and min(gaps) >= WOKEN_MIN_GAP_S * 0.9, gaps


def test_a_loop_waiting_for_a_wake_up_stops_promptly(tmp_path):
    loop = TaskLoop("127.0.0.1:1", None, bytes(SECRET_BYTES), 0.1, logging.getLogger("test"),
                    wakeup=Wakeup(tmp_path / "wake.sock"))
    loop.wakes = 1  # waiting up to WOKEN_POLL_S
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    try:
        assert loop._idle(stop) is False
    finally:
        loop.wakeup.close()
    assert time.monotonic() - t0 < WOKEN_POLL_S * 0.6


def test_the_loop_polls_until_it_is_first_woken_then_waits_for_wake_ups():
    class FakeWakeup:
        """Wakes the loop once, on the second wait."""

        def __init__(self):
            self.calls = 0

        def wait(self, timeout):
            self.calls += 1
            if self.calls == 2:
                return True
            time.sleep(timeout)
            return False

    loop = TaskLoop("127.0.0.1:1", lambda m, c: m, bytes(SECRET_BYTES), 0.1, logging.getLogger("test"),
                    wakeup=FakeWakeup())
    stop = threading.Event()
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        took.append((loop._idle(stop), time.monotonic() - t0))
    assert [w for w, _ in took] == [False, True, False]
    assert 0.09 <= took[0][1] < 0.5  # task_poll_s until the SuperNode has woken it once ...
    assert took[2][1] >= WOKEN_POLL_S * 0.95  # ... then the backstop
    plain = TaskLoop("127.0.0.1:1", lambda m, c: m, bytes(SECRET_BYTES), 0.05, logging.getLogger("test"))
    t0 = time.monotonic()
    assert plain._idle(stop) is False and time.monotonic() - t0 >= 0.04  # no wake-up: the plain poll


def test_the_shell_wakes_the_worker_only_after_a_message_arrived(tmp_path, monkeypatch):
    import flwr.supernode.start_client_internal as loop

    got = iter([None, 7])  # no message, then one (its run id)
    monkeypatch.setattr(loop, "_pull_and_store_message", lambda **kw: next(got))
    w = Wakeup(tmp_path / "wake.sock")
    try:
        assert shell.wake_worker_on_message(str(tmp_path / "wake.sock"))
        assert not shell.wake_worker_on_message(str(tmp_path / "wake.sock"))  # not wrapped twice
        assert loop._pull_and_store_message(state=None) is None and not w.wait(0.05)
        assert loop._pull_and_store_message(state=None) == 7 and w.wait(2.0)
    finally:
        w.close()
    monkeypatch.delattr(loop, "_pull_and_store_message")
    assert not shell.wake_worker_on_message(str(tmp_path / "wake.sock"))  # another Flower: nothing changed
