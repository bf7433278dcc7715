"""The site's DICOM Storage SCP (dicomfl.client.intake) against real clients and a real PACS.

Clients: dcmtk's ``echoscu`` and ``storescu`` (Debian ``dcmtk``), and Orthanc (Debian ``orthanc``)
pushing by C-STORE. Everything runs on loopback with bounded waits; each test stops what it
started, by pid. The generated study carries fake PHI, which must never show up in a log line,
the status file or a path the server makes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomfl.client.intake import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    IntakeSection,
    IntakeServer,
    check_instance,
    intake_path,
    iter_intake_files,
    read_status,
    status_path,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PLANTED = ("DOE", "JOHN", "PID-12345", "19620703", "ACC-778899", "St Elsewhere")
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
TOOL_TIMEOUT = 30

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk (storescu, echoscu) is not installed: apt-get install dcmtk",
)


# --------------------------------------------------------------------------- study generation


def _image(sop_class: str, study_uid: str, series_uid: str, number: int, size: int = 32) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19620703"
    ds.AccessionNumber = "ACC-778899"
    ds.InstitutionName = "St Elsewhere"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20260102"
    ds.Modality = "CR" if sop_class == CR else "DX"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if sop_class == DX:
        ds.PresentationIntentType = "FOR PRESENTATION"
    rng = np.random.default_rng(number)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write_study(folder: Path, n: int = 5, size: int = 32) -> list[Path]:
    """``n`` CR/DX instances of one study with fake PHI; one sits in ``DOE^JOHN/19620703/``."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = _image(CR if i % 2 == 0 else DX, study, series, i + 1, size)
        sub = folder / "DOE^JOHN" / "19620703" if i == 0 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"IMG{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return write_study(tmp_path / "outbox")


# --------------------------------------------------------------------------- helpers


class _Records(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_capture() -> Iterator[_Records]:
    """Every record of our logger and pynetdicom's, at every level they emit, whatever
    propagation or handlers another part of the suite has set up."""
    handler = _Records()
    ours = logging.getLogger("dicomfl.client.intake")
    ours_level = ours.level
    ours.setLevel(logging.DEBUG)
    loggers = [ours, logging.getLogger("pynetdicom")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)
    ours.setLevel(ours_level)


def assert_no_phi(records: _Records, *roots: Path) -> None:
    """No planted value in a captured log line, the status file, or a name under ``roots``."""
    lines = [r.getMessage() for r in records.records]
    assert lines, "nothing was logged: the scan would prove nothing"
    texts = list(lines)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            texts += [os.path.relpath(dirpath, root), *dirnames, *filenames]
            for name in filenames:
                if name == "status.json":
                    texts.append(Path(dirpath, name).read_text())
    for text in texts:
        for value in PLANTED:
            assert value.lower() not in text.lower(), f"planted value {value!r} leaked into {text!r}"


def run_tool(*args: str, timeout: int = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Start IntakeServers for a test (port chosen by the OS) and stop them afterwards."""
    started: list[IntakeServer] = []

    def _serve(name: str = "site", **settings) -> IntakeServer:
        settings.setdefault("port", 0)
        settings.setdefault(
            "allowed",
            [{"ae_title": "STORESCU", "host": "127.0.0.1"}, {"ae_title": "ECHOSCU", "host": "127.0.0.1"}],
        )
        server = IntakeServer(IntakeSection(**settings), tmp_path / name / "dicom", tmp_path / name / "state")
        server.start()
        started.append(server)
        return server

    yield _serve
    for server in started:
        server.stop(timeout_s=5)


def storescu(server: IntakeServer, *files: Path | str, aet: str = "STORESCU", aec: str = "DICOMFL",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    host, port = server.address
    return run_tool("storescu", "-aet", aet, "-aec", aec, *extra, host, str(port), *map(str, files))


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


# --------------------------------------------------------------------------- configuration


def test_section_validates_ae_titles_and_hosts() -> None:
    ok = IntakeSection(port=104, ae_title="  DICOMFL ", allowed=[{"ae_title": "PACS", "host": "10.1.2.0/24"}])
    assert ok.ae_title == "DICOMFL" and ok.host == "127.0.0.1" and ok.allowed[0].host == "10.1.2.0/24"
    assert ok.allowed[0].matches("PACS", "10.1.2.77") and not ok.allowed[0].matches("PACS", "10.1.3.1")
    assert ok.allowed[0].matches("PACS  ", "::ffff:10.1.2.3")  # padded AE, IPv4-mapped address
    for bad in ("", "A" * 17, "A\\B", "A\nB", "ÄE", "   "):
        with pytest.raises(ValueError):
            IntakeSection(port=104, ae_title=bad)
    with pytest.raises(ValueError):
        IntakeSection(port=104, allowed=[{"ae_title": "PACS", "host": "pacs.example.org"}])
    with pytest.raises(ValueError):
        IntakeSection(port=104, host="localhost")
    with pytest.raises(ValueError):
        IntakeSection(port=104, unknown_key=1)
    with pytest.raises(ValueError):
        IntakeSection(port=104, allowed=[{"ae_title": "PACS", "host": "127.0.0.1", "extra": 1}])
    with pytest.raises(ValueError):
        IntakeSection(port=70000)


def test_check_instance_statuses(study: list[Path]) -> None:
    ds = read(study[1])
    uid, cls = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    data = study[1].read_bytes()
    assert check_instance(data, len(data), cls, uid, 1 << 20) == (STATUS_SUCCESS, None, uid)
    assert check_instance(data, len(data), cls, uid, 100)[0] == STATUS_OUT_OF_RESOURCES
    assert check_instance(data, len(data), BASIC_TEXT_SR, uid, 1 << 20)[0] == STATUS_SOP_CLASS_NOT_SUPPORTED
    assert check_instance(data, len(data), cls, "1.2.3", 1 << 20)[0] == STATUS_DATASET_MISMATCH
    assert check_instance(b"\x00" * 128 + b"DICM" + b"\xff" * 50, 50, cls, uid, 1 << 20)[0] == STATUS_CANNOT_UNDERSTAND
    del ds.SOPInstanceUID
    no_uid = Path(str(study[1]) + ".nouid")
    ds.save_as(no_uid)
    raw = no_uid.read_bytes()
    assert check_instance(raw, len(raw), cls, uid, 1 << 20)[1] == "no-sop-instance-uid"
    ds.SOPInstanceUID, ds.SOPClassUID = uid, BASIC_TEXT_SR
    ds.save_as(no_uid)
    raw = no_uid.read_bytes()
    assert check_instance(raw, len(raw), cls, uid, 1 << 20)[0] == STATUS_SOP_CLASS_NOT_SUPPORTED


def test_read_status_without_a_file(tmp_path: Path) -> None:
    st = read_status(tmp_path)
    assert st["received"] == 0 and st["written"] == 0 and st["started_at"] is None


# --------------------------------------------------------------------------- dcmtk clients


@needs_dcmtk
def test_echoscu_gets_an_answer(serve, log_capture) -> None:
    server = serve()
    host, port = server.address
    res = run_tool("echoscu", "-aec", "DICOMFL", host, str(port))
    assert res.returncode == 0, res.stderr
    assert server.counters()["echoes"] == 1
    assert logging.getLogger("pynetdicom").getEffectiveLevel() >= logging.WARNING


@needs_dcmtk
def test_storescu_push_lands_hashed_and_is_idempotent(serve, study, tmp_path, log_capture) -> None:
    server = serve()
    res = storescu(server, "+sd", "+r", tmp_path / "outbox")
    assert res.returncode == 0, res.stderr
    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    files = list(iter_intake_files(dicom_dir))
    assert len(files) == len(study)
    for src in study:
        original = read(src)
        dst = intake_path(dicom_dir, original.SOPInstanceUID)
        assert dst.is_file() and dst.parent.parent == dicom_dir / "intake"
        assert dst.name == f"{dst.stem}.dcm" and len(dst.stem) == 64 and dst.parent.name == dst.stem[:2]
        received = read(dst)
        assert received == original  # same data set (storescu may re-encode; meta differs)
        assert received.PatientName == "DOE^JOHN"  # stored as received: no de-identification here
        assert stat.S_IMODE(dst.stat().st_mode) == 0o600
        assert stat.S_IMODE(dst.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((dicom_dir / "intake").stat().st_mode) == 0o700
    assert not [p for p in (dicom_dir / "intake").rglob(".*")], "a temp file was left behind"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    res = storescu(server, "+sd", "+r", tmp_path / "outbox")  # re-push: idempotent
    assert res.returncode == 0, res.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in iter_intake_files(dicom_dir)} == before

    # The same SOP Instance UID with other bytes (here: re-encoded) is refused, never written over.
    res = storescu(server, study[0], extra=("-xi", "-v"))
    assert res.returncode != 0 and "Received Store Response (Error: CannotUnderstand)" in res.stderr, res.stderr
    kept = intake_path(dicom_dir, read(study[0]).SOPInstanceUID)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in iter_intake_files(dicom_dir)} == before
    assert read(kept).file_meta.TransferSyntaxUID != "1.2.840.10008.1.2"
    server.stop()
    st = read_status(state_dir)
    n = len(study)
    counts = (st["received"], st["written"], st["duplicates"], st["conflicts"], st["rejected"], st["failed"])
    assert counts == (2 * n + 1, n, n, 1, 1, 0)
    assert st["store_bytes"] == sum(p.stat().st_size for p in files)
    assert st["associations_accepted"] == 3 and st["associations_refused"] == 0
    assert st["last_written_at"] and dt.datetime.fromisoformat(st["last_written_at"])
    assert stat.S_IMODE(status_path(state_dir).stat().st_mode) == 0o600
    assert set(json.loads(status_path(state_dir).read_text())) <= set(st)  # counts and times only
    assert_no_phi(log_capture, dicom_dir, state_dir)


@needs_dcmtk
def test_compressed_and_other_transfer_syntaxes_are_stored_as_sent(serve, tmp_path, log_capture) -> None:
    """Each file is encoded by dcmtk itself and pushed with storescu proposing its syntax: the
    stored file keeps that transfer syntax and the very same (still encoded) pixel data."""
    cases = [  # name, encoder command (None: keep explicit LE), storescu proposal, expected syntax
        ("implicit", None, "-xi", "1.2.840.10008.1.2"),
        ("deflated", None, "-xd", "1.2.840.10008.1.2.1.99"),
        ("rle", ["dcmcrle"], "-xr", "1.2.840.10008.1.2.5"),
        ("jpeg-lossless", ["dcmcjpeg", "+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
        ("jpeg-ls", ["dcmcjpls", "+el"], "-xt", "1.2.840.10008.1.2.4.80"),
        ("jpeg-baseline", ["dcmcjpeg", "+eb"], "-xy", "1.2.840.10008.1.2.4.50"),
        ("j2k-lossless", "pydicom", "-xv", "1.2.840.10008.1.2.4.90"),  # Debian's dcmtk has no J2K codec
    ]
    server = serve()
    dicom_dir = tmp_path / "site" / "dicom"
    for name, encoder, propose, syntax in cases:
        src = write_study(tmp_path / name, n=1, size=64)[0]
        if name == "jpeg-baseline":  # baseline JPEG is 8-bit
            ds = read(src)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) >> 4).astype(np.uint8).tobytes()
            ds.save_as(src, enforce_file_format=True)
        if encoder == "pydicom":
            ds = read(src)
            ds.compress(syntax)  # pylibjpeg-openjpeg, a project dependency
            src = src.with_suffix(".enc.dcm")
            ds.save_as(src, enforce_file_format=True)
        elif encoder is not None:
            enc = src.with_suffix(".enc.dcm")
            res = run_tool(*encoder, str(src), str(enc))
            assert res.returncode == 0, res.stderr
            src = enc
        res = storescu(server, src, extra=("-R", propose))
        assert res.returncode == 0, f"{name}: {res.stderr}"
        original = read(src)
        stored = read(intake_path(dicom_dir, original.SOPInstanceUID))
        if encoder is not None:  # storescu converts the uncompressed ones; the rest go as encoded
            assert original.file_meta.TransferSyntaxUID == syntax
        assert stored.file_meta.TransferSyntaxUID == syntax, name
        assert stored == original, name
    assert_no_phi(log_capture, dicom_dir, tmp_path / "site" / "state")


@needs_dcmtk
@pytest.mark.parametrize(
    ("aet", "allowed", "aec"),
    [
        ("INTRUDER", [{"ae_title": "STORESCU", "host": "127.0.0.1"}], "DICOMFL"),  # AE not allowed
        ("STORESCU", [{"ae_title": "STORESCU", "host": "10.9.8.7"}], "DICOMFL"),  # address not allowed
        ("STORESCU", [], "DICOMFL"),  # empty allow-list: nobody
        ("STORESCU", [{"ae_title": "STORESCU", "host": "127.0.0.1"}], "SOMEONE"),  # not our AE title
    ],
    ids=["calling-ae", "address", "empty-list", "called-ae"],
)
def test_refused_senders_write_nothing(serve, study, tmp_path, log_capture, aet, allowed, aec) -> None:
    server = serve(allowed=allowed)
    res = storescu(server, *study, aet=aet, aec=aec)
    assert res.returncode != 0
    assert "Association Rejected" in res.stderr
    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    assert list(iter_intake_files(dicom_dir)) == []
    server.stop()
    st = read_status(state_dir)
    assert st["associations_refused"] == 1 and st["received"] == 0 and st["last_refused_at"]
    refusals = [r.getMessage() for r in log_capture.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and f"AE '{aet}'" in refusals[0] and "127.0.0.1" in refusals[0]
    assert_no_phi(log_capture, dicom_dir, state_dir)


@needs_dcmtk
def test_associations_over_the_limit_are_refused(serve, tmp_path, log_capture) -> None:
    from pynetdicom import AE

    server = serve(max_associations=1)
    host, port = server.address
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context("1.2.840.10008.1.1")
    held = scu.associate(host, port, ae_title="DICOMFL")
    try:
        assert held.is_established
        res = run_tool("echoscu", "-aec", "DICOMFL", host, str(port))
        assert res.returncode != 0 and "Association Rejected" in res.stderr
    finally:
        held.release()
    assert run_tool("echoscu", "-aec", "DICOMFL", host, str(port)).returncode == 0  # free again
    server.stop()
    st = read_status(tmp_path / "site" / "state")
    assert (st["associations_accepted"], st["associations_refused"], st["echoes"]) == (2, 1, 1)
    assert_no_phi(log_capture, tmp_path / "site")


@needs_dcmtk
def test_oversize_instance_is_refused_and_the_rest_goes_through(serve, study, tmp_path, log_capture) -> None:
    big = write_study(tmp_path / "big", n=1, size=256)[0]  # 128 KiB of pixels, over the cap
    server = serve(max_instance_bytes=16 * 1024)
    res = storescu(server, study[1], big, study[2], extra=("-nh", "-v"))
    assert "Received Store Response (Refused: OutOfResources)" in res.stderr  # 0xA700, per instance
    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    written = set(iter_intake_files(dicom_dir))
    assert written == {intake_path(dicom_dir, read(p).SOPInstanceUID) for p in (study[1], study[2])}
    server.stop()
    st = read_status(state_dir)
    assert (st["received"], st["written"], st["rejected"], st["associations_accepted"]) == (3, 2, 1, 1)
    lines = [r.getMessage() for r in log_capture.records]
    assert any("too-large, dropped while being received (status 0xA700)" in line for line in lines)
    assert_no_phi(log_capture, dicom_dir, state_dir)


@needs_dcmtk
def test_non_image_sop_class_is_not_accepted(serve, tmp_path, log_capture) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.PatientName, sr.PatientID = "DOE^JOHN", "PID-12345"
    sr_path = tmp_path / "report.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    server = serve()
    res = storescu(server, sr_path)
    assert res.returncode != 0  # no presentation context is accepted for an SR
    dicom_dir, state_dir = tmp_path / "site" / "dicom", tmp_path / "site" / "state"
    assert list(iter_intake_files(dicom_dir)) == []
    server.stop()
    assert read_status(state_dir)["written"] == 0
    assert_no_phi(log_capture, dicom_dir, state_dir)


# --------------------------------------------------------------------------- TLS


def _pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    folder.mkdir(parents=True, exist_ok=True)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (
        x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / "ca.crt"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    usages = {"server": x509.ExtendedKeyUsageOID.SERVER_AUTH, "client": x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    for who, usage in usages.items():
        k = key()
        cert = (
            x509.CertificateBuilder().subject_name(name(f"{who}")).issuer_name(ca.subject)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{who}_crt"] = folder / f"{who}.crt"
        out[f"{who}_key"] = folder / f"{who}.key"
        out[f"{who}_crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
        out[f"{who}_key"].write_bytes(pem)
        os.chmod(out[f"{who}_key"], 0o600)
    return out


@needs_dcmtk
def test_tls_with_client_certificates(serve, study, tmp_path, log_capture) -> None:
    pki = _pki(tmp_path / "pki")
    server = serve(tls={"cert_file": pki["server_crt"], "key_file": pki["server_key"], "ca_file": pki["ca"]},
                   acse_timeout_s=5)
    host, port = server.address
    tls = ("+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca"]))

    # A client that connects and stays silent must not stall the others (handshakes are not done
    # in the accept loop).
    with socket.create_connection((host, port), timeout=5):
        t0 = time.monotonic()
        res = storescu(server, *study, extra=tls)
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 15
    dicom_dir = tmp_path / "site" / "dicom"
    assert len(list(iter_intake_files(dicom_dir))) == len(study)

    plain = run_tool("echoscu", "-aec", "DICOMFL", "-to", "5", "-ta", "5", host, str(port), timeout=20)
    assert plain.returncode != 0  # plain TCP on a TLS port gets nowhere
    anonymous = storescu(server, study[0], extra=("+tla", "-ic", "-to", "5", "-ta", "5"))
    assert anonymous.returncode != 0  # no client certificate: refused
    server.stop()
    assert_no_phi(log_capture, dicom_dir, tmp_path / "site" / "state")


# --------------------------------------------------------------------------- Orthanc


def _orthanc_or_skip() -> str:
    exe = shutil.which("Orthanc")
    if exe is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc'): the PACS push test needs it")
    return exe


def _http(url: str, data: bytes | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/dicom" if url.endswith("/instances") else "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as rsp:
        return rsp.read()


@needs_dcmtk
def test_orthanc_pushes_a_study(serve, study, tmp_path, log_capture) -> None:
    exe = _orthanc_or_skip()
    server = serve(allowed=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    _, port = server.address
    http_port = free_port()
    work = tmp_path / "orthanc"
    work.mkdir()
    config = {
        "Name": "dicomfl-test-pacs",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,  # Orthanc only pushes here: no DICOM port of its own to open
        "DicomAet": "ORTHANC",
        "DicomModalities": {"dicomfl": ["DICOMFL", "127.0.0.1", port]},
        "DicomScuTimeout": 10,
        "Plugins": [],
        "SaveJobs": False,
        "HttpTimeout": 10,
    }
    (work / "config.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, str(work / "config.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=work, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.skip(f"Orthanc exited at start (code {proc.returncode}); see its log")
            try:
                json.loads(_http(f"{base}/system", timeout=2))
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail("Orthanc's HTTP port did not answer within 20 s")
                time.sleep(0.2)
        study_ids = set()
        for path in study:
            answer = json.loads(_http(f"{base}/instances", path.read_bytes()))
            study_ids.add(answer["ParentStudy"])
        assert len(study_ids) == 1
        (study_id,) = study_ids
        _http(f"{base}/modalities/dicomfl/store",
              json.dumps({"Resources": [study_id], "Synchronous": True}).encode(), timeout=30)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    dicom_dir = tmp_path / "site" / "dicom"
    for src in study:
        original = read(src)
        dst = intake_path(dicom_dir, original.SOPInstanceUID)
        assert dst.is_file()
        assert read(dst).PixelData == original.PixelData
        assert read(dst).SOPInstanceUID == original.SOPInstanceUID
    server.stop()
    st = read_status(tmp_path / "site" / "state")
    assert st["written"] == len(study) and st["associations_accepted"] >= 1
    assert_no_phi(log_capture, dicom_dir, tmp_path / "site" / "state")


# --------------------------------------------------------------------------- the site daemon


def test_site_start_runs_the_scp_and_the_next_ingest_takes_what_arrived(study, tmp_path) -> None:
    """`dicomfl site start` with site.intake: storescu pushes a study to the running daemon, every
    instance lands, echoscu is answered, a sender not on the list is refused, `dicomfl site status`
    counts what came, and the next ingestion accepts it. No coordinator is needed to receive."""
    import sys

    import yaml

    from dicomfl.common.supervise import stop_group

    site = tmp_path / "daemon-site"
    (site / "dicom").mkdir(parents=True)
    (site / "site.key").write_text(os.urandom(32).hex())
    (site / "site.key").chmod(0o600)
    port = free_port()
    cfg = {"site": {"name": "site-x", "dicom_dir": "dicom", "secret_file": "site.key", "state_dir": "state",
                    "label_key": "study_instance_uid",
                    "intake": {"port": port, "ae_title": "DICOMFL",
                               "allowed": [{"ae_title": "STORESCU", "host": "127.0.0.1"},
                                           {"ae_title": "ECHOSCU", "host": "127.0.0.1"}]}},
           "federation": {"superlink": f"127.0.0.1:{free_port()}", "insecure": True, "port": free_port(),
                          "warm_worker": False},
           "preprocess": {"image_size": 32}}
    (site / "site.yaml").write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "dicomfl.workbench.cli"]
    with open(tmp_path / "daemon.out", "wb") as out:
        proc = subprocess.Popen([*cli, "site", "start", str(site / "site.yaml")], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, (tmp_path / "daemon.out").read_text()[-2000:]
            time.sleep(0.3)
        else:
            raise AssertionError("the site daemon's SCP did not listen within 90 s")
        assert run_tool("echoscu", "-aet", "ECHOSCU", "-aec", "DICOMFL", "127.0.0.1", str(port)).returncode == 0
        refused = run_tool("storescu", "-aet", "INTRUDER", "-aec", "DICOMFL", "127.0.0.1", str(port), str(study[1]))
        assert refused.returncode != 0
        pushed = run_tool("storescu", "-aet", "STORESCU", "-aec", "DICOMFL", "127.0.0.1", str(port), *map(str, study))
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        assert len(list(iter_intake_files(site / "dicom"))) == len(study)
        status = subprocess.run([*cli, "site", "status", str(site / "site.yaml"), "--json"], capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)["intake"]
        assert st["written"] == len(study) and st["associations_refused"] >= 1
    finally:
        stop_group(proc)
    assert proc.poll() is not None
    ingest = subprocess.run([*cli, "ingest", str(site / "site.yaml"), "--json"], capture_output=True, text=True,
                            timeout=300)
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert json.loads(ingest.stdout)["accepted"] == len(study)
    logs = "".join(p.read_text(errors="replace") for p in (site / "state" / "logs").glob("*.log"))
    assert "DOE^JOHN" not in logs and "INTRUDER" in logs  # the refused caller is named, no patient is
