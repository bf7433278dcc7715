"""The intake's doors (issue #26): a PDU is bounded by its header before its body is read.

The server runs in a subprocess (so its memory can be read from /proc); the attacks are raw
sockets on loopback: an A-ASSOCIATE-RQ header declaring ~4 GiB from an unauthenticated peer, and a
P-DATA-TF header declaring ~4 GiB inside an association of the allowed peer. Each is aborted at its
header and the server's peak memory stays under a cap while the attacker streams.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER = r"""
import json, logging, sys, time
from pathlib import Path
from dicomfl.client.intake import IntakeSection, IntakeServer
root = Path(sys.argv[1])
logging.basicConfig(filename=root / "server.log", level=logging.INFO)
section = IntakeSection(port=0, max_pdu=262144, max_instance_bytes=8 * 1024 * 1024,
                        allowed=[{"ae_title": "STORESCU", "host": "127.0.0.1"}])
server = IntakeServer(section, root / "dicom", root / "state")
server.start()
(root / "port").write_text(str(server.address[1]))
while not (root / "stop").exists():
    time.sleep(0.1)
server.stop(timeout_s=2)
"""

CAP_BYTES = 64 * 1024 * 1024


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


@pytest.fixture
def server(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "stderr.log", "wb"))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "port").exists():
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield proc, int((tmp_path / "port").read_text()), tmp_path
    finally:
        (tmp_path / "stop").touch()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stream(sock: socket.socket, total: int, deadline_s: float = 20.0) -> int:
    """Send up to ``total`` bytes; returns how many went out before the peer closed."""
    chunk = b"\0" * 65536
    sent = 0
    end = time.monotonic() + deadline_s
    sock.settimeout(2.0)
    try:
        while sent < total and time.monotonic() < end:
            sent += sock.send(chunk)
    except OSError:
        pass
    return sent


def _closed_by_peer(sock: socket.socket, timeout: float = 15.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_pynetdicom_internals_the_guard_relies_on() -> None:
    """Fails when pynetdicom's DUL stops reading a PDU as recv(6) then recv(length) through
    ``dul.socket``, or stops triggering EVT_CONN_OPEN before the association starts: then
    client/intake.py's _guard_pdu_reads must be revisited."""
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import RequestHandler

    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read and "self.socket.recv(pdu_length)" in read
    assert "self.socket.ready" in inspect.getsource(DULServiceProvider._is_transport_event)
    handle = inspect.getsource(RequestHandler.handle)
    assert handle.index("EVT_CONN_OPEN") < handle.index("assoc.start()")


def test_unauthenticated_4gib_request_header_is_aborted_in_bounded_memory(server) -> None:
    proc, port, root = server
    base = _vm(proc.pid, "VmRSS")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
        _stream(s, 256 * 1024 * 1024)
        assert _closed_by_peer(s)
    assert _vm(proc.pid, "VmHWM") - base < CAP_BYTES
    log = (root / "server.log").read_text()
    assert "declares 4294967280 bytes, over the limit of 65536" in log


def test_allowed_peer_4gib_pdata_header_is_aborted_in_bounded_memory(server) -> None:
    from pynetdicom import AE

    proc, port, root = server
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context("1.2.840.10008.1.1")
    assoc = scu.associate("127.0.0.1", port, ae_title="DICOMFL")
    assert assoc.is_established
    base = _vm(proc.pid, "VmRSS")
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
    _stream(raw, 256 * 1024 * 1024)
    for _ in range(150):
        if not assoc.is_alive():
            break
        time.sleep(0.1)
    assoc.abort()
    assert _vm(proc.pid, "VmHWM") - base < CAP_BYTES
    log = (root / "server.log").read_text()
    assert "PDU type 0x04 declares 4294967280 bytes, over the limit of 263168" in log
    # The server still serves the allowed peer.
    again = scu.associate("127.0.0.1", port, ae_title="DICOMFL")
    assert again.is_established
    assert again.send_c_echo().Status == 0
    again.release()


def test_trickled_request_is_cut_at_the_acse_timeout(tmp_path) -> None:
    from dicomfl.client.intake import IntakeSection, IntakeServer

    server = IntakeServer(IntakeSection(port=0, acse_timeout_s=2, allowed=[{"ae_title": "X", "host": "127.0.0.1"}]),
                          tmp_path / "dicom", tmp_path / "state")
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(struct.pack(">BBL", 0x01, 0, 1000))
            closed = False
            for _ in range(100):  # one byte every 0.1 s: each read is quick, the whole PDU is not
                try:
                    s.sendall(b"\0")
                except OSError:
                    closed = True
                    break
                time.sleep(0.1)
            assert closed or _closed_by_peer(s, timeout=5)
    finally:
        server.stop(timeout_s=2)


def test_idle_connections_from_elsewhere_do_not_block_the_allowed_peer(tmp_path) -> None:
    """60 idle TCP connections from 127.0.0.2 (not allowed): all but one closed at accept; the allowed
    peer's C-ECHO from 127.0.0.1 is then answered within a bounded wait."""
    from pynetdicom import AE

    from dicomfl.client.intake import IntakeSection, IntakeServer, read_status

    server = IntakeServer(IntakeSection(port=0, allowed=[{"ae_title": "ECHOSCU", "host": "127.0.0.1"}]),
                          tmp_path / "dicom", tmp_path / "state")
    server.start()
    idle = []
    try:
        for _ in range(60):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(server.address)
            idle.append(s)
        scu = AE(ae_title="ECHOSCU")
        scu.acse_timeout = scu.network_timeout = 10
        scu.add_requested_context("1.2.840.10008.1.1")
        assoc = scu.associate(*server.address, ae_title="DICOMFL")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert sum(_closed_by_peer(s, timeout=1) for s in idle) >= 59  # one may wait for its RJ
    finally:
        for s in idle:
            s.close()
        server.stop(timeout_s=2)
    assert read_status(tmp_path / "state")["connections_refused"] >= 59


def test_log_files_are_private(tmp_path) -> None:
    """The logging set-up's file and a supervised child's output file are mode 0600, also when
    they existed before with a wider mode."""
    import stat

    from dicomfl.common.logs import setup
    from dicomfl.common.supervise import start_group

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "intake.log").write_text("")
    os.chmod(tmp_path / "logs" / "intake.log", 0o644)
    path = setup(tmp_path, "intake")
    proc = start_group([sys.executable, "-c", "print('x')"], dict(os.environ), tmp_path / "logs" / "child.log")
    proc.wait(timeout=30)
    for p in (path, tmp_path / "logs" / "child.log"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    setup(None, "x")
