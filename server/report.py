"""The run report: report.md (what ran, per-round metrics, the cross-site matrix, the gaps, epsilon
per site), and PNG plots (learning curves, cross-site heatmap). Numbers only; no site data."""

from __future__ import annotations

import math
from pathlib import Path

from dicomfl.common import protocol as P


def _auroc_ci(m: dict) -> str:
    lo, hi = m.get(P.AUROC_LO), m.get(P.AUROC_HI)
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi):
        return f"{_f(m.get('auroc'))} [{_f(lo, 2)}, {_f(hi, 2)}]"
    return _f(m.get("auroc"))


def _f(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def learning_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({s for h in history for s in h.get("sites", {})})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in sites:
        rounds = [h["round"] for h in history if s in h["sites"]]
        loss = [h["sites"][s].get(P.TRAIN_LOSS, math.nan) for h in history if s in h["sites"]]
        auc = [h["sites"][s].get(P.VAL_AUROC, math.nan) for h in history if s in h["sites"]]
        axes[0].plot(rounds, loss, marker="o", label=s)
        # val-auroc in round r measures the global model from round r-1
        axes[1].plot([r - 1 for r in rounds], auc, marker="o", label=s)
    axes[0].set(xlabel="round", ylabel="local training loss", title="training loss per site")
    axes[1].set(xlabel="global model after round", ylabel="validation AUROC", title="global model at each site (val)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if sites:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_lines(n_sites: int, run) -> list[str]:
    """What the run's update screening (``run:`` section, :mod:`dicomfl.server.checks`) can and
    cannot defend against with ``n_sites`` sites: markdown lines for the run report and model card."""
    if n_sites <= 2:
        return [f"**With {n_sites} site(s), a malicious site cannot be told from an honest one**: when two updates "
                "disagree, nothing says which is honest. Only the bounds apply: the absolute norm bound "
                f"(run.max_update_norm_rel {run.max_update_norm_rel:g}x the global norm), the relative clip "
                f"(run.clip_update_median_ratio {run.clip_update_median_ratio:g}x the smaller of the two updates), "
                f"the weight cap (run.max_weight_share {run.max_weight_share:g}) and the free-rider rule for an update "
                "equal to the global model. Within those bounds one site can still move the model in any direction "
                "every round (a sign flip, noise). The median-ratio, direction and token-update rules need at least 3 "
                "sites; so do robust aggregators (median, trimmed mean, Krum, Bulyan), which with two sites are the "
                "mean or pick one of the two."]
    from .checks import ScreenRules

    ratio = ScreenRules.from_run(run).max_update_norm_ratio
    direction = (f" and one whose cosine with the round's median update is below run.min_update_cosine "
                 f"{run.min_update_cosine:g}" if run.min_update_cosine > -1 else "")
    return [f"With {n_sites} sites, each round rejects a free-rider (an update equal to the global model, or below "
            f"run.free_rider_ratio {run.free_rider_ratio:g}x the round's median), an update beyond the norm bounds "
            f"(run.max_update_norm_rel {run.max_update_norm_rel:g}x the global norm; {ratio:g}x the round's median, "
            f"run.max_update_median_ratio){direction}; every other update is clipped to "
            f"run.clip_update_median_ratio {run.clip_update_median_ratio:g}x the round's median distance, and no site "
            f"has more than run.max_weight_share {run.max_weight_share:g} of the weight. This holds against a minority "
            "of malicious sites; sites that collude into a majority of a round decide its median."]


def write_report(out_dir: Path, cfg, summary: dict) -> Path:
    out_dir = Path(out_dir)
    history = summary["history"]
    learning_curves(out_dir / "learning_curves.png", history)
    cs = summary["cross_site"]
    r = cfg.run
    lines = [f"# dicomfl run `{r.name}`", "",
             f"Strategy **{r.strategy}**" + (f" (mu = {r.proximal_mu})" if r.strategy == "fedprox" else "")
             + f", {summary['rounds']} of {r.rounds} rounds, {r.local_epochs} local epoch(s) per round, "
             f"min sites {r.min_sites}, round timeout {r.round_timeout_s:g} s. Model `{cfg.model.mode}` "
             f"({cfg.model.image_size} px, width {cfg.model.width}, depth {cfg.model.depth}). "
             f"DP requested by the run: {'yes' if cfg.privacy.dp else 'no'}.", "",
             f"Sites: {', '.join(summary['sites']) or 'none'}.", "", "## Rounds", "",
             "| round | sites trained | train loss (weighted) | rejected | declined (budget) | errors | no reply | seconds |",
             "| ---: | --- | ---: | --- | --- | --- | --- | ---: |"]
    for h in history:
        rej = "; ".join(f"{s}: {w}" for s, w in h.get("rejected", {}).items()) or "-"
        errs = "; ".join(f"{s}: {w}" for s, w in h.get("errors", {}).items()) or "-"
        lines.append(f"| {h['round']} | {', '.join(h.get('aggregated', [])) or '-'} | {_f(h.get('train_loss'))} | {rej} | "
                     f"{', '.join(h.get('declined', [])) or '-'} | {errs} | {', '.join(h.get('missing', [])) or '-'} | "
                     f"{_f(h.get('seconds'), 1)} |")
    riders = sorted({s for h in history for s, w in h.get("rejected", {}).items() if w.startswith("free-rider")})
    lines += ["", "**Update screening.** " + robustness_lines(len(summary["sites"]), r)[0]]
    if riders:
        lines += ["", f"**Free riders** (an update of nothing) in at least one round: {', '.join(riders)}."]
    missing = sorted({s for h in history for s in h.get("missing", [])})
    if missing:
        lines += ["", f"**Sites missing from at least one round:** {', '.join(missing)}."]
    resumed = summary.get("resumed_after") or []
    if resumed:
        lines += ["", "**Interrupted and resumed** from its last checkpoint after round(s) "
                  f"{', '.join(str(r) for r in resumed)} (e.g. the SuperLink restarted; the coordinator service "
                  "resumes such a run by itself)."]
    lines += ["", "## Per-site metrics by round", "",
              "`val AUROC` is the incoming global model on the site's validation split, measured before it trains.", "",
              "| round | site | examples | train loss | val AUROC | epsilon |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for h in history:
        for s, m in sorted(h.get("sites", {}).items()):
            lines.append(f"| {h['round']} | {s} | {_f(m.get(P.NUM_EXAMPLES), 0)} | {_f(m.get(P.TRAIN_LOSS))} | "
                         f"{_f(m.get(P.VAL_AUROC))} | {_f(m.get('epsilon'), 2) if 'epsilon' in m else '-'} |")
    eps = {}
    for h in history:
        for s, m in h.get("sites", {}).items():
            if m.get("epsilon") is not None:
                eps[s] = (m.get("epsilon"), m.get("delta"), m.get(P.TARGET_EPSILON))
    if eps:
        lines += ["", "## Privacy (DP-SGD, spent at each site, cumulative over the run)", "",
                  "| site | epsilon | delta | site budget |", "| --- | ---: | ---: | ---: |"]
        for s, (e, d, t) in sorted(eps.items()):
            lines.append(f"| {s} | {_f(e, 3)} | {d:g} | {_f(t, 2)} |")
    sites = cs.get("sites", [])
    models = cs.get("models", [])
    lines += ["", "## Cross-site validation (AUROC on each site's test split)", "",
              "Rows are models, columns the site that evaluated them. `local:<site>` is trained at that site alone with "
              "the same budget. `personal:<site>` is the final global model personalized at that site (its own "
              "GroupNorm parameters and/or fine-tuning); only its home cell is filled when the site keeps it at home. Gap = AUROC at its own site minus mean AUROC at the other sites. In brackets: the "
              "95% interval of a stratified bootstrap over the site's test images (1,000 resamples, at the site).", "",
              "| model | " + " | ".join(sites) + " | mean | gap |", "| --- | " + " | ".join("---:" for _ in sites) + " | ---: | ---: |"]
    g = cs.get("gaps", {}).get("auroc", {})
    for m in models:
        vals = [_auroc_ci(cs["matrix"][m].get(s, {})) for s in sites]
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {_f(g.get(m, {}).get('mean'))} | {_f(g.get(m, {}).get('gap'))} |")
    if cs.get("missing"):
        lines += ["", f"Sites that did not answer cross-site validation: {', '.join(cs['missing'])}."]
    pers = summary.get("personalized") or {}
    if pers:
        lines += ["", "## Personalization", "", f"Fine-tuning steps offered: {pers.get('steps', 0)}; sites that shared "
                  f"their personalized model: {', '.join(pers.get('shared', [])) or 'none'}.", "",
                  "| site | steps chosen | validation AUROC | epsilon (fine-tuning) | stopped by budget |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for site, m in sorted(pers.get("sites", {}).items()):
            lines.append(f"| {site} | {_f(m.get('steps'), 0)} | {_f(m.get(P.VAL_AUROC))} | {_f(m.get('epsilon'), 3)} | "
                         f"{'yes' if m.get('declined') else 'no'} |")
        for site, why in sorted(pers.get("errors", {}).items()):
            lines.append(f"| {site} | - | - | - | error: {why} |")
    lines += ["", "![cross-site heatmap](cross_site_final.png)", "", "![learning curves](learning_curves.png)", "",
              "Files: `metrics.json` (everything above), `cross_site_final.json` and `.csv`, `checkpoints/` "
              "(global and local models per round, `.npz`).", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
