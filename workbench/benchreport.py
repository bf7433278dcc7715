"""The benchmark's tables (markdown + JSON) and plots, from the per-job results."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.server.checkpoint import clean, write_json


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
        for metric in ("auroc", "balanced_accuracy"):
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
    write_json(out / "results.json", payload)
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
    loso = {c: r for c, r in rows.items() if r["kind"] == "loso"}
    if loso:
        lines += ["", "## Leave one site out (FedAvg on the others, tested on the unseen site)", "",
                  "| held-out site | AUROC at the unseen site | mean AUROC at the federated sites |", "| --- | ---: | ---: |"]
        for c, r in loso.items():
            lines.append(f"| {r['holdout']} | {_fmt(*r['heldout_auroc'])} | {_fmt(*r['inside_auroc'])} |")
    for c, r in rows.items():
        if r["kind"] == "scale":
            lines += ["", f"## Scale: {r['sites']} simulated sites", "",
                      f"{r['rounds']} rounds; updates aggregated per round: {r['aggregated_per_round']}; cross-site "
                      f"validation answered by {r['evaluated_sites']} sites; mean AUROC {r['mean_auroc']}; "
                      f"{r['seconds']:.0f} s."]
    lines += ["", "![cross-site heatmap](bench_heatmap.png)", "", "![learning curves](bench_curves.png)", "",
              "![privacy-utility](bench_privacy.png)", "", "![leave one site out](bench_loso.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    _plots(out, names, rows)
    return payload


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
