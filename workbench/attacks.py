"""Malicious sites for the benchmark and the tests: a wrapper around a real site's handler that
rewrites that site's train replies (the site trains honestly, then lies about the result).

* :func:`sign_flip` ``(factor)``: sends ``global - factor x (its honest update)``;
* :func:`noise` ``(factor)``: sends ``global + N``, ``N`` Gaussian with ``||N|| = factor x`` the
  norm of its honest update (a random direction, at the honest scale);
* :func:`free_rider` ``(claim)``: sends the global model back, claiming ``claim`` examples.

Nothing here is used by a site or the coordinator; it is the attacker's side of a measurement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from flwr.app import MetricRecord

from dicomfl.common import protocol as P

Rewrite = Callable[[object, int, dict], None]


def _arrays(reply, rnd: int, global_w: dict) -> tuple[dict, dict]:
    w = P.from_record(reply.content[P.ARRAYS])
    return w, {k: w[k].astype(np.float64) - global_w[k] for k in global_w}


def _send(reply, arrays: dict) -> None:
    reply.content[P.ARRAYS] = P.to_record({k: np.asarray(v, np.float32) for k, v in arrays.items()})


def sign_flip(factor: float = 9.0) -> Rewrite:
    """``global - factor x update``: the model pushed the other way, ``factor`` times as far."""
    def rewrite(reply, rnd: int, global_w: dict) -> None:
        _, d = _arrays(reply, rnd, global_w)
        _send(reply, {k: global_w[k] - factor * d[k] for k in global_w})
    return rewrite


def noise(factor: float = 5.0, seed: int = 0) -> Rewrite:
    """``global + N``, Gaussian ``N`` scaled to ``factor x`` the honest update's norm (fresh each round)."""
    def rewrite(reply, rnd: int, global_w: dict) -> None:
        _, d = _arrays(reply, rnd, global_w)
        size = float(np.sqrt(sum(float(np.sum(v * v)) for v in d.values())))
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"noise/{seed}/{rnd}".encode()).digest()[:8], "big"))
        n = {k: rng.normal(size=np.shape(v)) for k, v in global_w.items()}
        nn = float(np.sqrt(sum(float(np.sum(v * v)) for v in n.values())))
        _send(reply, {k: global_w[k] + n[k] * (factor * size / max(nn, 1e-30)) for k in global_w})
    return rewrite


def free_rider(claim: float = 1e6) -> Rewrite:
    """The global model sent back unchanged, claiming ``claim`` training examples."""
    def rewrite(reply, rnd: int, global_w: dict) -> None:
        _send(reply, {k: np.array(v, copy=True) for k, v in global_w.items()})
        m = {k: v for k, v in reply.content[P.METRICS].items()}
        reply.content[P.METRICS] = MetricRecord({**m, P.NUM_EXAMPLES: float(claim)})
    return rewrite


ATTACKS: dict[str, Callable[[], Rewrite]] = {
    "sign-flip-x9": lambda: sign_flip(9.0),
    "noise-x5": lambda: noise(5.0),
    "free-rider-1e6": lambda: free_rider(1e6),
}


class AttackedSite:
    """A grid handler: the real site handler for every node; the train replies of ``sites`` go
    through ``rewrite(reply, round, global_weights)``.

    Parameters
    ----------
    grid : InProcessGrid
        The grid whose nodes it serves (for the coordinator's names of its nodes).
    sites : set of str
        The malicious sites' names.
    rewrite : callable
        One of :func:`sign_flip`, :func:`noise`, :func:`free_rider` (or any with that signature).
    handler : callable, optional
        ``(message, context) -> reply``; default: the grid's own handler.
    """

    def __init__(self, grid, sites: set[str], rewrite: Rewrite, handler=None) -> None:
        if handler is None:
            from dicomfl.client.handler import SiteHandler

            handler = getattr(grid.app, "__self__", None) or SiteHandler()
        self.handler = handler
        self.names = grid.trusted_names()
        self.sites, self.rewrite = set(sites), rewrite

    def __call__(self, msg, context):
        reply = self.handler.handle(msg, context)
        if msg.metadata.message_type == "train" and self.names[context.node_id] in self.sites and reply.has_content():
            self.rewrite(reply, int(msg.content[P.CONFIG][P.SERVER_ROUND]), P.from_record(msg.content[P.ARRAYS]))
        return reply


# ------------------------------------------------------------------ the robustness benchmark rows
#: The screening defaults before the robust-by-default rules (run: keys): the absolute bound and
#: the 10x median ratio only. The new defaults are the run's own (common/config.py).
OLD_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("max_update_norm_rel", 1.0), ("max_update_norm_ratio", 10.0), ("max_update_median_ratio", 0.0),
    ("clip_update_norm", None),
    ("max_weight_share", 0.5), ("clip_update_median_ratio", 0.0), ("min_update_cosine", -1.0),
    ("free_rider_rel", 0.0), ("free_rider_ratio", 0.0))
SCENARIOS = ("honest", *ATTACKS)
SCREENS = ("old", "new")


def plan(cfg, attacker: str) -> list:
    """One job per seed, federated strategy of ``cfg.strategies`` (FedProx at its first mu),
    scenario (honest and each attack by ``attacker``) and screening defaults (old, new)."""
    from dicomfl.common.config import FEDERATED_STRATEGIES

    from .bench import Job

    jobs = []
    for seed in cfg.seeds:
        for st in (s for s in cfg.strategies if s in FEDERATED_STRATEGIES):
            mu = cfg.proximal_mu[0] if st == "fedprox" else 0.0
            for scen in SCENARIOS:
                for screen in SCREENS:
                    jobs.append(Job(id=f"{st}|{scen}|{screen}@seed{seed}", kind="federated", seed=seed, strategy=st,
                                    mu=mu, run_overrides=OLD_DEFAULTS if screen == "old" else (),
                                    attack=None if scen == "honest" else scen, attacker=attacker))
    return jobs


def _interval(results: list[dict], site: str) -> tuple[float, float, float]:
    """Mean AUROC over seeds at ``site``, and the 95% interval of the seed-mean over the site's
    replicate resamples of its test split (replicate r is the same resample in every seed)."""
    pts = [r["per_site"][site]["auroc"] for r in results if _ok(r["per_site"].get(site, {}).get("auroc"))]
    reps = [r["per_site"][site].get(P.AUROC_REPLICATES) for r in results]
    mean = float(np.mean(pts)) if pts else float("nan")
    if not reps or any(not x for x in reps):
        return mean, float("nan"), float("nan")
    n = min(len(x) for x in reps)
    m = np.nanmean(np.array([[np.nan if v is None else v for v in x[:n]] for x in reps], dtype=float), axis=0)
    return mean, float(np.nanpercentile(m, 2.5)), float(np.nanpercentile(m, 97.5))


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and np.isfinite(v)


def _attacker_rounds(results: list[dict], attacker: str) -> str:
    rej = sum(attacker in h["rejected"] for r in results for h in r.get("screening", []))
    clip = sum(attacker in h["clipped"] for r in results for h in r.get("screening", []))
    total = sum(len(r.get("screening", [])) for r in results)
    return f"{rej}/{total} rejected, {clip} clipped"


def _honest_rejections(results: list[dict]) -> str:
    rej = sum(len(h["rejected"]) for r in results for h in r.get("screening", []))
    clip = sum(len(h["clipped"]) for r in results for h in r.get("screening", []))
    return f"{rej} rejected, {clip} clipped"


def markdown(results: list[dict], names: list[str], attacker: str, command: str, seconds: float, cfg) -> str:
    """The robustness table: AUROC per site (old vs new defaults, each scenario) and the paired differences."""
    from .headline import _cells, compare

    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    strategies = list(dict.fromkeys(c.split("|")[0] for c in by))
    cells = _cells(results)
    out = ["# Robust by default: every strategy, honest and with one attacker of three, old vs new screening defaults", "",
           f"Command (took {seconds / 60:.1f} min): `{command}`", "",
           f"Cohort: {', '.join(names)}; attacker: **{attacker}** (a wrapper around its real handler, "
           "workbench/attacks.py). "
           f"{cfg.rounds} rounds x {cfg.local_epochs} local epoch(s), seeds {list(cfg.seeds)}, model "
           f"{cfg.model.image_size} px, width {cfg.model.width}, depth {cfg.model.depth}; every other run key at its "
           "default (strategy_params empty: Krum/MultiKrum/Bulyan with f = 0). Attacks: `sign-flip-x9` sends "
           "global - 9 x its honest update; `noise-x5` global + Gaussian noise of 5 x its honest update's norm; "
           "`free-rider-1e6` the global model back, claiming 10^6 examples. **old**: the screening defaults before "
           "(absolute bound 1x the global norm, 10x median ratio, weight share 0.5); **new**: the run's defaults now "
           "(median rule at 4x instead of 10x, the free-rider rules and the 2x-median clip; the direction rule is off).", "",
           "## Mean test AUROC over sites (paired differences with 95% intervals)", "",
           "Paired difference: the same site, test resample and seed for both (workbench/headline.py, hierarchical "
           "bootstrap over test images and seeds). Honest cost goal: `new - old` of the honest rows >= -0.01. "
           "Survival: `new attacked - new honest`.", "",
           "| strategy | scenario | old | new | new - old [95%] | new attacked - new honest [95%] | screening, old | screening, new |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]

    def mean_auroc(cfg_name: str) -> str:
        v = [r["per_site"][s]["auroc"] for r in by.get(cfg_name, []) for s in names if _ok(r["per_site"].get(s, {}).get("auroc"))]
        return f"{np.mean(v):.3f}" if v else "n/a"

    def diff(a: str, b: str) -> str:
        c = compare(cells, a, b)
        if c is None:
            return "n/a"
        lo, hi = c["lo"], c["hi"]
        return f"{c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if _ok(lo) and _ok(hi) else f"{c['diff']:+.3f}"

    for st in strategies:
        for scen in SCENARIOS:
            o, n = f"{st}|{scen}|old", f"{st}|{scen}|new"
            if o not in by and n not in by:
                continue
            surv = "-" if scen == "honest" else diff(n, f"{st}|honest|new")
            scr = [(_attacker_rounds(by.get(c, []), attacker) if scen != "honest" else _honest_rejections(by.get(c, [])))
                   for c in (o, n)]
            out.append(f"| {st} | {scen} | {mean_auroc(o)} | {mean_auroc(n)} | {diff(n, o)} | {surv} | {scr[0]} | {scr[1]} |")
    out += ["", "## Test AUROC per site (mean over seeds; 95% interval over the site's test resamples)", "",
            "| strategy | scenario | " + " | ".join(f"{s} old | {s} new" for s in names) + " |",
            "| --- | --- | " + " | ".join("---: | ---:" for _ in names) + " |"]
    for st in strategies:
        for scen in SCENARIOS:
            row = []
            for s in names:
                for screen in SCREENS:
                    rs = by.get(f"{st}|{scen}|{screen}", [])
                    m, lo, hi = _interval(rs, s) if rs else (float("nan"),) * 3
                    row.append(f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if _ok(lo) else (f"{m:.2f}" if _ok(m) else "n/a"))
            out.append(f"| {st} | {scen} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m dicomfl.workbench.attacks BENCH.yaml OUT.md [ATTACKER]``: the robustness rows of
    a benchmark config (its sites, strategies, seeds, rounds, model, replicates), resumable."""
    import sys
    import time
    from pathlib import Path

    import torch

    from .bench import Bench, load_bench_config

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print("usage: python -m dicomfl.workbench.attacks BENCH.yaml OUT.md [ATTACKER]", file=sys.stderr)
        return 2
    # One thread: these models are tiny, and torch's default thread pool on a small shared machine
    # spends more time contending than computing (a job took 4x longer).
    torch.set_num_threads(1)
    cfg = load_bench_config(args[0])
    bench = Bench(cfg, on_progress=lambda i, n, what: print(f"[{i + 1}/{n}] {what}", flush=True))
    attacker = args[2] if len(args) == 3 else bench.names[1]
    jobs = plan(cfg, attacker)
    t0 = time.perf_counter()
    results = bench.run_jobs(jobs)
    command = "python -m dicomfl.workbench.attacks " + " ".join(args)
    Path(args[1]).write_text(markdown(results, bench.names, attacker, command, time.perf_counter() - t0, cfg))
    print(f"wrote {args[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
