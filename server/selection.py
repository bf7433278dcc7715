"""Model selection by the sites' validation AUROC: ``best`` next to ``final``.

Every round, each site measures the incoming global model on its own validation split before it
trains (``val-auroc`` in its train reply), so round r scores the global model of round r - 1. The
final model is scored the same way in the final cross-site validation (``val-auroc`` next to the
test metrics). A model's score is the mean over the sites that reported one: every hospital
counts once, whatever its size. The test splits are never used to choose.
"""

from __future__ import annotations

import math

from dicomfl.common import protocol as P

#: Cross-site id of the best earlier global model, when it is not the final one.
BEST_MODEL = "best"


def _mean_val(per_site: dict) -> tuple[float | None, int]:
    vals = [m.get("val-auroc") for m in per_site.values() if isinstance(m, dict)]
    vals = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0]
    return (sum(vals) / len(vals), len(vals)) if vals else (None, 0)


def round_scores(history: list[dict]) -> dict[int, float]:
    """{round k: mean validation AUROC of the global model after round k}, from the replies of
    round k + 1 (round 0, the initial model, is not a candidate)."""
    out = {}
    for rec in history:
        k = int(rec.get("round", 0)) - 1
        score, _ = _mean_val(rec.get("sites", {}))
        if k >= 1 and score is not None:
            out[k] = score
    return out


def best_earlier(history: list[dict], final_round: int) -> tuple[int, float] | None:
    """The best-scoring global model before the final round: (round, score), or None."""
    scores = {k: v for k, v in round_scores(history).items() if k < final_round}
    if not scores:
        return None
    k = max(scores, key=lambda r: (scores[r], r))  # ties: the later model
    return k, scores[k]


def select(cross_site: dict, final_round: int, earlier: tuple[int, float] | None) -> dict:
    """Which global model the sites' validation prefers: the final one, or the best earlier one
    (evaluated as ``best`` in the same cross-site validation)."""
    matrix = cross_site.get("matrix", {})
    final_score, n_final = _mean_val(matrix.get(P.GLOBAL_MODEL, {}))
    cand = {"final": {"round": final_round, "val_auroc": final_score, "sites": n_final}}
    if earlier is not None:
        score, n = _mean_val(matrix.get(BEST_MODEL, {}))
        cand["best"] = {"round": earlier[0], "val_auroc": score if score is not None else earlier[1],
                        "val_auroc_when_trained": earlier[1], "sites": n}
    chosen = "final"
    if "best" in cand and cand["best"]["val_auroc"] is not None and (
            final_score is None or cand["best"]["val_auroc"] > final_score):
        chosen = "best"
    return {"chosen": chosen, "round": cand[chosen]["round"], "val_auroc": cand[chosen]["val_auroc"],
            "by": "mean validation AUROC over the sites", "candidates": cand}
