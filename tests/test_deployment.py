"""Real deployments on loopback: a SuperLink and site daemons (SuperNodes with the dicomfl
ClientApp) as separate processes, TLS and SuperNode authentication on, real gRPC. Every process is
started by the fixture and stopped by pid (process group), with bounded waits.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomfl.server.checkpoint import Checkpoints, read_npz
from dicomfl.workbench.launcher import LocalFederation

from .faultapps import FAULT_ENV, FAULTY_CLIENTAPP
from .test_federation import MODEL, SITES

pytestmark = pytest.mark.slow


def write_run(tmp: Path, name: str, **run) -> Path:
    cfg = {"run": {"name": name, "rounds": 2, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                   "round_timeout_s": 120, "out_dir": str(tmp / name), **run},
           "cross_site": {"every": 0, "local_baseline": True}, "model": MODEL}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def fed(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    f = LocalFederation(work, [cohort / s / "site.yaml" for s in SITES], extra_sites=["rogue"])
    try:
        f.start(timeout=180)
        yield f
    finally:
        pids = [p.pid for p in f.procs.values()]
        f.close()
        # Stopped cleanly: nothing any daemon started (SuperLink, SuperNodes, SuperExec, apps) is left.
        from dicomfl.common.supervise import session_pids

        deadline = time.monotonic() + 20
        while (left := [q for pid in pids for q in session_pids(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left running: {left}"


def _metrics(run_yaml: Path) -> dict:
    out = Path(yaml.safe_load(run_yaml.read_text())["run"]["out_dir"])
    return json.loads((out / "metrics.json").read_text())


def test_fedavg_then_fedprox_over_tls_with_authenticated_sites(fed, tmp_path):
    lines: list[str] = []
    for strategy in ("fedavg", "fedprox"):
        run_yaml = write_run(tmp_path, strategy, strategy=strategy, proximal_mu=0.1)
        assert fed.run(run_yaml, echo=lines.append, timeout=600) == 0, "\n".join(lines[-20:])
        m = _metrics(run_yaml)
        assert m["rounds"] == 2 and m["sites"] == list(SITES)
        for h in m["history"]:
            assert sorted(h["aggregated"]) == list(SITES) and not h["missing"]
            assert all(s["train-loss"] is not None for s in h["sites"].values())
        cs = m["cross_site"]
        assert cs["models"] == ["global"] + [f"local:{s}" for s in SITES]
        assert all(sorted(cs["matrix"][mdl]) == list(SITES) for mdl in cs["models"])
        out = Path(yaml.safe_load(run_yaml.read_text())["run"]["out_dir"])
        g1 = read_npz(out / "checkpoints" / "round-0001" / "global.npz")
        g2 = read_npz(out / "checkpoints" / "round-0002" / "global.npz")
        assert any(not np.array_equal(g1[k], g2[k]) for k in g1)
        assert (out / "report.md").is_file() and (out / "cross_site_final.png").is_file()
    assert any(line.startswith("round 2:") for line in lines)  # progress streamed to the terminal
    # Each site's log is its own and the SuperNode's runtime dependency installation stayed off.
    for s in SITES:
        assert "allow-runtime-dependency-installation" not in " ".join(
            (fed.workdir / "logs" / f"site-{s}.log").read_text().split())


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


def test_a_supernode_without_a_registered_key_cannot_join(fed):
    rogue_yaml = fed.site_yaml(fed.sites["site-a"], "site-a", key_of="rogue")
    raw = yaml.safe_load(rogue_yaml.read_text())
    raw["site"]["state_dir"] = str(fed.workdir / "rogue-state")
    rogue_yaml = rogue_yaml.with_name("rogue.yaml")
    rogue_yaml.write_text(yaml.safe_dump(raw))
    fed.start_site("rogue", rogue_yaml)
    log = fed.workdir / "rogue-state" / "logs" / "supernode.log"
    try:
        wait_for(lambda: log.exists() and "Failed to activate SuperNode" in log.read_text(), 90, "the rogue node's refusal")
        assert fed.online() == len(SITES)
    finally:
        fed.stop("site:rogue")


def test_a_site_killed_during_a_run_is_left_out_and_named(fed, tmp_path):
    run_yaml = write_run(tmp_path, "killed", rounds=2, round_timeout_s=45)
    out = tmp_path / "killed"
    proc = fed.run_async(run_yaml, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: (out / "checkpoints" / "round-0001" / "state.json").exists(), 300, "round 1")
        fed.kill_site("site-c")
        assert proc.wait(timeout=400) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    m = _metrics(run_yaml)
    assert m["rounds"] == 2
    h2 = m["history"][1]
    assert "site-c" in h2["missing"] and sorted(h2["aggregated"]) == ["site-a", "site-b"]
    assert "site-c" in (out / "report.md").read_text().split("Sites missing from at least one round:")[1]
    fed.start_site("site-c")
    fed.wait_online(len(SITES), 180)


def test_coordinator_restart_sites_reconnect_and_run_resumes(fed, tmp_path):
    run_yaml = write_run(tmp_path, "restart", rounds=3)
    out = tmp_path / "restart"
    proc = fed.run_async(run_yaml, log=tmp_path / "restart.log")
    try:
        wait_for(lambda: (out / "checkpoints" / "round-0001" / "state.json").exists(), 300, "round 1")
        fed.stop_coordinator(hard=True)  # SuperLink and ServerApp gone mid-run
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = Checkpoints(out).latest().round
    assert done < 3
    fed.start_coordinator()
    # The site daemons were not touched: they reconnect by themselves (TLS + authentication).
    fed.wait_online(len(SITES), 180)
    lines: list[str] = []
    assert fed.run(run_yaml, resume=True, echo=lines.append, timeout=600) == 0, "\n".join(lines[-20:])
    m = _metrics(run_yaml)
    assert [h["round"] for h in m["history"]] == [1, 2, 3]
    assert any(line.startswith("resuming after round") for line in lines)


def test_a_site_sending_nan_weights_is_rejected(fed, tmp_path):
    fed.stop("site:site-b")
    # site-b runs a test-side ClientApp (tests/faultapps.py) that sends NaN weights.
    fed.start_site("site-b", env_extra={"PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                        FAULT_ENV: "nan-weights"})
    try:
        time.sleep(2)
        fed.wait_online(len(SITES), 180)
        run_yaml = write_run(tmp_path, "nan", rounds=1)
        lines: list[str] = []
        assert fed.run(run_yaml, echo=lines.append, timeout=600, clientapp=FAULTY_CLIENTAPP) == 0, "\n".join(lines[-20:])
        m = _metrics(run_yaml)
        h = m["history"][0]
        assert "NaN" in h["rejected"]["site-b"] and sorted(h["aggregated"]) == ["site-a", "site-c"]
        g = Checkpoints(tmp_path / "nan").latest().global_weights
        assert all(np.isfinite(v).all() for v in g.values())
        assert any("rejected site-b" in line for line in lines)
    finally:
        fed.stop("site:site-b", signal.SIGTERM)
        fed.start_site("site-b")
