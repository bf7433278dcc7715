"""``dicomfl predict``: apply a trained model to a site's images, or to a folder of new studies.

    files (discovered by content) -> for each, in a worker process (the ingestion's pool):
      map + hash -> the site's key from the original header -> the ingestion's own per-file
      pipeline (checks, de-identification, features, full-depth pixels, scaling statistics)
    -> the parent scales each image as training does, runs the model in batches, and writes one
       row per image: the site's key, the file, the probability, the decision and the model.

Each row's ``site_split`` is the patient's split (train / val / test) only when the site's cache
held that patient before this prediction (the data training and evaluation used); any other
patient is ``new``, whatever split their pseudonym would hash to.

The same code computes the pixels and features as ingestion does (the ingestion's own per-file
worker, :class:`~dicomfl.common.ingest.FileWorker`), so an image gets the same probability here
as in the site's cross-site evaluation. The decision threshold is the one evaluation uses:
Youden's J on the site's own validation split (read from its ingested data), unless the
operator gives one.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomfl.common import errors as E
from dicomfl.common.config import SiteConfig
from dicomfl.common.deid import Deidentifier
from dicomfl.common.discover import walk
from dicomfl.common.errors import ModelMismatch, printable
from dicomfl.common.files import AtomicFile
from dicomfl.common.ingest import WORKER_ENV, FileJob, FileWorker, Rejected, file_ref, tsv_field
from dicomfl.common.normalize import CLIP
from dicomfl.common.outputs import check_output as check_path
from dicomfl.common.outputs import open_folder
from dicomfl.common.splits import NAMES, VAL, assign
from dicomfl.common.workers import PoolStartError, WorkerFailure, default_workers, imap_isolated

log = logging.getLogger("dicomfl.predict")

#: The longest key kept (an Accession Number is at most 16 characters, a UID 64); a longer value
#: is not a key this site issued, and its row gets an empty key.
MAX_KEY = 128

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


# ------------------------------------------------------------------------------- per file


def _scaled(img: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """One image robust-scaled from its ``[median, p99 - p1]``, as training's loader scales the
    cached images (the same arithmetic as :func:`~dicomfl.common.normalize.robust_scale`)."""
    out = (np.asarray(img, dtype=np.float32) - stats[0]) / stats[1]
    np.clip(out, -CLIP, CLIP, out=out)
    return out


# ------------------------------------------------------------------------------- parent side


def site_threshold(net, cfg: SiteConfig, image_size: int, n_classes: int, dev=None) -> tuple[float | None, str]:
    """The decision threshold as cross-site evaluation chooses it at this site: Youden's J on the
    site's validation split (the site's data is ingested first; a warm cache makes that quick).
    Used when the run's own evaluation of this model at this site is not at hand."""
    from dicomfl.common.ingest import ingest
    from dicomfl.common.metrics import choose_threshold
    from dicomfl.common.train import load_split, predict

    if n_classes != 2:
        return None, "argmax"
    data = ingest(cfg).data
    val = load_split(data, VAL, image_size, n_classes)
    if len(val) == 0 or len(np.unique(val.labels)) < 2:
        return 0.5, "default 0.5 (the site's validation split has not both classes)"
    probs = predict(net, val, dev=dev)
    return choose_threshold(val.labels, probs[:, 1]), f"site validation split (n={len(val)})"


NEW = "new"  # site_split of a patient the site's cache did not hold: the model never saw them


def cached_patients(cfg: SiteConfig, deid: Deidentifier) -> frozenset[str]:
    """The pseudonyms of the patients whose images the site's cache holds (accepted records):
    the site's data as its last ingestion left it, i.e. what training and evaluation used. Read
    from the live cache index without ingesting; an absent or stale cache (another pipeline
    fingerprint: another key, preprocessing or version) holds no patient."""
    from dicomfl.common.cache import SiteCache
    from dicomfl.common.features import N_FEATURES
    from dicomfl.common.ingest import fingerprint

    state = SiteCache(cfg.site.state_dir).load(fingerprint(cfg, deid), cfg.preprocess.image_size, N_FEATURES)
    if state is None:
        return frozenset()
    try:
        return frozenset(r.patient for r in state.records.values() if r.status == "accepted" and r.patient)
    finally:
        state.store.close()


def site_split(patient: str, known: frozenset[str], cfg: SiteConfig) -> str:
    """``train`` / ``val`` / ``test``: the split of a patient the site's cache held (so the README's
    "train means the model saw that patient" holds); ``new`` for any other patient, whatever
    split their pseudonym would hash to."""
    if patient not in known:
        return NEW
    return NAMES[assign(patient, cfg.splits.val, cfg.splits.test, cfg.splits.seed)]


def _csv_cell(value: str) -> str:
    """A cell a spreadsheet will not run (a leading = + - @ is a formula: it gets a leading ')
    and a terminal will not obey (control characters escaped)."""
    s = printable(value)
    return "'" + s if s[:1] in ("=", "+", "-", "@") else s


def _num(v: float) -> str:
    """A probability as written: 9 significant digits, which round-trips a float32 exactly."""
    return f"{float(v):.9g}"


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.tsv")


def check_output(out: Path, cfg: SiteConfig, protect: tuple[Path, ...] = ()) -> Path:
    """``out`` as a place for the predictions and their rejects file (:mod:`dicomfl.common.outputs`:
    not a link anywhere on its path, not a folder, not inside the site's DICOM or state folder, not
    one of the site's own files or ``protect``); :class:`~dicomfl.common.outputs.UnsafeOutput` if not."""
    check_path(out, cfg, protect=protect)
    check_path(rejects_path(Path(out)), cfg, protect=protect)
    return Path(out)


def predict_files(
    net,
    cfg: SiteConfig,
    out: Path,
    *,
    model_id: str,
    model_sha256: str,
    input_dir: Path | None = None,
    threshold: float | None = None,
    threshold_source: str = "given",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PredictReport:
    """Apply ``net`` (a built model with its weights) to the site's images, or to ``input_dir``,
    and write the predictions to ``out`` (mode 0600, replaced atomically).

    ``threshold`` (binary models): the decision threshold, described by ``threshold_source``;
    None: chosen on the site's validation split (:func:`site_threshold`).

    Raises
    ------
    ModelMismatch
        The model's image size differs from the site's ``preprocess.image_size``.
    DicomflError
        A threshold for a multi-class model, an output that cannot or must not be written, or
        worker processes that cannot start.
    """
    import torch

    from dicomfl.common.train import device

    t0 = time.perf_counter()
    mcfg = net.cfg
    size = cfg.preprocess.image_size
    if mcfg.image_size is not None and mcfg.image_size != size:
        raise ModelMismatch(f"the model asks for {mcfg.image_size} px images; this site ingests at {size} px "
                            "(preprocess.image_size)")
    n_classes = mcfg.n_classes
    if n_classes != 2 and threshold is not None:
        raise E.DicomflError(f"--threshold: the model has {n_classes} classes; its decision is the most probable class")
    out = check_output(out, cfg)
    try:
        out_dir = open_folder(out.parent)
    except OSError as exc:
        raise E.DicomflError(f"cannot write {printable(str(out))} ({type(exc).__name__})") from None
    try:
        fh = AtomicFile(out, mode=0o600, text=True, newline="", dir_fd=out_dir)
    except BaseException as exc:
        os.close(out_dir)
        if isinstance(exc, OSError) and not isinstance(exc, E.DicomflError):
            raise E.DicomflError(f"cannot write {printable(str(out))} ({type(exc).__name__})") from None
        raise
    dev = device()
    net = net.to(dev).eval()
    try:
        key = cfg.secret_key
        deid = Deidentifier(key, cfg.deid)
        # before anything here ingests (the threshold's fallback does): the patients training knew
        known = cached_patients(cfg, deid)
        if n_classes == 2 and threshold is None:
            threshold, threshold_source = site_threshold(net, cfg, size, n_classes, dev)
        elif n_classes != 2:
            threshold_source = "argmax"
        root = Path(input_dir) if input_dir is not None else cfg.site.dicom_dir
        report = PredictReport(model=model_id, model_sha256=model_sha256, input="folder" if input_dir else "site",
                               threshold=threshold, threshold_source=threshold_source)
        rej_fh = AtomicFile(rejects_path(out), mode=0o600, text=True, newline="", dir_fd=out_dir)
    except BaseException:
        fh.discard()
        os.close(out_dir)
        raise
    rels = [f.rel for f in walk(root)]
    report.seen = len(rels)
    n_workers = min(workers or cfg.ingest.workers or default_workers(), max(1, len(rels)))
    report.workers = n_workers
    mem = cfg.ingest.worker_memory_mb << 20 if cfg.ingest.worker_memory_mb else None
    header = (["key", "file", "site_split"] +
              (["probability", "decision", "threshold"] if n_classes == 2 else [f"p_{c}" for c in range(n_classes)] + ["decision"]) +
              ["model", "model_sha256"])
    reasons: dict[str, int] = {}
    ok = False
    try:
        writer = csv.writer(fh.fh)
        writer.writerow(header)
        rej_fh.fh.write("# reference\tfile\treason\n")
        pending: list[tuple[str, str, str, np.ndarray, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            x = torch.from_numpy(np.stack([p[3] for p in pending]))[:, None].to(dev)
            f = torch.from_numpy(np.stack([p[4] for p in pending])).to(dev)
            with torch.inference_mode():
                probs = torch.softmax(net(x, f), dim=1).cpu().numpy()
            for (k, rel, split, _, _), p in zip(pending, probs):
                if n_classes == 2:
                    cells = [_num(p[1]), int(float(_num(p[1])) >= threshold), repr(float(threshold))]
                else:
                    cells = [_num(v) for v in p] + [int(np.argmax(p))]
                writer.writerow([_csv_cell(k), _csv_cell(rel), split, *cells, model_id, model_sha256])
            report.predicted += len(pending)
            pending.clear()

        # The ingestion's own per-file worker, asked for the site's key too (images in the replies).
        job = FileJob(cfg=cfg, key=key, root=str(root), site_key=True)
        outcomes = imap_isolated(FileWorker(job), rels, workers=n_workers, timeout_s=cfg.ingest.file_timeout_s,
                                 memory_bytes=mem, env=WORKER_ENV)
        done = 0
        try:
            for i, outcome in outcomes:
                rel = rels[i]
                if isinstance(outcome, (WorkerFailure, Rejected)):
                    reason, detail = outcome.reason, outcome.detail
                    reasons[reason] = reasons.get(reason, 0) + 1
                    report.rejected += 1
                    ref = file_ref(deid, rel)
                    report.rejects.append({"file": ref, "reason": reason, "detail": detail})
                    rej_fh.fh.write(f"{ref}\t{tsv_field(rel)}\t{reason}\n")
                    if reason != E.NOT_DICOM:
                        log.warning("rejected %s: %s%s", ref, reason, f" ({detail})" if detail else "")
                else:  # Accepted (nothing is Known: the job lists no cached contents)
                    k = outcome.site_key if outcome.site_key is not None and len(outcome.site_key) <= MAX_KEY else None
                    split = site_split(outcome.patient, known, cfg)
                    pending.append((k or "", rel, split, _scaled(outcome.image, outcome.stats),
                                    np.asarray(outcome.features, dtype=np.float32)))
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
        ok = True
    finally:
        try:
            if ok:
                fh.commit()
                rej_fh.commit()
        finally:
            fh.discard()  # after a commit: nothing left to remove
            rej_fh.discard()
            os.close(out_dir)
    report.rejected_by_reason = dict(sorted(reasons.items()))
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.images_per_s = round(report.predicted / report.elapsed_s, 1) if report.elapsed_s > 0 else 0.0
    return report


__all__ = ["NEW", "PredictReport", "cached_patients", "check_output", "predict_files", "rejects_path", "site_split",
           "site_threshold"]
