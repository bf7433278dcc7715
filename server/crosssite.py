"""Cross-site validation: every site evaluates every model on its own test split.

Models are the global model (``global``), each site's local-only baseline (``local:<site>``),
trained alongside the federation with the same budget, and with personalization each site's
personalized model (``personal:<site>``: the final global model fine-tuned at the site; a row
with only its home cell when the site keeps it at home). The result is a models x sites matrix per
metric, and for each local model its generalization gap: performance at its own site minus the
mean performance at the other sites (NVFlare's cross-site validation is the reference design;
Flower has none built in).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from dicomfl.common import protocol as P

from .checkpoint import clean, write_json

METRICS = ("auroc", P.BALANCED_ACCURACY, "auprc", "accuracy", "sensitivity", "specificity", "brier", "ece", "loss")


def home_site(model_id: str) -> str | None:
    """The site a ``local:<site>`` or ``personal:<site>`` model was made at (None for the others)."""
    return P.local_model_site(model_id) or P.personal_model_site(model_id)


def gaps(matrix: dict[str, dict[str, dict]], metric: str = "auroc") -> dict[str, dict]:
    """Per model: mean over sites, own-site value, mean at the others, and the gap (own - others)."""
    out = {}
    for model, by_site in matrix.items():
        vals = {s: m.get(metric) for s, m in by_site.items()}
        finite = {s: v for s, v in vals.items() if v is not None and math.isfinite(v)}
        home = home_site(model)
        row = {"mean": float(np.mean(list(finite.values()))) if finite else None,
               "min": float(np.min(list(finite.values()))) if finite else None}
        if home is not None:
            own = finite.get(home)
            others = [v for s, v in finite.items() if s != home]
            row["own"] = own
            row["others"] = float(np.mean(others)) if others else None
            row["gap"] = own - row["others"] if own is not None and others else None
        out[model] = row
    return out


def write(out_dir: Path, matrix: dict[str, dict[str, dict]], tag: str = "final") -> dict:
    """Write cross-site matrices (CSV per metric + JSON) and heatmaps; return the JSON payload."""
    out_dir = Path(out_dir)
    sites = sorted({s for by_site in matrix.values() for s in by_site})
    models = sorted(matrix, key=lambda m: (m != "global", m))
    payload = {"sites": sites, "models": models, "matrix": matrix,
               "gaps": {m: gaps(matrix, m) for m in ("auroc", P.BALANCED_ACCURACY)}}
    write_json(out_dir / f"cross_site_{tag}.json", clean(payload))
    for metric in ("auroc", P.BALANCED_ACCURACY):
        with open(out_dir / f"cross_site_{tag}_{metric}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["model"] + sites)
            for m in models:
                w.writerow([m] + ["" if (v := matrix[m].get(s, {}).get(metric)) is None or not math.isfinite(v)
                                  else f"{v:.4f}" for s in sites])
    heatmap(out_dir / f"cross_site_{tag}.png", matrix, models, sites, "auroc")
    return payload


def heatmap(path: Path, matrix, models, sites, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.full((len(models), len(sites)), np.nan)
    for i, m in enumerate(models):
        for j, s in enumerate(sites):
            v = matrix[m].get(s, {}).get(metric)
            if v is not None and math.isfinite(v):
                data[i, j] = v
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(sites), 1.0 + 0.55 * len(models)))
    im = ax.imshow(data, vmin=0.4, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("evaluated at site (its test split)")
    for i in range(len(models)):
        for j in range(len(sites)):
            txt = "n/a" if np.isnan(data[i, j]) else f"{data[i, j]:.2f}"
            ax.text(j, i, txt, ha="center", va="center", color="white" if not np.isnan(data[i, j]) and data[i, j] < 0.75 else "black")
    ax.set_title(f"cross-site {metric.upper()}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
