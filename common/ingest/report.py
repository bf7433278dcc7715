"""What an ingestion leaves: the data training sees (:class:`SiteData`), its PHI-free report
(:class:`IngestReport`), and the site's own files about it under ``<state_dir>/reports``:
``ingest.json`` (the report, which ``dicomfl site status`` reads) and ``rejects-map.tsv`` (the
operator's map from file references to paths, never sent anywhere)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomfl.common import __version__
from dicomfl.common import errors as E
from dicomfl.common.config import SiteConfig
from dicomfl.common.deid import Deidentifier
from dicomfl.common.deid_profile import table_digest
from dicomfl.common.features import SCHEMA_VERSION

PIPELINE_VERSION = 3  # 2: Table E.1-1 2024b; TM kept under date shifting. 3: Pillow resize, chunked cache

#: errno values that say the site's disk, not the file, is the problem (see :func:`storage_cause`).
_STORAGE_ERRNO = {errno.ENOSPC: E.DISK_FULL, errno.EDQUOT: E.DISK_FULL, errno.EIO: E.IO_ERROR}


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


def storage_cause(exc: BaseException) -> str | None:
    """``E.DISK_FULL`` or ``E.IO_ERROR`` when ``exc`` says the disk is full or failing
    (ENOSPC, EDQUOT, EIO); None for any other error."""
    return _STORAGE_ERRNO.get(getattr(exc, "errno", None)) if isinstance(exc, OSError) else None


def storage_message(state_dir: Path, cause: str, deferred: int | None) -> str:
    """The one line a full or failing disk ends an ingestion with."""
    what = "no space left on device" if cause == E.DISK_FULL else "input/output error"
    when = "when space is freed" if cause == E.DISK_FULL else "when the disk is healthy"
    done = "nothing ingested" if deferred is None else f"{deferred} files deferred"
    return f"{E.printable(str(state_dir))}: {what}; {done}, run ingest again {when}"


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


__all__ = ["IngestReport", "IngestResult", "PIPELINE_VERSION", "SiteData", "file_ref", "fingerprint",
           "prepare_state_dir", "read_rejects_map", "storage_cause", "storage_message", "tsv_field",
           "write_rejects_map", "write_report"]
