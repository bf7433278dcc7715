"""DICOM intake throughput on loopback (a benchmark, not a test).

One ``storescu`` call pushes N generated instances (default 1,000 CR images, 256x256 16-bit,
~128 KiB each) in a single association to a receiver; the wall time covers the whole push, from
storescu's start to its exit, with every instance written and acknowledged.

Rows:
  storescu -> dicomfl (max PDU X)  dicomfl.client.intake.IntakeServer (pynetdicom; atomic write +
                                   fsync of file and folder per instance)
  storescu -> dcmtk storescp       dcmtk's own C++ Storage SCP writing to a folder (no fsync)
  storescu -> Orthanc              Orthanc's Storage SCP (SQLite index + storage area)
  Orthanc -> dicomfl               Orthanc pushing the uploaded study to dicomfl
                                   (POST /modalities/dicomfl/store, timed from request to reply)

dcmtk tools (and Orthanc, built on dcmtk) run with TCP_NODELAY=1 in their environment: Debian's
dcmtk leaves Nagle's algorithm on by default, and then every instance waits for a delayed ACK
(~40 ms; measured here: storescp 20 instances/s with the default, 880/s with TCP_NODELAY=1).
``--dcmtk-default-tcp`` measures with dcmtk's default instead.

Usage: python benchmarks/intake_bench.py [--n 1000] [--size 256] [--max-pdu 16384 262144]
                                         [--no-orthanc] [--tmp DIR] [--dcmtk-default-tcp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomfl.client.intake import (  # noqa: E402
    IntakeSection,
    IntakeServer,
    iter_intake_files,
    read_status,
)

CR = "1.2.840.10008.5.1.4.1.1.1"


def generate(folder: Path, n: int, size: int) -> int:
    """Write ``n`` CR instances of one study; return their total size in bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    total = 0
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^PATIENT", "BENCH-1", "CR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DCMTK_ENV: dict[str, str] = dict(os.environ, TCP_NODELAY="1")


def push(port: int, src: Path, aec: str) -> float:
    """One storescu association for every file under ``src``; returns the wall time."""
    t0 = time.perf_counter()
    res = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", aec, "+sd", "127.0.0.1", str(port), str(src)],
        capture_output=True, text=True, timeout=600, check=False, env=DCMTK_ENV,
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"storescu failed ({res.returncode}): {res.stderr[-500:]}")
    return wall


def row(name: str, n: int, nbytes: int, wall: float) -> None:
    print(f"{name:<34} {n:>6} {wall:>8.2f} s {n / wall:>9.1f} inst/s {nbytes / wall / 2**20:>8.1f} MiB/s", flush=True)


def bench_dicomfl(tmp: Path, src: Path, n: int, nbytes: int, max_pdu: int) -> None:
    site = tmp / f"site-{max_pdu}"
    section = IntakeSection(port=0, max_pdu=max_pdu, allowed=[{"ae_title": "STORESCU", "host": "127.0.0.1"}])
    server = IntakeServer(section, site / "dicom", site / "state")
    server.start()
    try:
        wall = push(server.address[1], src, "DICOMFL")
    finally:
        server.stop()
    written = len(list(iter_intake_files(site / "dicom")))
    st = read_status(site / "state")
    assert written == n == st["written"], (written, st)
    row(f"storescu -> dicomfl (PDU {max_pdu // 1024} KiB)", n, nbytes, wall)
    shutil.rmtree(site)


def stop(proc: subprocess.Popen) -> None:
    """Stop a receiver this script started (its own process group), by pid."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited at start ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open within {timeout} s")


def bench_storescp(tmp: Path, src: Path, n: int, nbytes: int) -> None:
    out = tmp / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "--max-pdu", "131072", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=DCMTK_ENV)
    try:
        wait_port(port, proc)
        wall = push(port, src, "STORESCP")
    finally:
        stop(proc)
    assert len(list(out.iterdir())) == n
    row("storescu -> storescp (no fsync)", n, nbytes, wall)


def bench_orthanc(tmp: Path, src: Path, n: int, nbytes: int, max_pdu: int) -> None:
    """storescu -> Orthanc, then Orthanc -> dicomfl (the PACS push an AI node sees)."""
    exe = shutil.which("Orthanc")
    if exe is None:
        print("Orthanc: not installed, skipped")
        return
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()[1]
    work = tmp / "orthanc"
    work.mkdir()
    site = tmp / "site-orthanc"
    section = IntakeSection(port=0, max_pdu=max_pdu, allowed=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    server = IntakeServer(section, site / "dicom", site / "state")
    server.start()
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
        "DicomModalities": {"dicomfl": ["DICOMFL", "127.0.0.1", server.address[1]]},
        "Plugins": [], "SaveJobs": False,
    }
    (work / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([exe, str(work / "config.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=work, start_new_session=True, env=DCMTK_ENV)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_port(dicom_port, proc)
        wall = push(dicom_port, src, "ORTHANC")
        with urllib.request.urlopen(f"{base}/statistics", timeout=10) as rsp:
            assert json.loads(rsp.read())["CountInstances"] == n
        row(f"storescu -> Orthanc {version}", n, nbytes, wall)
        with urllib.request.urlopen(f"{base}/studies", timeout=10) as rsp:
            (study,) = json.loads(rsp.read())
        body = json.dumps({"Resources": [study], "Synchronous": True}).encode()
        req = urllib.request.Request(f"{base}/modalities/dicomfl/store", data=body, method="POST")
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as rsp:
            rsp.read()
        wall = time.perf_counter() - t0
    finally:
        stop(proc)
        server.stop()
    assert read_status(site / "state")["written"] == n
    row(f"Orthanc -> dicomfl (PDU {max_pdu // 1024} KiB)", n, nbytes, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="instances to push")
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each image")
    ap.add_argument("--max-pdu", type=int, nargs="+", default=[16384, 262144], help="dicomfl max PDU sizes to try")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--tmp", type=Path, default=None, help="where to make the working folder (default: the temp dir)")
    ap.add_argument("--dcmtk-default-tcp", action="store_true", help="leave dcmtk's TCP_NODELAY default (Nagle on)")
    args = ap.parse_args()
    if args.dcmtk_default_tcp:
        DCMTK_ENV.pop("TCP_NODELAY", None)
    if shutil.which("storescu") is None:
        raise SystemExit("storescu not found: apt-get install dcmtk")
    tmp = Path(tempfile.mkdtemp(prefix="dicomfl-intake-bench-", dir=args.tmp))
    try:
        src = tmp / "outbox"
        nbytes = generate(src, args.n, args.size)
        print(f"{args.n} instances, {args.size}x{args.size} 16-bit, {nbytes / 2**20:.1f} MiB, one association per push,"
              f" {os.cpu_count()} CPUs, working folder on {fs_type(tmp)},"
              f" dcmtk TCP_NODELAY={DCMTK_ENV.get('TCP_NODELAY', 'default')}")
        print(f"{'sender -> receiver':<34} {'n':>6} {'wall':>10} {'rate':>16} {'throughput':>14}")
        for pdu in args.max_pdu:
            bench_dicomfl(tmp, src, args.n, nbytes, pdu)
        if shutil.which("storescp"):
            bench_storescp(tmp, src, args.n, nbytes)
        if not args.no_orthanc:
            bench_orthanc(tmp, src, args.n, nbytes, max(args.max_pdu))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fs_type(path: Path) -> str:
    """The file system type of ``path`` (from /proc/mounts), for the record."""
    try:
        best = ("", "?")
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, fstype)
        return best[1]
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
