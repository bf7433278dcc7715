"""Evaluation metrics for a site's predictions, from scikit-learn where it has them.

Binary tasks report AUROC, AUPRC, accuracy, balanced accuracy, sensitivity and specificity at a
threshold chosen on validation data (Youden's J on the validation ROC curve; 0.5 when validation
has one class only), Brier score and expected calibration error (ECE, 10 equal-width bins, the
usual definition: sum over bins of |accuracy - confidence| weighted by the bin's share).
Multi-class tasks report macro one-vs-rest AUROC, accuracy, balanced accuracy, multi-class Brier
score and top-label ECE. A metric that is undefined on the data (AUROC with one class present) is
NaN, never a made-up number; JSON writers turn NaN into null.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

from .stats import bootstrap_auroc

N_BINS = 10


def choose_threshold(y_true: np.ndarray, p_pos: np.ndarray) -> float:
    """Youden's J threshold on validation data (0.5 if it cannot be estimated)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0 or len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y_true, p_pos)
    j = tpr - fpr
    best = int(np.argmax(j))
    t = float(thr[best])
    return 0.5 if not math.isfinite(t) else min(max(t, 0.0), 1.0)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> float:
    """Top-label ECE. ``probs`` is (N, C) class probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    correct = (pred == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _safe(fn, *a, **k) -> float:
    try:
        v = float(fn(*a, **k))
    except ValueError:
        return float("nan")
    return v


def binary_metrics(y_true: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    n = len(y)
    out: dict[str, float] = {"n": float(n), "threshold": float(threshold), "prevalence": float(y.mean()) if n else float("nan")}
    if n == 0:
        for k in ("auroc", "auroc_lo", "auroc_hi", "auprc", "accuracy", "balanced_accuracy", "sensitivity",
                  "specificity", "brier", "ece"):
            out[k] = float("nan")
        return out
    two = len(np.unique(y)) == 2
    out["auroc"] = _safe(skm.roc_auc_score, y, p) if two else float("nan")
    out["auroc_lo"], out["auroc_hi"] = bootstrap_auroc(y, p) if two else (float("nan"), float("nan"))
    out["auprc"] = _safe(skm.average_precision_score, y, p) if two else float("nan")
    pred = (p >= threshold).astype(int)
    out["accuracy"] = float(skm.accuracy_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    out["sensitivity"] = float(tp / (tp + fn)) if tp + fn else float("nan")
    out["specificity"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y, pred)) if two else float("nan")
    out["brier"] = float(skm.brier_score_loss(y, p, pos_label=1)) if n else float("nan")
    out["ece"] = expected_calibration_error(y, np.stack([1 - p, p], axis=1))
    return out


def multiclass_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape if probs.ndim == 2 else (0, 0)
    out: dict[str, float] = {"n": float(n)}
    if n == 0:
        for k in ("auroc", "accuracy", "balanced_accuracy", "brier", "ece"):
            out[k] = float("nan")
        return out
    present = np.unique(y)
    out["auroc"] = (
        _safe(skm.roc_auc_score, y, probs, multi_class="ovr", average="macro", labels=list(range(c)))
        if len(present) == c else float("nan")
    )
    pred = probs.argmax(axis=1)
    out["accuracy"] = float(skm.accuracy_score(y, pred))
    out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y, pred)) if len(present) > 1 else float("nan")
    onehot = np.eye(c)[y]
    out["brier"] = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    out["ece"] = expected_calibration_error(y, probs)
    return out


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of class probabilities (N, C): binary, or one-vs-rest macro; NaN when undefined."""
    y = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1] if probs.ndim == 2 else 2
    if len(y) == 0 or len(np.unique(y)) < (2 if c == 2 else c):
        return float("nan")
    if c == 2:
        return _safe(skm.roc_auc_score, y, probs[:, 1] if probs.ndim == 2 else probs)
    return _safe(skm.roc_auc_score, y, probs, multi_class="ovr", average="macro", labels=list(range(c)))


def evaluate_predictions(
    y_test: np.ndarray, probs_test: np.ndarray, y_val: np.ndarray | None = None, probs_val: np.ndarray | None = None
) -> dict[str, float]:
    """Metrics on test predictions; for binary tasks the threshold comes from validation predictions."""
    probs_test = np.asarray(probs_test)
    if probs_test.ndim == 2 and probs_test.shape[1] > 2:
        return multiclass_metrics(y_test, probs_test)
    p_test = probs_test[:, 1] if probs_test.ndim == 2 else probs_test
    thr = 0.5
    if y_val is not None and probs_val is not None and len(y_val):
        pv = np.asarray(probs_val)
        thr = choose_threshold(y_val, pv[:, 1] if pv.ndim == 2 else pv)
    return binary_metrics(y_test, p_test, thr)
