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
import shutil
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


def _pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV item (PS3.8 9.3.5)."""
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def test_command_set_that_never_ends_is_aborted(server) -> None:
    """An allowed peer sends command fragments without the last-fragment bit (pynetdicom would join
    them in memory without a limit): the association is aborted past 64 KiB, with one line, and the
    server serves the next association."""
    from pynetdicom import AE

    proc, port, root = server
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context("1.2.840.10008.1.1")
    assoc = scu.associate("127.0.0.1", port, ae_title="DICOMFL")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket
    raw.settimeout(5)
    try:
        for _ in range(64):  # 64 x 16 KiB of command fragments, none the last
            raw.sendall(_pdata(context_id, 0x01, b"\0" * 16384))
    except OSError:
        pass
    for _ in range(150):
        if not assoc.is_alive():
            break
        time.sleep(0.1)
    assert not assoc.is_alive()
    assoc.abort()
    log = (root / "server.log").read_text()
    assert log.count("a command set passes the limit of 65536 bytes") == 1
    again = scu.associate("127.0.0.1", port, ae_title="DICOMFL")
    assert again.is_established
    assert again.send_c_echo().Status == 0
    again.release()


MARKERS = ("MRN12345678", "19700101", "ZZMARKERNAME", "ACCZZ998877")


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu) is not installed: apt-get install dcmtk")
def test_library_warnings_reach_no_log_with_a_value(tmp_path) -> None:
    """The intake process as the site daemon runs it (``python -m dicomfl.client.intake``, its
    stderr in ``logs/intake-process.log``) receives, by storescu, an instance whose SOP Instance UID
    is invalid and embeds a record number and a birth date: pydicom and pynetdicom warn about it,
    quoting it. No planted value reaches any file under ``state_dir/logs``, every log file is 0600,
    and the warning itself is there, redacted."""
    import stat
    import warnings

    import pydicom
    import yaml
    from pydicom.data import get_testdata_file

    from dicomfl.common.supervise import start_group, stop_group

    from .phi import found_in

    bad_uid = "1.2.MRN12345678.19700101"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = bad_uid
        ds.PatientName, ds.AccessionNumber = "ZZMARKERNAME^X", "ACCZZ998877"
        ds.save_as(tmp_path / "bad.dcm")
    site = tmp_path / "site"
    (site / "dicom").mkdir(parents=True)
    (site / "site.key").write_text(os.urandom(32).hex())
    (site / "site.key").chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {"site": {"name": "site-w", "dicom_dir": "dicom", "secret_file": "site.key", "state_dir": "state",
                    "intake": {"port": port, "allowed": [{"ae_title": "STORESCU", "host": "127.0.0.1"}]}},
           "federation": {"superlink": "127.0.0.1:9", "insecure": True}}
    (site / "site.yaml").write_text(yaml.safe_dump(cfg))
    logs = site / "state" / "logs"
    logs.mkdir(parents=True)
    proc = start_group([sys.executable, "-m", "dicomfl.client.intake", str(site / "site.yaml")], dict(os.environ),
                       logs / "intake-process.log")
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (logs / "intake-process.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the intake did not listen within 60 s"
            time.sleep(0.2)
        res = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "DICOMFL", "127.0.0.1", str(port),
                              str(tmp_path / "bad.dcm")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    finally:
        stop_group(proc)
    files = sorted(p for p in logs.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"intake.log", "intake-process.log"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        blob = p.read_bytes()
        for marker in (*MARKERS, bad_uid):
            assert not found_in(marker, blob), f"{marker} in {p.name}"
    text = (logs / "intake.log").read_text()
    assert "Invalid value for VR UI: <redacted>" in text  # the warning came, without its value
    assert "Traceback" not in (logs / "intake-process.log").read_text()


def test_library_records_are_redacted_once_a_minute_and_ours_pass() -> None:
    """LibraryRedactor: a library's message loses quoted values, UID-like tokens, digit runs and
    its traceback (the exception type stays); one redacted message is written once a minute;
    dicomfl's own records are not touched."""
    import logging

    from dicomfl.common.logs import LibraryRedactor, redact

    assert redact("Invalid value for VR UI: '1.2.MRN12345678.19700101'. See <x>") == (
        "Invalid value for VR UI: <redacted>. See <x>")
    assert redact('name "O\'Brien^PAT" uid 1.2.840.99999.1 id MRN0012345 len 64') == (
        "name <redacted> uid <redacted> id <redacted> len 64")
    f = LibraryRedactor()
    try:
        raise ValueError("value 'DOE^JOHN' cannot be decoded")
    except ValueError:
        import sys as _sys

        exc = _sys.exc_info()
    rec = logging.LogRecord("pynetdicom.dimse", logging.ERROR, __file__, 1, "bad %s", ("'DOE^JOHN'",), exc)
    assert f.filter(rec) and rec.getMessage() == "bad <redacted> (ValueError)" and rec.exc_info is None
    again = logging.LogRecord("pynetdicom.dimse", logging.ERROR, __file__, 1, "bad %s", ("'OTHER'",), exc)
    assert not f.filter(again)  # the same redacted text within a minute
    assert f.filter(rec)  # a record already reduced keeps its verdict for the next handler
    ours = logging.LogRecord("dicomfl.client.intake", logging.WARNING, __file__, 1, "AE 'PACS' at %s", ("10.0.0.1",),
                             None)
    assert f.filter(ours) and ours.getMessage() == "AE 'PACS' at 10.0.0.1"
