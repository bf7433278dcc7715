"""Prediction throughput next to ingestion's, on the same files (a benchmark, not a test).

A generated two-site cohort (``dicomfl synth``, ``--per-site`` images per site at
``--image-size``) trains a small fused model for one FedAvg round in process; then, on site-a's
files, in one run:

* dicomfl cold ingestion (empty cache) with ``--workers`` workers: files/s;
* ``dicomfl predict`` on the site's folder (the same worker pool and per-file pipeline, plus the
  model, the threshold from the validation split and the CSV): images/s;
* the same with ``--input`` (a copy of the folder: no cache exists for it).

Intake throughput (storescu -> the site's SCP) is measured by ``benchmarks/intake_bench.py``.

Usage: python benchmarks/predict_bench.py [--per-site 600] [--image-size 64] [--workers 2] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomfl.client.predict import predict_files  # noqa: E402
from dicomfl.common.config import load_run_config, load_site_config  # noqa: E402
from dicomfl.common.ingest import ingest  # noqa: E402
from dicomfl.server.federation import Federation  # noqa: E402
from dicomfl.workbench.export import load_trained  # noqa: E402
from dicomfl.workbench.inprocess import InProcessGrid  # noqa: E402
from dicomfl.workbench.synth import synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-site", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="predict-bench-", dir=a.tmp))
    try:
        synth(tmp / "cohort", sites=2, per_site=a.per_site, seed=0, image_size=a.image_size)
        sites = [tmp / "cohort" / s / "site.yaml" for s in ("site-a", "site-b")]
        run = {"run": {"name": "bench", "rounds": 1, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                       "out_dir": str(tmp / "run")}, "cross_site": {"every": 0, "local_baseline": False},
               "model": {"mode": "fused", "image_size": a.image_size, "width": 8, "depth": 1},
               "sites": [str(s) for s in sites]}
        (tmp / "run.yaml").write_text(yaml.safe_dump(run))
        rc = load_run_config(tmp / "run.yaml")
        Federation(rc, InProcessGrid(rc.sites)).run()
        cfg = load_site_config(sites[0])
        shutil.rmtree(cfg.site.state_dir / "cache", ignore_errors=True)
        t0 = time.perf_counter()
        rep = ingest(cfg, workers=a.workers).report
        t_ingest = time.perf_counter() - t0
        trained = load_trained(tmp / "run" / "checkpoints" / "round-0001" / "global.npz")
        rows = [("dicomfl ingest, cold", rep.seen, t_ingest, "files")]
        for label, inp in (("dicomfl predict, site folder", None), ("dicomfl predict --input (copy)", tmp / "inbox")):
            if inp is not None:
                shutil.copytree(cfg.site.dicom_dir, inp)
            t0 = time.perf_counter()
            p = predict_files(trained.net, cfg, tmp / "p.csv", model_id=trained.model_id, model_sha256=trained.sha256,
                              input_dir=inp, workers=a.workers)
            rows.append((label, p.predicted, time.perf_counter() - t0, "images"))
        print(f"site-a: {rep.seen} files ({rep.accepted} accepted), {a.image_size} px, {a.workers} workers\n")
        print("| path | items | seconds | items/s |\n| --- | --- | --- | --- |")
        for label, n, t, unit in rows:
            print(f"| {label} | {n} {unit} | {t:.1f} | {n / t:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
