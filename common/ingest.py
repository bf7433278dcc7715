"""Ingestion: a site's DICOM folder + labels CSV -> de-identified, full-depth training data on disk.

    labels (checked first) -> discover (by content) -> for each new file, in a worker process:
      read (mapped, hashed as it is read) -> check header -> check codestream -> label key
      -> patient pseudonym, age -> de-identify -> features -> pixels -> scaling statistics
    -> the parent appends each result to the on-disk cache -> labels join -> patient-level splits

Each file is processed in a worker process (:mod:`.workers`): a native decoder that aborts,
segfaults, panics, hangs or asks for gigabytes costs only its file, which is rejected with a
reason (``decoder-crash``, ``timeout``, ``worker-memory``) and the ingestion goes on. Before
anything decodes, the header is checked (:func:`~.reader.check_image`) and so is the compressed
codestream's own header (:func:`~.codestream.check_codestream`): a 6 kB JPEG 2000 file that
declares 65000 x 65000 pixels is rejected without allocating them. Files over
``ingest.max_file_bytes`` are rejected without being read.

The original header exists only inside a worker; what leaves it is a :class:`~.cache.Record`
(codes, pseudonyms, HMACs), one float32 image, its feature vector and its two scaling numbers.
The parent writes them straight into the site's on-disk cache (:mod:`.cache`) and keeps only
the small per-file records, so the parent's memory does not grow with the images; training
reads batches from the cache (:class:`SiteData` holds lazy views, not arrays).

Nothing identifying is written or printed: a rejected file is named in the report and the logs
by a site-local reference (``file:`` + an HMAC of its relative path under the site key), since
folder names are often patient names; ``<state_dir>/reports/rejects-map.tsv`` (mode 0600, in a
0700 folder) maps references back to paths for the site's operator and is never sent anywhere.
Reject details are reason codes, DICOM keywords and exception type names: never a header value.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import mmap
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import RLELossless

from . import __version__
from . import errors as E
from .cache import (FIRST_CHUNK_ROWS, CacheState, ChunkStore, FileEntry, LazyRows, Record, SiteCache, StoreRows,
                    chunk_rows_for)
from .codestream import J2K_SYNTAXES, JPEG_LS_SYNTAXES, JPEG_SYNTAXES, check_codestream
from .config import SiteConfig
from .deid import Deidentifier
from .deid_profile import table_digest
from .discover import looks_like_dicom, walk
from .features import N_FEATURES, SCHEMA_VERSION, extract, modality_of, patient_age_years
from .labels import Labels, key_value, load_labels
from .pixels import full_depth_pixels, keep_image_blocks, robust_stats
from .reader import check_image, read_dataset
from .splits import NAMES, assign
from .workers import PoolStartError, WorkerFailure, default_workers, imap_isolated

log = logging.getLogger("dicomfl.ingest")
# pydicom logs the same value-quoting messages it warns with: keep its logger silent.
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

PIPELINE_VERSION = 3  # 2: Table E.1-1 2024b; TM kept under date shifting. 3: Pillow resize, chunked cache

#: Failures that depend on the machine rather than the file: not cached, retried next time.
RETRY_REASONS = frozenset({E.TIMEOUT, E.WORKER_MEMORY, E.DEFERRED})
#: errno values that say the site's disk, not the file, is the problem (see :func:`storage_cause`).
_STORAGE_ERRNO = {errno.ENOSPC: E.DISK_FULL, errno.EDQUOT: E.DISK_FULL, errno.EIO: E.IO_ERROR}
#: Free space under which ``state_dir`` counts as full when a worker dies by SIGBUS (a write to a
#: mapped page the file system could not back), on top of one worker's reply slots.
FULL_FLOOR_BYTES = 1 << 20

#: Modality defined terms (PS3.3 C.7.3.1.1.1, current and retired). The report counts images by
#: these; any other value (a free-text Modality can hold anything) is counted as "other".
MODALITIES = frozenset("""
AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL
IVOCT IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR
PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM
SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF
""".split())

#: Environment of the worker processes: one thread each (N workers, N cores).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_HASH_CHUNK = 1 << 20
#: Files a worker holds at most: the one it decodes and the next (common/workers.py, ``prefetch``).
PREFETCH = 2


@dataclass
class SiteData:
    """What training sees: no header, no identifier, and no whole-site array in memory.

    ``images`` (N, S, S) float32 at full depth, ``features`` (N, F) float32 and ``stats``
    (N, 2) float32 (each image's median and p99 - p1, for robust scaling) are lazy views of the
    on-disk cache (:class:`~dicomfl.common.cache.LazyRows`: indexing reads only those rows), or
    plain arrays when built in memory (``stats`` may then be None: scaling statistics are
    computed when the images are read).
    """

    images: Any  # (N, S, S) float32: LazyRows or ndarray
    features: Any  # (N, F) float32: LazyRows or ndarray
    labels: np.ndarray  # (N,) int64, -1 when unlabelled
    split: np.ndarray  # (N,) int8: 0 train, 1 val, 2 test
    patients: list[str]  # pseudonymous patient ids
    stats: Any = None  # (N, 2) float32 [median, p99 - p1]: LazyRows, ndarray or None

    def subset(self, split: int, labelled_only: bool = True) -> np.ndarray:
        mask = self.split == split
        if labelled_only:
            mask &= self.labels >= 0
        return np.flatnonzero(mask)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


@dataclass
class IngestReport:
    site: str
    seen: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    by_modality: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    unlabelled: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    split_patients: dict[str, int] = field(default_factory=dict)
    label_rows: int = 0
    label_rows_unmatched: int = 0
    label_problems: list[str] = field(default_factory=list)
    # {"file": "file:<reference>", "reason": code, "detail": keywords}; references map to paths
    # only in <state_dir>/reports/rejects-map.tsv (the operator's, never sent anywhere).
    rejects: list[dict[str, str]] = field(default_factory=list)
    # Files not processed for a reason of the machine (reason "deferred": disk full, io error,
    # interrupted); counted in ``rejected`` too, never cached, tried again at the next ingestion.
    deferred: int = 0
    deferred_by_reason: dict[str, int] = field(default_factory=dict)
    cache_hits: int = 0
    decoded: int = 0
    workers: int = 0
    cache_rows_written: int = 0
    publish_s: float = 0.0  # syncing the new rows and publishing the index (included in elapsed_s)
    elapsed_s: float = 0.0
    files_per_s: float = 0.0
    pipeline_version: int = PIPELINE_VERSION
    feature_schema_version: int = SCHEMA_VERSION
    deid_options: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class IngestResult:
    report: IngestReport
    data: SiteData


def fingerprint(cfg: SiteConfig, deid: Deidentifier) -> str:
    parts = [
        f"pipeline={PIPELINE_VERSION}",
        f"dicomfl={__version__}",
        f"schema={SCHEMA_VERSION}",
        f"table={table_digest()}",
        cfg.preprocess.model_dump_json(),
        cfg.deid.model_dump_json(),
        f"label_key={cfg.site.label_key}",
        "key=" + deid.pseudonym("fingerprint", b"site-key"),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def file_ref(deid: Deidentifier, rel: str) -> str:
    """The site-local reference of a file: ``file:`` + an HMAC of its relative path."""
    return "file:" + deid.pseudonym("file-ref", rel, 16)


def modality_code(ds) -> str:
    m = modality_of(ds)
    return m if m in MODALITIES or m == "unknown" else "other"


# ------------------------------------------------------------------------------- one file


def process_file(data: bytes, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    """One file's bytes -> (Record, image | None, features | None), in this process. Never raises
    for bad input. (:func:`ingest` runs the same steps in worker processes; this is the entry
    point for tests and tools that already hold the bytes.)"""
    rec, img, feats = _process(data, rel, content_key, cfg, deid)
    return rec, img, feats


def _check_decodable_syntax(ds) -> None:
    """A transfer syntax the standard does not define, or an encapsulated one without a
    codestream check, has no decoder here."""
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        return
    if not syntax.is_transfer_syntax:
        raise E.RejectedFile(E.NO_DECODER, "TransferSyntaxUID")
    if not syntax.is_encapsulated:
        return
    if syntax not in J2K_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES and syntax != RLELossless:
        from .pixels import _syntax_name

        raise E.RejectedFile(E.NO_DECODER, _syntax_name(ds))


def _process(source, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    """``source``: the file's bytes or a read-only mapping of it.

    pydicom's warnings quote element values, so every warning raised while the original header
    is alive is discarded here (never printed, never logged).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if not looks_like_dicom(bytes(source[:132])):
                raise E.RejectedFile(E.NOT_DICOM if len(source) else E.EMPTY_FILE)
            ds = read_dataset(source)
            pp = cfg.preprocess
            check_image(ds, pp.max_pixels)
            _check_decodable_syntax(ds)
            check_codestream(ds, pp.max_pixels)
            k = key_value(ds, rel, cfg.site.label_key)
            label_key = deid.pseudonym("label-key", k, 32) if k else ""
            age = patient_age_years(ds) if cfg.deid.retain_patient_characteristics else None
            patient = deid.patient_pseudonym(ds, fallback=content_key)
            deid.apply(ds, patient)
            feats = extract(ds, age)
            img = full_depth_pixels(ds, pp.image_size, pp.multiframe, pp.color)
            return Record("accepted", modality=modality_code(ds), label_key=label_key, patient=patient), img, feats
        except E.RejectedFile as rej:
            return Record("rejected", reason=rej.reason, detail=rej.detail), None, None
        except MemoryError:  # over the worker's address-space cap: not cached, retried next time
            return Record("rejected", reason=E.WORKER_MEMORY, detail="MemoryError"), None, None
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen file: reject, keep going
            return Record("rejected", reason=E.INTERNAL_ERROR, detail=type(exc).__name__), None, None


# Worker side: one process per core, each with its own copy of this state (set by _init_worker).
_W: dict[str, Any] = {}


def _init_worker(cfg: SiteConfig, key: bytes, known: frozenset[str], slot_dir: str | None = None) -> None:
    """Worker initializer: the site's config and key, the content keys the cache already holds
    (a moved or renamed file is recognised by its content, not decoded again), every decoder
    imported before the first file (so its import is not counted in the file's time), and this
    worker's :class:`ReplySlots` in ``slot_dir`` (None: images travel in the reply)."""
    for name in ("gdcm", "openjpeg", "rle"):
        with contextlib.suppress(ImportError):
            __import__(name)
    import pydicom.pixels  # noqa: F401

    keep_image_blocks()
    slots = None
    if slot_dir:
        with contextlib.suppress(OSError):  # no slot file (disk full?): images travel in the reply
            slots = ReplySlots.create(slot_dir, cfg.preprocess.image_size)
    _W.update(cfg=cfg, key=key, known=known, deid=Deidentifier(key, cfg.deid), root=str(cfg.site.dicom_dir),
              slots=slots)


def map_file(path: str, max_bytes: int) -> "mmap.mmap | E.RejectedFile":
    """A read-only mapping of one file (the caller closes it), or the rejection that says why
    not: unreadable, empty, or over ``max_bytes`` (then it is not read at all)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return E.RejectedFile(E.DEFERRED, E.IO_ERROR)
        return E.RejectedFile(E.UNREADABLE, type(exc).__name__)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return E.RejectedFile(E.EMPTY_FILE, "")
        if size > max_bytes:
            return E.RejectedFile(E.TOO_LARGE, "file size over ingest.max_file_bytes")
        try:
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:  # the mapping is over the worker's cap
                return E.RejectedFile(E.WORKER_MEMORY, "mmap")
            if isinstance(exc, OSError) and exc.errno == errno.EIO:
                return E.RejectedFile(E.DEFERRED, E.IO_ERROR)
            return E.RejectedFile(E.UNREADABLE, type(exc).__name__)
    except OSError as exc:
        if exc.errno == errno.EIO:  # the disk, not the file: tried again next time
            return E.RejectedFile(E.DEFERRED, E.IO_ERROR)
        return E.RejectedFile(E.UNREADABLE, type(exc).__name__)
    finally:
        os.close(fd)


def content_key(mm, key: bytes) -> str:
    """A file's content key: an HMAC of its bytes under the site key, hashed in 1 MiB steps
    (the file is never copied whole)."""
    h = hmac.new(key, b"content\x00", hashlib.sha256)
    with memoryview(mm) as view:
        for at in range(0, len(view), _HASH_CHUNK):
            h.update(view[at:at + _HASH_CHUNK])
    return h.hexdigest()[:32]


class ReplySlots:
    """Where a worker leaves its accepted images for the parent: :data:`SLOTS` image-sized slots
    in a file of its own (mode 0600, in a 0700 scratch folder under ``cache/`` that the parent
    removes), used in turn.

    Sent through the worker's pipe, a 256 px float32 image is 256 KiB: pickled, cut into
    64 KiB pipe writes that each wait for the parent to read, and unpickled into a new array.
    That hand-over cost a worker and the parent about 0.4 ms of CPU each per file and held the
    worker for about 1 ms before it could start its next file. Written to a mapped slot, the
    reply is a few hundred bytes and the parent copies the image from the slot straight into
    the cache's chunk (one ``pwrite``).

    ``2 * PREFETCH`` slots are enough. A worker holds at most :data:`PREFETCH` items, and the
    pool hands it a new one only after reading a reply; it reads at most ``PREFETCH`` replies of
    one worker before :func:`ingest` has copied their images (ingest copies each image before it
    asks the pool for the next outcome). So at most ``PREFETCH`` images read but not yet copied
    plus ``PREFETCH`` new ones are in a worker's slots at once, and by the time it writes its
    result ``k + SLOTS`` into the slot of result ``k``, that one has been copied. Each slot
    starts with the sequence number of the image in it;
    the reference carries it too, and the parent checks it before and after copying, so a
    broken promise rejects the file (``worker-error``, retried next time), never stores a
    wrong image.
    """

    HEADER = 16  # bytes before each slot's image: the sequence number (8 bytes) and padding
    SLOTS = 2 * PREFETCH

    def __init__(self, path: str, image_size: int, mm: mmap.mmap) -> None:
        self.path, self.image_size, self._mm = path, int(image_size), mm
        self.image_bytes = self.image_size * self.image_size * 4
        self.slot_bytes = self.HEADER + self.image_bytes
        self._seq = 0

    @classmethod
    def create(cls, folder: str, image_size: int) -> ReplySlots:
        """A new slot file in ``folder`` for this process (worker side).

        Its blocks are allocated now (``posix_fallocate``), not on the first write: a write to
        a mapped page that a full file system cannot back kills the writer with SIGBUS, which
        would read as a decoder crash on a good file. Allocated up front, a full disk is an
        ``OSError`` (ENOSPC) here instead, and the worker sends its images in its replies.

        Raises
        ------
        OSError
            The file cannot be created or its space allocated (the file is removed).
        """
        path = os.path.join(folder, f"w{os.getpid()}.slots")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = cls.SLOTS * (cls.HEADER + image_size * image_size * 4)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, image_size, mm)

    @classmethod
    def attach(cls, path: str, image_size: int) -> ReplySlots:
        """Map a worker's slot file read-only (parent side)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = cls.SLOTS * (cls.HEADER + image_size * image_size * 4)
            if os.fstat(fd).st_size != size:
                raise ValueError("reply slot file size")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(path, image_size, mm)

    def put(self, img: np.ndarray) -> tuple[str, int]:
        """Write ``img`` (float32, image_size x image_size) into the next slot; returns the
        reference ``(file name, sequence number)`` for the reply."""
        seq = self._seq
        self._seq += 1
        at = (seq % self.SLOTS) * self.slot_bytes
        arr = np.ascontiguousarray(img, dtype=np.float32)
        if arr.shape != (self.image_size, self.image_size):
            raise ValueError("image shape")
        self._mm[at:at + 8] = seq.to_bytes(8, "little")
        np.frombuffer(self._mm, np.float32, self.image_size * self.image_size, at + self.HEADER)[:] = arr.reshape(-1)
        return os.path.basename(self.path), seq

    def read(self, seq: int) -> np.ndarray:
        """A copy of the image of reference ``seq`` (parent side); the slot's sequence number is
        checked before and after the copy."""
        at = (seq % self.SLOTS) * self.slot_bytes
        self._check(seq, at)
        with memoryview(self._mm) as view:
            out = np.frombuffer(view[at + self.HEADER:at + self.slot_bytes], np.float32).copy()
        self._check(seq, at)
        return out.reshape(self.image_size, self.image_size)

    def _check(self, seq: int, at: int) -> None:
        if int.from_bytes(self._mm[at:at + 8], "little") != seq:
            raise RuntimeError("a worker's reply slot was overwritten before it was read")

    def close(self) -> None:
        self._mm.close()


def _work(rel: str) -> tuple:
    """One file, in a worker: map it, hash it as it is read, check, de-identify, decode.

    Returns ``("known", content)``, ``("rejected", content | None, reason, detail)`` or
    ``("accepted", content, modality, label_key, patient, image, features, stats)``, where
    ``image`` is the float32 array or, with reply slots, the :class:`ReplySlots` reference
    of where it was written.
    """
    cfg: SiteConfig = _W["cfg"]
    mm = map_file(os.path.join(_W["root"], rel), cfg.ingest.max_file_bytes)
    if isinstance(mm, E.RejectedFile):
        return ("rejected", None, mm.reason, mm.detail)
    with mm:
        if not looks_like_dicom(mm[:132]):  # not hashed: a stat key is enough for what is skipped
            return ("rejected", None, E.NOT_DICOM, "")
        content = content_key(mm, _W["key"])
        if content in _W["known"]:
            return ("known", content)
        rec, img, feats = _process(mm, rel, content, cfg, _W["deid"])
    if rec.status != "accepted":
        return ("rejected", content, rec.reason, rec.detail)
    stats = robust_stats(img)
    slots: ReplySlots | None = _W.get("slots")
    return ("accepted", content, rec.modality, rec.label_key, rec.patient, slots.put(img) if slots else img, feats, stats)


# ------------------------------------------------------------------------------- the site


def prepare_state_dir(cfg: SiteConfig) -> Path:
    """Create ``state_dir`` and its ``cache/``, ``logs/`` and ``reports/`` folders (mode 0700).

    Raises
    ------
    ConfigError
        ``site.state_dir`` is a file, or cannot be created or written (one line, naming the
        config file and the key).
    """
    sd = cfg.site.state_dir
    try:
        sd.mkdir(parents=True, exist_ok=True)
        for sub in ("cache", "logs", "reports"):
            (sd / sub).mkdir(exist_ok=True)
            os.chmod(sd / sub, 0o700)
    except OSError as exc:
        src = E.printable(str(cfg.source)) if cfg.source is not None else "site config"
        raise E.ConfigError(f"{src}: site.state_dir: cannot create or use the folder {E.printable(str(sd))} "
                            f"({type(exc).__name__})") from None
    return sd


def tsv_field(text: str) -> str:
    return E.printable(text.replace("\\", "\\\\"))


def write_rejects_map(state_dir: Path, rows: list[tuple[str, str, str]]) -> Path:
    """``<state_dir>/reports/rejects-map.tsv`` (mode 0600): reference, path relative to
    ``site.dicom_dir`` (backslashes doubled, control characters escaped), reason."""
    reports = Path(state_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    os.chmod(reports, 0o700)
    path = reports / "rejects-map.tsv"
    tmp = reports / ".rejects-map.tsv.tmp"
    lines = ["# reference\tpath under site.dicom_dir (\\\\ = backslash, \\xNN = a control character)\treason\n"]
    lines += [f"{ref}\t{tsv_field(rel)}\t{reason}\n" for ref, rel, reason in rows]
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:  # a full disk: the previous map stays, no half-written one is left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_rejects_map(state_dir: Path) -> dict[str, str]:
    """The operator's map: ``{reference: path as written (escaped)}``."""
    out = {}
    path = Path(state_dir) / "reports" / "rejects-map.tsv"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            ref, rel, _reason = line.split("\t")
            out[ref] = rel
    return out


def ingest(
    cfg: SiteConfig,
    *,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> IngestResult:
    """Ingest a site's DICOM folder: discover, check, de-identify, decode at full depth, cache,
    label, split.

    Parameters
    ----------
    cfg : SiteConfig
        The site's config (folder, labels, key, state dir, de-identification, preprocessing,
        ``ingest`` settings: workers, per-file timeout and memory, largest file).
    use_cache : bool
        Reuse ``<state_dir>/cache`` for unchanged files and publish the new rows there. Without
        it, the rows go to a private scratch store that disappears with the returned data.
    progress : callable, optional
        ``progress(files_done, files_total)`` as files finish.
    workers : int, optional
        Worker processes (default: ``ingest.workers``, else the CPUs this process may use).

    Returns
    -------
    IngestResult
        ``report`` (counts, reasons, splits; PHI-free) and ``data`` (lazy views of the cached
        images, features and scaling statistics; labels, splits, pseudonymous patient ids).

    Raises
    ------
    ConfigError
        The labels file, the secret key or the state dir cannot be used (one line naming the
        file and the key or row).
    DicomflError
        The worker processes cannot start.
    """
    t0 = time.perf_counter()
    s = cfg.site
    prepare_state_dir(cfg)
    key = cfg.secret_key
    deid = Deidentifier(key, cfg.deid)
    fp = fingerprint(cfg, deid)
    size = cfg.preprocess.image_size
    report = IngestReport(site=s.name, deid_options=cfg.deid.model_dump())

    # The labels file first: a bad one stops before any file is decoded.
    labels = Labels()
    if s.labels is not None:
        labels = load_labels(s.labels, s.label_key, lambda v: deid.pseudonym("label-key", v, 32),
                             key_column=s.labels_key_column, value_column=s.labels_value_column,
                             n_classes=s.n_classes)

    cache = SiteCache(s.state_dir)
    #: Set when the site's disk cannot take more (E.DISK_FULL or E.IO_ERROR): the ingestion stops,
    #: what is not finished is deferred, and StorageError ends the call.
    halted: str | None = None
    try:
        lock = cache.locked() if use_cache else contextlib.nullcontext()
        lock.__enter__()
    except OSError as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        raise E.StorageError(_storage_message(s.state_dir, cause, None)) from None
    try:
        old = cache.load(fp, size, N_FEATURES) if use_cache else None
        old_chunks = {c for c, _ in old.store.chunks} if old is not None else set()
        try:
            if old is not None:
                store = old.store
            elif use_cache:
                store = cache.new_store(size, N_FEATURES)
            else:
                store = ChunkStore(s.state_dir / "cache" / "scratch", size, N_FEATURES, chunk_rows_for(size), scratch=True)
        except OSError as exc:
            cause = storage_cause(exc)
            if cause is None:
                raise
            raise E.StorageError(_storage_message(s.state_dir, cause, None)) from None

        rels: list[str] = []
        path_keys: list[str] = []
        contents: list[str] = []
        recs: list[Record | None] = []
        new_files: dict[str, FileEntry] = {}
        new_records: dict[str, Record] = {}
        todo: list[int] = []
        stat_of: list[tuple[int, int]] = []
        for i, f in enumerate(walk(s.dicom_dir)):
            rels.append(f.rel)
            stat_of.append((f.size, f.mtime_ns))
            path_key = deid.pseudonym("path", f.rel, 32)
            path_keys.append(path_key)
            entry = old.files.get(path_key) if old else None
            if entry is not None and entry.size == f.size and entry.mtime_ns == f.mtime_ns and entry.content in old.records:
                contents.append(entry.content)
                recs.append(new_records.setdefault(entry.content, old.records[entry.content]))
                new_files[path_key] = entry
                report.cache_hits += 1
            elif f.size > cfg.ingest.max_file_bytes:
                c = _stat_key(deid, f.rel, f.size, f.mtime_ns)
                contents.append(c)
                recs.append(new_records.setdefault(c, Record("rejected", reason=E.TOO_LARGE,
                                                             detail="file size over ingest.max_file_bytes")))
                new_files[path_key] = FileEntry(f.size, f.mtime_ns, c)
            else:
                contents.append("")
                recs.append(None)
                todo.append(i)
        total = len(rels)
        done = total - len(todo)
        if progress:
            progress(done, total)

        n_workers = min(workers or cfg.ingest.workers or default_workers(), max(1, len(todo)))
        report.workers = n_workers if todo else 0
        mem = cfg.ingest.worker_memory_mb << 20 if cfg.ingest.worker_memory_mb else None
        known = frozenset(old.records) if old else frozenset()
        try:
            slot_dir = _slot_dir(s.state_dir) if todo else None
        except OSError as exc:  # no room for the folder: images travel in the replies
            if storage_cause(exc) is None:
                raise
            slot_dir = None
        slot_bytes = ReplySlots.SLOTS * (ReplySlots.HEADER + size * size * 4)
        attached: dict[str, ReplySlots] = {}
        outcomes = imap_isolated(_work, [rels[i] for i in todo], workers=n_workers,
                                 timeout_s=cfg.ingest.file_timeout_s, memory_bytes=mem,
                                 initializer=_init_worker, initargs=(cfg, key, known, slot_dir), env=WORKER_ENV,
                                 prefetch=PREFETCH)
        try:
            for j, outcome in outcomes:
                i = todo[j]
                rel = rels[i]
                cacheable = True
                if isinstance(outcome, WorkerFailure):
                    content = _stat_key(deid, rel, *stat_of[i])
                    reason, detail = outcome.reason, outcome.detail
                    if reason == E.DECODER_CRASH and detail == "SIGBUS":
                        # A write to a mapped page the file system cannot back, or a read of a
                        # mapped page the disk cannot deliver: the machine, not the file?
                        why = _sigbus_cause(s.state_dir, os.path.join(s.dicom_dir, rel), slot_bytes)
                        if why is not None:
                            reason, detail = E.DEFERRED, why
                            if why == E.DISK_FULL:
                                halted = why
                    rec = Record("rejected", reason=reason, detail=detail)
                    cacheable = reason not in RETRY_REASONS
                    report.decoded += 1
                elif outcome[0] == "known":
                    content = outcome[1]
                    rec = old.records[content]
                    report.cache_hits += 1
                elif outcome[0] == "rejected":
                    _, content, reason, detail = outcome
                    content = content or _stat_key(deid, rel, *stat_of[i])
                    rec = Record("rejected", reason=reason, detail=detail)
                    cacheable = reason not in RETRY_REASONS
                    report.decoded += 1
                else:
                    _, content, modality, label_key, patient, img, feats, stats = outcome
                    report.decoded += 1
                    try:
                        if content in new_records:
                            rec = new_records[content]  # the same content under another path
                        elif isinstance(img, tuple):  # in the worker's reply slot: copied from there
                            try:
                                slots = _attached(attached, slot_dir, img[0], size, n_workers + 1)
                                image = slots.read(img[1])
                            except (OSError, ValueError, RuntimeError) as exc:  # the slot went away or was overwritten
                                rec = Record("rejected", reason=E.WORKER_ERROR, detail=f"reply slot {type(exc).__name__}")
                                cacheable = False  # retried next time
                            else:
                                row = store.append(image, feats, stats)
                                rec = Record("accepted", modality=modality, label_key=label_key, patient=patient, row=row)
                                report.cache_rows_written += 1
                        else:
                            rec = Record("accepted", modality=modality, label_key=label_key, patient=patient,
                                         row=store.append(img, feats, stats))
                            report.cache_rows_written += 1
                    except OSError as exc:  # the cache's disk is full or failing: this file and the rest wait
                        halted = storage_cause(exc)
                        if halted is None:
                            raise
                        rec = Record("rejected", reason=E.DEFERRED, detail=halted)
                        cacheable = False
                rec = new_records.setdefault(content, rec) if cacheable else rec
                contents[i] = content
                recs[i] = rec
                if cacheable:
                    new_files[path_keys[i]] = FileEntry(*stat_of[i], content)
                done += 1
                if progress:
                    progress(done, total)
                if halted is not None:
                    break  # closing the pool stops the workers; every file not finished is deferred
        except PoolStartError as exc:
            raise E.DicomflError(f"ingestion workers cannot start ({exc})") from None
        finally:
            outcomes.close()
            for slots in attached.values():
                slots.close()
            if slot_dir is not None:
                shutil.rmtree(slot_dir, ignore_errors=True)
        if halted is not None:
            for i in todo:
                if recs[i] is None:
                    recs[i] = Record("rejected", reason=E.DEFERRED, detail=halted)
        del stat_of, path_keys, attached

        # Drop rows no file uses any more once they are most of the store.
        live = sorted({r.row for r in new_records.values() if r.status == "accepted"})
        dead = store.rows - len(live)
        if halted is None and dead > len(live) and dead >= FIRST_CHUNK_ROWS:
            try:
                compact, mapping = store.compacted(np.asarray(live, dtype=np.int64))
            except OSError as exc:  # no room for the compacted copy: keep the store as it is
                if storage_cause(exc) is None:
                    raise
            else:
                store.close()
                store = compact
                new_records = {c: (replace(r, row=mapping[r.row]) if r.status == "accepted" else r)
                               for c, r in new_records.items()}
                recs = [new_records.get(c, r) for c, r in zip(contents, recs)]
        if use_cache:
            state = CacheState(fingerprint=fp, store=store, files=new_files, records=new_records)
            unchanged = (old is not None and store is old.store and not store.changed
                         and new_files == old.files and new_records == old.records)
            if not unchanged:
                t_pub = time.perf_counter()
                try:
                    # What finished is published; the deferred files are not in it. A failed
                    # publish leaves the previous index in force (CURRENT is swapped last).
                    cache.save(state)
                except OSError as exc:
                    cause = storage_cause(exc)
                    if cause is None:
                        raise
                    halted = halted or cause
                    if state.index is None:  # not published: the previous index is in force
                        # The chunk files this run created are named by no index: their space goes now.
                        cache.remove_chunks({c for c, _ in store.chunks} - old_chunks)
                        # Nothing of this run reached the cache: every file it decoded is tried again.
                        for i in todo:
                            if not (recs[i].status == "rejected" and recs[i].reason == E.DEFERRED):
                                recs[i] = Record("rejected", reason=E.DEFERRED, detail=cause)
                report.publish_s = round(time.perf_counter() - t_pub, 3)
        del new_files, new_records, old, todo
    finally:
        lock.__exit__(None, None, None)

    # One sample per accepted content (duplicate files under two paths count once), in walk order.
    report.label_rows = labels.rows
    report.label_problems = labels.problems
    for p in labels.problems:
        log.warning("labels: %s", p)
    rows_seen: set[int] = set()
    keep_rows: list[int] = []
    y: list[int] = []
    patients: list[str] = []
    matched_keys: set[str] = set()
    reasons: Counter[str] = Counter()
    deferred: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    rejected_paths: list[tuple[str, str, str]] = []
    for rel, rec in zip(rels, recs):
        report.seen += 1
        if rec.status != "accepted":
            ref = file_ref(deid, rel)
            report.rejected += 1
            reasons[rec.reason] += 1
            if rec.reason == E.DEFERRED:
                deferred[rec.detail] += 1
            report.rejects.append({"file": ref, "reason": rec.reason, "detail": rec.detail})
            rejected_paths.append((ref, rel, rec.reason))
            if rec.reason != E.NOT_DICOM and not (halted is not None and rec.reason == E.DEFERRED):
                log.warning("rejected %s: %s%s", ref, rec.reason, f" ({rec.detail})" if rec.detail else "")
            continue
        report.accepted += 1
        modalities[rec.modality] += 1
        if rec.row in rows_seen:
            continue
        rows_seen.add(rec.row)
        keep_rows.append(rec.row)
        label = labels.by_key.get(rec.label_key, -1) if rec.label_key else -1
        if label >= 0:
            matched_keys.add(rec.label_key)
        y.append(label)
        patients.append(rec.patient)
    report.rejected_by_reason = dict(sorted(reasons.items()))
    report.deferred = sum(deferred.values())
    report.deferred_by_reason = dict(sorted(deferred.items()))
    report.by_modality = dict(sorted(modalities.items()))
    report.label_rows_unmatched = len(set(labels.by_key) - matched_keys)

    rows = np.asarray(keep_rows, dtype=np.int64)
    split = np.asarray([assign(p, cfg.splits.val, cfg.splits.test, cfg.splits.seed) for p in patients], dtype=np.int8)
    labels_arr = np.asarray(y, dtype=np.int64)
    data = SiteData(images=StoreRows(store, "images", rows), features=StoreRows(store, "features", rows),
                    labels=labels_arr, split=split, patients=patients, stats=StoreRows(store, "stats", rows))
    report.labelled = int((labels_arr >= 0).sum())
    report.unlabelled = int((labels_arr < 0).sum())
    for code, name in NAMES.items():
        report.splits[name] = int(((split == code) & (labels_arr >= 0)).sum())
        report.split_patients[name] = len({p for p, sp in zip(patients, split) if sp == code})
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.files_per_s = round(report.seen / report.elapsed_s, 1) if report.elapsed_s > 0 else 0.0
    # The site's own record of this ingestion, whoever ran it (the CLI, the site's worker in a
    # round, predict): ``dicomfl site status`` reads it.
    try:
        write_rejects_map(s.state_dir, rejected_paths)
        write_report(s.state_dir, report)
    except OSError as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        halted = halted or cause
    if halted is not None:
        log.warning("ingestion stopped: %s; %d files deferred", halted, report.deferred)
        raise E.StorageError(_storage_message(s.state_dir, halted, report.deferred))
    return IngestResult(report=report, data=data)


def storage_cause(exc: BaseException) -> str | None:
    """``E.DISK_FULL`` or ``E.IO_ERROR`` when ``exc`` says the disk is full or failing
    (ENOSPC, EDQUOT, EIO); None for any other error."""
    return _STORAGE_ERRNO.get(getattr(exc, "errno", None)) if isinstance(exc, OSError) else None


def _storage_message(state_dir: Path, cause: str, deferred: int | None) -> str:
    """The one line a full or failing disk ends an ingestion with."""
    what = "no space left on device" if cause == E.DISK_FULL else "input/output error"
    when = "when space is freed" if cause == E.DISK_FULL else "when the disk is healthy"
    done = "nothing ingested" if deferred is None else f"{deferred} files deferred"
    return f"{E.printable(str(state_dir))}: {what}; {done}, run ingest again {when}"


def _sigbus_cause(state_dir: Path, path: str, slot_bytes: int) -> str | None:
    """Why a worker died by SIGBUS, if the cause is the machine's: ``E.DISK_FULL`` when
    ``state_dir`` has less free space than one worker's reply slots and
    :data:`FULL_FLOOR_BYTES` (a mapped page that could not be backed), ``E.IO_ERROR`` when the
    file cannot be read through to its end with plain reads (a mapped page the disk could not
    deliver). None: the disk is healthy and the file reads, so the death is the file's."""
    try:
        st = os.statvfs(state_dir)
        if st.f_bavail * st.f_frsize < slot_bytes + FULL_FLOOR_BYTES:
            return E.DISK_FULL
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return E.IO_ERROR if exc.errno == errno.EIO else None
    try:
        while os.read(fd, _HASH_CHUNK):
            pass
    except OSError as exc:
        return E.IO_ERROR if exc.errno == errno.EIO else None
    finally:
        os.close(fd)
    return None


def write_report(state_dir: Path, report: IngestReport) -> Path:
    """``<state_dir>/reports/ingest.json`` (mode 0600, written whole or not at all): the last
    ingestion's report, which ``dicomfl site status`` reads."""
    import json

    reports = Path(state_dir) / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    os.chmod(reports, 0o700)
    path = reports / "ingest.json"
    tmp = reports / ".ingest.json.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _slot_dir(state_dir: Path) -> str:
    """A new scratch folder (mode 0700) for the workers' reply slots: ``cache/.slots-<id>``
    (removed when the ingestion ends; one left by a killed ingestion goes with the next
    publish, which removes every folder of ``cache/`` but ``chunks``)."""
    path = Path(state_dir) / "cache" / f".slots-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700, parents=True)
    os.chmod(path, 0o700)
    return str(path)


def _attached(attached: dict[str, ReplySlots], slot_dir: str, name: str, size: int, keep: int) -> ReplySlots:
    """A worker's reply slots, mapped on its first reply and kept for the ``keep`` workers that
    replied last: a crashed worker's replacement writes to a new file, and the parent's memory
    must not grow with the crashes. A file is removed once its worker is gone; the folder
    goes at the end of the ingestion."""
    slots = attached.pop(name, None)
    if slots is None:
        if os.path.basename(name) != name or not (name.startswith("w") and name.endswith(".slots")):
            raise ValueError("reply slot name")
        slots = ReplySlots.attach(os.path.join(slot_dir, name), size)
        while len(attached) >= keep:
            old_name = next(iter(attached))
            attached.pop(old_name).close()
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(old_name[1:-len(".slots")]), 0)  # still running: keep its file
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(slot_dir, old_name))
    attached[name] = slots  # the most recent last
    return slots


def _stat_key(deid: Deidentifier, rel: str, size: int, mtime_ns: int) -> str:
    """The key of a file's record when its content was not hashed (too large, unreadable, its
    worker failed): its path, size and mtime; any change to the file retries it."""
    return "s" + deid.pseudonym("stat", f"{rel}\x00{size}\x00{mtime_ns}", 31)


__all__ = ["IngestReport", "IngestResult", "LazyRows", "SiteData", "content_key", "file_ref", "ingest", "map_file", "prepare_state_dir",
           "process_file", "read_rejects_map", "write_rejects_map"]
