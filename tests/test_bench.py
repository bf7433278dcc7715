"""``dicomfl bench`` end to end on a tiny grid: every kind of configuration, the tables, the plots,
resuming from partial results. The in-process vs deployed spot check (``--deployment``) runs on
the shared federation of tests/test_deployment.py."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from dicomfl.workbench.bench import Bench, load_bench_config

from .test_federation import MODEL, SITES


def _bench_yaml(cohort, tmp_path, **over):
    cfg = {"sites": [str(cohort / s / "site.yaml") for s in SITES], "strategies": ["local", "pooled", "fedavg", "fedprox", "fedadam"],
           "proximal_mu": [0.1], "dp_epsilons": [None, 8.0], "seeds": [0], "rounds": 1, "model": MODEL,
           "scale_sites": 12, "scale_rounds": 1, "out_dir": str(tmp_path / "bench"), **over}
    p = tmp_path / "bench.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_bench_grid_tables_plots_and_resume(cohort, tmp_path):
    path = _bench_yaml(cohort, tmp_path)
    cfg = load_bench_config(path)
    seen = []
    payload = Bench(cfg, on_progress=lambda i, n, what: seen.append(what)).run()
    rows = payload["configs"]
    expected = {"local", "pooled", "fedavg", "fedprox(mu=0.1)", "fedadam", "fedavg+dp(eps=8)", "fedavg[image-only]",
                "fedavg[metadata-only]", "loso(-site-a)", "loso(-site-b)", "loso(-site-c)", "scale(12 sites)"}
    assert set(rows) == expected
    for c, r in rows.items():
        if r["kind"] == "scale":
            assert r["sites"] == 12 and r["aggregated_per_round"] == [12] and r["evaluated_sites"] == 12
            continue
        assert r["seeds"] == 1
        assert set(r["auroc"]) == set(SITES)
    local = rows["local"]
    assert local["in_site"][0] is not None and local["gap"][0] == pytest.approx(local["in_site"][0] - local["out_site"][0], abs=1e-9)
    assert 0 < rows["fedavg+dp(eps=8)"]["epsilon"] <= 8.0 * 1.0001
    assert rows["loso(-site-b)"]["holdout"] == "site-b"
    out = cfg.out_dir
    for f in ("results.md", "results.json", "bench_heatmap.png", "bench_curves.png", "bench_privacy.png", "bench_loso.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| fedavg+dp(eps=8) |" in md and "Leave one site out" in md and "12 simulated sites" in md
    # The headline table: paired comparisons over the same sites, test images and seed, from the
    # replicate AUROCs every site sent (bench default: 1000 per model).
    assert "## Headline comparisons" in md
    assert "| comparison (A vs B) | mean difference in AUROC | 95% interval | sites x seeds | verdict |" in md
    head = {h["comparison"]: h for h in payload["headline"]}
    for want in ("fedavg vs local (each site's own model, at home)", "fedavg vs pooled", "pooled vs local at home",
                 "fused (pixels + metadata) vs image-only, fedavg", "DP-SGD (eps=8) vs no DP, fedavg"):
        h = head[want]
        assert h["sites"] == 3 and h["seeds"] == 1 and h["replicates"] == 1000 and h["unpaired_dropped"] == 0
        assert h["lo"] <= h["hi"] and h["verdict"] in ("better", "worse", "not separable")
        # ... and the same comparison at each site alone; with one seed the mean over sites is the row's.
        assert set(h["per_site"]) == set(SITES)
        assert h["diff"] == pytest.approx(sum(c["diff"] for c in h["per_site"].values()) / len(SITES), abs=1e-9)
        assert f"| {want} | {h['diff']:+.3f} | [{h['lo']:+.3f}, {h['hi']:+.3f}] | 3 x 1 | {h['verdict']} |" in md
    # the point estimate is the mean over sites of the paired AUROC differences on the whole test splits
    fedavg = json.loads((out / "results" / "fedavg@seed0.json").read_text())["per_site"]
    pooled = json.loads((out / "results" / "pooled@seed0.json").read_text())["per_site"]
    assert head["fedavg vs pooled"]["diff"] == pytest.approx(
        sum(fedavg[s]["auroc"] - pooled[s]["auroc"] for s in SITES) / 3)
    assert len({fedavg[s]["auroc-boot-id"] for s in SITES}) == 3  # one test split per site
    assert all(fedavg[s]["auroc-boot-id"] == pooled[s]["auroc-boot-id"] for s in SITES)
    # Learning curves of pooled and local training: CSV and plot, validation AUROC and loss per epoch
    assert "## Learning curves (pooled and local training)" in md
    rows = list(csv.DictReader((out / "bench_learning_curves.csv").open()))
    for training in ("pooled", "local"):
        mine = [r for r in rows if r["training"] == training and r["seed"] == "0" and r["site"] == "mean"]
        assert [r["epoch"] for r in mine] == ["0", "1"] and all(0 <= float(r["val_auroc"]) <= 1 for r in mine)
        assert all(float(r["val_loss"]) > 0 for r in mine)
    assert (out / "bench_learning_curves.png").stat().st_size > 0
    # Resume: a second run finds every result on disk and recomputes nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    Bench(cfg).run()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == stamps
    # Same seed, same numbers (the grid is deterministic); two seeds are summarised together.
    again = Bench(load_bench_config(_bench_yaml(cohort, tmp_path, out_dir=str(tmp_path / "bench2"), seeds=[0, 1],
                                                strategies=["fedavg"], dp_epsilons=[None], leave_one_site_out=False,
                                                ablation=False, scale_sites=0))).run()
    first = json.loads((out / "results" / "fedavg@seed0.json").read_text())
    second = json.loads((tmp_path / "bench2" / "results" / "fedavg@seed0.json").read_text())
    assert first["per_site"] == second["per_site"]
    two = again["configs"]["fedavg"]
    assert two["seeds"] == 2 and set(two["auroc"]) == set(SITES)


def test_bench_runs_scaffold_when_listed_and_not_by_default(cohort, tmp_path):
    from dicomfl.workbench.bench import BenchConfig

    assert "scaffold" not in BenchConfig(sites=[]).strategies  # the default grid is unchanged
    cfg = load_bench_config(_bench_yaml(cohort, tmp_path, strategies=["scaffold"], dp_epsilons=[None],
                                        leave_one_site_out=False, ablation=False, scale_sites=0, local_epochs=1))
    rows = Bench(cfg).run()["configs"]
    assert set(rows) == {"scaffold"} and set(rows["scaffold"]["auroc"]) == set(SITES)
    run = json.loads((cfg.out_dir / "runs" / "bench-scaffold-seed0" / "metrics.json").read_text())
    assert run["strategy"] == "scaffold" and run["history"][0]["aggregated"] == sorted(SITES)
    # SCAFFOLD's sites trained with SGD at scaffold_lr; the server step is 1 (the run config has no server_lr)
    raw = yaml.safe_load((cfg.out_dir / "runs" / "bench-scaffold-seed0.yaml").read_text())
    assert "server_lr" not in raw["run"]


def test_every_dp_configuration_and_seed_gets_its_own_budget_and_the_sites_ledgers_are_untouched(cohort, tmp_path):
    """Each benchmark configuration and seed is its own experiment: its sites' state (privacy
    ledger, SCAFFOLD controls, personalized models) lives under the benchmark's output, so no DP run
    finds a budget spent by the one before, and nothing the benchmark does writes a site's ledger."""
    from dicomfl.client.privacy import read_site_ledger

    ledgers = {s: cohort / s / "state" / "privacy" / "ledger.json" for s in SITES}
    before = {s: p.read_bytes() if p.exists() else None for s, p in ledgers.items()}
    cfg = load_bench_config(_bench_yaml(cohort, tmp_path, strategies=["fedavg"], dp_epsilons=[8.0, 1.0], seeds=[0, 1],
                                        leave_one_site_out=False, ablation=False, scale_sites=0, replicates=0))
    Bench(cfg).run()
    for eps in (8.0, 1.0):
        for seed in (0, 1):
            job = f"fedavg+dp(eps={eps:g})@seed{seed}"
            r = json.loads((cfg.out_dir / "results" / f"{job}.json").read_text())
            assert r["declined"] == 0 and 0.5 * eps < r["epsilon"] <= eps * 1.0001, (eps, seed, r["epsilon"])
            state = cfg.out_dir / "state" / "".join(c if c.isalnum() or c in "-_." else "-" for c in job)
            for site in SITES:  # the job's own ledger holds exactly its own run
                assert list(read_site_ledger(state / site)["runs"]) == [f"bench-fedavg-dp-eps-{eps:g}--seed{seed}"]
    assert {s: p.read_bytes() if p.exists() else None for s, p in ledgers.items()} == before


def test_recipe_runs_turn_each_item_on_and_are_compared_with_fedavg(cohort, tmp_path):
    """``recipes:`` adds one FedAvg run per recipe with its items on; the headline compares each with
    plain FedAvg on the same test images, and personalized recipes also with the local models."""
    from dicomfl.common import protocol as P

    cfg = load_bench_config(_bench_yaml(cohort, tmp_path, strategies=["local", "fedavg"], dp_epsilons=[None],
                                        recipes=["augment", "cosine+steps", "personalize", "local-norm"],
                                        recipe_local_steps=3, recipe_personalize_steps=2, rounds=1, leave_one_site_out=False,
                                        ablation=False, scale_sites=0, replicates=50))
    payload = Bench(cfg).run()
    assert set(payload["configs"]) == {"local", "fedavg", "fedavg+augment", "fedavg+cosine+steps",
                                       "fedavg+personalize", "fedavg+local-norm"}
    runs = cfg.out_dir / "runs"

    def run_section(job):
        return yaml.safe_load((runs / f"bench-{job}-seed0.yaml").read_text())["run"]

    assert run_section("fedavg-cosine-steps")["lr_schedule"] == "cosine"
    assert run_section("fedavg-cosine-steps")["local_steps"] == 3
    assert run_section("fedavg-personalize")["personalize"] == {"steps": 2}
    assert run_section("fedavg-local-norm")["local_norm"] is True
    assert "lr_schedule" not in run_section("fedavg") and "personalize" not in run_section("fedavg")
    # Steps instead of epochs: every site made exactly 3 optimizer steps a round.
    hist = json.loads((runs / "bench-fedavg-cosine-steps-seed0" / "metrics.json").read_text())["history"]
    assert {m.get("steps") for h in hist for m in h["sites"].values()} == {3}
    # Augmentation on (at the sites, in training) makes another model than plain FedAvg with the
    # same seed (training is seeded and deterministic on CPU).
    from dicomfl.server.checkpoint import read_npz

    plain, aug = (read_npz(runs / f"bench-{j}-seed0" / "checkpoints" / "round-0001" / "global.npz")
                  for j in ("fedavg", "fedavg-augment"))
    assert any(not np.array_equal(plain[k], aug[k]) for k in plain)
    results = {p.stem: json.loads(p.read_text()) for p in (cfg.out_dir / "results").glob("*.json")}
    # The personalized recipes' result is each site's personalized model at home, next to the global one.
    for c in ("fedavg+personalize", "fedavg+local-norm"):
        r = results[f"{c}@seed0"]
        assert r["personalized"] is True and set(r["per_site"]) == set(SITES) == set(r["global_per_site"])
        for site in SITES:
            assert r["per_site"][site]["auroc"] is not None and len(r["per_site"][site][P.AUROC_REPLICATES]) == 50
    assert "personalized" not in results["fedavg+cosine+steps@seed0"]
    head = {h["comparison"]: h for h in payload["headline"]}
    for want in ("recipe fedavg+augment (global) vs fedavg", "recipe fedavg+cosine+steps (global) vs fedavg",
                 "recipe fedavg+personalize (personalized at home) vs fedavg",
                 "recipe fedavg+personalize (personalized at home) vs local at home",
                 "recipe fedavg+local-norm (personalized at home) vs local at home"):
        assert head[want]["sites"] == 3 and head[want]["replicates"] == 50, want
    # A personalized recipe is never "the best federated strategy" (that is one global model).
    from dicomfl.workbench.headline import best_federated

    assert best_federated(list(results.values())) in {"fedavg", "fedavg+augment", "fedavg+cosine+steps"}
    assert best_federated([r for r in results.values() if r.get("personalized")]) is None


def test_a_recipe_names_only_known_items(cohort, tmp_path):
    from dicomfl.common.config import ConfigError

    for bad in (["augment+flip"], ["cosine+cosine"], [""]):
        with pytest.raises(ConfigError, match="recipes.0"):
            load_bench_config(_bench_yaml(cohort, tmp_path, recipes=bad))


def test_fedavgm_runs_with_server_momentum_at_fedavgs_effective_step(cohort, tmp_path):
    """FedAvgM gets momentum beta and server learning rate 1 - beta (not the server optimizers'
    0.01, which would leave the global model where it started)."""
    from dicomfl.common.config import load_run_config
    from dicomfl.server.federation import strategy_for
    from dicomfl.workbench.bench import Job

    cfg = load_bench_config(_bench_yaml(cohort, tmp_path, strategies=["fedavgm"], dp_epsilons=[None]))
    b = Bench(cfg)
    run = load_run_config(b._run_yaml(Job(id="fedavgm@seed0", kind="federated", seed=0, strategy="fedavgm"),
                                      [b.site_cfgs[n] for n in b.names]))
    assert run.run.server_lr == pytest.approx(0.1) and run.run.strategy_params == {"server_momentum": 0.9}
    strategy = strategy_for(run)
    assert strategy.server_learning_rate == pytest.approx(0.1) and strategy.server_momentum == pytest.approx(0.9)
