"""Real deployments on loopback: a SuperLink and site daemons (each a SuperNode and the site's warm
worker, with the dicomfl ClientApp forwarding to it) as separate processes, TLS and SuperNode
authentication on, real gRPC. Every process is started by the fixture and stopped by pid (process
group), with bounded waits; the workers and the SuperLink killed on purpose are children of those
daemons, found by the pids the daemons write.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomfl.server import runner
from dicomfl.server.checkpoint import Checkpoints, read_npz
from dicomfl.workbench.launcher import LocalFederation

from .faultapps import FAULTY_CLIENTAPP, fault_file
from .test_federation import MODEL, SITES

pytestmark = pytest.mark.slow

CLIENTAPP_LINE = re.compile(r"worker \(pid (\d+)\): (\w+)(?:\.\w+)? message from ClientApp pid (-?\d+) "
                            r"\(torch imported in the ClientApp: (\w+);")
DIRECT_LINE = re.compile(r"worker \(pid (\d+)\): (\w+)(?:\.\w+)? message taken from the SuperNode \((woken|asked)\)")
DIRECT = "site-a"  # its worker takes the SuperNode's tasks itself (message_path: direct, the default)
FORWARDED = ("site-b", "site-c")  # Flower starts a forwarding ClientApp per message (message_path: forwarder)


def write_run(tmp: Path, name: str, local_baseline: bool = False, **run) -> Path:
    cfg = {"run": {"name": name, "rounds": 2, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                   "round_timeout_s": 120, "out_dir": str(tmp / name), **run},
           "cross_site": {"every": 0, "local_baseline": local_baseline}, "model": MODEL}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def wait_for(pred, timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


ROOT = Path(__file__).resolve().parents[1]


def own_state(site_yaml: Path, state: Path) -> Path:
    """The cohort site's config with a state folder of its own (a copy of its cache, an empty
    privacy ledger): what other test modules spent of the shared cohort's budgets stays there."""
    from dicomfl.common.config import load_site_config

    cfg = load_site_config(site_yaml)
    raw = yaml.safe_load(site_yaml.read_text())
    raw["site"].update({"dicom_dir": str(cfg.site.dicom_dir), "secret_file": str(cfg.site.secret_file),
                        "state_dir": str(state)})
    if cfg.site.labels is not None:
        raw["site"]["labels"] = str(cfg.site.labels)
    if (cfg.site.state_dir / "cache").is_dir():
        shutil.copytree(cfg.site.state_dir / "cache", state / "cache")
    state.parent.mkdir(parents=True, exist_ok=True)
    out = state.parent / f"{state.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)  # a cohort not ingested yet has no cache to copy
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def fed(cohort, tmp_path_factory):
    """One federation for the module: a SuperLink and three site daemons. Every site and the
    submitting side have this repository on PYTHONPATH, so a run may name the test-side ClientApp
    (tests/faultapps.py); a site misbehaves only while its fault file says so."""
    work = tmp_path_factory.mktemp("federation")
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", pythonpath)  # `flwr run` checks that it can import the ClientApp it is given
        own = {s: own_state(cohort / s / "site.yaml", work / "state" / s) for s in SITES}
        f = LocalFederation(work, list(own.values()), extra_sites=["rogue"])
        for s in FORWARDED:  # the test-side ClientApp (faults) runs only where Flower starts a ClientApp
            f.sites[s] = f.site_yaml(own[s], s, message_path="forwarder")
        try:
            f.start(timeout=180)
            f.rogue_log = start_rogue(f)
            for s in SITES:
                f.wait_worker(s, 120)
            yield f
        finally:
            pids = [p.pid for p in f.procs.values()]
            f.close()
            # Stopped cleanly: nothing any daemon started (SuperLink, SuperNodes, SuperExec, workers, apps) is left.
            from dicomfl.common.supervise import session_pids

            deadline = time.monotonic() + 20
            while (left := [q for pid in pids for q in session_pids(pid)]) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not left, f"processes left running: {left}"


@contextmanager
def faults(fed: LocalFederation, by_site: dict[str, str]):
    """Switch on test-side faults (tests/faultapps.py) at the named sites for the ``with`` block."""
    files = [fault_file(fed.sites[site]) for site in by_site]
    try:
        for site, spec in by_site.items():
            fault_file(fed.sites[site]).write_text(spec + "\n")
        yield
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def _metrics(run_yaml: Path) -> dict:
    out = Path(yaml.safe_load(run_yaml.read_text())["run"]["out_dir"])
    return json.loads((out / "metrics.json").read_text())


class SiteLog:
    """A site's ``site.log`` from now on: the worker's lines about each message it got."""

    def __init__(self, fed: LocalFederation, site: str) -> None:
        self.path = fed.state_dir(site) / "logs" / "site.log"
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def text(self) -> str:
        with open(self.path, "rb") as fh:
            fh.seek(self.start)
            return fh.read().decode("utf-8", "replace")

    def messages(self) -> list[tuple[int, str, int, str]]:
        """(worker pid, message type, ClientApp pid, torch imported there) per forwarded message, in order."""
        return [(int(a), b, int(c), d) for a, b, c, d in CLIENTAPP_LINE.findall(self.text())]

    def taken(self) -> list[tuple[int, str]]:
        """(worker pid, message type) per message the worker took from the SuperNode itself, in order."""
        return [(int(a), b) for a, b, _ in DIRECT_LINE.findall(self.text())]

    def woken(self) -> list[bool]:
        """Per message the worker took from the SuperNode: whether its SuperNode had woken it for it."""
        return [c == "woken" for _, _, c in DIRECT_LINE.findall(self.text())]


def start_rogue(fed: LocalFederation) -> Path:
    """A daemon for "site-a" with a key the coordinator never registered; its SuperNode's log."""
    rogue_yaml = fed.site_yaml(fed.sites["site-a"], "site-a", key_of="rogue", warm_worker=False)
    raw = yaml.safe_load(rogue_yaml.read_text())
    raw["site"]["state_dir"] = str(fed.workdir / "rogue-state")
    rogue_yaml = rogue_yaml.with_name("rogue.yaml")
    rogue_yaml.write_text(yaml.safe_dump(raw))
    fed.start_site("rogue", rogue_yaml)
    return fed.workdir / "rogue-state" / "logs" / "supernode.log"


def test_a_supernode_without_a_registered_key_cannot_join(fed):
    """First in the module: the rogue daemon was started with the federation, so its refusal
    overlaps the workers' start-up; it is stopped here."""
    log = fed.rogue_log
    try:
        wait_for(lambda: log.exists() and "Failed to activate SuperNode" in log.read_text(), 90, "the rogue node's refusal")
        assert fed.online() == len(SITES)
    finally:
        fed.stop("site:rogue")




def test_rounds_through_the_warm_worker_equal_the_in_process_path(fed, tmp_path):
    """FedProx, 3 rounds, through real gRPC: one worker per site serves every message (same pid
    throughout), each message's ClientApp process is a fresh forwarder without torch, and the
    result is the in-process path's on the same seed."""
    workers = {s: fed.worker_pid(s) for s in SITES}
    logs = {s: SiteLog(fed, s) for s in SITES}
    run_yaml = write_run(tmp_path, "fedprox", strategy="fedprox", proximal_mu=0.1, rounds=3, local_baseline=True)
    lines: list[str] = []
    assert fed.run(run_yaml, echo=lines.append, timeout=600) == 0, "\n".join(lines[-20:])
    m = _metrics(run_yaml)
    assert m["rounds"] == 3 and m["sites"] == list(SITES)
    for h in m["history"]:
        assert sorted(h["aggregated"]) == list(SITES) and not h["missing"] and not h["errors"]
    cs = m["cross_site"]
    assert cs["models"] == ["global", "best"] + [f"local:{s}" for s in SITES]  # best: chosen by validation
    assert all(sorted(cs["matrix"][mdl]) == list(SITES) for mdl in cs["models"])
    out = tmp_path / "fedprox"
    assert (out / "report.md").is_file() and (out / "cross_site_final.png").is_file()
    assert any(line.startswith("round 3:") for line in lines)  # progress streamed to the terminal
    taken = logs[DIRECT].taken()  # no process per message: the worker took each task itself
    assert [t for _, t in taken] == ["query"] + ["train"] * 3 + ["evaluate"] and {w for w, _ in taken} == {workers[DIRECT]}
    assert not logs[DIRECT].messages() and fed.worker_pid(DIRECT) == workers[DIRECT]
    # Its SuperNode wakes it for its messages, so the worker no longer polls 10 times a second. (A
    # message its once-a-second backstop ask finds while the SuperNode is still pulling the
    # objects is "asked"; the wake-up that follows is read at the next wait, so the first one is
    # always logged.)
    assert "wakes the worker when a message has arrived" in (fed.state_dir(DIRECT) / "logs" / "supernode.log").read_text()
    assert "worker: woken by the SuperNode" in (fed.state_dir(DIRECT) / "logs" / "site.log").read_text(), logs[DIRECT].woken()
    for s in SITES:  # every SuperNode runs with its idle wait capped (federation.idle_poll_s)
        assert "idle wait capped at 0.25 s" in (fed.state_dir(s) / "logs" / "supernode.log").read_text()
    for s in FORWARDED:
        assert not logs[s].taken()
        got = logs[s].messages()
        assert [t for _, t, _, _ in got] == ["query"] + ["train"] * 3 + ["evaluate"], got  # query: feature statistics
        assert {w for w, _, _, _ in got} == {workers[s]} and fed.worker_pid(s) == workers[s]  # one warm worker
        assert {torch for _, _, _, torch in got} == {"False"}  # the per-message ClientApp never imported torch
        assert len({app for _, _, app, _ in got}) == len(got) and workers[s] not in {app for _, _, app, _ in got}
    for s in SITES:
        assert "allow-runtime-dependency-installation" not in " ".join(
            (fed.workdir / "logs" / f"site-{s}.log").read_text().split())
    # The same run in process (the benchmark's path), one torch thread as each deployed site has.
    import torch

    from dicomfl.common.config import load_run_config
    from dicomfl.server.federation import Federation
    from dicomfl.workbench.inprocess import InProcessGrid

    cfg = load_run_config(run_yaml, check_files=False)
    cfg.run.out_dir = tmp_path / "fedprox-inprocess"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = Federation(cfg, InProcessGrid([fed.sites[s] for s in SITES])).run()
    finally:
        torch.set_num_threads(threads)
    a = Checkpoints(out).latest().global_weights
    b = Checkpoints(cfg.run.out_dir).latest().global_weights
    rel = math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)) / math.sqrt(sum(float(np.sum(b[k] ** 2)) for k in b))
    assert rel < 1e-5, rel
    for s in SITES:
        assert cs["matrix"]["global"][s]["auroc"] == pytest.approx(local["cross_site"]["matrix"]["global"][s]["auroc"], abs=1e-6)
    g1 = read_npz(out / "checkpoints" / "round-0001" / "global.npz")
    assert any(not np.array_equal(g1[k], a[k]) for k in a)


def test_evaluate_only_an_existing_model(fed, tmp_path):
    run_yaml = write_run(tmp_path, "evalonly")
    model = tmp_path / "model.npz"
    from dicomfl.common.model import ModelConfig, build_model, get_weights
    from dicomfl.server.checkpoint import write_npz

    write_npz(model, get_weights(build_model(ModelConfig(**MODEL), seed=7)))
    lines: list[str] = []
    assert fed.run(run_yaml, evaluate_only=model, echo=lines.append, timeout=300) == 0, "\n".join(lines[-20:])
    payload = json.loads((tmp_path / "evalonly" / "evaluate-model.json").read_text())
    assert sorted(payload["matrix"]["model"]) == list(SITES)
    assert not (tmp_path / "evalonly" / "checkpoints").exists()  # nothing was trained


def test_bench_deployment_spot_check_agrees_with_the_in_process_path(fed, cohort, tmp_path):
    """`dicomfl bench --deployment`'s comparison (FedAvg, first seed), on this module's federation."""
    from dicomfl.workbench.bench import Bench, load_bench_config
    from dicomfl.workbench.benchdeploy import compare

    from .test_bench import _bench_yaml

    path = _bench_yaml(cohort, tmp_path, seeds=[0], strategies=["fedavg"], dp_epsilons=[None],
                       leave_one_site_out=False, ablation=False, scale_sites=0)
    text = compare(Bench(load_bench_config(path)), fed=fed)
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "Deployment spot check (fedavg, seed 0)" in md and text.strip() in md
    line = next(x for x in md.splitlines() if x.startswith("Global weights: relative L2 difference"))
    rel = float(line.split("difference ")[1].split(";")[0])
    auroc_diff = float(line.rsplit("difference ", 1)[1].rstrip("."))
    assert rel < 1e-3 and auroc_diff < 0.02, line


def test_untrusted_parties_through_a_real_deployment(fed, tmp_path):
    """#13's attacks through real gRPC with TLS and authenticated SuperNodes, in two runs.

    Run 1: site-b sends NaN weights (rejected, named); site-c claims to be site-a (kept under its
    authenticated name, the claim recorded as a mismatch, nothing taken from site-a); site-a trains
    under its own privacy budget (epsilon 2, about 1.8 per round here). Run 2, under a new run
    name: site-a finds its budget spent and declines; its ledger composes both runs."""
    from dicomfl.client.privacy import site_spend

    logs = {s: SiteLog(fed, s) for s in SITES}
    site_yaml = fed.sites["site-a"]
    original = site_yaml.read_text()
    raw = yaml.safe_load(original)
    raw["privacy"] = {**(raw.get("privacy") or {}), "dp": True, "run_epsilon": 2.0, "lifetime_epsilon": 2.0, "noise_multiplier": 2.0,
                      "delta": 1e-5, "max_grad_norm": 1.0,
                      "stats_noise_multiplier": 1000.0}  # the feature-statistics release costs almost nothing here
    raw.setdefault("train", {})["batch_size"] = 16
    state = fed.state_dir("site-a")
    before = site_spend(state, "rdp", 1e-5)["runs"]
    site_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))  # the worker reads it afresh for a new run
    try:
        run1, run2 = write_run(tmp_path, "untrusted-1", rounds=1), write_run(tmp_path, "untrusted-2", rounds=1)
        lines: list[str] = []
        with faults(fed, {"site-b": "nan-weights", "site-c": "claim:site-a"}):
            code = fed.run(run1, echo=lines.append, timeout=300, clientapp=FAULTY_CLIENTAPP)
        assert code == 0, "\n".join(lines[-20:])
        lines2: list[str] = []
        assert fed.run(run2, echo=lines2.append, timeout=300) == 0, "\n".join(lines2[-20:])
    finally:
        site_yaml.write_text(original)
    m = _metrics(run1)
    h = m["history"][0]
    # NaN weights: rejected with the site named; the global model stays finite.
    assert list(h["rejected"]) == ["site-b"] and sorted(h["aggregated"]) == ["site-a", "site-c"]
    assert any("rejected site-b" in line for line in lines)
    g = Checkpoints(tmp_path / "untrusted-1").latest().global_weights
    assert all(np.isfinite(v).all() for v in g.values())
    # A spoofed name: identity is the authenticated node, the claim is only recorded.
    ident = m["identity"]
    assert ident["authenticated"] and set(ident["mismatched_claims"].values()) == {"site-a"}
    assert m["sites"] == list(SITES) and not any("#" in s for s in m["sites"])
    assert sorted(m["cross_site"]["matrix"]["global"]) == list(SITES)
    for s in FORWARDED:  # the test's ClientApp (a mod around dicomfl's forwarder) is light too
        assert {torch for _, _, _, torch in logs[s].messages()} == {"False"}
    assert [t for _, t in logs[DIRECT].taken()] == ["query", "train", "evaluate"] * 2  # the FAB's app is not run there
    # The budget holds across runs.
    h2 = _metrics(run2)["history"][0]
    assert h2["declined"] == ["site-a"] and sorted(h2["aggregated"]) == ["site-b", "site-c"]
    spend = site_spend(state, "rdp", 1e-5)
    runs = {k: v for k, v in spend["runs"].items() if k not in before}
    assert runs["untrusted-1"]["rounds_trained"] == 1 and runs["untrusted-2"]["rounds_trained"] == 0
    assert runs["untrusted-2"]["rounds_declined"] == 1
    assert 0 < runs["untrusted-1"]["epsilon"] <= spend["epsilon_total"] <= 2.0 + 1e-9


def test_a_worker_killed_mid_round_is_named_restarted_and_rejoins(fed, tmp_path):
    """site-c's worker dies while its round-1 train message waits at it (tests/faultapps.py: the
    worker is stopped, handed the message, then SIGKILLed, so the timing does not depend on the
    machine's load): site-c is named in round 1 with an error code, its daemon starts a new
    worker, and site-c is aggregated again in round 2."""
    site_log = SiteLog(fed, "site-c")
    old = fed.worker_pid("site-c")
    run_yaml = write_run(tmp_path, "workerkill", rounds=2)
    lines: list[str] = []
    with faults(fed, {"site-c": "kill-worker:1"}):
        code = fed.run(run_yaml, echo=lines.append, timeout=400, clientapp=FAULTY_CLIENTAPP)
    assert code == 0, "\n".join(lines[-20:])
    new = fed.wait_worker("site-c", 60, other_than=old)
    h = _metrics(run_yaml)["history"]
    assert sorted(h[0]["aggregated"]) == ["site-a", "site-b"]
    assert h[0]["errors"]["site-c"].startswith("dicomfl:internal-error:ref="), h[0]
    ref = h[0]["errors"]["site-c"].rsplit("=", 1)[1]
    assert f"ref={ref}" in site_log.text()  # what happened is in the site's own log, not at the coordinator
    assert sorted(h[1]["aggregated"]) == list(SITES)  # rejoined
    got = site_log.messages()
    # the feature-statistics query before round 1 went to the old worker; round 2 and the evaluation to the new one
    assert [t for _, t, _, _ in got] == ["query", "train", "evaluate"] and got[0][0] == old
    assert {w for w, _, _, _ in got[1:]} == {new}
    assert new != old


def test_superlink_killed_mid_run_the_coordinator_resumes_it_by_itself(fed, tmp_path):
    run_yaml = write_run(tmp_path, "restart", rounds=2)
    out = tmp_path / "restart"
    proc = fed.run_async(run_yaml, log=tmp_path / "restart.log")
    try:
        # round 1 checkpointed: latest.json names it (the round's state.json is written just before it)
        wait_for(lambda: runner.checkpoint_round(out) >= 1, 300, "round 1")
        killed = fed.kill_superlink()  # the SuperLink and its ServerApp gone mid-run; the service stays
        done = runner.checkpoint_round(out)
        # Nobody types anything: the service restarts the SuperLink, the untouched site daemons
        # reconnect (TLS + authentication), the run resumes from its checkpoint and finishes, and
        # `dicomfl run` follows it to the end.
        assert proc.wait(timeout=400) == 0, (tmp_path / "restart.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert fed.superlink_pid() not in (None, killed)
    m = _metrics(run_yaml)
    assert m["rounds"] == 2 and [h["round"] for h in m["history"]] == [1, 2]
    assert m.get("resumed_after") == [done]
    assert f"**Interrupted and resumed** from its last checkpoint after round(s) {done} " in (out / "report.md").read_text()
    cfg = yaml.safe_load(fed.coordinator_yaml.read_text())
    records = [json.loads(p.read_text()) for p in (Path(cfg["coordinator"]["state_dir"]) / "runs").glob("*.json")]
    rec = next(r for r in records if r["out_dir"] == str(out.resolve()))
    assert rec["status"] == "finished" and [r["after_round"] for r in rec["resumes"]] == [done]
    text = (tmp_path / "restart.log").read_text()
    assert "resumes the run" in text and f"resuming after round {done}" in text
    assert "the SuperLink restarted; resuming" in (fed.workdir / "logs" / "coordinator.log").read_text()
    fed.wait_online(len(SITES), 120)


def test_a_site_killed_during_a_run_is_left_out_and_named(fed, tmp_path):
    """Last in the module: site-c stays down afterwards."""
    run_yaml = write_run(tmp_path, "killed", rounds=2, round_timeout_s=15)  # short: site-c will not answer
    out = tmp_path / "killed"
    proc = fed.run_async(run_yaml, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: (out / "checkpoints" / "round-0001" / "state.json").exists(), 300, "round 1")
        fed.kill_site("site-c")
        assert proc.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    m = _metrics(run_yaml)
    assert m["rounds"] == 2
    h2 = m["history"][1]
    assert "site-c" in h2["missing"] and sorted(h2["aggregated"]) == ["site-a", "site-b"]
    assert "site-c" in (out / "report.md").read_text().split("Sites missing from at least one round:")[1]
