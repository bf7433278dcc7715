"""``dicomfl predict``: apply a trained model to a site's images, or to a folder of new studies.

    files (discovered by content) -> for each, in a worker process (the ingestion's pool):
      map + hash -> the site's key from the original header -> the ingestion's own per-file
      pipeline (checks, de-identification, features, full-depth pixels, scaling statistics)
    -> the parent scales each image as training does, runs the model in batches, and writes one
       row per image: the site's key, the file, the probability, the decision and the model.

The same code computes the pixels and features as ingestion does (:func:`~dicomfl.common.ingest.
process_file`), so an image gets the same probability here as in the site's cross-site
evaluation. The decision threshold is the one evaluation uses: Youden's J on the site's own
validation split (read from its ingested data), unless the operator gives one.

The predictions file is the site's own data for its own use: it holds the site's key (accession
number, Study Instance UID, ...) and the file's path, is written only where the operator says,
with mode 0600, and is never sent anywhere. Rejected files go to a second file next to it (also
0600) with their reasons; logs and the terminal name them only by their site-local reference
(``file:`` + an HMAC), as ingestion does.
"""

from __future__ import annotations

import csv
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomfl.common import errors as E
from dicomfl.common.config import SiteConfig
from dicomfl.common.deid import Deidentifier
from dicomfl.common.discover import looks_like_dicom, walk
from dicomfl.common.errors import ModelMismatch, printable
from dicomfl.common.ingest import WORKER_ENV, content_key, file_ref, map_file, process_file
from dicomfl.common.labels import key_value
from dicomfl.common.normalize import CLIP
from dicomfl.common.pixels import robust_stats
from dicomfl.common.splits import NAMES, VAL, assign
from dicomfl.common.workers import PoolStartError, WorkerFailure, default_workers, imap_isolated

log = logging.getLogger("dicomfl.predict")

#: Columns of the predictions file (binary models; a multi-class model has p_0..p_{C-1} instead
#: of probability, and its decision is the most probable class).
COLUMNS = ("key", "file", "site_split", "probability", "decision", "threshold", "model", "model_sha256")

BATCH = 64


@dataclass
class PredictReport:
    """What ``dicomfl predict`` did: counts and reasons only (no key, no path)."""

    model: str
    model_sha256: str
    input: str  # "site" (the site's DICOM folder) or "folder"
    threshold: float | None
    threshold_source: str  # "site validation split (n=...)", "given", "default 0.5", "argmax"
    seen: int = 0
    predicted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejects: list[dict[str, str]] = field(default_factory=list)
    workers: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# ------------------------------------------------------------------------------- worker side

_P: dict[str, Any] = {}


def _init_worker(cfg: SiteConfig, key: bytes, root: str) -> None:
    import contextlib

    for name in ("gdcm", "openjpeg", "rle"):
        with contextlib.suppress(ImportError):
            __import__(name)
    import pydicom.pixels  # noqa: F401

    _P.update(cfg=cfg, key=key, root=root, deid=Deidentifier(key, cfg.deid))


def _header_key(mm, rel: str, label_key: str) -> str | None:
    """The site's key of one file, read from its original header (pixels not read)."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mm.seek(0)
            ds = pydicom.dcmread(mm, force=True, stop_before_pixels=True)
            return key_value(ds, rel, label_key)
        except Exception:  # noqa: BLE001 - an unreadable header is rejected by process_file
            return None
        finally:
            mm.seek(0)


def _work(rel: str) -> tuple:
    """One file: ``("rejected", reason, detail)`` or ``("accepted", key, patient, scaled image, features)``."""
    cfg: SiteConfig = _P["cfg"]
    mapped = map_file(os.path.join(_P["root"], rel), cfg.ingest.max_file_bytes)
    if isinstance(mapped, E.RejectedFile):
        return ("rejected", mapped.reason, mapped.detail)
    with mapped as mm:
        if not looks_like_dicom(mm[:132]):
            return ("rejected", E.NOT_DICOM, "")
        key = _header_key(mm, rel, cfg.site.label_key)
        rec, img, feats = process_file(mm, rel, content_key(mm, _P["key"]), cfg, _P["deid"])
    if rec.status != "accepted":
        return ("rejected", rec.reason, rec.detail)
    med, scale = robust_stats(img)
    x = np.clip((img - med) / scale, -CLIP, CLIP).astype(np.float32)
    return ("accepted", key, rec.patient, x, np.asarray(feats, dtype=np.float32))


# ------------------------------------------------------------------------------- parent side


def site_threshold(net, cfg: SiteConfig, image_size: int, n_classes: int) -> tuple[float | None, str]:
    """The decision threshold cross-site evaluation uses at this site: Youden's J on the site's
    validation split (the site's data is ingested first; a warm cache makes that quick)."""
    from dicomfl.common.ingest import ingest
    from dicomfl.common.metrics import choose_threshold
    from dicomfl.common.train import load_split, predict

    if n_classes != 2:
        return None, "argmax"
    data = ingest(cfg).data
    val = load_split(data, VAL, image_size, n_classes)
    if len(val) == 0 or len(np.unique(val.labels)) < 2:
        return 0.5, "default 0.5 (the site's validation split has not both classes)"
    probs = predict(net, val)
    return choose_threshold(val.labels, probs[:, 1]), f"site validation split (n={len(val)})"


def _csv_cell(value: str) -> str:
    """A cell a spreadsheet will not run (a leading = + - @ is a formula) and a terminal will
    not obey (control characters escaped)."""
    s = printable(value)
    return "'" + s if s[:1] in ("=", "+", "-", "@") else s


def _open_private(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return open(fd, "w", encoding="utf-8", newline="")


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.tsv")


def predict_files(
    net,
    cfg: SiteConfig,
    out: Path,
    *,
    model_id: str,
    model_sha256: str,
    input_dir: Path | None = None,
    threshold: float | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PredictReport:
    """Apply ``net`` (a built model with its weights) to the site's images, or to ``input_dir``,
    and write the predictions to ``out`` (mode 0600).

    Raises
    ------
    ModelMismatch
        The model's image size differs from the site's ``preprocess.image_size``.
    DicomflError
        The output cannot be written, or the worker processes cannot start.
    """
    import torch

    t0 = time.perf_counter()
    mcfg = net.cfg
    size = cfg.preprocess.image_size
    if mcfg.image_size is not None and mcfg.image_size != size:
        raise ModelMismatch(f"the model asks for {mcfg.image_size} px images; this site ingests at {size} px "
                            "(preprocess.image_size)")
    n_classes = mcfg.n_classes
    if n_classes == 2 and threshold is not None:
        source = "given"
    else:
        threshold, source = site_threshold(net, cfg, size, n_classes)
    root = Path(input_dir) if input_dir is not None else cfg.site.dicom_dir
    report = PredictReport(model=model_id, model_sha256=model_sha256, input="folder" if input_dir else "site",
                           threshold=threshold, threshold_source=source)
    key = cfg.secret_key
    deid = Deidentifier(key, cfg.deid)
    rels = [f.rel for f in walk(root)]
    report.seen = len(rels)
    n_workers = min(workers or cfg.ingest.workers or default_workers(), max(1, len(rels)))
    report.workers = n_workers
    mem = cfg.ingest.worker_memory_mb << 20 if cfg.ingest.worker_memory_mb else None
    header = (["key", "file", "site_split"] +
              (["probability", "decision", "threshold"] if n_classes == 2 else [f"p_{c}" for c in range(n_classes)] + ["decision"]) +
              ["model", "model_sha256"])
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = _open_private(out)
        rej_fh = _open_private(rejects_path(out))
    except OSError as exc:
        raise E.DicomflError(f"cannot write {printable(str(out))} ({type(exc).__name__})") from None
    net = net.eval()
    torch.set_grad_enabled(False)
    reasons: dict[str, int] = {}
    with fh, rej_fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        rej_fh.write("# reference\tfile\treason\n")
        pending: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            x = torch.from_numpy(np.stack([p[3] for p in pending]))[:, None]
            f = torch.from_numpy(np.stack([p[4] for p in pending]))
            probs = torch.softmax(net(x, f), dim=1).numpy()
            for (k, rel, split, _, _), p in zip(pending, probs):
                if n_classes == 2:
                    cells = [f"{p[1]:.6f}", int(p[1] >= threshold), f"{threshold:.6f}"]
                else:
                    cells = [f"{v:.6f}" for v in p] + [int(np.argmax(p))]
                writer.writerow([_csv_cell(k), _csv_cell(rel), split, *cells, model_id, model_sha256])
            report.predicted += len(pending)
            pending.clear()

        outcomes = imap_isolated(_work, rels, workers=n_workers, timeout_s=cfg.ingest.file_timeout_s,
                                 memory_bytes=mem, initializer=_init_worker, initargs=(cfg, key, str(root)),
                                 env=WORKER_ENV)
        done = 0
        try:
            for i, outcome in outcomes:
                rel = rels[i]
                if isinstance(outcome, WorkerFailure) or outcome[0] == "rejected":
                    reason, detail = ((outcome.reason, outcome.detail) if isinstance(outcome, WorkerFailure)
                                      else outcome[1:3])
                    reasons[reason] = reasons.get(reason, 0) + 1
                    report.rejected += 1
                    if reason != E.NOT_DICOM:
                        ref = file_ref(deid, rel)
                        report.rejects.append({"file": ref, "reason": reason, "detail": detail})
                        rej_fh.write(f"{ref}\t{printable(rel)}\t{reason}\n")
                        log.warning("rejected %s: %s%s", ref, reason, f" ({detail})" if detail else "")
                else:
                    _, k, patient, x, f = outcome
                    split = NAMES[assign(patient, cfg.splits.val, cfg.splits.test, cfg.splits.seed)]
                    pending.append((k or "", rel, split, x, f))
                    if len(pending) >= BATCH:
                        flush()
                done += 1
                if progress:
                    progress(done, len(rels))
            flush()
        except PoolStartError as exc:
            raise E.DicomflError(f"prediction workers cannot start ({exc})") from None
        finally:
            outcomes.close()
            torch.set_grad_enabled(True)
    report.rejected_by_reason = dict(sorted(reasons.items()))
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.images_per_s = round(report.predicted / report.elapsed_s, 1) if report.elapsed_s > 0 else 0.0
    return report


def read_predictions(path: Path) -> Iterator[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


__all__ = ["COLUMNS", "PredictReport", "predict_files", "read_predictions", "rejects_path", "site_threshold"]
