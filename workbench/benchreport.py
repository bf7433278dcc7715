"""The benchmark's tables (markdown + JSON) and plots, from the per-job results."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.server.checkpoint import clean, write_json

from .headline import best_federated, headline, markdown


def _ms(vals: list) -> tuple[float | None, float | None]:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v)) if len(v) > 1 else 0.0


def _fmt(m, s) -> str:
    if m is None:
        return "n/a"
    return f"{m:.3f} ± {s:.3f}" if s else f"{m:.3f}"


def summarize(names: list[str], results: list[dict]) -> dict:
    by_cfg: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_cfg[r["config"]].append(r)
    rows = {}
    for cfg, rs in by_cfg.items():
        kind = rs[0]["kind"]
        row: dict = {"kind": kind, "seeds": len(rs), "seconds": _ms([r["seconds"] for r in rs])[0]}
        if kind == "scale":
            r = rs[0]
            row.update({"sites": r["sites"], "rounds": r["rounds"], "aggregated_per_round": r["aggregated_per_round"],
                        "evaluated_sites": r["evaluated_sites"], "mean_auroc": r["mean_auroc"]})
            rows[cfg] = row
            continue
        for metric in ("auroc", P.BALANCED_ACCURACY):
            per_site = {s: _ms([r["per_site"].get(s, {}).get(metric) for r in rs]) for s in names}
            row[metric] = {s: {"mean": m, "std": sd} for s, (m, sd) in per_site.items()}
            row[f"{metric}_mean"] = _ms([np.nanmean([v for v in (r["per_site"].get(s, {}).get(metric) for s in names)
                                                      if v is not None] or [np.nan]) for r in rs])
        if kind == "local":
            ins, outs = [], []
            for r in rs:
                pm = r["per_model"]
                ins.append(np.nanmean([pm[h][h]["auroc"] if pm[h][h]["auroc"] is not None else np.nan for h in names]))
                outs.append(np.nanmean([pm[h][s]["auroc"] if pm[h][s]["auroc"] is not None else np.nan
                                        for h in names for s in names if s != h]))
            row["in_site"], row["out_site"] = _ms(ins), _ms(outs)
            row["gap"] = _ms([a - b for a, b in zip(ins, outs)])
            row["per_model"] = {h: {s: _ms([r["per_model"][h][s]["auroc"] for r in rs])[0] for s in names} for h in names}
        if kind == "loso":
            row["holdout"] = rs[0]["holdout"]
            row["heldout_auroc"] = _ms([r["heldout"]["auroc"] for r in rs])
            row["inside_auroc"] = _ms([np.nanmean([v["auroc"] for s, v in r["per_site"].items()
                                                   if s != r["holdout"] and v["auroc"] is not None] or [np.nan]) for r in rs])
        eps = [r.get("epsilon") for r in rs if r.get("epsilon") is not None]
        row["epsilon"] = max(eps) if eps else None
        if any(r.get("curve") for r in rs):
            L = min(len(r["curve"]) for r in rs if r.get("curve"))
            row["curve"] = [float(np.nanmean([r["curve"][i] for r in rs if r.get("curve")])) for i in range(L)]
        rows[cfg] = row
    return rows


def write_bench_report(out: Path, cfg, names: list[str], results: list[dict]) -> dict:
    out = Path(out)
    rows = summarize(names, results)
    payload = clean({"sites": names, "seeds": cfg.seeds, "rounds": cfg.rounds, "local_epochs": cfg.local_epochs,
                     "model": cfg.model.model_dump(), "configs": rows})
    lines = [f"# dicomfl bench: {len(names)} sites, {cfg.rounds} rounds x {cfg.local_epochs} local epoch(s), "
             f"seeds {cfg.seeds}", "",
             "AUROC on each site's test split, mean ± std over seeds. For `local`, each site's column is its own model "
             "at home; in-site / out-of-site / gap compare each local model at its own site with the other sites.", "",
             "| configuration | " + " | ".join(names) + " | mean AUROC | mean bal. acc. | in-site | out-of-site | gap | epsilon | s/seed |",
             "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, r in rows.items():
        if r["kind"] in ("scale", "loso"):
            continue
        cells = [_fmt(r["auroc"][s]["mean"], r["auroc"][s]["std"]) for s in names]
        extra = [_fmt(*r[k]) if r["kind"] == "local" else "-" for k in ("in_site", "out_site", "gap")]
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {_fmt(*r['auroc_mean'])} | {_fmt(*r['balanced_accuracy_mean'])} | "
                     + " | ".join(extra) + f" | {eps} | {r['seconds']:.0f} |")
    best = best_federated(results)
    head = headline(results, getattr(cfg, "dp_epsilons", ()))
    payload["headline"] = clean(head)
    payload["best_federated"] = best
    lines += ["", *markdown(head, best), "", *_precision(names, results)]
    loso = {c: r for c, r in rows.items() if r["kind"] == "loso"}
    if loso:
        lines += ["", "## Leave one site out (FedAvg on the others, tested on the unseen site)", "",
                  "| held-out site | AUROC at the unseen site | mean AUROC at the federated sites |", "| --- | ---: | ---: |"]
        for c, r in loso.items():
            lines.append(f"| {r['holdout']} | {_fmt(*r['heldout_auroc'])} | {_fmt(*r['inside_auroc'])} |")
    curves = learning_curves(names, results)
    payload["learning_curves"] = clean(curves)
    if curves:
        lines += ["", *_curve_lines(curves)]
    write_json(out / "results.json", payload)
    for c, r in rows.items():
        if r["kind"] == "scale":
            lines += ["", f"## Scale: {r['sites']} simulated sites", "",
                      f"{r['rounds']} rounds; updates aggregated per round: {r['aggregated_per_round']}; cross-site "
                      f"validation answered by {r['evaluated_sites']} sites; mean AUROC {r['mean_auroc']}; "
                      f"{r['seconds']:.0f} s."]
    lines += ["", "![cross-site heatmap](bench_heatmap.png)", "", "![learning curves](bench_curves.png)", "",
              "![privacy-utility](bench_privacy.png)", "", "![leave one site out](bench_loso.png)", ""]
    if curves:
        lines += ["![pooled and local learning curves](bench_learning_curves.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    _plots(out, names, rows)
    if curves:
        _write_curves(out, names, curves)
    return payload


# ------------------------------------------------------------------ precision of one site's AUROC
def _precision(names: list[str], results: list[dict]) -> list[str]:
    """Each site's test-split size and the median half-width of its AUROC's 95% interval."""
    n, half = defaultdict(list), defaultdict(list)
    for r in results:
        if r.get("kind") in ("scale", "loso"):
            continue
        for s, cell in (r.get("per_site") or {}).items():
            if not isinstance(cell, dict):
                continue
            if cell.get("n") is not None:
                n[s].append(cell["n"])
            lo, hi = cell.get(P.AUROC_LO), cell.get(P.AUROC_HI)
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                half[s].append((hi - lo) / 2)
    if not any(n.values()) and not any(half.values()):
        return []
    cells = [f"{s}: {int(np.median(n[s])) if n[s] else '?'} images, "
             f"±{np.median(half[s]):.3f}" if half[s] else f"{s}: n/a" for s in names]
    return ["Test split per site and the median half-width of one site's AUROC 95% interval "
            "(stratified bootstrap over its test images): " + "; ".join(cells) + "."]


# ----------------------------------------------------------------------------- learning curves
CURVE_CONFIGS = ("pooled", "local")
PLATEAU = 0.01  # "converged": the seed-mean of the site-mean validation AUROC is within this of its best


def learning_curves(names: list[str], results: list[dict]) -> dict:
    """Per curve config (pooled, local): epochs, and validation AUROC / loss per site and their mean
    over sites, each averaged over seeds; plus where the mean AUROC plateaus."""
    out = {}
    for cfg in CURVE_CONFIGS:
        rs = [r for r in results if r.get("config") == cfg and r.get("learning_curve")]
        if not rs:
            continue
        L = min(len(r["learning_curve"]["epochs"]) for r in rs)
        epochs = rs[0]["learning_curve"]["epochs"][:L]
        row: dict = {"epochs": epochs, "seeds": [r["seed"] for r in rs], "per_seed": {}}
        for key in (P.VAL_AUROC, P.VAL_LOSS):
            per_site = {s: _nanmean_rows([[_num(v) for v in r["learning_curve"][key].get(s, [])[:L]] for r in rs], L)
                        for s in names}
            row[key] = per_site
            row[key + "-mean"] = [float(np.nanmean([per_site[s][i] for s in names])) if any(
                math.isfinite(per_site[s][i]) for s in names) else math.nan for i in range(L)]
        for r in rs:
            row["per_seed"][r["seed"]] = {key: {s: [_num(v) for v in r["learning_curve"][key].get(s, [])[:L]]
                                                for s in names} for key in (P.VAL_AUROC, P.VAL_LOSS)}
        auc = np.array(row["val-auroc-mean"], dtype=float)
        if np.isfinite(auc).any():
            b = int(np.nanargmax(auc))
            row["best_epoch"], row["best_val_auroc"] = epochs[b], float(auc[b])
            within = np.flatnonzero(np.nan_to_num(auc, nan=-1) >= auc[b] - PLATEAU)
            row["plateau_epoch"] = epochs[int(within[0])]
        loss = np.array(row["val-loss-mean"], dtype=float)
        if np.isfinite(loss).any():
            row["lowest_loss_epoch"] = epochs[int(np.nanargmin(loss))]
        out[cfg] = row
    return out


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and v is not None and math.isfinite(v) else math.nan


def _nanmean_rows(rows: list[list[float]], L: int) -> list[float]:
    arr = np.full((len(rows), L), np.nan)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r[:L]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return [float(x) for x in np.nanmean(arr, axis=0)]


def _curve_lines(curves: dict) -> list[str]:
    lines = ["## Learning curves (pooled and local training)", "",
             "Validation AUROC and loss (each site's validation split; mean over sites and seeds) after each epoch "
             f"(local: each site's own model). Converged: within {PLATEAU} of the best mean validation AUROC. "
             "Data: `bench_learning_curves.csv`.", "",
             "| training | epochs | val AUROC at 0 / mid / end | best (epoch) | within 0.01 of best from epoch | lowest val loss at epoch |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for cfg, c in curves.items():
        a = c["val-auroc-mean"]
        mid = len(a) // 2
        f = lambda v: "n/a" if not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {cfg} | {c['epochs'][-1]} | {f(a[0])} / {f(a[mid])} / {f(a[-1])} | "
                     f"{f(c.get('best_val_auroc', math.nan))} ({c.get('best_epoch', '-')}) | {c.get('plateau_epoch', '-')} | "
                     f"{c.get('lowest_loss_epoch', '-')} |")
    return lines


def _write_curves(out: Path, names: list[str], curves: dict) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "bench_learning_curves.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["training", "seed", "site", "epoch", "val_auroc", "val_loss"])
        for cfg, c in curves.items():
            for seed, per in [*c["per_seed"].items(), ("mean", None)]:
                for site in [*names, "mean"]:
                    for i, e in enumerate(c["epochs"]):
                        if per is None:
                            a = c["val-auroc-mean"][i] if site == "mean" else c[P.VAL_AUROC][site][i]
                            lo = c["val-loss-mean"][i] if site == "mean" else c[P.VAL_LOSS][site][i]
                        elif site == "mean":
                            a = _mean_finite([per[P.VAL_AUROC][s][i] for s in names if i < len(per[P.VAL_AUROC][s])])
                            lo = _mean_finite([per[P.VAL_LOSS][s][i] for s in names if i < len(per[P.VAL_LOSS][s])])
                        else:
                            a = per[P.VAL_AUROC][site][i] if i < len(per[P.VAL_AUROC][site]) else math.nan
                            lo = per[P.VAL_LOSS][site][i] if i < len(per[P.VAL_LOSS][site]) else math.nan
                        w.writerow([cfg, seed, site, e, "" if not math.isfinite(a) else f"{a:.4f}",
                                    "" if not math.isfinite(lo) else f"{lo:.4f}"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"pooled": "black", "local": "tab:orange"}
    for cfg, c in curves.items():
        for ax, key, label in ((axes[0], P.VAL_AUROC, "validation AUROC"), (axes[1], P.VAL_LOSS, "validation loss")):
            ax.plot(c["epochs"], c[key + "-mean"], marker=".", color=colors.get(cfg), lw=2, label=f"{cfg}, mean over sites")
            for s in names:
                ax.plot(c["epochs"], c[key][s], color=colors.get(cfg), lw=0.7, alpha=0.45)
            ax.set(xlabel="epoch (local: rounds x local epochs)", ylabel=label)
        if "plateau_epoch" in c:
            axes[0].axvline(c["plateau_epoch"], color=colors.get(cfg), ls=":", lw=1)
    axes[0].set_title("learning curves (thin: each site; dotted: converged)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_learning_curves.png", dpi=110)
    plt.close(fig)


def _mean_finite(vals: list[float]) -> float:
    v = [x for x in vals if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _plots(out: Path, names: list[str], rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # heatmap: local models (per home site), pooled and the federated strategies (no DP)
    labels, data = [], []
    for c, r in rows.items():
        if r["kind"] == "local":
            for h in names:
                labels.append(P.local_model_id(h))
                data.append([r["per_model"][h][s] if r["per_model"][h][s] is not None else np.nan for s in names])
        elif r["kind"] in ("pooled", "federated") and "dp(" not in c:
            labels.append(c)
            data.append([r["auroc"][s]["mean"] if r["auroc"][s]["mean"] is not None else np.nan for s in names])
    if data:
        arr = np.array(data, dtype=float)
        fig, ax = plt.subplots(figsize=(2 + 1.3 * len(names), 1 + 0.45 * len(labels)))
        im = ax.imshow(arr, vmin=0.4, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(labels)), labels)
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                if np.isfinite(arr[i, j]):
                    ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center", color="white" if arr[i, j] < 0.75 else "black")
        ax.set_xlabel("evaluated at site")
        ax.set_title("cross-site AUROC (mean over seeds)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "bench_heatmap.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for c, r in rows.items():
        if r.get("curve") and "[" not in c:
            ax.plot(range(len(r["curve"])), r["curve"], marker=".", label=c)
    ax.set(xlabel="global model after round", ylabel="mean validation AUROC over sites", title="learning curves")
    _finish(plt, fig, ax, out / "bench_curves.png", legend_size=7)
    fig, ax = plt.subplots(figsize=(6, 4))
    for base in ("fedavg", "pooled"):
        pts = sorted((r["epsilon"], r["auroc_mean"][0]) for c, r in rows.items()
                     if c.startswith(base + "+dp") and r["epsilon"] is not None and r["auroc_mean"][0] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{base} + DP-SGD")
        if base in rows and rows[base]["auroc_mean"][0] is not None:
            ax.axhline(rows[base]["auroc_mean"][0], ls="--", color="gray" if base == "fedavg" else "black",
                       label=f"{base}, no DP")
    ax.set(xscale="log", xlabel="epsilon spent (delta 1e-5)", ylabel="mean AUROC over sites", title="privacy vs utility")
    _finish(plt, fig, ax, out / "bench_privacy.png", legend_size=8)
    loso = [r for r in rows.values() if r["kind"] == "loso"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if loso:
        x = np.arange(len(loso))
        ax.bar(x - 0.2, [r["heldout_auroc"][0] or 0 for r in loso], 0.4, label="unseen site")
        ax.bar(x + 0.2, [r["inside_auroc"][0] or 0 for r in loso], 0.4, label="federated sites")
        ax.set_xticks(x, [r["holdout"] for r in loso])
        ax.legend()
    ax.set(ylim=(0.4, 1.0), ylabel="AUROC", title="leave one site out")
    fig.tight_layout()
    fig.savefig(out / "bench_loso.png", dpi=110)
    plt.close(fig)


def _finish(plt, fig, ax, path: Path, legend_size: int) -> None:
    """Grid, a legend when something is drawn, tight layout; save and close."""
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
