"""The benchmark's headline comparisons: paired differences in AUROC with a 95% interval and a verdict.

Every comparison is paired: configuration A and configuration B at the same site, on the same test
split, for the same training seed, and replicate r of both is the same resample of that split (a
site draws its resamples from its name and the split's content, never from the model or the job:
:func:`dicomfl.common.stats.replicate_indices`). The interval is a hierarchical bootstrap
(:func:`dicomfl.common.stats.hierarchical_difference`): replicate r resamples the test images at
every site (replicate r of each site) and the training seeds (with replacement), so it carries both
the test-set sampling and the training variance between seeds. The sites are fixed strata (the
claim is about these sites), and each site counts equally.

The verdict is ``better`` when the whole interval of A - B lies above 0, ``worse`` below 0, else
``not separable``. Nothing is corrected for the number of comparisons.

Which federated strategy is "best" is decided on the sites' *validation* splits (mean
``val-auroc`` over sites and seeds), never on the test splits the comparison is made on.

Recipe runs (``fedavg+<items>``, bench ``recipes:``) are compared with FedAvg; a personalized
recipe (each site's personalized model at home) also with the local models and pooled. Every
comparison is also made at each site alone (``per_site``): the goals are per site.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.common.stats import BETTER, UNSEPARABLE, WORSE, hierarchical_difference

FEDAVG = "fedavg"


def _cells(results: list[dict]) -> dict[str, dict[tuple[str, int], dict]]:
    """config -> (site, seed) -> that site's cell (per_site) of that seed's result."""
    out: dict[str, dict[tuple[str, int], dict]] = defaultdict(dict)
    for r in results:
        if r.get("kind") in ("scale", "loso"):
            continue
        for site, cell in (r.get("per_site") or {}).items():
            if isinstance(cell, dict):
                out[r["config"]][(site, int(r["seed"]))] = cell
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_federated(results: list[dict]) -> str | None:
    """The non-DP federated configuration (all sites, the bench's model) with the highest mean
    validation AUROC over sites and seeds; None when no such configuration has one."""
    scores: dict[str, list[float]] = defaultdict(list)
    for r in results:
        c = r.get("config", "")
        if r.get("kind") != "federated" or "+dp" in c or "[" in c or r.get("personalized"):
            continue  # DP, ablations and personalized models (one per site) are not a global model
        for cell in (r.get("per_site") or {}).values():
            v = (cell or {}).get(P.VAL_AUROC)
            if _finite(v):
                scores[c].append(float(v))
    if not scores:
        return None
    return max(sorted(scores), key=lambda c: float(np.mean(scores[c])))


def compare(cells: dict[str, dict[tuple[str, int], dict]], a: str, b: str, alpha: float = 0.05) -> dict | None:
    """A - B over the (site, seed) units both have replicates for (same split id); None if none."""
    ca, cb = cells.get(a, {}), cells.get(b, {})
    rows_a, rows_b, pts_a, pts_b, seeds, sites = [], [], [], [], [], set()
    mismatched = 0
    for unit in sorted(set(ca) & set(cb)):
        x, y = ca[unit], cb[unit]
        ra, rb = x.get(P.AUROC_REPLICATES), y.get(P.AUROC_REPLICATES)
        if not ra or not rb or not _finite(x.get("auroc")) or not _finite(y.get("auroc")):
            continue
        if x.get(P.AUROC_REPLICATES_ID) != y.get(P.AUROC_REPLICATES_ID):
            mismatched += 1  # different test splits (a re-ingest between runs): not a pair
            continue
        n = min(len(ra), len(rb))
        rows_a.append([math.nan if v is None else float(v) for v in ra[:n]])
        rows_b.append([math.nan if v is None else float(v) for v in rb[:n]])
        pts_a.append(float(x["auroc"]))
        pts_b.append(float(y["auroc"]))
        seeds.append(unit[1])
        sites.add(unit[0])
    if not rows_a:
        return None
    n = min(len(r) for r in rows_a)
    res = hierarchical_difference(np.array([r[:n] for r in rows_a]), np.array([r[:n] for r in rows_b]), seeds,
                                  pts_a, pts_b, alpha=alpha)
    res.update({"a": a, "b": b, "sites": len(sites), "replicates": n, "unpaired_dropped": mismatched})
    return res


def headline(results: list[dict], dp_epsilons=(), alpha: float = 0.05) -> list[dict]:
    """The headline comparisons that the results allow, in a fixed order (see the module docstring)."""
    cells = _cells(results)
    best = best_federated(results)
    plan: list[tuple[str, str, str]] = [(f"{FEDAVG} vs local (each site's own model, at home)", FEDAVG, "local")]
    if best and best != FEDAVG:
        plan.append((f"best federated by validation ({best}) vs local at home", best, "local"))
    plan.append((f"{FEDAVG} vs pooled", FEDAVG, "pooled"))
    if best and best != FEDAVG:
        plan.append((f"best federated by validation ({best}) vs pooled", best, "pooled"))
    plan.append(("pooled vs local at home", "pooled", "local"))
    plan.append((f"fused (pixels + metadata) vs image-only, {FEDAVG}", FEDAVG, f"{FEDAVG}[image-only]"))
    for eps in dp_epsilons:
        if eps is not None:
            plan.append((f"DP-SGD (eps={eps:g}) vs no DP, {FEDAVG}", f"{FEDAVG}+dp(eps={eps:g})", FEDAVG))
    personalized = {r["config"] for r in results if r.get("personalized")}
    recipes = sorted({r["config"] for r in results if r.get("kind") == "federated"
                      and r["config"].startswith(FEDAVG + "+") and "+dp" not in r["config"]})
    for c in recipes:
        what = "personalized at home" if c in personalized else "global"
        plan.append((f"recipe {c} ({what}) vs {FEDAVG}", c, FEDAVG))
        if c in personalized:
            plan.append((f"recipe {c} (personalized at home) vs local at home", c, "local"))
            plan.append((f"recipe {c} (personalized at home) vs pooled", c, "pooled"))
    sites = sorted({unit[0] for by_unit in cells.values() for unit in by_unit})
    out = []
    for label, a, b in plan:
        res = compare(cells, a, b, alpha)
        if res is not None:
            # The same comparison at each site alone (the goals are per site: "at every site").
            res["per_site"] = {}
            for site in sites:
                one = {c: {u: v for u, v in by_unit.items() if u[0] == site} for c, by_unit in cells.items()}
                r = compare(one, a, b, alpha)
                if r is not None:
                    res["per_site"][site] = {k: r[k] for k in ("diff", "lo", "hi", "verdict")}
            out.append({"comparison": label, **res})
    return out


def markdown(rows: list[dict], best: str | None = None) -> list[str]:
    """The headline table (markdown lines)."""
    lines = ["## Headline comparisons", "",
             "Paired differences in test AUROC (A - B): the same site, test images and training seed for both; "
             "95% interval from a hierarchical bootstrap (test images resampled by patient at each site, training "
             "seeds resampled with replacement); verdict: better / worse when the whole interval is above / below 0. "
             + (f"Best federated strategy chosen on validation AUROC: {best}. " if best else "")
             + "No correction for multiple comparisons.", "",
             "| comparison (A vs B) | mean difference in AUROC | 95% interval | sites x seeds | verdict |",
             "| --- | ---: | ---: | ---: | --- |"]
    if not rows:
        lines.append("| (no configuration pair with replicate AUROCs: `replicates: 0`?) | - | - | - | - |")
    for r in rows:
        lines.append(f"| {r['comparison']} | {r['diff']:+.3f} | {_ci(r)} | {r['sites']} x {r['seeds']} | {r['verdict']} |")
    sites = sorted({s for r in rows for s in r.get("per_site", {})})
    if sites:
        lines += ["", "The same comparisons at each site alone (mean difference over seeds, 95% interval, verdict). "
                  "Descriptive: one site's interval resamples its test images and only that site's few seeds, and "
                  "nothing is corrected for the number of cells.", "",
                  "| comparison (A vs B) | " + " | ".join(sites) + " |", "| --- | " + " | ".join("---" for _ in sites) + " |"]
        for r in rows:
            cells = []
            for s in sites:
                c = r.get("per_site", {}).get(s)
                cells.append(f"{c['diff']:+.3f} {_ci(c)} {_SHORT.get(c['verdict'], c['verdict'])}" if c else "-")
            lines.append(f"| {r['comparison']} | " + " | ".join(cells) + " |")
    return lines


_SHORT = {BETTER: "better", WORSE: "worse", UNSEPARABLE: "n.s."}


def _ci(r: dict) -> str:
    return f"[{r['lo']:+.3f}, {r['hi']:+.3f}]" if _finite(r["lo"]) and _finite(r["hi"]) else "n/a"
