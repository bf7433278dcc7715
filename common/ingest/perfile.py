"""One file's work, shared by ingestion and prediction: it runs in a worker of the file pool
(:mod:`dicomfl.common.workers`).

    map (read-only, never copied whole) -> content key (hashed as it is read) -> known? ->
    check header -> check codestream -> label key -> patient pseudonym, age -> de-identify ->
    features -> full-depth pixels -> scaling statistics

What leaves the worker is one of :class:`Known`, :class:`Rejected` or :class:`Accepted`: codes,
pseudonyms and HMACs, one float32 image (or the :class:`~dicomfl.common.workers.SlotRef` of where
it was written), its features and its two scaling numbers. The original header exists only in
the worker. The one exception is :attr:`Accepted.site_key`, the site's own join key (accession
number, ...) from the original header, sent only when the job asks for it: prediction writes it
into the operator's predictions file, which never leaves the site.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import mmap
import os
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.uid import RLELossless

from dicomfl.common import errors as E
from dicomfl.common.cache import Record
from dicomfl.common.codestream import J2K_SYNTAXES, JPEG_LS_SYNTAXES, JPEG_SYNTAXES, check_codestream
from dicomfl.common.config import SiteConfig
from dicomfl.common.deid import Deidentifier
from dicomfl.common.discover import looks_like_dicom
from dicomfl.common.features import extract, modality_of, patient_age_years
from dicomfl.common.labels import key_value
from dicomfl.common.pixels import full_depth_pixels, keep_image_blocks, robust_stats
from dicomfl.common.reader import check_image, read_dataset
from dicomfl.common.workers import ReplySlots, SlotRef, WorkerTask

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


# ------------------------------------------------------------------------------- what a worker sends


@dataclass(frozen=True, slots=True)
class Known:
    """The file's content is already in the site's cache: nothing decoded."""

    content: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The file is not used, for ``reason`` (a reason code) and ``detail`` (keywords, type names).

    ``content`` is None when the file was not hashed (the parent keys its record by path, size
    and mtime). ``retry``: the failure is the machine's, not the file's (not cached, tried again
    next time); set by the parent, which knows which reasons those are.
    """

    reason: str
    detail: str = ""
    content: str | None = None
    retry: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    """A de-identified, decoded file.

    ``image``: the (S, S) float32 image at full depth; in a worker's reply it may instead be the
    :class:`~dicomfl.common.workers.SlotRef` of where it was written; None (parent side) when the
    same content was already stored in this ingestion. ``stats``: its ``[median, p99 - p1]``.
    """

    content: str
    modality: str
    label_key: str  # HMAC of the label join key ("" when the image has none)
    patient: str  # pseudonymous patient id
    image: np.ndarray | SlotRef | None
    features: np.ndarray
    stats: np.ndarray
    site_key: str | None = None  # the site's own join key, only when the job asks (prediction)


Reply = Known | Rejected | Accepted


# ------------------------------------------------------------------------------- the steps


def modality_code(ds) -> str:
    m = modality_of(ds)
    return m if m in MODALITIES or m == "unknown" else "other"


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
        from dicomfl.common.pixels import _syntax_name

        raise E.RejectedFile(E.NO_DECODER, _syntax_name(ds))


def _process(source, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    """``source``: the file's bytes or a read-only mapping of it. Returns ``(Record, image | None,
    features | None, site key | None)``; the site key is the label join key from the original
    header. Never raises for bad input.

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
            rec = Record("accepted", modality=modality_code(ds), label_key=label_key, patient=patient)
            return rec, img, feats, k
        except E.RejectedFile as rej:
            return Record("rejected", reason=rej.reason, detail=rej.detail), None, None, None
        except MemoryError:  # over the worker's address-space cap: not cached, retried next time
            return Record("rejected", reason=E.WORKER_MEMORY, detail="MemoryError"), None, None, None
        except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen file: reject, keep going
            return Record("rejected", reason=E.INTERNAL_ERROR, detail=type(exc).__name__), None, None, None


def process_file(data: bytes, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    """One file's bytes -> (Record, image | None, features | None), in this process. Never raises
    for bad input. (:class:`FileWorker` runs the same steps in worker processes; this is the
    entry point for tests and tools that already hold the bytes.)"""
    rec, img, feats, _key = _process(data, rel, content_key, cfg, deid)
    return rec, img, feats


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


# ------------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class FileJob:
    """What every worker of one ingestion (or prediction) needs: sent to each worker once.

    ``root``: the folder the items' relative paths are under. ``known``: content keys the cache
    already holds (a moved or renamed file is recognised by its content, not decoded again).
    ``slot_dir``: where each worker creates its :class:`~dicomfl.common.workers.ReplySlots`
    (None: images travel in the replies). ``site_key``: also send the site's own join key.
    """

    cfg: SiteConfig
    key: bytes
    root: str
    known: frozenset[str] = frozenset()
    slot_dir: str | None = None
    site_key: bool = False


class FileWorker(WorkerTask):
    """The per-file work of ingestion and prediction, as the file pool runs it: one instance per
    worker process, started there (:meth:`start`), then called with each file's path relative
    to ``job.root``. Returns a :data:`Reply`; never raises for bad input."""

    def __init__(self, job: FileJob) -> None:
        self.job = job
        self._deid: Deidentifier | None = None
        self._slots: ReplySlots | None = None

    def start(self) -> None:
        """Every decoder imported before the first file (so its import is not counted in the
        file's time), Pillow's block pool kept, the site's de-identifier built, and this worker's
        reply slots created (none if the file cannot be made, e.g. on a full disk: images then
        travel in the replies)."""
        for name in ("gdcm", "openjpeg", "rle"):
            with contextlib.suppress(ImportError):
                __import__(name)
        import pydicom.pixels  # noqa: F401

        keep_image_blocks()
        job = self.job
        self._deid = Deidentifier(job.key, job.cfg.deid)
        if job.slot_dir:
            with contextlib.suppress(OSError):
                self._slots = ReplySlots.create(job.slot_dir, job.cfg.preprocess.image_size)

    def __call__(self, rel: str) -> Reply:
        job = self.job
        cfg = job.cfg
        mm = map_file(os.path.join(job.root, rel), cfg.ingest.max_file_bytes)
        if isinstance(mm, E.RejectedFile):
            return Rejected(mm.reason, mm.detail)
        with mm:
            if not looks_like_dicom(mm[:132]):  # not hashed: a stat key is enough for what is skipped
                return Rejected(E.NOT_DICOM, "")
            content = content_key(mm, job.key)
            if content in job.known:
                return Known(content)
            rec, img, feats, k = _process(mm, rel, content, cfg, self._deid)
        if rec.status != "accepted":
            return Rejected(rec.reason, rec.detail, content)
        stats = robust_stats(img)
        image = self._slots.put(img) if self._slots is not None else img
        return Accepted(content, rec.modality, rec.label_key, rec.patient, image, feats, stats,
                        site_key=k if job.site_key else None)


__all__ = ["Accepted", "FileJob", "FileWorker", "Known", "MODALITIES", "Rejected", "Reply", "WORKER_ENV",
           "content_key", "map_file", "modality_code", "process_file"]
