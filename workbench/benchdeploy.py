"""``dicomfl bench --deployment``: one configuration (FedAvg, first seed) through a real SuperLink
and SuperNodes on loopback (TLS + authentication), compared with the in-process result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .bench import Bench, Job
from dicomfl.server.checkpoint import Checkpoints
from .launcher import LocalFederation


def compare(bench: Bench, only: str | None = None, fed: LocalFederation | None = None) -> str:
    """Run one federated configuration (``only``, else FedAvg) on both paths, first seed. ``fed``:
    a running federation of the same sites to use (the tests share one); else one is started."""
    from .bench import plan

    cfg = bench.cfg
    seed = cfg.seeds[0]
    jobs = [j for j in plan(cfg, bench.names) if j.kind == "federated" and j.seed == seed
            and (j.config == only if only else j.config == "fedavg")]
    job = jobs[0] if jobs else Job(id=f"fedavg@seed{seed}", kind="federated", seed=seed)
    sites = [bench.site_cfgs[n] for n in bench.names]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each deployed site does (OMP_NUM_THREADS=1): same arithmetic
    try:
        inproc = bench._federate(job, sites)
    finally:
        torch.set_num_threads(threads)
    dep_job = Job(**{**job.__dict__, "id": f"deployment-{job.id}"})
    run_yaml = bench._run_yaml(dep_job, sites)
    if fed is not None:
        code = fed.run(run_yaml, echo=lambda s: None, timeout=900)
    else:
        with LocalFederation(cfg.out_dir / "deployment", sites) as fed:
            code = fed.run(run_yaml, echo=lambda s: None)
    if code != 0:
        return f"deployment spot check: the run did not finish (see {cfg.out_dir}/deployment/logs)"
    dep_out = cfg.out_dir / "runs" / Path(run_yaml).stem
    dep = json.loads((dep_out / "metrics.json").read_text())
    a = Checkpoints(Path(inproc["out_dir"])).latest().global_weights
    b = Checkpoints(dep_out).latest().global_weights
    rel = math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)) / max(
        math.sqrt(sum(float(np.sum(a[k] ** 2)) for k in a)), 1e-12)
    ga, gb = inproc["cross_site"]["matrix"]["global"], dep["cross_site"]["matrix"]["global"]
    diffs = [abs((ga[s]["auroc"] or 0) - (gb[s]["auroc"] or 0)) for s in bench.names if s in ga and s in gb]
    lines = ["", f"## Deployment spot check ({job.config}, seed {seed}): in-process vs real SuperLink + SuperNodes", "",
             "| site | AUROC in process | AUROC deployed |", "| --- | ---: | ---: |"]
    for s in bench.names:
        lines.append(f"| {s} | {ga.get(s, {}).get('auroc')} | {gb.get(s, {}).get('auroc')} |")
    lines += ["", f"Global weights: relative L2 difference {rel:.2e}; largest AUROC difference {max(diffs):.4f}.", ""]
    text = "\n".join(lines)
    with open(cfg.out_dir / "results.md", "a") as fh:
        fh.write(text)
    return text
