"""Files that make native decoders crash, hang or over-allocate -- and worker functions to run.

Each crasher is one of pydicom's own test files with one attribute or a few bytes changed, written
to a folder the test owns. What each one does to a bare ``pydicom.dcmread(f).pixel_array`` with the
installed decoders (python-gdcm, pylibjpeg-openjpeg, pylibjpeg-rle; checked by
``tests/test_workers.py`` in a subprocess before it is relied on):

* ``j2k_photometric``: JPEG 2000, PhotometricInterpretation RGB or YBR_FULL_422 over 1-sample
  grey data. GDCM throws through a ``noexcept`` path: ``std::terminate``, SIGABRT.
* ``jpeg_lossless_bits_stored``: JPEG Lossless, 8 bits allocated, BitsStored 7. GDCM
  ``std::terminate``, SIGABRT.
* ``rle_segment_offset``: RLE, the low byte of the second segment offset set to 0 (offsets stay
  increasing and inside the frame). pylibjpeg-rle raises ``pyo3_runtime.PanicException``, a
  ``BaseException``.
* ``rle_rows``: RLE, Rows 64 -> 7. ``PanicException``.
* ``jpeg_sof_precision``: JPEG baseline, SOF0 sample precision 8 -> 255 (one byte). GDCM
  SIGSEGV. Found by setting each of the frame's first 700 bytes to 0x00, 0x7F and 0xFF in
  turn: the first position that segfaults. It is written at the SOF0 segment, not at a fixed
  file offset, so it is deterministic.
* ``j2k_bomb``: JPEG 2000 64x64 (6 kB) whose SIZ image and tile size say 65000 x 65000.
  OpenJPEG allocates for the codestream's size (8.7 GB peak RSS here); under an
  address-space limit it fails instead (tile size too, because 1016 x 1016 tiles of 64 x 64
  are over the standard's 65535-tile limit and OpenJPEG refuses them up front).
* ``jp2_zero_box``: the JPEG 2000 frame behind a JP2 signature box and a box of length 0.
  pydicom's own J2K header helper (pure Python, run before any decoder) loops forever.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# pydicom is imported inside the functions, so that a worker running a trivial function from
# this module starts without it.

#: Good files for the mixed runs: one per decoder path, all small.
GOOD = ("MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm")

#: Address-space limit (RLIMIT_AS) under which the bomb is shown to fail to decode.
BOMB_AS_LIMIT = 1_500_000_000


def testfile(name: str) -> Path:
    """Path of one of pydicom's test files."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _first_frame(ds: Any) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def _with_attr(dst: Path, source: str, out_name: str, **attrs: Any) -> Path:
    import pydicom

    ds = pydicom.dcmread(testfile(source))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out = dst / out_name
    ds.save_as(out, enforce_file_format=False)
    return out


def _patch_frame(dst: Path, source: str, out_name: str, patch: Any) -> Path:
    """Copy ``source`` with bytes of its first frame changed in place: ``patch(frame) -> {pos: bytes}``."""
    import pydicom

    raw = bytearray(testfile(source).read_bytes())
    frame = _first_frame(pydicom.dcmread(testfile(source)))
    start = raw.index(frame)
    for pos, value in patch(frame).items():
        raw[start + pos:start + pos + len(value)] = value
    out = dst / out_name
    out.write_bytes(bytes(raw))
    return out


def j2k_photometric(dst: Path, photometric: str = "RGB") -> Path:
    """JPEG 2000 grey image whose PhotometricInterpretation says colour (GDCM: SIGABRT)."""
    name = f"j2k_{photometric.lower()}.dcm"
    return _with_attr(dst, "MR_small_jp2klossless.dcm", name, PhotometricInterpretation=photometric)


def jpeg_lossless_bits_stored(dst: Path) -> Path:
    """JPEG Lossless (Process 14 SV1), 8 bits allocated, BitsStored 7 (GDCM: SIGABRT)."""
    return _with_attr(dst, "JPGLosslessP14SV1_1s_1f_8b.dcm", "jpeg_lossless_bs7.dcm", BitsStored=7)


def rle_segment_offset(dst: Path) -> Path:
    """RLE whose header's second segment offset has its low byte set to 0 (PanicException)."""
    return _patch_frame(dst, "MR_small_RLE.dcm", "rle_offset.dcm", lambda frame: {8: b"\x00"})


def rle_rows(dst: Path) -> Path:
    """RLE with Rows 64 -> 7 (PanicException)."""
    return _with_attr(dst, "MR_small_RLE.dcm", "rle_rows7.dcm", Rows=7)


def jpeg_sof_precision(dst: Path) -> Path:
    """JPEG baseline with the SOF0 sample precision byte set to 0xFF (GDCM: SIGSEGV)."""

    def patch(frame: bytes) -> dict[int, bytes]:
        sof = frame.index(b"\xff\xc0")
        return {sof + 4: b"\xff"}  # marker (2), length (2), then P

    return _patch_frame(dst, "SC_rgb_jpeg_dcmtk.dcm", "jpeg_sof_p255.dcm", patch)


def j2k_bomb(dst: Path, size: int = 65000) -> Path:
    """64x64 JPEG 2000 file whose SIZ says ``size`` x ``size`` in one tile."""

    def patch(frame: bytes) -> dict[int, bytes]:
        siz = frame.index(b"\xff\x51")
        return {siz + 6: struct.pack(">II", size, size),  # Xsiz, Ysiz
                siz + 22: struct.pack(">II", size, size)}  # XTsiz, YTsiz

    return _patch_frame(dst, "MR_small_jp2klossless.dcm", "j2k_bomb.dcm", patch)


def jp2_zero_box(dst: Path) -> Path:
    """JPEG 2000 frame behind a JP2 signature and a zero-length box (pydicom loops forever)."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(testfile("MR_small_jp2klossless.dcm"))
    wrapped = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00ftyp" + _first_frame(ds)
    ds.PixelData = encapsulate([wrapped])
    out = dst / "jp2_zero_box.dcm"
    ds.save_as(out, enforce_file_format=False)
    return out


def all_crashers(dst: Path) -> dict[str, Path]:
    """Every crasher above, written to ``dst``: name -> file."""
    return {
        "j2k_rgb": j2k_photometric(dst, "RGB"),
        "j2k_ybr_full_422": j2k_photometric(dst, "YBR_FULL_422"),
        "jpeg_lossless_bs7": jpeg_lossless_bits_stored(dst),
        "rle_offset": rle_segment_offset(dst),
        "rle_rows": rle_rows(dst),
        "jpeg_sof_p255": jpeg_sof_precision(dst),
        "j2k_bomb": j2k_bomb(dst),
        "jp2_zero_box": jp2_zero_box(dst),
    }


def good_files(dst: Path) -> list[Path]:
    """Copies of the :data:`GOOD` files in ``dst``."""
    out = []
    for name in GOOD:
        path = dst / f"good_{name}"
        path.write_bytes(testfile(name).read_bytes())
        out.append(path)
    return out


# --------------------------------------------------------------------------------------------
# Functions that run in workers (module level, so they pickle by reference)


def warm_up() -> None:
    """Worker initializer: import pydicom and every decoder before the first item."""
    import gdcm  # noqa: F401
    import numpy  # noqa: F401
    import openjpeg  # noqa: F401
    import pydicom  # noqa: F401
    import pydicom.pixels  # noqa: F401
    import rle  # noqa: F401


def decode(path: Path) -> tuple[tuple[int, ...], int]:
    """Decode a file's pixels; return ``(shape, sum of the pixels)`` (small, picklable)."""
    import pydicom

    arr = pydicom.dcmread(path).pixel_array
    return tuple(arr.shape), int(arr.sum(dtype="int64"))


def check_then_decode(path: Path) -> tuple[tuple[int, ...], int]:
    """What ingestion does: check the codestream against the header, then decode."""
    import pydicom

    from dicomfl.common.codestream import check_codestream

    ds = pydicom.dcmread(path)
    check_codestream(ds, max_pixels=50_000_000)
    arr = ds.pixel_array
    return tuple(arr.shape), int(arr.sum(dtype="int64"))


def run_job(job: tuple[str, Path]) -> tuple[tuple[int, ...], int]:
    """``("decode", path)``: :func:`decode`; ``("check", path)``: :func:`check_then_decode`."""
    what, path = job
    return {"decode": decode, "check": check_then_decode}[what](path)


class FakePanic(BaseException):
    """Stands in for ``pyo3_runtime.PanicException``: a BaseException from native bindings."""


#: Text a misbehaving "decoder" prints; tests assert that it never reaches them.
LEAK = "PATIENT^LEAKED 19700101"


def behave(spec: tuple) -> Any:
    """Do what ``spec`` says; a scriptable stand-in for a decoder.

    ``("ok", v)`` returns ``v``; ``("sleep", s)`` sleeps ``s`` seconds then returns ``s``;
    ``("raise", "ValueError")`` raises it with :data:`LEAK` as its text; ``("panic",)`` raises
    :class:`FakePanic`; ``("reject", reason, detail)`` raises ``RejectedFile``; ``("signal",
    "SIGSEGV")`` kills the worker with that signal; ``("exit", n)`` raises ``SystemExit(n)``;
    ``("alloc", nbytes)`` allocates and touches nothing but address space; ``("die-after", v, s)``
    returns ``v`` and kills the worker with SIGSEGV ``s`` seconds later; ``("unpicklable",)``
    returns a lambda; ``("pid",)`` returns the worker's pid; ``("print",)`` writes :data:`LEAK`
    to stdout, stderr and fd 2, then returns 0.
    """
    kind = spec[0]
    if kind == "ok":
        return spec[1]
    if kind == "sleep":
        time.sleep(spec[1])
        return spec[1]
    if kind == "raise":
        raise {"ValueError": ValueError, "RuntimeError": RuntimeError, "OSError": OSError}[spec[1]](LEAK)
    if kind == "panic":
        raise FakePanic(LEAK)
    if kind == "reject":
        from dicomfl.common.errors import RejectedFile

        raise RejectedFile(spec[1], spec[2])
    if kind == "signal":
        os.kill(os.getpid(), getattr(signal, spec[1]))
        time.sleep(60)  # not reached: the signal is delivered at once
    if kind == "exit":
        raise SystemExit(spec[1])
    if kind == "alloc":
        return len(bytearray(spec[1]))
    if kind == "unpicklable":
        return lambda: None
    if kind == "pid":
        return os.getpid()
    if kind == "die-after":  # returns spec[1], and the worker dies spec[2] s later (on its next item)
        import threading

        threading.Timer(spec[2], os.kill, (os.getpid(), signal.SIGSEGV)).start()
        return spec[1]
    if kind == "print":
        print(LEAK)
        print(LEAK, file=sys.stderr)
        os.write(2, LEAK.encode() + b"\n")
        return 0
    raise AssertionError(kind)


def failing_initializer() -> None:
    """An initializer that raises (with text that must not surface)."""
    raise ValueError(LEAK)


# --------------------------------------------------------------------------------------------
# Running bare decodes in subprocesses, to prove that a crasher really crashes

# One fresh interpreter imports pydicom and its decoders once, then forks one child per job (it
# has no threads of ours, and each child only decodes): a bare ``dcmread(path).pixel_array``
# per child, without paying the imports nine times. Each child reports one JSON line; the
# runner then reports how each child ended.
_BARE = r"""
import json, os, resource, signal, sys, warnings
warnings.simplefilter("ignore")
import pydicom, pydicom.pixels
from dicomfl.common.codestream import check_codestream

class Alarm(BaseException):
    pass

def ring(signum, frame):
    raise Alarm()

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

def job(name, path, limit, what, alarm):
    ds = pydicom.dcmread(path)
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = hwm()
    out = {"name": name}
    signal.signal(signal.SIGALRM, ring)
    signal.alarm(alarm)
    try:
        if what == "check":
            check_codestream(ds, max_pixels=50_000_000)
        else:
            ds.pixel_array
        out["outcome"] = "ok"
    except BaseException as exc:
        out.update(outcome="raised", type=type(exc).__name__, is_exception=isinstance(exc, Exception),
                   reason=getattr(exc, "reason", None))
    signal.alarm(0)
    out["hwm_growth"] = hwm() - before
    os.write(1, (json.dumps(out) + "\n").encode())

pids = {}
for name, (path, limit, what, alarm) in json.loads(sys.argv[1]).items():
    pid = os.fork()
    if pid == 0:
        try:
            job(name, path, limit, what, alarm)
        finally:
            os._exit(0)
    pids[pid] = name
while pids:
    pid, status = os.wait()
    os.write(1, (json.dumps({"name": pids.pop(pid), "status": os.waitstatus_to_exitcode(status)}) + "\n").encode())
"""


@dataclass
class Bare:
    """How one bare job ended."""

    returncode: int | None  # the child's exit code, or -signal; None: the runner was killed
    result: dict  # the JSON line the child printed ({} if it died first)

    @property
    def signal(self) -> str | None:
        if self.returncode is not None and self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return None


@dataclass
class BareJob:
    """One bare decode (or ``check_codestream``) to run.

    Attributes
    ----------
    path : Path
    as_limit : int
        RLIMIT_AS (bytes) set after reading the file, before decoding; 0: none.
    what : str
        ``"decode"`` (``ds.pixel_array``) or ``"check"`` (``check_codestream``, 50 M pixels).
    alarm_s : int
        If set, an alarm raises ``Alarm`` (a BaseException) that many seconds into the job:
        the proof that a decode hangs, without trusting a wall-clock wait on a loaded machine.
    """

    path: Path
    as_limit: int = 0
    what: str = "decode"
    alarm_s: int = 0


def run_bare(jobs: dict[str, BareJob], timeout: float = 120) -> dict[str, Bare]:
    """Run each job in its own forked child of one fresh interpreter; how each one ended.

    Each child's JSON line reports the outcome, the type name of what was raised and the
    growth of the peak resident set (VmHWM) across the call. The runner's stderr (where the
    decoders print) is captured and thrown away. Bounded: at ``timeout`` the runner's whole
    process group is killed.
    """
    root = Path(__file__).resolve().parent.parent
    spec = {name: [str(j.path), j.as_limit, j.what, j.alarm_s] for name, j in jobs.items()}
    proc = subprocess.Popen([sys.executable, "-c", _BARE, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=root,
                            start_new_session=True)
    try:
        out, _err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _err = proc.communicate()
    results: dict[str, dict] = {name: {} for name in jobs}
    codes: dict[str, int | None] = {name: None for name in jobs}
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if "status" in msg:
                codes[msg["name"]] = msg["status"]
            else:
                results[msg["name"]] = msg
    return {name: Bare(codes[name], results[name]) for name in jobs}


# --------------------------------------------------------------------------------------------
# Plain generated images (scale tests and the ingestion benchmark)

#: Where generated files of one patient go: a folder named like a patient, as PACS exports are.
PATIENT_FOLDER = "DOE^JOHN/19620703"


def plain_writer(rows: int, cols: int, bits_stored: int = 12):
    """A function ``write(path, index, pixels=None)`` that writes an uncompressed, chest-like
    DX image (Explicit VR Little Endian, 16 bits allocated, ``bits_stored`` stored), distinct
    for each ``index`` (its own noise, UIDs, accession number and patient id; two images per
    patient), with fake PHI in the header. Fast: one template dataset, one pixel base."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    lungs = np.exp(-(((yy - cy) / (0.35 * rows)) ** 2 + ((np.abs(xx - cx) - 0.22 * cols) / (0.16 * cols)) ** 2))
    top = (1 << bits_stored) - 1
    base = (0.75 * top - 0.5 * top * lungs).astype(np.int32)
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

    def write(path: Path, index: int, pixels=None) -> None:
        rng = np.random.default_rng(index)
        if pixels is None:
            noise = rng.integers(-64, 64, size=(rows, cols), dtype=np.int32)
            pixels = np.clip(base + noise, 0, top).astype(np.uint16)
        meta = FileMetaDataset()
        sop = generate_uid(entropy_srcs=[f"sop{index}"])
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study{index}"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series{index}"])
        ds.PatientName = f"DOE^JOHN{index // 2}"
        ds.PatientID = f"PID{index // 2:07d}"
        ds.PatientBirthDate = "19620703"
        ds.PatientSex = "M" if index % 3 else "F"
        ds.AccessionNumber = f"ACC{index:07d}"
        ds.StudyDate = "20240105"
        ds.InstitutionName = "GENERAL HOSPITAL OF NOWHERE"
        ds.Modality = "DX"
        ds.ViewPosition = "PA" if index % 2 else "AP"
        ds.BodyPartExamined = "CHEST"
        ds.PixelSpacing = [0.7, 0.7]
        ds.KVP = 110
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)

    return write


def plain_cohort(root: Path, n: int, rows: int = 256, cols: int = 256, *, per_folder: int = 500,
                 start: int = 0) -> list[tuple[str, int]]:
    """``n`` generated images under ``root``, ``per_folder`` to a patient-like folder
    (``DOE^JOHN/19620703/<k>/``); returns ``[(path relative to root, label)]``."""
    write = plain_writer(rows, cols)
    out = []
    for i in range(start, start + n):
        rel = f"{PATIENT_FOLDER}/{i // per_folder:04d}/IM{i:07d}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, i)
        out.append((rel, i % 2))
    return out
