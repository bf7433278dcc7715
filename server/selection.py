"""Model selection by the sites' validation AUROC: ``best`` next to ``final``.

Every round, each site measures the incoming global model on its own validation split before it
trains (``val-auroc`` in its train reply), so round r scores the global model of round r - 1. The
final model is scored the same way in the final cross-site validation (``val-auroc`` next to the
test metrics). A model's score is the mean over the sites that reported one: every hospital
counts once, whatever its size. The test splits are never used to choose.

:class:`BestModel` is what the round loop calls at the end of a run: ``candidates`` adds the best
earlier global model to the final cross-site validation, ``choose`` picks between it and the
final one from that validation's numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

from dicomfl.common import protocol as P

#: Cross-site id of the best earlier global model, when it is not the final one.
BEST_MODEL = "best"


def _mean_val(per_site: dict) -> tuple[float | None, int]:
    vals = [m.get(P.VAL_AUROC) for m in per_site.values() if isinstance(m, dict)]
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


class BestModel:
    """The end-of-run choice between the final global model and the best earlier one.

    Parameters
    ----------
    checkpoint_dir : Path
        The run's checkpoints (``round-<k>/global.npz``): where the earlier models are read from.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.earlier: tuple[int, float] | None = None

    def candidates(self, history: list[dict], final_round: int) -> dict[str, dict]:
        """``{BEST_MODEL: arrays}`` for the final cross-site validation, or {} when no earlier
        round scored (or its checkpoint is gone)."""
        from .checkpoint import read_npz

        self.earlier = best_earlier(history, final_round)
        path = self.checkpoint_dir / f"round-{self.earlier[0]:04d}" / "global.npz" if self.earlier else None
        if path is None or not path.is_file():
            self.earlier = None
            return {}
        return {BEST_MODEL: read_npz(path)}

    def choose(self, cross_site: dict, final_round: int, models: dict[str, dict], final: dict) -> tuple[dict, dict]:
        """(the choice, see :func:`select`; the chosen model's arrays), from the final cross-site
        validation of ``models`` (``final``: the final global model's arrays)."""
        selected = select(cross_site, final_round, self.earlier)
        return selected, models[BEST_MODEL] if selected["chosen"] == "best" else final
