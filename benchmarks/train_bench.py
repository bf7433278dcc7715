"""Training-step throughput: non-private vs DP-SGD (Opacus modes), same model, batch and data.

Each configuration runs in its own subprocess (so peak memory is its own), first a warm-up, then
a timed run of ``--steps`` optimizer steps through :func:`dicomfl.common.train.train_local`, the
function the sites use. Prints a markdown table: images/s, ratio to non-private, peak RSS (and
peak CUDA memory when on a GPU).

    python benchmarks/train_bench.py [--image-size 128] [--width 32] [--batch 32] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODES = ["non-private", "dp:hooks", "dp:functorch", "dp:ghost"]


def child(args) -> None:
    import resource
    import time

    import numpy as np
    import torch

    from dicomfl.common.features import N_FEATURES
    from dicomfl.common.model import ModelConfig, build_model
    from dicomfl.common.train import SplitData, DPSettings, TrainSettings, device, train_local

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    data = SplitData(rng.normal(size=(n, args.image_size, args.image_size)).astype(np.float32),
                  rng.normal(size=(n, N_FEATURES)).astype(np.float32), rng.integers(0, 2, n).astype(np.int64))
    model = build_model(ModelConfig(mode=args.model_mode, image_size=args.image_size, width=args.width, depth=args.depth))
    dp = None
    if args.mode.startswith("dp:"):
        dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=args.mode[3:])
    settings = TrainSettings(epochs=1, max_steps=args.steps, batch_size=args.batch, seed=0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warm = TrainSettings(epochs=1, max_steps=2, batch_size=args.batch, seed=1)
    train_local(model, data, warm, dp=dp)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train_local(model, data, settings, dp=dp)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    seen = res.steps * args.batch  # expected batch size under Poisson sampling
    out = {"mode": args.mode, "images_per_s": seen / dt, "seconds": dt, "steps": res.steps,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mib": rss0 / 1024, "device": str(device())}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-mode", default="fused")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=str, default=None, help="Also write the rows to this JSON file.")
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("mode", "modes", "json") and v is not None]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            err = (r.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"mode": mode, "error": err[:200]})
            continue
        rows.append(json.loads(line[7:]))
    base = next((r["images_per_s"] for r in rows if r["mode"] == "non-private" and "images_per_s" in r), None)
    print(f"model {args.model_mode} {args.image_size}px width {args.width} depth {args.depth}, batch {args.batch}, "
          f"{args.steps} steps, {args.threads} threads, device {rows[0].get('device', '?')}\n")
    print("| mode | images/s | slowdown vs non-private | peak RSS MiB | peak CUDA MiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error']} | | | |")
            continue
        slow = f"{base / r['images_per_s']:.2f}x" if base else "n/a"
        cuda = f"{r['peak_cuda_mib']:.0f}" if "peak_cuda_mib" in r else "-"
        print(f"| {r['mode']} | {r['images_per_s']:.1f} | {slow} | {r['peak_rss_mib']:.0f} | {cuda} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
