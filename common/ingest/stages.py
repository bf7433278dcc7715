"""Ingestion's stages, each a function (or, for publish, an object fed file by file) with a typed
outcome:

    triage   -> :class:`Triage`      discover the files; what the cache already holds, what is too
                                     large, what is left to do
    dispatch -> :class:`Dispatch`    hand what is left to the file pool (:class:`~.perfile.FileWorker`)
    collect  -> :data:`FileOutcome`  one worker reply (or failure) -> accepted (image, features,
                                     statistics), rejected (reason), deferred (the machine's
                                     reason), or known
    publish  -> :class:`Publication` each accepted image appended to the cache's store as it
                                     arrives; at the end, the store compacted and the index published
    report   -> :class:`Summary`     labels joined, splits assigned, counts; ``reports/ingest.json``
                                     and ``rejects-map.tsv`` written

:func:`ingest` runs them in that order and writes the report itself, so whoever runs an
ingestion (the CLI, the site's worker during a round, prediction) leaves the record that
``dicomfl site status`` reads.

Collect and publish run file by file inside dispatch's loop, in that order: an image in a
worker's reply slot is copied into the store before the pool is asked for the next reply (the
slots' promise, :class:`~dicomfl.common.workers.ReplySlots`), so the parent holds one image at a
time whatever N is.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dicomfl.common import errors as E
from dicomfl.common.cache import (FIRST_CHUNK_ROWS, CacheState, ChunkStore, FileEntry, Record, SiteCache, StoreRows,
                                  chunk_rows_for)
from dicomfl.common.config import SiteConfig
from dicomfl.common.deid import Deidentifier
from dicomfl.common.discover import walk
from dicomfl.common.features import N_FEATURES
from dicomfl.common.labels import Labels, load_labels
from dicomfl.common.splits import NAMES, assign
from dicomfl.common.workers import (PREFETCH, PoolStartError, ReplySlots, SlotReader, SlotRef, WorkerFailure,
                                    default_workers, imap_isolated)
from .perfile import WORKER_ENV, Accepted, FileJob, FileWorker, Known, Rejected, Reply
from .report import (IngestReport, IngestResult, SiteData, file_ref, fingerprint, prepare_state_dir, storage_cause,
                     storage_message, write_rejects_map, write_report)

log = logging.getLogger("dicomfl.ingest")
# pydicom logs the same value-quoting messages it warns with: keep its logger silent.
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

#: Failures that depend on the machine rather than the file: not cached, retried next time.
RETRY_REASONS = frozenset({E.TIMEOUT, E.WORKER_MEMORY, E.DEFERRED})
#: Free space under which ``state_dir`` counts as full when a worker dies by SIGBUS (a write to a
#: mapped page the file system could not back), on top of one worker's reply slots.
FULL_FLOOR_BYTES = 1 << 20

_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Deferred:
    """A file not processed for a reason of the machine (``why``: ``disk-full``, ``io-error``,
    ``interrupted``): never cached, tried again at the next ingestion. ``halt``: the site's disk
    cannot take more, so the ingestion stops after this file."""

    content: str
    why: str
    halt: bool = False


#: One file after :func:`collect`. An :class:`~.perfile.Accepted` here holds its image as an
#: array (or None: the same content was already stored by this ingestion); a
#: :class:`~.perfile.Rejected` always has its ``content`` key and ``retry`` set.
FileOutcome = Known | Rejected | Deferred | Accepted


# ------------------------------------------------------------------------------- triage


@dataclass
class Triage:
    """Every discovered file, in walk order, and what is left for the workers.

    ``recs[i]`` is the file's record when triage settled it (unchanged since the cache saw it,
    or over ``ingest.max_file_bytes``), else None; ``todo`` lists the others' positions.
    """

    rels: list[str]
    path_keys: list[str]
    stat_of: list[tuple[int, int]]  # (size, mtime_ns)
    contents: list[str]
    recs: list[Record | None]
    new_files: dict[str, FileEntry]
    new_records: dict[str, Record]
    todo: list[int]
    cache_hits: int = 0


def triage(cfg: SiteConfig, deid: Deidentifier, old: CacheState | None) -> Triage:
    """Discover the site's files (by content, :func:`~dicomfl.common.discover.walk`) and settle
    what needs no worker: a file whose path, size and mtime the cache knows keeps its record; a
    file over ``ingest.max_file_bytes`` is rejected unread."""
    t = Triage([], [], [], [], [], {}, {}, [])
    for i, f in enumerate(walk(cfg.site.dicom_dir)):
        t.rels.append(f.rel)
        t.stat_of.append((f.size, f.mtime_ns))
        path_key = deid.pseudonym("path", f.rel, 32)
        t.path_keys.append(path_key)
        entry = old.files.get(path_key) if old else None
        if entry is not None and entry.size == f.size and entry.mtime_ns == f.mtime_ns and entry.content in old.records:
            t.contents.append(entry.content)
            t.recs.append(t.new_records.setdefault(entry.content, old.records[entry.content]))
            t.new_files[path_key] = entry
            t.cache_hits += 1
        elif f.size > cfg.ingest.max_file_bytes:
            c = _stat_key(deid, f.rel, f.size, f.mtime_ns)
            t.contents.append(c)
            t.recs.append(t.new_records.setdefault(c, Record("rejected", reason=E.TOO_LARGE,
                                                               detail="file size over ingest.max_file_bytes")))
            t.new_files[path_key] = FileEntry(f.size, f.mtime_ns, c)
        else:
            t.contents.append("")
            t.recs.append(None)
            t.todo.append(i)
    return t


# ------------------------------------------------------------------------------- dispatch


@dataclass
class Dispatch:
    """The file pool at work on triage's ``todo``: ``replies`` yields ``(position in todo, reply
    or WorkerFailure)`` as files finish. :meth:`close` stops the workers and removes their reply
    slots."""

    replies: Iterator[tuple[int, Reply | WorkerFailure]]
    workers: int
    slot_dir: str | None
    slots: SlotReader | None
    slot_bytes: int  # one worker's slot file

    def close(self) -> None:
        self.replies.close()
        if self.slots is not None:
            self.slots.close()
        if self.slot_dir is not None:
            shutil.rmtree(self.slot_dir, ignore_errors=True)


def dispatch(cfg: SiteConfig, key: bytes, rels: list[str], known: frozenset[str], workers: int | None) -> Dispatch:
    """Start the file pool on ``rels`` (lazily: workers start on the first ``next``).

    Each worker gets its reply slots in a scratch folder under ``cache/`` (none when the folder
    cannot be made on a full disk: images then travel in the replies)."""
    s = cfg.site
    size = cfg.preprocess.image_size
    n_workers = min(workers or cfg.ingest.workers or default_workers(), max(1, len(rels)))
    mem = cfg.ingest.worker_memory_mb << 20 if cfg.ingest.worker_memory_mb else None
    try:
        slot_dir = _slot_dir(s.state_dir) if rels else None
    except OSError as exc:  # no room for the folder: images travel in the replies
        if storage_cause(exc) is None:
            raise
        slot_dir = None
    job = FileJob(cfg=cfg, key=key, root=str(s.dicom_dir), known=known, slot_dir=slot_dir)
    replies = imap_isolated(FileWorker(job), rels, workers=n_workers, timeout_s=cfg.ingest.file_timeout_s,
                            memory_bytes=mem, env=WORKER_ENV, prefetch=PREFETCH)
    slots = SlotReader(slot_dir, size, n_workers + 1) if slot_dir is not None else None
    return Dispatch(replies, n_workers, slot_dir, slots, ReplySlots.file_bytes(size))


# ------------------------------------------------------------------------------- collect


def collect(reply: Reply | WorkerFailure, rel: str, stat: tuple[int, int], *, cfg: SiteConfig, deid: Deidentifier,
            d: Dispatch, stored: Container[str]) -> FileOutcome:
    """One worker's reply -> the file's typed outcome, its image copied out of the reply slot.

    ``stored``: content keys this ingestion already has a record for (a second copy of the same
    content is not read again). A file whose worker died by SIGBUS is deferred when the site's
    disk is full or the file cannot be read (the machine, not the file); a reply slot that went
    away or was overwritten rejects the file for this time only (``worker-error``, retried).
    """
    if isinstance(reply, WorkerFailure):
        content = _stat_key(deid, rel, *stat)
        reason, detail = reply.reason, reply.detail
        if reason == E.DECODER_CRASH and detail == "SIGBUS":
            # A write to a mapped page the file system cannot back, or a read of a mapped page
            # the disk cannot deliver: the machine, not the file?
            why = _sigbus_cause(cfg.site.state_dir, os.path.join(cfg.site.dicom_dir, rel), d.slot_bytes)
            if why is not None:
                return Deferred(content, why, halt=why == E.DISK_FULL)
        return _rejected(reason, detail, content)
    if isinstance(reply, Known):
        return reply
    if isinstance(reply, Rejected):
        return _rejected(reply.reason, reply.detail, reply.content or _stat_key(deid, rel, *stat))
    if reply.content in stored:
        return replace(reply, image=None)  # the same content under another path
    if isinstance(reply.image, SlotRef):  # in the worker's reply slot: copied from there
        try:
            if d.slots is None:
                raise ValueError("no reply slots")
            return replace(reply, image=d.slots.read(reply.image))
        except (OSError, ValueError, RuntimeError) as exc:  # the slot went away or was overwritten
            return Rejected(E.WORKER_ERROR, f"reply slot {type(exc).__name__}", reply.content, retry=True)
    return reply


def _rejected(reason: str, detail: str, content: str) -> Rejected | Deferred:
    if reason == E.DEFERRED:
        return Deferred(content, detail)
    return Rejected(reason, detail, content, retry=reason in RETRY_REASONS)


# ------------------------------------------------------------------------------- publish


@dataclass
class Publication:
    """What the publish stage holds and leaves: every file's content key and record (in walk
    order), the store the accepted images went to, the file and record tables of the new index,
    and ``halted`` (``disk-full`` or ``io-error``) once the site's disk could take no more.

    Fed by :meth:`add` as files are collected; :meth:`publish` ends it."""

    triage: Triage
    store: ChunkStore
    old: CacheState | None  # the index in force when the ingestion began (None: none, or no cache)
    rows_written: int = 0
    publish_s: float = 0.0
    halted: str | None = None
    #: The chunk files the old index names, as they were before this run appended to its store.
    old_chunks: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.old_chunks = {c for c, _ in self.old.store.chunks} if self.old is not None else set()

    @property
    def contents(self) -> list[str]:
        return self.triage.contents

    @property
    def recs(self) -> list[Record | None]:
        return self.triage.recs

    def add(self, i: int, outcome: FileOutcome) -> None:
        """File ``i``'s outcome: its image appended to the store, its record kept (and cached
        unless the failure is the machine's). A store that cannot grow (ENOSPC, EDQUOT, EIO)
        defers the file and sets ``halted``; any other error propagates."""
        t = self.triage
        cacheable = True
        content = outcome.content
        if isinstance(outcome, Known):
            rec = self.old.records[content]
        elif isinstance(outcome, Rejected):
            rec = Record("rejected", reason=outcome.reason, detail=outcome.detail)
            cacheable = not outcome.retry
        elif isinstance(outcome, Deferred):
            rec = Record("rejected", reason=E.DEFERRED, detail=outcome.why)
            cacheable = False
            if outcome.halt:
                self.halted = outcome.why
        else:
            try:
                if outcome.image is None:
                    rec = t.new_records[content]
                else:
                    row = self.store.append(outcome.image, outcome.features, outcome.stats)
                    rec = Record("accepted", modality=outcome.modality, label_key=outcome.label_key,
                                 patient=outcome.patient, row=row)
                    self.rows_written += 1
            except OSError as exc:  # the cache's disk is full or failing: this file and the rest wait
                self.halted = storage_cause(exc)
                if self.halted is None:
                    raise
                rec = Record("rejected", reason=E.DEFERRED, detail=self.halted)
                cacheable = False
        rec = t.new_records.setdefault(content, rec) if cacheable else rec
        t.contents[i] = content
        t.recs[i] = rec
        if cacheable:
            t.new_files[t.path_keys[i]] = FileEntry(*t.stat_of[i], content)

    def defer_unfinished(self) -> None:
        """Every file not finished when the ingestion halted is deferred for the same cause."""
        for i in self.triage.todo:
            if self.recs[i] is None:
                self.recs[i] = Record("rejected", reason=E.DEFERRED, detail=self.halted)

    def publish(self, cache: SiteCache, fp: str, use_cache: bool) -> None:
        """Drop rows no file uses any more once they are most of the store, then publish the new
        index (what finished; the deferred files are not in it). A publish that fails on a full
        or failing disk leaves the previous index in force (CURRENT is swapped last), removes
        the chunk files only this run created, and defers every file this run decoded."""
        t = self.triage
        live = sorted({r.row for r in t.new_records.values() if r.status == "accepted"})
        dead = self.store.rows - len(live)
        if self.halted is None and dead > len(live) and dead >= FIRST_CHUNK_ROWS:
            try:
                compact, mapping = self.store.compacted(np.asarray(live, dtype=np.int64))
            except OSError as exc:  # no room for the compacted copy: keep the store as it is
                if storage_cause(exc) is None:
                    raise
            else:
                self.store.close()
                self.store = compact
                t.new_records = {c: (replace(r, row=mapping[r.row]) if r.status == "accepted" else r)
                                 for c, r in t.new_records.items()}
                t.recs = [t.new_records.get(c, r) for c, r in zip(t.contents, t.recs)]
        if not use_cache:
            return
        store, old = self.store, self.old
        state = CacheState(fingerprint=fp, store=store, files=t.new_files, records=t.new_records)
        unchanged = (old is not None and store is old.store and not store.changed
                     and t.new_files == old.files and t.new_records == old.records)
        if unchanged:
            return
        t_pub = time.perf_counter()
        try:
            cache.save(state)
        except OSError as exc:
            cause = storage_cause(exc)
            if cause is None:
                raise
            self.halted = self.halted or cause
            if state.index is None:  # not published: the previous index is in force
                # The chunk files this run created are named by no index: their space goes now.
                cache.remove_chunks({c for c, _ in store.chunks} - self.old_chunks)
                # Nothing of this run reached the cache: every file it decoded is tried again.
                for i in t.todo:
                    if not (t.recs[i].status == "rejected" and t.recs[i].reason == E.DEFERRED):
                        t.recs[i] = Record("rejected", reason=E.DEFERRED, detail=cause)
        self.publish_s = round(time.perf_counter() - t_pub, 3)


# ------------------------------------------------------------------------------- report


@dataclass
class Summary:
    """The report stage's outcome: the data training sees and the operator's reference -> path
    rows of the rejected files (for ``rejects-map.tsv``)."""

    data: SiteData
    rejected_paths: list[tuple[str, str, str]]  # (reference, relative path, reason)


def summarize(cfg: SiteConfig, deid: Deidentifier, labels: Labels, rels: list[str], recs: list[Record],
              store: ChunkStore, report: IngestReport, halted: str | None) -> Summary:
    """Count every file into ``report``, join the labels and assign the patient-level splits: one
    sample per accepted content (duplicate files under two paths count once), in walk order.
    Rejected files are logged by reference, with their reason (not-DICOM files, and the files
    deferred by a halt, are counted but not logged one by one)."""
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
    return Summary(data=data, rejected_paths=rejected_paths)


# ------------------------------------------------------------------------------- ingest


def ingest(
    cfg: SiteConfig,
    *,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> IngestResult:
    """Ingest a site's DICOM folder: discover, check, de-identify, decode at full depth, cache,
    label, split; and write ``<state_dir>/reports/ingest.json`` and ``rejects-map.tsv``, whoever
    the caller is.

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
    StorageError
        The site's disk is full or failing: what finished is published, the rest deferred.
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
    try:
        lock = cache.locked() if use_cache else contextlib.nullcontext()
        lock.__enter__()
    except OSError as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        raise E.StorageError(storage_message(s.state_dir, cause, None)) from None
    try:
        old = cache.load(fp, size, N_FEATURES) if use_cache else None
        try:
            if old is not None:
                store = old.store
            elif use_cache:
                store = cache.new_store(size, N_FEATURES)
            else:
                store = ChunkStore(s.state_dir / "cache" / "scratch", size, N_FEATURES, chunk_rows_for(size),
                                   scratch=True)
        except OSError as exc:
            cause = storage_cause(exc)
            if cause is None:
                raise
            raise E.StorageError(storage_message(s.state_dir, cause, None)) from None

        tri = triage(cfg, deid, old)
        report.cache_hits += tri.cache_hits
        total = len(tri.rels)
        done = total - len(tri.todo)
        if progress:
            progress(done, total)

        pub = Publication(tri, store, old)  # before any row is appended: it notes the old index's chunks
        d = dispatch(cfg, key, [tri.rels[i] for i in tri.todo], frozenset(old.records) if old else frozenset(), workers)
        report.workers = d.workers if tri.todo else 0
        try:
            for j, reply in d.replies:
                i = tri.todo[j]
                outcome = collect(reply, tri.rels[i], tri.stat_of[i], cfg=cfg, deid=deid, d=d, stored=tri.new_records)
                if isinstance(outcome, Known):
                    report.cache_hits += 1
                else:
                    report.decoded += 1
                pub.add(i, outcome)
                done += 1
                if progress:
                    progress(done, total)
                if pub.halted is not None:
                    break  # closing the pool stops the workers; every file not finished is deferred
        except PoolStartError as exc:
            raise E.DicomflError(f"ingestion workers cannot start ({exc})") from None
        finally:
            d.close()
        del d
        if pub.halted is not None:
            pub.defer_unfinished()
        pub.publish(cache, fp, use_cache)
        report.cache_rows_written = pub.rows_written
        report.publish_s = pub.publish_s
        rels, recs, store, halted = tri.rels, pub.recs, pub.store, pub.halted
        del tri, pub, old  # the per-file tables go before the report is built
    finally:
        lock.__exit__(None, None, None)

    summary = summarize(cfg, deid, labels, rels, recs, store, report, halted)
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.files_per_s = round(report.seen / report.elapsed_s, 1) if report.elapsed_s > 0 else 0.0
    # The site's own record of this ingestion, whoever ran it (the CLI, the site's worker in a
    # round, predict): ``dicomfl site status`` reads it.
    try:
        write_rejects_map(s.state_dir, summary.rejected_paths)
        write_report(s.state_dir, report)
    except OSError as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        halted = halted or cause
    if halted is not None:
        log.warning("ingestion stopped: %s; %d files deferred", halted, report.deferred)
        raise E.StorageError(storage_message(s.state_dir, halted, report.deferred))
    return IngestResult(report=report, data=summary.data)


# ------------------------------------------------------------------------------- helpers


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
        while os.read(fd, _READ_CHUNK):
            pass
    except OSError as exc:
        return E.IO_ERROR if exc.errno == errno.EIO else None
    finally:
        os.close(fd)
    return None


def _slot_dir(state_dir: Path) -> str:
    """A new scratch folder (mode 0700) for the workers' reply slots: ``cache/.slots-<id>``
    (removed when the ingestion ends; one left by a killed ingestion goes with the next
    publish, which removes every folder of ``cache/`` but ``chunks``)."""
    path = Path(state_dir) / "cache" / f".slots-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o700, parents=True)
    os.chmod(path, 0o700)
    return str(path)


def _stat_key(deid: Deidentifier, rel: str, size: int, mtime_ns: int) -> str:
    """The key of a file's record when its content was not hashed (too large, unreadable, its
    worker failed): its path, size and mtime; any change to the file retries it."""
    return "s" + deid.pseudonym("stat", f"{rel}\x00{size}\x00{mtime_ns}", 31)


__all__ = ["Deferred", "Dispatch", "FileOutcome", "Publication", "RETRY_REASONS", "Summary", "Triage", "collect",
           "dispatch", "ingest", "summarize", "triage"]
