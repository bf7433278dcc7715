"""The warm worker's direct path to the SuperNode (dicomfl.client.tasks) and the SuperNode shell
that caps its idle wait (dicomfl.client.supernode), against a real Flower SuperNode started in
process isolation on loopback (no SuperLink needed: its Runtime API serves the worker either way).
The full path, messages included, runs in tests/test_deployment.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from dicomfl.client import supernode as shell
from dicomfl.client.tasks import SECRET_BYTES, TaskLoop, read_secret, write_secret
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
                                  ["--idle-s", "0.2", "x"]])
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
        p = subprocess.Popen([sys.executable, "-m", "dicomfl.client.supernode", "--idle-s", "0.25", "--",
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
