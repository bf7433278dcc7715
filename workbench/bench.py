"""``dicomfl bench``: local-only vs pooled vs FedAvg / FedProx / FedAdam (with and without DP),
leave-one-site-out, model ablation and a many-site scale run — under identical budgets and seeds.

Every federated configuration runs the same ClientApp, round loop and Flower strategies as a real
deployment, through :class:`~dicomfl.workbench.inprocess.InProcessGrid` (one process: no SuperLink,
SuperNodes or worker processes per configuration, so a full grid fits on a small machine). ``--deployment`` also runs one configuration through a real SuperLink and
SuperNodes on loopback and reports how far the two paths differ.

Budget: every model sees ``rounds x local_epochs`` epochs of its training data (local-only and
pooled models train that many epochs; federated sites that many local epochs in total).
Results are saved per configuration and seed as they finish (``<out_dir>/results/``), so an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from dicomfl.common.config import FEDERATED_STRATEGIES, ConfigError, ModelConfig, load_site_config, run_config_dict, validate_file

from dicomfl.common import protocol as P
from dicomfl.common.fedstats import FeatureTransform
from dicomfl.server.checkpoint import clean, write_json


# Baselines the benchmark trains next to the federated strategies (common.config.FEDERATED_STRATEGIES).
BASELINES = ("local", "pooled")
# Strategies a benchmark runs only when its config lists them (not in the default grid).
OPT_IN_STRATEGIES = ("scaffold",)
# Every benchmark run's name starts with this.
BENCH_RUN_PREFIX = "bench-"
# The training recipe's items (README: "Recipe for acquisition shift", personalization), each
# measured on by a FedAvg run with it (``recipes:``) against FedAvg without it.
RECIPE_ITEMS = ("augment", "cosine", "steps", "personalize", P.LOCAL_NORM)
# Recipes whose result is each site's personalized model at home, not one global model.
PERSONAL_ITEMS = frozenset({"personalize", P.LOCAL_NORM})


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[Path]
    strategies: list[str] = [*BASELINES, *(s for s in FEDERATED_STRATEGIES if s not in OPT_IN_STRATEGIES)]
    proximal_mu: list[float] = [0.01, 0.1]
    dp_epsilons: list[float | None] = [None, 8.0, 1.0]
    dp_strategies: list[str] = ["fedavg"]
    leave_one_site_out: bool = True
    ablation: bool = True
    # With the ablation: one more FedAvg run of the fused model with these schema features dropped
    # (model.drop_features; e.g. the generated cohort's per-site constants). Empty: no such run.
    ablation_drop_features: list[str] = Field(default_factory=list, max_length=64)
    # Recipe runs: FedAvg with these items of the training recipe on (RECIPE_ITEMS; several joined
    # by '+', e.g. "augment+cosine"), each compared with plain FedAvg in the headline table.
    recipes: list[str] = Field(default_factory=list, max_length=32)
    recipe_local_steps: int = Field(default=10, ge=1)  # S of the "steps" item (run.local_steps)
    recipe_personalize_steps: int = Field(default=20, ge=0)  # fine-tuning steps of "personalize"
    seeds: list[int] = [0, 1, 2]
    # 25 rounds x 1 local epoch: where pooled and local training have converged on the generated
    # cohort at train.lr 1e-3 (README: learning curves; bench_learning_curves.csv shows it per run).
    rounds: int = Field(default=25, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    # The server learning rate of the strategies that have one; None: each strategy's own default
    # (its registry entry: 0.01 for the server optimizers, 1 for SCAFFOLD). FedAvgM gets 1 - fedavgm_momentum.
    server_lr: float | None = Field(default=None, gt=0)
    # The sites' learning rate in every benchmark training (local, pooled, federated, LOSO, scale);
    # None: each site's own train.lr. (SCAFFOLD's sites use scaffold_lr.)
    lr: float | None = Field(default=None, gt=0)
    # SCAFFOLD (strategies: [..., scaffold]) trains with plain SGD at every site: the sites' own
    # train.lr suits their optimizer (Adam by default), so SCAFFOLD's sites use this one instead.
    # Its server step eta_g is its registry default, 1 (unless server_lr is set).
    scaffold_lr: float = Field(default=0.05, gt=0)
    # FedAvgM (Hsu et al. 2019): server momentum beta, with server learning rate 1 - beta, so that
    # its effective step eta / (1 - beta) is FedAvg's (1): the momentum, not a larger step, is measured.
    fedavgm_momentum: float = Field(default=0.9, ge=0, lt=1)
    model: ModelConfig = ModelConfig(image_size=64, width=16)
    # Replicate AUROCs per model and site (paired headline comparisons, workbench/headline.py): every
    # site scores every model on the same resamples of its test split. 0: none (no headline table).
    replicates: int = Field(default=1000, ge=0, le=5000)
    scale_sites: int = Field(default=100, ge=0)  # 0 = no scale run
    scale_rounds: int = Field(default=2, ge=1)
    out_dir: Path = Path("runs/bench")
    source: Path | None = Field(default=None, exclude=True)


def load_bench_config(path: Path) -> BenchConfig:
    path = Path(path)
    cfg, base = validate_file(path, BenchConfig)
    cfg.sites = [p if p.is_absolute() else (base / p).resolve() for p in cfg.sites]
    cfg.out_dir = cfg.out_dir if cfg.out_dir.is_absolute() else (base / cfg.out_dir).resolve()
    cfg.source = path
    for i, p in enumerate(cfg.sites):
        if not p.is_file():
            raise ConfigError(f"{path}: sites.{i}: file not found: {p}")
    from dicomfl.common.fedstats import check_drop_features

    try:
        cfg.ablation_drop_features = check_drop_features(cfg.ablation_drop_features)
    except ValueError as exc:
        raise ConfigError(f"{path}: ablation_drop_features: {exc}") from None
    for i, r in enumerate(cfg.recipes):
        items = r.split("+")
        if not r or any(i not in RECIPE_ITEMS for i in items) or len(set(items)) != len(items):
            raise ConfigError(f"{path}: recipes.{i}: not a '+'-joined list of distinct items of {list(RECIPE_ITEMS)}")
    unknown = set(cfg.strategies) - set(BASELINES) - set(FEDERATED_STRATEGIES)
    if unknown:
        raise ConfigError(f"{path}: strategies: unknown {sorted(unknown)}")
    if len(cfg.sites) < 2:
        raise ConfigError(f"{path}: sites: a benchmark needs at least 2 sites")
    return cfg


@dataclass
class Job:
    """One configuration and seed."""

    id: str
    kind: str  # local | pooled | federated | loso | scale
    seed: int
    strategy: str = "fedavg"
    mu: float = 0.0
    epsilon: float | None = None
    mode: str = "fused"
    holdout: str | None = None
    drop: tuple[str, ...] = ()  # extra model.drop_features of this job (the proxy-feature ablation)
    recipe: tuple[str, ...] = ()  # RECIPE_ITEMS on in this job
    # Robustness rows (workbench/attacks.py): run: keys over the run's defaults (e.g. the old
    # screening defaults), and the attack one site's train replies go through (ATTACKS name).
    run_overrides: tuple[tuple[str, Any], ...] = ()
    attack: str | None = None
    attacker: str | None = None

    @property
    def config(self) -> str:
        return self.id.rsplit("@seed", 1)[0]


def plan(cfg: BenchConfig, site_names: list[str]) -> list[Job]:
    jobs: list[Job] = []
    for seed in cfg.seeds:
        def add(cid: str, **kw) -> None:
            jobs.append(Job(id=f"{cid}@seed{seed}", seed=seed, **kw))

        if "local" in cfg.strategies:
            add("local", kind="local")
        if "pooled" in cfg.strategies:
            add("pooled", kind="pooled")
        for eps in cfg.dp_epsilons:
            tag = "" if eps is None else f"+dp(eps={eps:g})"
            if eps is not None and "pooled" in cfg.dp_strategies:
                add(f"pooled{tag}", kind="pooled", epsilon=eps)
            for s in cfg.strategies:
                if s not in FEDERATED_STRATEGIES or (eps is not None and s not in cfg.dp_strategies):
                    continue
                if s == "fedprox":
                    for mu in cfg.proximal_mu:
                        add(f"fedprox(mu={mu:g}){tag}", kind="federated", strategy=s, mu=mu, epsilon=eps)
                else:
                    add(f"{s}{tag}", kind="federated", strategy=s, epsilon=eps)
        if cfg.ablation:
            for mode in ("image", "metadata"):
                add(f"fedavg[{mode}-only]", kind="federated", strategy="fedavg", mode=mode)
            if cfg.ablation_drop_features:
                add("fedavg[fused-without-proxies]", kind="federated", strategy="fedavg",
                    drop=tuple(cfg.ablation_drop_features))
        for r in cfg.recipes:
            add(f"fedavg+{r}", kind="federated", strategy="fedavg", recipe=tuple(r.split("+")))
        if cfg.leave_one_site_out:
            for h in site_names:
                add(f"loso(-{h})", kind="loso", strategy="fedavg", holdout=h)
    if cfg.scale_sites:
        jobs.append(Job(id=f"scale({cfg.scale_sites} sites)@seed{cfg.seeds[0]}", kind="scale", seed=cfg.seeds[0]))
    return jobs


class Bench:
    """The multicenter benchmark: every configuration of a :class:`BenchConfig`, over its seeds.

    Parameters
    ----------
    cfg : BenchConfig
        Sites, strategies, DP budgets, seeds, rounds, model, output folder.
    on_progress : callable, optional
        ``on_progress(done, total, job_id)`` before each job.

    ``run(only=None)`` runs (or resumes) the grid and returns the summary that is also written to
    ``<out_dir>/results.md`` and ``results.json``.
    """

    def __init__(self, cfg: BenchConfig, on_progress: Callable[[int, int, str], None] | None = None) -> None:
        self.cfg = cfg
        self.out = cfg.out_dir
        self.results_dir = self.out / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.site_cfgs = {load_site_config(p).site.name: p for p in cfg.sites}
        self.names = sorted(self.site_cfgs)
        self.on_progress = on_progress or (lambda i, n, what: None)

    # ----------------------------------------------------------------- helpers
    def _result_path(self, job: Job) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=()[]+@" else "_" for c in job.id)
        return self.results_dir / f"{safe}.json"

    def _run_yaml(self, job: Job, sites: list[Path], rounds: int | None = None, local_baseline: bool = False) -> Path:
        name = BENCH_RUN_PREFIX + "".join(c if c.isalnum() else "-" for c in job.id).strip("-")[:60]
        out = self.out / "runs" / name
        cfg = run_config_dict(name, rounds=rounds or self.cfg.rounds, strategy=job.strategy, proximal_mu=job.mu,
                              min_sites=1, local_epochs=self.cfg.local_epochs, out_dir=out, seed=job.seed,
                              server_lr=self.cfg.server_lr, local_baseline=local_baseline,
                              model=self._model(job), replicates=0 if job.kind == "scale" else self.cfg.replicates,
                              dp=job.epsilon is not None, target_epsilon=job.epsilon or 8.0, sites=sites)
        out.mkdir(parents=True, exist_ok=True)
        items = set(job.recipe)
        if "cosine" in items:
            cfg["run"]["lr_schedule"] = "cosine"
        if "steps" in items:
            cfg["run"]["local_steps"] = self.cfg.recipe_local_steps
        if "personalize" in items:
            cfg["run"]["personalize"] = {"steps": self.cfg.recipe_personalize_steps}
        if P.LOCAL_NORM in items:
            cfg["run"]["local_norm"] = True
        if job.strategy == "fedavgm":
            cfg["run"]["server_lr"] = round(1.0 - self.cfg.fedavgm_momentum, 12)
            cfg["run"]["strategy_params"] = {"server_momentum": self.cfg.fedavgm_momentum}
        cfg["run"].update(dict(job.run_overrides))
        path = out.parent / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _model(self, job: Job) -> dict:
        model = {**self.cfg.model.model_dump(exclude_none=True), "mode": job.mode}
        if job.drop:
            model["drop_features"] = sorted(set(model.get("drop_features", [])) | set(job.drop))
        return model

    def _standardization(self, trainers: dict) -> "FeatureTransform":
        """The pooled baselines' feature transform: exact statistics of every site's training split
        (what a federation without DP computes), the bench model's drops."""
        from dicomfl.common.fedstats import combine, global_standardization, iter_blocks, released, sums
        from dicomfl.common.splits import TRAIN

        m = self.cfg.model
        if not m.standardize_features or m.mode == "image":
            return FeatureTransform(drop=tuple(m.drop_features))
        feats = released(m.drop_features)
        stats = [sums(iter_blocks(t.split(TRAIN).features), feats) for t in trainers.values()]
        mean, std = global_standardization(combine(stats, feats))
        return FeatureTransform(mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32),
                                drop=tuple(m.drop_features))

    def _job_state(self, job: Job) -> Path:
        """The folder of this job's site state: ``<out_dir>/state/<job>/<site>`` (fresh each time).

        Each benchmark configuration and seed is its own experiment, so every job starts with an
        empty privacy ledger, no SCAFFOLD control and no personalized model of its own, kept under
        the benchmark's output. The sites' own ``state_dir`` is only read, for their ingested data:
        the benchmark never writes to a site's ledger (nor could a run name erase a site's spend).
        """
        root = self.out / "state" / "".join(c if c.isalnum() or c in "-_." else "-" for c in job.id)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True, mode=0o700)
        return root

    def _federate(self, job: Job, sites: list[Path], **kw) -> dict:
        from dicomfl.common.config import load_run_config

        from dicomfl.server.federation import Federation
        from .inprocess import InProcessGrid

        if job.strategy == "scaffold":
            run_cfg, grid = self._sgd_sites(load_run_config(self._run_yaml(job, sites, **kw), check_files=False),
                                            self._job_state(job))
        else:
            run_cfg = load_run_config(self._run_yaml(job, sites, **kw))
            grid = InProcessGrid(run_cfg.sites, resolver=_BenchSites(self.cfg.replicates, self._job_state(job),
                                                                     self.cfg.lr, augment="augment" in job.recipe))
        if job.attack is not None:  # one site lies in every train reply (workbench/attacks.py)
            from .attacks import ATTACKS, AttackedSite

            grid.app = AttackedSite(grid, {job.attacker}, ATTACKS[job.attack](), handler=grid.app.__self__)
        shutil.rmtree(run_cfg.out_dir / "checkpoints", ignore_errors=True)
        summary = Federation(run_cfg, grid).run()
        summary["out_dir"] = str(run_cfg.out_dir)
        return summary

    def _sgd_sites(self, run_cfg, state: Path):
        """The run's sites held in memory with ``train.optimizer: sgd`` and ``scaffold_lr`` (SCAFFOLD)."""
        from dicomfl.client.handler import InMemorySites
        from dicomfl.client.trainer import SiteTrainer

        from .inprocess import InProcessGrid

        sims, keys = {}, []
        for p in run_cfg.sites:
            sc = load_site_config(p)
            sc.train.optimizer, sc.train.lr = "sgd", self.cfg.scaffold_lr
            sc.privacy.eval_replicates = self.cfg.replicates
            key = f"mem:{sc.site.name}"
            sims[key] = _with_state(SiteTrainer(sc, run_cfg.model), state)
            keys.append(Path(key))
        run_cfg.sites = keys
        return run_cfg, InProcessGrid(keys, resolver=InMemorySites(sims))

    # ------------------------------------------------------------------- jobs
    def run_job(self, job: Job) -> dict:
        t0 = time.perf_counter()
        if job.kind == "local":
            res = self._local(job)
        elif job.kind == "pooled":
            res = self._pooled(job)
        elif job.kind == "federated":
            res = self._federated(job)
        elif job.kind == "loso":
            res = self._loso(job)
        else:
            res = self._scale(job)
        res.update({"id": job.id, "config": job.config, "kind": job.kind, "seed": job.seed,
                    "seconds": round(time.perf_counter() - t0, 2)})
        return res

    def _federated(self, job: Job) -> dict:
        s = self._federate(job, [self.site_cfgs[n] for n in self.names])
        g = s["cross_site"]["matrix"]["global"]
        eps = [m.get("epsilon") for h in s["history"] for m in h["sites"].values() if m.get("epsilon") is not None]
        curve = [float(np.nanmean([m.get(P.VAL_AUROC, math.nan) if m.get(P.VAL_AUROC) is not None else math.nan
                                   for _, m in sorted(h["sites"].items())])) for h in s["history"]]  # sorted: a float mean depends on its order, replies arrive in any
        res = {"per_site": {site: _pick(g.get(site)) for site in self.names}, "epsilon": max(eps) if eps else None,
               "curve": curve, "declined": sum(len(h["declined"]) for h in s["history"]),
               "selected": (s.get("selected") or {}).get("chosen"),
               # what the update screening did each round (robustness rows count the attacker's)
               "screening": [{"rejected": dict(h.get("rejected", {})), "clipped": dict(h.get("clipped", {})),
                              "aggregated": list(h.get("aggregated", []))} for h in s["history"]]}
        if PERSONAL_ITEMS & set(job.recipe):
            # Each site's personalized model at home is this configuration's result; the global
            # model it was made from is kept next to it.
            mat = s["cross_site"]["matrix"]
            res["global_per_site"] = res["per_site"]
            res["per_site"] = {site: _pick(mat.get(P.personal_model_id(site), {}).get(site)) for site in self.names}
            res["personalized"] = True
        return res

    def _local(self, job: Job) -> dict:
        # The local-only models trained alongside a FedAvg run: same seed, same budget.
        s = self._federate(Job(id=job.id, kind="federated", seed=job.seed), [self.site_cfgs[n] for n in self.names],
                           local_baseline=True)
        mat = s["cross_site"]["matrix"]
        per_model = {home: {site: _pick(mat.get(P.local_model_id(home), {}).get(site), replicates=site == home)
                            for site in self.names} for home in self.names}
        # Learning curves of the local models: validation AUROC / loss of each site's local model
        # before each round's training (after r - 1 rounds), and after the last round (cross-site).
        epochs = [i * self.cfg.local_epochs for i in range(len(s["history"]) + 1)]
        auroc, loss = {}, {}
        for site in self.names:
            before = [h.get("local", {}).get(site, {}) for h in s["history"]]
            final = mat.get(P.local_model_id(site), {}).get(site) or {}
            auroc[site] = [m.get(P.VAL_AUROC) for m in before] + [final.get(P.VAL_AUROC)]
            loss[site] = [m.get(P.VAL_LOSS) for m in before] + [final.get(P.VAL_LOSS)]
        return {"per_model": per_model, "per_site": {site: per_model[site][site] for site in self.names},
                "learning_curve": {"epochs": epochs, P.VAL_AUROC: auroc, P.VAL_LOSS: loss}}

    def _pooled(self, job: Job) -> dict:
        from dicomfl.client.privacy import Ledger, PrivacySession
        from dicomfl.client.trainer import SiteTrainer
        from dicomfl.common.model import build_model, get_weights
        from dicomfl.common.splits import TRAIN, VAL
        from dicomfl.common.augment import AugmentSettings
        from dicomfl.common.train import SplitData, TrainSettings, evaluate, train_local

        trainers = {n: SiteTrainer(load_site_config(self.site_cfgs[n]), self.cfg.model) for n in self.names}
        features = self._standardization(trainers)
        pooled = SplitData.concat([t.view(TRAIN, features) for t in trainers.values()])
        first = load_site_config(self.site_cfgs[self.names[0]])
        epochs = self.cfg.rounds * self.cfg.local_epochs
        dp = None
        settings = TrainSettings(epochs=epochs, batch_size=first.train.batch_size, lr=self.cfg.lr or first.train.lr,
                                 seed=job.seed,
                                 augment=AugmentSettings.of(first.train.augment))
        if job.epsilon is not None:
            # The same mechanism a site runs (PrivacySession): a noisy label-count release for the
            # class weights, accounted, then DP-SGD with the noise that fits the rest of the budget.
            p = first.privacy.model_copy(update={"noise_multiplier": None})
            session = PrivacySession(Ledger(run=job.id, accountant=p.accountant, delta=1e-5, target_epsilon=job.epsilon,
                                            max_grad_norm=p.max_grad_norm), p)
            session.budget(n_train=len(pooled), batch_size=settings.batch_size, num_rounds=1, local_epochs=epochs,
                           local_steps=None)
            dp, settings.class_counts = session.settings(pooled.labels, self.cfg.model.n_classes)
            settings.class_weights = p.class_weights == "noisy"
        model = build_model(self.cfg.model, seed=job.seed)
        curve = {"epochs": [], P.VAL_AUROC: {n: [] for n in self.names}, P.VAL_LOSS: {n: [] for n in self.names}}

        def score(epoch: int, m) -> None:  # each site's validation split, as a site scores the global model
            curve["epochs"].append(epoch)
            for n, t in trainers.items():
                v = evaluate(m, t.view(VAL, features))
                curve[P.VAL_AUROC][n].append(v.get("auroc"))
                curve[P.VAL_LOSS][n].append(v.get("loss"))

        if dp is None:  # the learning curve of pooled training (non-private: the upper bound)
            score(0, model)
            settings.on_epoch = score
        res = train_local(model, pooled, settings, dp=dp, global_weights=get_weights(model))
        out = {"per_site": {n: _pick(t.evaluate(res.weights, features=features, replicates=self.cfg.replicates))
                            for n, t in trainers.items()},
               **({"learning_curve": curve} if curve["epochs"] else {})}
        if dp is not None:
            from dicomfl.client.privacy import epsilon

            out["epsilon"] = epsilon(res.history, 1e-5, p.accountant)
        return out

    def _loso(self, job: Job) -> dict:
        from dicomfl.client.trainer import SiteTrainer
        from dicomfl.server.checkpoint import Checkpoints

        rest = [self.site_cfgs[n] for n in self.names if n != job.holdout]
        s = self._federate(job, rest)
        g = Checkpoints(Path(s["out_dir"])).latest().global_weights
        st = s.get("feature_stats") or {}  # the federation's standardization, as its sites applied it
        features = FeatureTransform(mean=np.asarray(st["mean"], np.float32) if st.get("mean") else None,
                                    std=np.asarray(st["std"], np.float32) if st.get("std") else None,
                                    drop=tuple(self.cfg.model.drop_features))
        held = SiteTrainer(load_site_config(self.site_cfgs[job.holdout]), self.cfg.model).evaluate(
            g, features=features, replicates=self.cfg.replicates)
        inside = s["cross_site"]["matrix"]["global"]
        return {"holdout": job.holdout, "heldout": _pick(held),
                "per_site": {**{k: _pick(v) for k, v in inside.items()}, job.holdout: _pick(held)}}

    def _scale(self, job: Job) -> dict:
        """Many small simulated sites: the server side (sampling, checks, aggregation, checkpoints,
        cross-site matrix) with ``scale_sites`` sites, each a shard of the cohort's data."""
        from dicomfl.client.handler import InMemorySites
        from dicomfl.client.trainer import SiteTrainer
        from dicomfl.common.config import load_run_config
        from dicomfl.common.ingest import SiteData

        from dicomfl.server.federation import Federation
        from .inprocess import InProcessGrid

        n = self.cfg.scale_sites
        base = [load_site_config(self.site_cfgs[name]) for name in self.names]
        datas = [SiteTrainer(c, self.cfg.model).data() for c in base]
        keys, sims = [], {}
        for i in range(n):
            src, d = base[i % len(base)], datas[i % len(base)]
            idx = np.arange(len(d.labels))[(i // len(base))::max(1, math.ceil(n / len(base)))]
            shard = SiteData(images=d.images[idx], features=d.features[idx], labels=d.labels[idx], split=d.split[idx],
                             patients=[d.patients[j] for j in idx])
            sc = src.model_copy(deep=True)
            sc.train.lr = self.cfg.lr or sc.train.lr
            sc.site.name = f"sim-{i:03d}"
            sc.site.state_dir = self.out / "scale-state" / sc.site.name
            key = f"mem:{sc.site.name}"
            sims[key] = SiteTrainer(sc, self.cfg.model, data=shard)
            keys.append(Path(key))
        run_cfg = load_run_config(self._run_yaml(job, [self.site_cfgs[self.names[0]]], rounds=self.cfg.scale_rounds),
                                  check_files=False)
        run_cfg.sites = keys
        run_cfg.run.min_sites = max(2, n // 2)
        grid = InProcessGrid(keys, resolver=InMemorySites(sims))
        s = Federation(run_cfg, grid).run()
        g = s["cross_site"]["matrix"]["global"]
        vals = [v.get("auroc") for v in g.values() if v.get("auroc") is not None and math.isfinite(v["auroc"])]
        return {"sites": n, "rounds": s["rounds"], "aggregated_per_round": [len(h["aggregated"]) for h in s["history"]],
                "evaluated_sites": len(g), "mean_auroc": float(np.mean(vals)) if vals else None, "per_site": {}}

    # -------------------------------------------------------------------- main
    def run_jobs(self, jobs: list[Job]) -> list[dict]:
        """Each job's result, in order: read from its saved file when an earlier run finished it,
        else run and saved as it finishes (so an interrupted benchmark resumes)."""
        results = []
        for i, job in enumerate(jobs):
            path = self._result_path(job)
            self.on_progress(i, len(jobs), job.id)
            if path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            res = clean(self.run_job(job))
            write_json(path, res)
            results.append(res)
        return results

    def run(self, only: str | None = None) -> dict:
        jobs = plan(self.cfg, self.names)
        if only:
            jobs = [j for j in jobs if j.config == only or j.id == only]
            if not jobs:
                raise ConfigError(f"no configuration named {only!r} in this benchmark")
        results = self.run_jobs(jobs)
        self.on_progress(len(jobs), len(jobs), "done")
        from .benchreport import write_bench_report

        return write_bench_report(self.out, self.cfg, self.names, results)


def _pick(m: dict | None, replicates: bool = True) -> dict[str, Any]:
    """What a result keeps of one site's metrics: the scores, the test size, the AUROC's interval,
    the validation AUROC (model selection) and, with ``replicates``, the replicate AUROCs (rounded
    to 6 decimals) with their split id."""
    m = m or {}
    out = {"auroc": m.get("auroc"), P.BALANCED_ACCURACY: m.get(P.BALANCED_ACCURACY)}
    for k in ("n", P.AUROC_LO, P.AUROC_HI, P.VAL_AUROC):
        if k in m:
            out[k] = m[k]
    if replicates and m.get(P.AUROC_REPLICATES) is not None:
        out[P.AUROC_REPLICATES] = [round(float(v), 6) for v in m[P.AUROC_REPLICATES]]
        out[P.AUROC_REPLICATES_ID] = m.get(P.AUROC_REPLICATES_ID)
    return out


def _with_state(trainer, state: Path):
    """``trainer`` with its data loaded from the site's own ``state_dir`` (the ingest cache), then
    ``state_dir`` moved to ``state/<site>``: what the job writes (ledger, controls) stays there."""
    trainer.data()
    trainer.cfg = trainer.cfg.model_copy(deep=True)
    trainer.cfg.site.state_dir = state / trainer.cfg.site.name
    trainer.cfg.site.state_dir.mkdir(mode=0o700, exist_ok=True)
    return trainer


def _BenchSites(replicates: int, state: Path, lr: float | None = None, augment: bool = False):
    """The sites of a benchmark run, from their site.yaml, with ``privacy.eval_replicates`` set to
    ``replicates`` (``train.lr`` to ``lr`` when given, ``train.augment`` on with ``augment``): the benchmarker holds every site's data
    in this process (the pooled baseline trains on all of it), so the sites' consent to send
    replicate AUROCs is the benchmarker's; in a deployment it stays each site's (default: none)."""
    from dicomfl.client.handler import SiteResolver
    from dicomfl.common.config import AugmentSection

    class BenchSites(SiteResolver):
        def load(self, site_config: str, model_cfg):
            trainer = _with_state(super().load(site_config, model_cfg), state)
            trainer.cfg.privacy.eval_replicates = replicates
            if lr is not None:
                trainer.cfg.train.lr = lr
            if augment and trainer.cfg.train.augment is None:  # the recipe's item: the site's defaults
                trainer.cfg.train.augment = AugmentSection()
            return trainer

    return BenchSites()

