"""``dicomfl export``: a trained model as files that load and run without dicomfl, with a model card.

What is written into ``OUT_DIR``:

* ``model.pt`` (TorchScript, ``torch.jit.script`` of the fused network with its weights, softmax
  inside): ``model(images (N,1,S,S) float32 robust-scaled, features (N,F) float32) ->
  probabilities (N, n_classes)``. Input shapes are checked and a wrong one raises.
* ``preprocess.pt`` (TorchScript): the per-image robust scaling of
  :func:`dicomfl.common.normalize.robust_scale` (same percentiles, same float32/float64 steps as
  NumPy's default ``linear`` method), preceded by the antialiased bilinear resize to ``S`` x ``S``
  that ingestion applies when the image is not that size yet:
  ``preprocess(pixels (H,W) | (N,H,W) | (N,1,H,W)) -> (N,1,S,S)``.
* ``model.onnx`` (``--format onnx``; ``torch.onnx.export(dynamo=True)``, batch dimension dynamic),
  when the packages ``onnx`` and ``onnxscript`` are installed.
* ``model_card.json`` and ``model_card.md``: feature schema, preprocessing, training sites and
  their image counts, rounds, strategy, each site's DP epsilon, the cross-site AUROC matrix with
  Hanley-McNeil 95% intervals, intended use and known limits. The card's numbers are those of the
  run's ``metrics.json`` (and so of its ``report.md``). The JSON card is also stored inside
  ``model.pt`` (extra file ``model_card.json``) and ``model.onnx`` (metadata ``model_card``).

Every exported file is loaded back and compared with dicomfl's own model on fixed random inputs
before the card is written; the largest difference is recorded in the card.

Nothing here reads site data: the inputs are the weights file, ``run_config.json`` (its model
section only) and the numbers in ``metrics.json`` / ``cross_site_*.json`` / checkpoint
``state.json``. Site config paths and the run's coordinator are not copied into the card.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig, RunSection, SiteConfig
from dicomfl.common.errors import DicomflError, ModelMismatch, printable
from dicomfl.common.files import write_bytes
from dicomfl.common.features import N_FEATURES, SCHEMA_VERSION, feature_names
from dicomfl.common.featurenet import with_transform
from dicomfl.common.fedstats import FeatureTransform, check_standardization
from dicomfl.common.jsonfile import read_json
from dicomfl.common.model import (MAX_MEMORY_MB, MAX_PARAMETERS, build_model, check_model_size, load_weights,
                                  parameter_count, state_shapes)
from dicomfl.common.normalize import CLIP, HIGH_PCT, LOW_PCT
from dicomfl.common.outputs import check_output, open_folder
from dicomfl.common.weights import WeightsError, npz_headers, read_npz, shapes_problem, values_problem
from dicomfl.server.report import robustness_lines

FORMATS = ("torchscript", "onnx")
CARD_VERSION = 1
MODEL_FILE = "model.pt"
PREPROCESS_FILE = "preprocess.pt"
ONNX_FILE = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
Z95 = 1.959963984540054  # two-sided 95% normal quantile
VERIFY_TOLERANCE = 1e-5

INTENDED_USE = (
    "Research only; not a medical device. Not for diagnosis, triage or any clinical decision. "
    "The model predicts the binary label the training sites supplied (label 1 = finding present); "
    "for runs on a cohort made by `dicomfl synth` / `dicomfl demo` that is a synthetic finding of a "
    "generated cohort, with no clinical meaning.")
LIMITATIONS = (
    "Performance is known only on the training sites' own held-out test splits (cross-site "
    "validation below); there is no external validation, and performance at a new site, scanner "
    "or population is unknown.",
    "The 95% intervals are Hanley-McNeil (1982) normal (Wald) approximations from each AUROC and "
    "that site's positive/negative counts, clipped to [0, 1]: no bootstrap, images treated as "
    "independent (no patient clustering); they are rough for small test splits and collapse to a "
    "point at AUROC 0 or 1.",
    "Inputs must be made exactly as in training: full-depth pixels (modality LUT applied, "
    "MONOCHROME1 inverted, middle frame, colour to BT.601 luminance), resized to the image size and "
    "robust-scaled per image (preprocess.pt), and the metadata feature vector of the named schema "
    "version computed from the de-identified header with dicomfl.common.features.extract (fixed "
    "transforms, missing indicators, one-hot with 'other'/'missing'). The run's standardization "
    "of the numeric features (its sites' federated mean and std) and its dropped features are "
    "applied inside the model: give it the raw schema vector. Any other pipeline is "
    "out of distribution.",
    "The outputs are softmax probabilities; no operating threshold is exported (the cross-site "
    "evaluation chose one per site on validation data). Calibration at a new site is unknown.",
    "Sites are known to differ (scanners, protocols, prevalence); a model may still use site "
    "proxies left in the pixels or the features.",
    "Without DP-SGD there is no formal privacy guarantee for the training data: model weights can "
    "memorize training examples. With DP-SGD, epsilon is each site's cumulative spend as it "
    "reported it (its own accountant), not a guarantee checked by the coordinator.",
)



@contextmanager
def _quiet_jit():
    """torch 2.13 marks ``torch.jit.script/save/load`` deprecated (in favour of torch.export); the
    TorchScript format itself still loads in any torch >= 2.x, which is why it is exported."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


# ------------------------------------------------------------------------------ exported modules
class Probabilities(nn.Module):
    """``forward(images (N,1,S,S), features (N,F)) -> softmax probabilities (N, n_classes)``.

    ``image_size`` 0 accepts any square or non-square size (the network pools globally);
    ``checked`` makes a wrong input shape raise (TorchScript; the ONNX graph declares its shapes).
    """

    def __init__(self, net: nn.Module, image_size: int, n_features: int, checked: bool = True) -> None:
        super().__init__()
        self.net = net
        self.image_size = int(image_size)
        self.n_features = int(n_features)
        self.checked = checked

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.checked:
            if images.dim() != 4 or images.size(1) != 1:
                raise ValueError("images: expected shape (N, 1, S, S), float32, robust-scaled")
            if self.image_size > 0 and (images.size(2) != self.image_size or images.size(3) != self.image_size):
                raise ValueError("images: wrong image size (see the model card)")
            if features.dim() != 2 or features.size(1) != self.n_features:
                raise ValueError("features: expected shape (N, F) float32 (see the model card)")
            if features.size(0) != images.size(0):
                raise ValueError("images and features: different batch sizes")
        return torch.softmax(self.net(images, features), dim=1)


class RobustScale(nn.Module):
    """dicomfl's per-image preprocessing after decoding: resize (when needed), then
    ``clip((x - median) / (p99 - p1), -3, 3)`` with NumPy's ``linear`` percentiles.

    Mirrors :func:`dicomfl.common.normalize.robust_scale` step by step: the percentiles are
    interpolated in float64 between float32 order statistics, the median and the scale are then
    rounded to float32, and a flat image (p99 == p1) maps to zeros.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = int(image_size)  # 0: no resize
        self.low_pct = float(LOW_PCT)
        self.high_pct = float(HIGH_PCT)
        self.clip = float(CLIP)

    def _percentile(self, s: torch.Tensor, q: float) -> torch.Tensor:
        n = s.size(1)
        pos = (n - 1) * (q / 100.0)
        i = int(math.floor(pos))
        j = min(i + 1, n - 1)
        t = pos - i
        a = s[:, i]
        b = s[:, j]
        diff = (b - a).to(torch.float64)  # float32 difference, as NumPy's _lerp
        if t >= 0.5:
            return b.to(torch.float64) - diff * (1.0 - t)
        return a.to(torch.float64) + diff * t

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32)
        if x.dim() == 2:
            x = x.unsqueeze(0).unsqueeze(0)
        elif x.dim() == 3:
            x = x.unsqueeze(1)
        elif x.dim() != 4 or x.size(1) != 1:
            raise ValueError("pixels: expected (H, W), (N, H, W) or (N, 1, H, W)")
        if self.image_size > 0 and (x.size(2) != self.image_size or x.size(3) != self.image_size):
            x = F.interpolate(x, size=[self.image_size, self.image_size], mode="bilinear", align_corners=False,
                              antialias=True)
        n = x.size(0)
        s = torch.sort(x.reshape(n, -1), dim=1)[0]
        lo = self._percentile(s, self.low_pct)
        med = self._percentile(s, 50.0).to(torch.float32)
        hi = self._percentile(s, self.high_pct)
        scale = (hi - lo).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, float("inf")))
        out = (x - med.view(n, 1, 1, 1)) / scale.view(n, 1, 1, 1)
        return torch.clamp(out, -self.clip, self.clip)


# ------------------------------------------------------------------------------ the run's numbers
def hanley_mcneil(auroc: float | None, n_pos: int, n_neg: int) -> dict | None:
    """Standard error and 95% interval of an AUROC (Hanley & McNeil, Radiology 1982), or None
    when it is undefined (no AUROC, no positives or no negatives)."""
    if auroc is None or not math.isfinite(auroc) or n_pos < 1 or n_neg < 1:
        return None
    a = float(auroc)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1.0 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return {"se": se, "ci95": [max(0.0, a - Z95 * se), min(1.0, a + Z95 * se)]}


def _counts(metrics: dict) -> tuple[int, int] | None:
    n, prev = metrics.get("n"), metrics.get("prevalence")
    if n is None or prev is None or not math.isfinite(n) or not math.isfinite(prev):
        return None
    n_pos = int(round(n * prev))
    return n_pos, int(round(n)) - n_pos


def auroc_cell(metrics: dict) -> dict:
    """One cell of the cross-site matrix: AUROC, counts and its 95% interval: the site's own
    stratified bootstrap (``auroc_lo``/``auroc_hi``, computed on its test predictions) when the
    site sent it, else Hanley-McNeil's from the counts."""
    cell = {"auroc": metrics.get("auroc"), "n": None, "n_pos": None, "n_neg": None, "se": None, "ci95": None,
            "ci_method": None}
    c = _counts(metrics)
    if c is not None:
        cell.update(n=c[0] + c[1], n_pos=c[0], n_neg=c[1])
        hm = hanley_mcneil(cell["auroc"], *c)
        if hm is not None:
            cell.update(hm, ci_method="hanley-mcneil")
    lo, hi = metrics.get(P.AUROC_LO), metrics.get(P.AUROC_HI)
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi):
        cell.update(ci95=[float(lo), float(hi)], ci_method="bootstrap")
    return cell


def auroc_matrix(cs: dict) -> dict:
    """A cross-site payload (``metrics.json``'s ``cross_site`` or ``cross_site_<tag>.json``) as
    the card's matrix: per model, per site, AUROC with interval; plus the report's mean and gap."""
    sites, models = list(cs.get("sites", [])), list(cs.get("models", []))
    gaps = cs.get("gaps", {}).get("auroc", {})
    rows = {}
    for m in models:
        by_site = cs.get("matrix", {}).get(m, {})
        rows[m] = {"sites": {s: auroc_cell(by_site[s]) for s in sites if s in by_site},
                   "mean": gaps.get(m, {}).get("mean"), "gap": gaps.get(m, {}).get("gap")}
    return {"sites": sites, "models": models, "auroc": rows, "missing": list(cs.get("missing", []))}


@dataclass
class RunInfo:
    dir: Path
    model: ModelConfig
    run: dict  # run_config.json's run section, without paths
    privacy: dict
    metrics: dict | None  # metrics.json (None: the run did not finish)
    history: list
    features: "FeatureTransform | None" = None  # the run's feature standardization and drops (fedstats)


def find_run_dir(model_path: Path) -> Path:
    """The run folder above ``model_path``: the nearest one holding run_config.json or metrics.json."""
    for d in Path(model_path).resolve().parents:
        if (d / "run_config.json").is_file() or (d / "metrics.json").is_file():
            return d
    raise DicomflError(f"{printable(str(model_path))}: no run folder above it (run_config.json / metrics.json); "
                       "give the run's folder with --run")


def _read_json(path: Path) -> dict:
    data = read_json(path)  # bounded: size, depth (one line naming the file, never a traceback)
    if not isinstance(data, dict):
        raise DicomflError(f"{printable(str(path))}: expected a JSON object")
    return data


def _checkpoint(run_dir: Path, latest: Path) -> "tuple[Path, int | None] | None":
    """The folder and round ``checkpoints/latest.json`` names, if it names one of this run's
    ``round-NNNN`` folders (never a path outside the run)."""
    meta = _read_json(latest)
    name, rnd = meta.get("path"), meta.get("round")
    if not isinstance(name, str) or not re.fullmatch(r"round-\d{4,9}", name):
        return None
    rnd = rnd if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd > 0 else None
    return run_dir / "checkpoints" / name, rnd


def load_run(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "run_config.json"
    if not cfg_path.is_file():
        raise DicomflError(f"{printable(str(run_dir))}: no run_config.json (is this a run's out_dir?)")
    raw = _read_json(cfg_path)
    try:
        model = ModelConfig.model_validate(raw.get("model", {}))
    except ValueError as exc:
        raise DicomflError(f"{printable(str(cfg_path))}: model: not a valid model config "
                           f"({type(exc).__name__})") from None
    for key in ("run", "privacy"):
        if not isinstance(raw.get(key) or {}, dict):
            raise DicomflError(f"{printable(str(cfg_path))}: {key}: not a mapping")
    run = {k: v for k, v in (raw.get("run") or {}).items() if k != "out_dir"}
    metrics = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None
    if metrics is not None:
        history = metrics.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise DicomflError(f"{printable(str(run_dir / 'metrics.json'))}: history: not a list of rounds")
    else:  # an unfinished run: the newest checkpoint's history
        latest = run_dir / "checkpoints" / "latest.json"
        history = []
        if latest.is_file():
            ck = _checkpoint(run_dir, latest)
            history = _read_json(ck[0] / "state.json").get("history", []) if ck and (ck[0] / "state.json").is_file() else []
            history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    return RunInfo(dir=run_dir, model=model, run=run, privacy=dict(raw.get("privacy") or {}), metrics=metrics,
                   history=history, features=_run_features(run_dir, model, raw.get("model") or {}))


def _run_features(run_dir: Path, model: ModelConfig, raw_model: dict) -> "FeatureTransform | None":
    """The feature transform the run's sites applied: ``feature_stats.json`` (written by the
    coordinator before round 1) checked as a site checks the coordinator's numbers, and the
    model's drops. A run from before federated statistics (no ``standardize_features`` in its
    model) has none."""
    drop = tuple(model.drop_features)
    if not model.standardize_features or model.mode == "image" or "standardize_features" not in raw_model:
        return FeatureTransform(drop=drop)
    path = run_dir / "feature_stats.json"
    if not path.is_file():
        raise DicomflError(f"{printable(str(run_dir))}: no feature_stats.json (the run's model standardizes "
                           "its features with them)")
    raw = _read_json(path)
    try:
        mean, std = check_standardization(raw.get("mean"), raw.get("std"))
    except ValueError as exc:
        raise DicomflError(f"{printable(str(path))}: {exc}") from None
    return FeatureTransform(mean=mean, std=std, drop=drop)


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def identify(model_path: Path, weights: dict, info: RunInfo) -> tuple[str, int | None]:
    """(model id, round) of a weights file: from its place in ``checkpoints/round-NNNN/``, else
    by content against the newest checkpoint's models; ("unknown", None) when neither says."""
    p = Path(model_path).resolve()
    sel = (info.metrics or {}).get("selected")
    if p.parent.name == "checkpoints" and p.stem == "best" and isinstance(sel, dict) and isinstance(sel.get("round"), int):
        # the global model chosen by the sites' validation (server/selection.py)
        return ("best" if sel.get("chosen") == "best" else P.GLOBAL_MODEL), sel["round"]
    m = re.fullmatch(r"round-(\d+)", p.parent.name)
    stem = p.stem
    from_name = P.GLOBAL_MODEL if stem == "global" else P.local_model_id(stem[6:]) if stem.startswith("local-") else None
    if m and p.parent.parent.name == "checkpoints" and from_name is not None:
        return from_name, int(m.group(1))
    latest = info.dir / "checkpoints" / "latest.json"
    if latest.is_file():
        ck = _checkpoint(info.dir, latest)
        d, rnd = ck if ck else (info.dir / "checkpoints" / "none", None)
        shapes = {k: v.shape for k, v in weights.items()}
        for f in sorted(d.glob("*.npz")) if d.is_dir() else []:
            if f.stem == "global" or f.stem.startswith("local-"):
                try:  # bounded by this model's own shapes: a planted bomb is skipped, not inflated
                    other = read_npz(f, shapes)
                except Exception:  # noqa: BLE001 - not this model's weights
                    continue
                if _same_arrays(weights, other):
                    return (P.GLOBAL_MODEL if f.stem == "global" else P.local_model_id(f.stem[6:])), rnd
    return (from_name or "unknown"), None


def _evaluation_of(model_id: str, rnd: int | None, info: RunInfo, model_path: Path) -> tuple[str | None, dict | None]:
    """(where the numbers come from, this model's row: site -> metrics) of the cross-site
    validation that evaluated exactly this model, or (None, None)."""
    rounds_done = info.metrics.get("rounds") if info.metrics else None
    found: list[tuple[str, dict, str]] = []
    if model_id == "best" and info.metrics is not None and info.metrics.get("cross_site"):
        found.append(("metrics.json: cross-site validation at the end of the run", info.metrics["cross_site"], model_id))
    if rnd is not None and info.metrics is not None and rnd == rounds_done and info.metrics.get("cross_site"):
        found.append(("metrics.json: cross-site validation at the end of the run", info.metrics["cross_site"], model_id))
    if rnd is not None and (p := info.dir / f"cross_site_round-{rnd:04d}.json").is_file():
        found.append((p.name, _read_json(p), model_id))
    stem = Path(model_path).stem
    if (p := info.dir / f"evaluate-{stem}.json").is_file():  # dicomfl run --evaluate-only MODEL
        found.append((p.name, _read_json(p), stem))
    for source, cs, key in found:
        row = (cs.get("matrix") or {}).get(key)
        if row:
            return source, row
    return None, None


def evaluated_threshold(trained: "Trained", model_path: Path, site: str) -> tuple[float | None, str | None]:
    """The decision threshold the run's cross-site validation used for this model at ``site``
    (chosen there on the site's validation split), and where it was read; (None, None) if the run
    did not evaluate this model at that site."""
    source, row = _evaluation_of(trained.model_id, trained.round, trained.info, model_path)
    cell = (row or {}).get(site) if isinstance(row, dict) else None
    t = cell.get("threshold") if isinstance(cell, dict) else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0.0 <= t <= 1.0:
        return float(t), f"the run's cross-site validation of {trained.model_id} at {site} ({source})"
    return None, None


def training_summary(info: RunInfo, model_id: str, rnd: int | None) -> dict:
    """Sites, their training-image counts and DP epsilon, rounds and strategy, as the report has them."""
    upto = [h for h in info.history if rnd is None or h.get("round", 0) <= rnd]
    all_sites = sorted(info.metrics.get("sites", []) if info.metrics else
                       {s for h in upto for k in ("sites", "errors", "rejected") for s in h.get(k, {})})
    sites = []
    for s in all_sites:
        examples = eps = None
        for h in upto:
            m = h.get("sites", {}).get(s)
            if m is None:
                continue
            if m.get(P.NUM_EXAMPLES) is not None:
                examples = int(m[P.NUM_EXAMPLES])
            if m.get("epsilon") is not None:
                eps = {"epsilon": m["epsilon"], "delta": m.get("delta"), "site_budget": m.get(P.TARGET_EPSILON)}
        aggregated = [h["round"] for h in upto if s in h.get("aggregated", [])]
        row = {"name": s, "train_images": examples, "rounds_aggregated": aggregated,
               "privacy": "DP-SGD" if eps else "no DP", "epsilon": None, "delta": None, "site_budget": None}
        if eps:
            row.update(eps)
        sites.append(row)
    home = P.local_model_site(model_id)
    trained_on = [home] if home else sorted({s for h in upto for s in h.get("aggregated", [])})
    r = info.run
    return {"run": r.get("name"), "strategy": info.metrics.get("strategy") if info.metrics else r.get("strategy"),
            "proximal_mu": r.get("proximal_mu"), "strategy_params": r.get("strategy_params") or {},
            "rounds_completed": info.metrics.get("rounds") if info.metrics else (upto[-1]["round"] if upto else 0),
            "rounds_planned": r.get("rounds"), "local_epochs": r.get("local_epochs"), "local_steps": r.get("local_steps"),
            "dp_requested_by_run": bool(info.privacy.get("dp", False)),
            "finished": info.metrics is not None, "sites": sites, "model_trained_on": trained_on,
            "model_kind": "local-only baseline (trained at one site alone)" if home else
            ("federated global model" if model_id == P.GLOBAL_MODEL else "unknown")}


# ------------------------------------------------------------------------------ verification
def reference_inputs(image_size: int, n_features: int, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random inputs for checking an exported model against dicomfl's own."""
    rng = np.random.default_rng(seed)
    images = np.clip(rng.standard_normal((n, 1, image_size, image_size)), -CLIP, CLIP).astype(np.float32)
    features = rng.uniform(0.0, 1.0, (n, n_features)).astype(np.float32)
    return images, features


def reference_probabilities(net: nn.Module, images: np.ndarray, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net.eval()(torch.from_numpy(images), torch.from_numpy(features)), dim=1).numpy()


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]  # kind -> path
    card: dict
    notes: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _onnx_available() -> str | None:
    """None when ONNX export can run here, else why not."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"the package(s) {', '.join(missing)} are not installed (pip install onnx onnxscript onnxruntime)" \
        if missing else None


def _export_onnx(module: Probabilities, images: np.ndarray, features: np.ndarray, path: Path, dynamic_size: bool) -> None:
    import logging

    batch = torch.export.Dim("batch")
    img_dims = {0: batch}
    if dynamic_size:
        img_dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, (torch.from_numpy(images), torch.from_numpy(features)), dynamo=True,
                                     input_names=["images", "features"], output_names=["probabilities"],
                                     dynamic_shapes={"images": img_dims, "features": {0: batch}}, verbose=False)
        prog.save(str(path))
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)


def _onnx_run(path: Path, images: np.ndarray, features: np.ndarray) -> np.ndarray | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in (("images", images), ("features", features)) if k in names}
    return sess.run(["probabilities"], feed)[0]


def _onnx_embed_card(path: Path, card_json: str) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in (("model_card", card_json), ("producer", "dicomfl export")):
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, str(path))


# ------------------------------------------------------------------------------ the export
@dataclass
class Trained:
    """A run's trained model, ready to apply: its network (eval mode), weights, identity and run."""

    net: nn.Module
    weights: dict
    model_id: str
    round: int | None
    sha256: str
    info: RunInfo


def _not_weights(model_path: Path, exc: BaseException) -> DicomflError:
    why = str(exc) if isinstance(exc, WeightsError) else type(exc).__name__
    return DicomflError(f"{printable(str(model_path))}: not a weights file (.npz of arrays; {why})")


def load_trained(model_path: Path, run_dir: Path | None = None, *, image_size: int | None = None,
                 batch_size: int = 4, max_parameters: int = MAX_PARAMETERS,
                 max_memory_mb: int = MAX_MEMORY_MB) -> Trained:
    """Build the model a run's weights file belongs to (its run folder says which model).

    Nothing is allocated before it is bounded: the file's ``.npy`` headers are read first; the
    run's model description is sized arithmetically (parameters, and the memory to train it on
    batches of ``batch_size`` images of ``image_size`` px, default the model's own size or 64;
    :func:`~dicomfl.common.model.check_model_size`) and its state-dict shapes compared with the
    headers; only then are the arrays read (exactly the bytes the headers declare) and the model
    built. Weights that are not real floats, or hold NaN, infinities or absurd magnitudes, are
    refused (:func:`~dicomfl.common.weights.values_problem`).

    Raises
    ------
    DicomflError
        No such file, not an ``.npz`` of arrays, no run folder, a model past the bounds, or
        weights that do not fit the run's model or cannot be used (one line naming the file).
    """
    model_path = Path(model_path)
    where = printable(str(model_path))
    if not model_path.is_file():
        raise DicomflError(f"{where}: model file not found")
    try:
        headers = npz_headers(model_path)
    except Exception as exc:  # noqa: BLE001 - not an .npz of arrays: one line, the type only
        raise _not_weights(model_path, exc) from None
    info = load_run(Path(run_dir) if run_dir is not None else find_run_dir(model_path))
    run = f"(run {printable(str(info.dir))}, feature schema v{SCHEMA_VERSION})"
    try:
        check_model_size(info.model, image_size or info.model.image_size or 64, batch_size,
                         max_parameters=max_parameters, max_memory_mb=max_memory_mb)
    except ModelMismatch as exc:
        raise DicomflError(f"{printable(str(info.dir / 'run_config.json'))}: {exc}") from None
    shapes = state_shapes(info.model)
    if (why := shapes_problem(headers, shapes)) is not None:
        raise DicomflError(f"{where}: {why} {run}")
    try:
        weights = read_npz(model_path, shapes)
    except Exception as exc:  # noqa: BLE001 - one line, the type only
        raise _not_weights(model_path, exc) from None
    if (why := values_problem(weights)) is not None:
        raise DicomflError(f"{where}: refused: {why}")
    net = build_model(info.model)
    try:
        load_weights(net, weights)
    except ModelMismatch as exc:
        raise DicomflError(f"{where}: {exc} {run}") from None
    model_id, rnd = identify(model_path, weights, info)
    net = with_transform(net.eval(), info.features)  # the features as the run's sites fed them
    return Trained(net=net.eval(), weights=weights, model_id=model_id, round=rnd, sha256=_sha256(model_path), info=info)


def export_model(model_path: Path, out_dir: Path, formats=("torchscript",), run_dir: Path | None = None,
                 sites: Sequence[SiteConfig] = ()) -> ExportResult:
    """Export the weights at ``model_path`` (a run's ``.npz``) into ``out_dir``; see the module doc.

    ``out_dir`` is checked by :func:`dicomfl.common.outputs.check_output` before anything is
    written: no link on its path or at a file it writes, not inside the ``sites``' DICOM or state
    folders, none of their files or the model itself. Each file is written atomically into the
    folder opened without following links (mode 0666 less the umask, as before).

    Raises
    ------
    DicomflError
        A bad model path, no run folder, weights that do not fit the run's model, an unknown
        format, ``onnx`` asked for without the packages it needs, or an output that must not be
        written (:class:`~dicomfl.common.outputs.UnsafeOutput`).
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    formats = list(dict.fromkeys(formats or ["torchscript"]))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise DicomflError(f"--format: unknown format {printable(bad[0])!r} (expected {' or '.join(FORMATS)})")
    if "onnx" in formats and (why := _onnx_available()):
        raise DicomflError(f"--format onnx: {why}")
    check_output(out_dir, sites, protect=(model_path,), folder=True,  # before any work: a bad --out fails at once
                 names=(MODEL_FILE, PREPROCESS_FILE, ONNX_FILE, CARD_JSON, CARD_MD))
    trained = load_trained(model_path, run_dir)
    cfg, net = trained.info.model, trained.net
    net.eval()
    size = cfg.image_size or 0
    probe_size = size or 64
    images, features = reference_inputs(probe_size, N_FEATURES)
    expected = reference_probabilities(net, images, features)

    folder = open_folder(out_dir)
    try:
        return _write_export(trained, model_path, out_dir, folder, formats, size, images, features, expected)
    finally:
        os.close(folder)


def _write_export(trained: Trained, model_path: Path, out_dir: Path, folder: int, formats: list[str], size: int,
                  images: np.ndarray, features: np.ndarray, expected: np.ndarray) -> ExportResult:
    """The export's files, written into ``folder`` (a descriptor of ``out_dir``)."""
    info, net, weights = trained.info, trained.net, trained.weights

    def put(name: str, data: bytes) -> Path:
        write_bytes(out_dir / name, data, mode=0o666, dir_fd=folder)
        return out_dir / name

    files: dict[str, Path] = {}
    verified: dict[str, float | None] = {}
    notes: list[str] = []
    scripted = buf = None
    if "torchscript" in formats:
        with _quiet_jit():
            scripted = torch.jit.script(Probabilities(net, size, N_FEATURES).eval())
            buf = io.BytesIO()
            torch.jit.save(scripted, buf)
            buf.seek(0)
            with torch.no_grad():
                got = torch.jit.load(buf)(torch.from_numpy(images), torch.from_numpy(features)).numpy()
            verified["torchscript"] = float(np.max(np.abs(got - expected)))
            pre = torch.jit.script(RobustScale(size))
            pre_buf = io.BytesIO()
            torch.jit.save(pre, pre_buf)
            files["preprocess"] = put(PREPROCESS_FILE, pre_buf.getvalue())
    with tempfile.TemporaryDirectory(prefix="dicomfl-export-") as scratch:  # private (0700): ONNX wants a path
        onnx_tmp = Path(scratch) / ONNX_FILE
        if "onnx" in formats:
            _export_onnx(Probabilities(net, size, N_FEATURES, checked=False).eval(), images, features, onnx_tmp,
                         dynamic_size=size == 0)
            got = _onnx_run(onnx_tmp, images, features)
            verified["onnx"] = None if got is None else float(np.max(np.abs(got - expected)))
            if got is None:
                notes.append("onnxruntime is not installed: model.onnx was not run after export")
        for kind, diff in verified.items():
            if diff is not None and not diff <= VERIFY_TOLERANCE:
                raise DicomflError(f"export check failed: the {kind} model differs from dicomfl's by {diff:.3g}")

        model_id, rnd = trained.model_id, trained.round
        card = build_card(info, model_path, weights, model_id, rnd, net, formats, verified)
        card_json = json.dumps(card, indent=2, allow_nan=False)
        if scripted is not None:
            model_buf = io.BytesIO()
            with _quiet_jit():
                torch.jit.save(scripted, model_buf, _extra_files={CARD_JSON: card_json})
            files["torchscript"] = put(MODEL_FILE, model_buf.getvalue())
        if "onnx" in formats:
            _onnx_embed_card(onnx_tmp, card_json)
            files["onnx"] = put(ONNX_FILE, onnx_tmp.read_bytes())
    files["card_json"] = put(CARD_JSON, (card_json + "\n").encode())
    files["card_md"] = put(CARD_MD, card_markdown(card).encode())
    order = ("torchscript", "preprocess", "onnx", "card_json", "card_md")
    return ExportResult(out_dir=out_dir, files={k: files[k] for k in order if k in files}, card=card, notes=notes)


def build_card(info: RunInfo, model_path: Path, weights: dict, model_id: str, rnd: int | None, net: nn.Module,
               formats: list[str], verified: dict) -> dict:
    cfg = info.model
    source, row = _evaluation_of(model_id, rnd, info, model_path)
    this = {s: auroc_cell(row[s]) for s in sorted(row)} if row else None
    try:
        rel = str(Path(model_path).resolve().relative_to(info.dir.resolve()))
    except ValueError:
        rel = Path(model_path).name
    size = cfg.image_size
    return {
        "card_version": CARD_VERSION,
        "model": {
            "id": model_id, "round": rnd, "weights_file": rel, "weights_sha256": _sha256(model_path),
            "kind": training_summary(info, model_id, rnd)["model_kind"],
            "architecture": cfg.model_dump(mode="json"), "parameters": parameter_count(net),
            "n_classes": cfg.n_classes,
            "inputs": {"images": {"shape": ["N", 1, size or "S", size or "S"], "dtype": "float32",
                                  "content": "robust-scaled full-depth pixels (preprocess.pt)"},
                       "features": {"shape": ["N", N_FEATURES], "dtype": "float32",
                                    "content": f"metadata feature vector, schema v{SCHEMA_VERSION}"}},
            "output": {"probabilities": {"shape": ["N", cfg.n_classes], "dtype": "float32",
                                         "content": "column 1 = probability of the finding (label 1)"
                                         if cfg.n_classes == 2 else "column k = probability of label k"}},
            "mode_note": {"fused": "uses both inputs", "image": "uses the images only (features are ignored)",
                          "metadata": "uses the features only (images are ignored)"}[cfg.mode],
        },
        "files": {"torchscript": MODEL_FILE if "torchscript" in formats else None,
                  "preprocess": PREPROCESS_FILE if "torchscript" in formats else None,
                  "onnx": ONNX_FILE if "onnx" in formats else None},
        "verification": {"max_abs_difference": verified, "tolerance": VERIFY_TOLERANCE,
                         "against": "dicomfl's FusedNet with the same weights + softmax, on fixed random inputs"},
        "features": {"schema_version": SCHEMA_VERSION, "n_features": N_FEATURES, "names": feature_names(),
                     # applied inside the exported model (the run's federated standardization, fedstats)
                     "standardized": info.features is not None and info.features.mean is not None,
                     "dropped": list(info.features.drop) if info.features is not None else []},
        "preprocessing": {
            "image_size": size,
            "image_size_note": None if size else "the run fixed none: each site's preprocess.image_size",
            "pixels": ["decoded at full bit depth (no 8-bit step), stored values as float32",
                       "modality LUT applied (Rescale Slope/Intercept or Modality LUT Sequence)",
                       "MONOCHROME1 inverted as (lo + hi) - x, lo/hi the modality-LUT outputs of the smallest and "
                       "largest representable stored values (higher = brighter/denser)",
                       "multi-frame: the middle frame; colour: ITU-R BT.601 luminance",
                       "resized (stretched) to image_size x image_size, bilinear with antialiasing"],
            "scaling": {"formula": f"clip((x - median(x)) / (p{HIGH_PCT:g}(x) - p{LOW_PCT:g}(x)), -{CLIP:g}, {CLIP:g})",
                        "per": "image", "low_percentile": LOW_PCT, "high_percentile": HIGH_PCT, "clip": CLIP,
                        "percentile_method": "linear interpolation between order statistics (NumPy's default)",
                        "dtype": "float32 (percentiles interpolated in float64, then rounded to float32)",
                        "flat_image": "p99 == p1 (no epsilon): the image maps to zeros",
                        "implementation": PREPROCESS_FILE if "torchscript" in formats else None},
        },
        "training": training_summary(info, model_id, rnd),
        "evaluation": {
            "metric": "AUROC on each site's own test split" if cfg.n_classes == 2 else
                      "macro one-vs-rest AUROC on each site's own test split",
            "interval": "95%, Hanley & McNeil (1982) from the AUROC and the site's positive/negative counts "
                        "(n x prevalence); null where undefined",
            "this_model": {"source": source, "auroc_by_site": this} if this is not None else
                          {"source": None, "auroc_by_site": None,
                           "note": "this weights file was not evaluated by cross-site validation in this run"},
            "run_cross_site": auroc_matrix(info.metrics["cross_site"]) if info.metrics and
                              info.metrics.get("cross_site") else None,
        },
        "robustness": _robustness(info),
        "intended_use": INTENDED_USE,
        "limitations": list(LIMITATIONS),
        "produced_by": {"tool": "dicomfl export", "torch": torch.__version__},
    }


def _robustness(info: RunInfo) -> list[str] | None:
    """What the run's update screening could defend against with the sites that trained it (the
    run report's paragraph); None for a run folder whose run section this version cannot read."""
    sites = {s for h in info.history if isinstance(h, dict) for s in (h.get("sites") or {})}
    try:
        run = RunSection.model_validate(info.run)
    except ValueError:
        return None
    return robustness_lines(len(sites), run) if sites else None


# ------------------------------------------------------------------------------ markdown
def _f(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _g(v) -> str:
    return "-" if v is None else f"{v:g}"


def _cell(c: dict | None) -> str:
    if not c:
        return "n/a"
    ci = f" ({_f(c['ci95'][0])}-{_f(c['ci95'][1])})" if c.get("ci95") else ""
    return f"{_f(c.get('auroc'))}{ci}"


def card_markdown(card: dict) -> str:
    m, t, pre, ev = card["model"], card["training"], card["preprocessing"], card["evaluation"]
    sc = pre["scaling"]
    files = [f"`{v}`" for v in card["files"].values() if v]
    lines = [f"# Model card: `{m['id']}` of run `{t['run']}`", "",
             f"Weights `{m['weights_file']}` (round {m['round'] if m['round'] is not None else 'unknown'}, "
             f"sha256 `{m['weights_sha256'][:16]}...`): {m['kind']}. Files: {', '.join(files)}, `{CARD_JSON}`.", "",
             "## Intended use", "", card["intended_use"], "",
             "## Inputs and output", "",
             f"* `images`: float32 ({', '.join(map(str, m['inputs']['images']['shape']))}), robust-scaled (below).",
             f"* `features`: float32 (N, {card['features']['n_features']}), metadata schema "
             f"v{card['features']['schema_version']} (names below).",
             f"* output `probabilities`: float32 (N, {m['n_classes']}), softmax; {m['output']['probabilities']['content']}.",
             f"* Model: `{m['architecture']['mode']}` ({m['mode_note']}), width {m['architecture']['width']}, "
             f"depth {m['architecture']['depth']}, {m['parameters']:,} parameters.", "",
             "```python", "import torch  # no dicomfl needed",
             f"model = torch.jit.load('{MODEL_FILE}').eval()",
             f"preprocess = torch.jit.load('{PREPROCESS_FILE}')  # pixels (H, W) float32 after the modality LUT",
             "probabilities = model(preprocess(pixels), features)", "```", "",
             "## Preprocessing", "",
             f"Image size: {pre['image_size'] or pre['image_size_note']}.", ""]
    lines += [f"{i + 1}. {step}" for i, step in enumerate(pre["pixels"])]
    lines += [f"{len(pre['pixels']) + 1}. per image: `{sc['formula']}`; percentiles by {sc['percentile_method']}; "
              f"{sc['dtype']}; {sc['flat_image']}.", "",
              "## Training", "",
              f"Strategy **{t['strategy']}**" + (f" (mu = {t['proximal_mu']})" if t["strategy"] == "fedprox" else "")
              + f", {t['rounds_completed']} of {t['rounds_planned']} rounds, {t['local_epochs']} local epoch(s) per round"
              + ("" if t["finished"] else " (the run did not finish)") + f". DP requested by the run: "
              f"{'yes' if t['dp_requested_by_run'] else 'no'}. This model was trained on: "
              f"{', '.join(t['model_trained_on']) or 'none'}.", "",
              "| site | training images | rounds aggregated | privacy | epsilon | delta | site budget |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for s in t["sites"]:
        lines.append(f"| {s['name']} | {_f(s['train_images'])} | {', '.join(map(str, s['rounds_aggregated'])) or '-'} | "
                     f"{s['privacy']} | {_f(s['epsilon'])} | {_g(s['delta'])} | "
                     f"{_f(s['site_budget'], 2)} |")
    lines += ["", "## Evaluation", "", f"{ev['metric']}; intervals: {ev['interval']}.", ""]
    this = ev["this_model"]
    if this.get("auroc_by_site"):
        lines += [f"**This model** (from {this['source']}):", "", "| site | AUROC (95% CI) | n | positives |",
                  "| --- | ---: | ---: | ---: |"]
        for s, c in this["auroc_by_site"].items():
            lines.append(f"| {s} | {_cell(c)} | {_f(c['n'])} | {_f(c['n_pos'])} |")
    else:
        lines.append(f"**This model:** {this['note']}.")
    cs = ev.get("run_cross_site")
    if cs:
        lines += ["", "**The run's cross-site matrix** (as in its report.md; rows are models, columns the site that "
                  "evaluated them; `local:<site>` is trained at that site alone):", "",
                  "| model | " + " | ".join(cs["sites"]) + " | mean | gap |",
                  "| --- | " + " | ".join("---:" for _ in cs["sites"]) + " | ---: | ---: |"]
        for mid in cs["models"]:
            row = cs["auroc"][mid]
            lines.append(f"| {mid} | " + " | ".join(_cell(row["sites"].get(s)) for s in cs["sites"])
                         + f" | {_f(row['mean'])} | {_f(row['gap'])} |")
    if card.get("robustness"):
        lines += ["", "## Robustness to a malicious site", ""] + list(card["robustness"])
    lines += ["", "## Known limits", ""] + [f"* {x}" for x in card["limitations"]]
    lines += ["", "## Metadata features (in order)", "", ", ".join(f"`{n}`" for n in card["features"]["names"]), ""]
    return "\n".join(lines)
