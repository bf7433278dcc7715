"""Ingestion: a site's DICOM folder + labels CSV -> de-identified, full-depth training data.

    discover (by content) -> read -> label key (in memory) -> patient pseudonym, age
      -> de-identify -> features -> pixels -> cache -> labels join -> patient-level splits

The original header exists only inside :func:`process_file`; what leaves it is a
:class:`~dicomfl.common.cache.Record` (codes, pseudonyms, HMACs), a float32 image and a float32
feature vector.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from . import errors as E
from .cache import CacheState, FileEntry, Record, SiteCache
from .config import SiteConfig
from .deid import Deidentifier
from .deid_profile import table_digest
from .discover import looks_like_dicom, walk
from .features import N_FEATURES, SCHEMA_VERSION, extract, modality_of, patient_age_years
from .labels import Labels, key_value, load_labels
from .pixels import full_depth_pixels
from .reader import check_image, read_dataset
from .splits import NAMES, assign

log = logging.getLogger("dicomfl.ingest")
# pydicom logs the same value-quoting messages it warns with: keep its logger silent.
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

PIPELINE_VERSION = 2  # 2: Table E.1-1 2024b; TM kept under date shifting


@dataclass
class SiteData:
    """What training sees: no header, no identifier."""

    images: np.ndarray  # (N, S, S) float32
    features: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) int64, -1 when unlabelled
    split: np.ndarray  # (N,) int8: 0 train, 1 val, 2 test
    patients: list[str]  # pseudonymous patient ids

    def subset(self, split: int, labelled_only: bool = True) -> np.ndarray:
        mask = self.split == split
        if labelled_only:
            mask &= self.labels >= 0
        return np.flatnonzero(mask)


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
    rejects: list[dict[str, str]] = field(default_factory=list)
    cache_hits: int = 0
    decoded: int = 0
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


def process_file(data: bytes, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    """One file -> (Record, image | None, features | None). Never raises for bad input.

    pydicom's warnings quote element values, so every warning raised while the original header
    is alive is discarded here (never printed, never logged).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _process_file(data, rel, content_key, cfg, deid)


def _process_file(data: bytes, rel: str, content_key: str, cfg: SiteConfig, deid: Deidentifier):
    try:
        if not looks_like_dicom(data[:132]):
            if not data:
                raise E.RejectedFile(E.EMPTY_FILE)
            raise E.RejectedFile(E.NOT_DICOM)
        ds = read_dataset(data)
        check_image(ds, cfg.preprocess.max_pixels)
        k = key_value(ds, rel, cfg.site.label_key)
        label_key = deid.pseudonym("label-key", k, 32) if k else ""
        age = patient_age_years(ds) if cfg.deid.retain_patient_characteristics else None
        patient = deid.patient_pseudonym(ds, fallback=content_key)
        deid.apply(ds, patient)
        feats = extract(ds, age)
        img = full_depth_pixels(ds, cfg.preprocess.image_size, cfg.preprocess.multiframe, cfg.preprocess.color)
        return Record("accepted", modality=modality_of(ds), label_key=label_key, patient=patient), img, feats
    except E.RejectedFile as rej:
        return Record("rejected", reason=rej.reason, detail=rej.detail), None, None
    except Exception as exc:  # noqa: BLE001 - a bug or an unforeseen file: reject, keep going
        return Record("rejected", reason="internal-error", detail=type(exc).__name__), None, None


def ingest(
    cfg: SiteConfig,
    *,
    use_cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest a site's DICOM folder: discover, de-identify, decode at full depth, cache, label, split.

    Parameters
    ----------
    cfg : SiteConfig
        The site's config (folder, labels, key, state dir, de-identification and preprocessing).
    use_cache : bool
        Reuse ``<state_dir>/cache`` for unchanged files and write the new generation back.
    progress : callable, optional
        ``progress(files_done, files_total)`` after each file.

    Returns
    -------
    IngestResult
        ``report`` (counts, reasons, splits; PHI-free) and ``data`` (images, features, labels,
        splits, pseudonymous patient ids).

    Raises
    ------
    ConfigError
        The labels file or the secret key cannot be used (one line naming the file and row).
    """
    t0 = time.perf_counter()
    s = cfg.site
    deid = Deidentifier(cfg.secret_key, cfg.deid)
    fp = fingerprint(cfg, deid)
    cache = SiteCache(s.state_dir)
    old = cache.load(fp) if use_cache else None
    report = IngestReport(site=s.name, deid_options=cfg.deid.model_dump())

    files = list(walk(s.dicom_dir))
    new = CacheState(fingerprint=fp)
    images: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    order: list[tuple[str, Record]] = []  # (rel, record) in walk order
    size = cfg.preprocess.image_size

    for i, f in enumerate(files):
        path_key = deid.pseudonym("path", f.rel, 32)
        entry = old.files.get(path_key) if old else None
        rec: Record | None = None
        if entry and entry.size == f.size and entry.mtime_ns == f.mtime_ns and entry.content in old.records:
            content = entry.content
            rec = old.records[content]
        else:
            try:
                data = f.path.read_bytes()
            except OSError as exc:
                data = None
                rec = Record("rejected", reason=E.UNREADABLE, detail=type(exc).__name__)
            content = deid.pseudonym("content", data, 32) if data is not None else deid.pseudonym("unreadable", f.rel, 32)
            if rec is None and old and content in old.records:
                rec = old.records[content]
        if rec is not None and rec.status == "accepted" and content not in new.records:
            # cache hit: copy the stored tensors into the new generation
            assert old is not None
            row = len(images)
            images.append(np.asarray(old.images[rec.row]))
            feats.append(np.asarray(old.features[rec.row]))
            rec = Record(**{**rec.__dict__, "row": row})
            report.cache_hits += 1
        elif rec is not None and content in new.records:
            rec = new.records[content]  # duplicate file content under another path
        elif rec is not None:
            report.cache_hits += 1
        else:
            rec, img, fv = process_file(data, f.rel, content, cfg, deid)
            report.decoded += 1
            if rec.status == "accepted":
                rec.row = len(images)
                images.append(img)
                feats.append(fv)
        new.files[path_key] = FileEntry(f.size, f.mtime_ns, content)
        new.records[content] = rec
        order.append((f.rel, rec))
        if progress:
            progress(i + 1, len(files))

    new.images = np.stack(images) if images else np.zeros((0, size, size), np.float32)
    new.features = np.stack(feats) if feats else np.zeros((0, N_FEATURES), np.float32)
    if use_cache:
        cache.save(new)

    labels = Labels()
    if s.labels is not None:
        labels = load_labels(s.labels, s.label_key, lambda v: deid.pseudonym("label-key", v, 32))
    report.label_rows = labels.rows
    report.label_problems = labels.problems
    for p in labels.problems:
        log.warning("labels: %s", p)

    # One sample per accepted content (duplicate files under two paths count once).
    rows_seen: set[int] = set()
    keep_rows: list[int] = []
    y: list[int] = []
    patients: list[str] = []
    matched_keys: set[str] = set()
    reasons: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    for rel, rec in order:
        report.seen += 1
        if rec.status != "accepted":
            report.rejected += 1
            reasons[rec.reason] += 1
            report.rejects.append({"file": rel, "reason": rec.reason, "detail": rec.detail})
            if rec.reason != E.NOT_DICOM:
                log.warning("rejected %s: %s%s", rel, rec.reason, f" ({rec.detail})" if rec.detail else "")
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
    report.by_modality = dict(sorted(modalities.items()))
    report.label_rows_unmatched = len(set(labels.by_key) - matched_keys)

    idx = np.asarray(keep_rows, dtype=np.int64)
    split = np.asarray(
        [assign(p, cfg.splits.val, cfg.splits.test, cfg.splits.seed) for p in patients], dtype=np.int8
    )
    labels_arr = np.asarray(y, dtype=np.int64)
    data = SiteData(
        images=np.asarray(new.images[idx]) if len(idx) else new.images[:0],
        features=np.asarray(new.features[idx]) if len(idx) else new.features[:0],
        labels=labels_arr,
        split=split,
        patients=patients,
    )
    report.labelled = int((labels_arr >= 0).sum())
    report.unlabelled = int((labels_arr < 0).sum())
    for code, name in NAMES.items():
        report.splits[name] = int(((split == code) & (labels_arr >= 0)).sum())
        report.split_patients[name] = len({p for p, sp in zip(patients, split) if sp == code})
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.files_per_s = round(report.seen / report.elapsed_s, 1) if report.elapsed_s > 0 else 0.0
    return IngestResult(report=report, data=data)
