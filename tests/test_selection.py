"""Model selection by validation AUROC (server/selection.py): which model each round's replies
score, ties, NaN and out-of-range values, and the choice between final and best."""

from __future__ import annotations

import math

from dicomfl.server.selection import best_earlier, round_scores, select


def _round(r, *vals):
    return {"round": r, "sites": {f"s{i}": {"val-auroc": v} for i, v in enumerate(vals)}}


def test_round_r_scores_the_model_of_round_r_minus_1():
    hist = [_round(1, 0.5, 0.5), _round(2, 0.6, 0.8), _round(3, 0.9, 0.7), _round(4, 0.7, 0.7)]
    assert round_scores(hist) == {1: 0.7, 2: 0.8, 3: 0.7}  # round 1's replies score the initial model: not a candidate
    assert best_earlier(hist, 4) == (2, 0.8)


def test_nan_and_out_of_range_scores_are_ignored_and_ties_take_the_later_model():
    hist = [_round(2, math.nan, 0.6), _round(3, 7.0, 0.6), _round(4, -1.0, 0.6)]
    assert round_scores(hist) == {1: 0.6, 2: 0.6, 3: 0.6}
    assert best_earlier(hist, 4) == (3, 0.6)
    assert best_earlier([_round(1, 0.9)], 1) is None


def test_select_prefers_the_final_model_unless_the_earlier_one_validates_better():
    cs = {"matrix": {"global": {"a": {"val-auroc": 0.7}, "b": {"val-auroc": 0.9}},
                     "best": {"a": {"val-auroc": 0.75}, "b": {"val-auroc": 0.8}}}}
    sel = select(cs, 5, (3, 0.77))
    assert sel["chosen"] == "final" and sel["round"] == 5 and sel["val_auroc"] == 0.8
    cs["matrix"]["best"]["b"]["val-auroc"] = 0.95
    sel = select(cs, 5, (3, 0.77))
    assert sel["chosen"] == "best" and sel["round"] == 3 and sel["val_auroc"] == 0.85
    assert select({"matrix": {"global": {}}}, 2, None)["chosen"] == "final"
