"""Ingestion at hospital scale: throughput, warm re-ingest, and peak memory against N (a benchmark,
not a test).

On generated uncompressed 12-bit chest-like images (``--rows`` x ``--rows`` source pixels,
ingested at ``--image-size``; uncompressed so that decoding does not hide our own overhead), in
one run and on the same files:

* files/s of plain ``pydicom.dcmread`` + ``pixel_array`` + ``apply_modality_lut`` (one process);
* dicomfl cold ingestion (empty state dir) with 1 worker and with 2 workers, and the warm
  re-ingest of the same files;
* at each N of ``--sizes``: peak RSS of a cold ingestion (the parent, and the largest worker),
  the warm re-ingest time, and peak RSS and time of one training epoch read from the cache;
* optionally (``--big N``) one N-file ingestion with its time and peak RSS;
* optionally (``--baseline DIR``) the same cold and warm ingestions with another version of
  dicomfl (``DIR`` goes first on ``PYTHONPATH`` of those runs: a folder holding a ``dicomfl``
  package, e.g. a shim whose ``dicomfl/common`` links to another checkout; ``installed`` runs
  the environment's own ``dicomfl``), interleaved with this version's runs on the same files,
  so that before and after are measured side by side, under the same load.

Each measurement runs in its own process (``child`` sub-command), so each peak RSS is its own;
the parent's peak is ``RUSAGE_SELF``, the workers' is ``RUSAGE_CHILDREN`` (the largest one).

Usage:
    python benchmarks/ingest_bench.py [--sizes 1000,5000,20000] [--speed-n 5000] [--rows 512]
        [--image-size 256] [--workdir DIR] [--rss-workers W] [--train-device cpu|cuda]
        [--big 100000 --big-rows 256 --big-image-size 128] [--json OUT.json]
        [--baseline DIR|installed] [--no-train]

Disk: N x rows^2 x 2 bytes of sources plus N x image_size^2 x 4 bytes of cache per ingested set
(20k at 512 -> 256: about 10 GB + 5 GB). Check ``df`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Module-level imports stay light: spawned ingestion workers import this script's module again.


def _rss() -> dict:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"self_rss_mb": me.ru_maxrss / 1024, "children_rss_mb": kids.ru_maxrss / 1024,
            "self_cpu_s": me.ru_utime + me.ru_stime, "children_cpu_s": kids.ru_utime + kids.ru_stime}


def _cpu() -> float:
    """CPU seconds of this process and its finished children so far (a load-independent cost:
    on a shared machine, files/s measures the other users too)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------------------------ child processes


def child_plain(args) -> dict:
    import warnings

    import pydicom
    from pydicom.pixels import apply_modality_lut

    warnings.simplefilter("ignore")
    files = Path(args.target).read_text().splitlines()
    c0 = _cpu()
    t0 = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        apply_modality_lut(ds.pixel_array, ds)
    dt = time.perf_counter() - t0
    return {"files": len(files), "seconds": dt, "files_per_s": len(files) / dt,
            "cpu_ms_per_file": (_cpu() - c0) / len(files) * 1e3, **_rss()}


def child_ingest(args) -> dict:
    import dicomfl.common as common_package
    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest

    cfg = load_site_config(args.target)
    c0 = _cpu()
    t0 = time.perf_counter()
    res = ingest(cfg, use_cache=not args.no_cache, workers=args.workers)
    dt = time.perf_counter() - t0
    cpu = _cpu() - c0  # the parent's and its workers' (with their start-up)
    r = res.report
    return {"files": r.seen, "accepted": r.accepted, "decoded": r.decoded, "cache_hits": r.cache_hits,
            "workers": r.workers, "rows_written": r.cache_rows_written, "publish_s": r.publish_s, "seconds": dt,
            "files_per_s": r.seen / dt, "cpu_ms_per_file": cpu / max(1, r.seen) * 1e3, "code": str(Path(common_package.__file__).resolve().parents[1]),
            **_rss()}


def child_train(args) -> dict:
    import torch

    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest
    from dicomfl.common.model import ModelConfig, build_model
    from dicomfl.common.splits import TRAIN
    from dicomfl.common.train import TrainSettings, load_split, train_local

    cfg = load_site_config(args.target)
    res = ingest(cfg)  # warm: from the cache
    mc = ModelConfig(image_size=cfg.preprocess.image_size, width=args.width, depth=args.depth)
    train = load_split(res.data, TRAIN, mc.image_size)
    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    r = train_local(build_model(mc), train, TrainSettings(epochs=1, batch_size=args.batch), dev=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"images": len(train), "steps": r.steps, "seconds": dt, "images_per_s": len(train) / dt,
           "device": str(dev), "threads": torch.get_num_threads(), **_rss()}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["plain", "ingest", "train"])
    ap.add_argument("target")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    fn = {"plain": child_plain, "ingest": child_ingest, "train": child_train}[args.what]
    print("RESULT " + json.dumps(fn(args)), flush=True)


def run_child(*args: str, pythonpath: str | None = None) -> dict:
    """One measurement in its own process; ``pythonpath``: the baseline's (see ``--baseline``)."""
    env = None
    if pythonpath is not None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if pythonpath != "installed":
            env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", *args], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    if r.returncode != 0 or "RESULT " not in r.stdout:
        raise RuntimeError(f"child {args} failed ({r.returncode}): {r.stderr[-3000:]}")
    out = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    out["process_seconds"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------ cohort


def _gen(job: tuple[str, int, int, int, int]) -> None:
    from tests.crashers import PATIENT_FOLDER, plain_writer

    root, start, stop, rows, per_folder = job
    write = plain_writer(rows, rows)
    for i in range(start, stop):
        p = Path(root) / PATIENT_FOLDER / f"{i // per_folder:04d}" / f"IM{i:07d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            write(p, i)


def generate(root: Path, n: int, rows: int, per_folder: int = 500) -> list[str]:
    """``n`` files under ``root`` (kept between runs), generated by one process per core."""
    from concurrent.futures import ProcessPoolExecutor

    from tests.crashers import PATIENT_FOLDER

    step = 250
    jobs = [(str(root), a, min(a + step, n), rows, per_folder) for a in range(0, n, step)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        list(ex.map(_gen, jobs))
    return [f"{PATIENT_FOLDER}/{i // per_folder:04d}/IM{i:07d}" for i in range(n)]


def site_for(work: Path, name: str, src: Path, rels: list[str], image_size: int) -> Path:
    """A site over the first files of ``src`` (hard links: no extra disk), with a labels CSV."""
    from tests.conftest import write_site

    d = work / name
    if d.exists():
        shutil.rmtree(d)
    dicom = d / "dicom"
    for rel in rels:
        (dicom / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, dicom / rel)
    labels = d / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{rel},{i % 2}\n" for i, rel in enumerate(rels)))
    return write_site(d, dicom, site={"labels": str(labels)}, preprocess={"image_size": image_size})


def fresh_state(site: Path) -> None:
    shutil.rmtree(site.parent / "state", ignore_errors=True)


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--speed-n", type=int, default=5000, help="files for the throughput rows")
    ap.add_argument("--rows", type=int, default=512, help="source image rows = columns")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--rss-workers", type=int, default=None, help="workers of the per-N runs (default: all CPUs)")
    ap.add_argument("--train-device", default="cpu")
    ap.add_argument("--train-width", type=int, default=16)
    ap.add_argument("--train-depth", type=int, default=3)
    ap.add_argument("--gpu-epoch", action="store_true",
                    help="also one epoch on CUDA at the largest N (pinned batches, non-blocking copies)")
    ap.add_argument("--big", type=int, default=0, help="also ingest this many files once (generated)")
    ap.add_argument("--big-rows", type=int, default=256)
    ap.add_argument("--big-image-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--baseline", default=None,
                    help="also run every ingestion with this PYTHONPATH (a folder holding another dicomfl, or "
                         "'installed'), interleaved with this version's runs")
    ap.add_argument("--no-train", action="store_true", help="skip the training epochs of the per-N rows")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomfl-ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpus": os.cpu_count(), "rows": args.rows, "image_size": args.image_size}
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    try:
        n_max = max(sizes + [args.speed_n])
        t0 = time.perf_counter()
        src = work / "src"
        rels = generate(src, n_max, args.rows)
        say(f"generated {n_max} files of {args.rows}x{args.rows} in {time.perf_counter() - t0:.1f} s")

        # Throughput, all on the same speed-n files (the page cache is warm for every row).
        speed = site_for(work, "speed", src, rels[:args.speed_n], args.image_size)
        listing = work / "speed.txt"
        listing.write_text("\n".join(str(src / r) for r in rels[:args.speed_n]))
        base = args.baseline
        results["baseline"] = base
        rows = {"plain": run_child("plain", str(listing))}
        brows = {}
        # Baseline and this version alternate run by run, on the same files.
        for w in (1, 2):
            for tag, pp, into in ((("base", base, brows),) if base else ()) + (("this", None, rows),):
                fresh_state(speed)
                into[f"cold_{w}w"] = run_child("ingest", str(speed), "--workers", str(w), pythonpath=pp)
                if w == 2:
                    into["warm"] = run_child("ingest", str(speed), "--workers", "2", pythonpath=pp)
        rows["plain_again"] = run_child("plain", str(listing))
        results["speed"] = rows
        if base:
            brows["plain"] = {"files_per_s": (rows["plain"]["files_per_s"] + rows["plain_again"]["files_per_s"]) / 2,
                              "files": rows["plain"]["files"]}
            results["speed_baseline"] = brows
            say("baseline:", json.dumps({k: round(v["files_per_s"], 1) for k, v in brows.items()}))
            say(f"load average now: {os.getloadavg()}")
        say(json.dumps({k: (round(v["files_per_s"], 1), round(v["cpu_ms_per_file"], 2)) for k, v in rows.items()}),
            "publish s:", {k: v.get("publish_s") for k, v in rows.items()})
        fresh_state(speed)

        # Peak RSS and time against N.
        per_n = {}
        for n in sizes:
            site = site_for(work, f"n{n}", src, rels[:n], args.image_size)
            extra = ["--workers", str(args.rss_workers)] if args.rss_workers else []
            per_n[n] = {}
            if base:
                per_n[n]["base_cold"] = run_child("ingest", str(site), *extra, pythonpath=base)
                per_n[n]["base_warm"] = run_child("ingest", str(site), *extra, pythonpath=base)
                fresh_state(site)
            cold = run_child("ingest", str(site), *extra)
            warm = run_child("ingest", str(site), *extra)
            train = None if args.no_train else run_child("train", str(site), "--device", args.train_device,
                                                         "--width", str(args.train_width), "--depth", str(args.train_depth))
            per_n[n].update(cold=cold, warm=warm, train=train)
            if base:
                bc, bw = per_n[n]["base_cold"], per_n[n]["base_warm"]
                say(f"N={n} baseline: cold {bc['seconds']:.1f} s ({bc['cpu_ms_per_file']:.2f} CPU ms/file), "
                    f"parent {bc['self_rss_mb']:.0f} MB; warm {bw['seconds']:.2f} s")
            if args.gpu_epoch and n == max(sizes):
                gpu = run_child("train", str(site), "--device", "cuda", "--width", "32", "--depth", "3")
                per_n[n]["train_gpu"] = gpu
                say(f"N={n}: epoch on {gpu['device']} (width 32, depth 3): {gpu['seconds']:.1f} s, "
                    f"{gpu['images_per_s']:.0f} images/s, host RSS {gpu['self_rss_mb']:.0f} MB, "
                    f"GPU peak {gpu.get('cuda_peak_mb', 0):.0f} MB")
            epoch = f"epoch {train['seconds']:.1f} s on {train['device']}, {train['self_rss_mb']:.0f} MB" if train else "no epoch"
            say(f"N={n}: cold {cold['seconds']:.1f} s ({cold['workers']} workers, publish {cold['publish_s']:.1f} s, "
                f"{cold['cpu_ms_per_file']:.2f} CPU ms/file), "
                f"parent {cold['self_rss_mb']:.0f} MB, "
                f"worker {cold['children_rss_mb']:.0f} MB; warm {warm['seconds']:.2f} s; {epoch}")
            shutil.rmtree(site.parent / "dicom")
            shutil.rmtree(site.parent / "state")
        results["per_n"] = per_n

        if args.big:
            shutil.rmtree(src)
            t0 = time.perf_counter()
            big_src = work / "big"
            big_rels = generate(big_src, args.big, args.big_rows)
            say(f"generated {args.big} files of {args.big_rows}x{args.big_rows} in {time.perf_counter() - t0:.1f} s")
            from tests.conftest import write_site

            big_dir = work / "bigsite"
            big_dir.mkdir(exist_ok=True)
            big_site = write_site(big_dir, big_src, preprocess={"image_size": args.big_image_size})
            cold = run_child("ingest", str(big_site))
            warm = run_child("ingest", str(big_site))
            results["big"] = {"n": args.big, "rows": args.big_rows, "image_size": args.big_image_size,
                              "cold": cold, "warm": warm}
            say(f"N={args.big}: cold {cold['seconds']:.1f} s, parent {cold['self_rss_mb']:.0f} MB, "
                f"worker {cold['children_rss_mb']:.0f} MB; warm {warm['seconds']:.2f} s, {warm['self_rss_mb']:.0f} MB")
        results["loadavg"] = f"{' '.join(f'{x:.2f}' for x in load0)} at start, " \
                             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at end (1/5/15 min)"
        report(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> None:
    s = res["speed"]
    b = res.get("speed_baseline")
    plain = s["plain"]["files_per_s"]
    print(f"\n{res['cpus']} CPUs; {res['rows']}x{res['rows']} 12-bit sources -> {res['image_size']} px; "
          f"{s['plain']['files']} files for the throughput rows; load average {res.get('loadavg')}")
    print(f"plain read before / after the ingest rows: {plain:.1f} / {s['plain_again']['files_per_s']:.1f} files/s "
          f"(ratios below use their mean)")
    plain = (plain + s["plain_again"]["files_per_s"]) / 2
    print("CPU ms per file (parent + workers, start-up included; load-independent): plain "
          f"{(s['plain']['cpu_ms_per_file'] + s['plain_again']['cpu_ms_per_file']) / 2:.2f}; "
          + "; ".join(f"{tag} " + ", ".join(f"{k} {r[k]['cpu_ms_per_file']:.2f}" for k in ("cold_1w", "cold_2w", "warm"))
                      for tag, r in ((("baseline", b),) if b else ()) + (("this", s),)))
    if b:
        print(f"baseline: {b['cold_1w'].get('code')} (PYTHONPATH {res['baseline']}); this: {s['cold_1w'].get('code')}")
        print("| path | baseline files/s | this files/s | this / baseline | baseline vs plain (per core) | "
              "this vs plain (per core) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
    else:
        print("| path | files/s | vs plain (per core) |")
        print("| --- | ---: | ---: |")
    for key, name, cores in (("cold_1w", "dicomfl cold ingest, 1 worker", 1),
                             ("cold_2w", "dicomfl cold ingest, 2 workers", 2),
                             ("warm", "dicomfl warm re-ingest", 1)):
        fps = s[key]["files_per_s"]
        if b:
            bf = b[key]["files_per_s"]
            print(f"| {name} | {bf:.1f} | {fps:.1f} | {fps / bf:.2f}x | {plain / (bf / cores):.2f}x time | "
                  f"{plain / (fps / cores):.2f}x time |")
        else:
            print(f"| {name} | {fps:.1f} | {plain / (fps / cores):.2f}x time |")
    print(f"plain dcmread + pixel_array + modality LUT: {plain:.1f} files/s")
    up = s["cold_2w"]["files_per_s"] / s["cold_1w"]["files_per_s"]
    if b:
        print(f"speed-up from 2 workers: baseline {b['cold_2w']['files_per_s'] / b['cold_1w']['files_per_s']:.2f}x, "
              f"this {up:.2f}x")
    else:
        print(f"speed-up from 2 workers: {up:.2f}x")
    print("\n| N | code | cold ingest s | parent peak RSS MB | largest worker MB | warm re-ingest s | epoch s (device) | "
          "epoch peak RSS MB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, r in res["per_n"].items():
        rows = ([("baseline", r["base_cold"], r["base_warm"], None)] if "base_cold" in r else []) + [
            ("this", r["cold"], r["warm"], r["train"])]
        for code, c, w, t in rows:
            ep = f"{t['seconds']:.1f} ({t['device']}) | {t['self_rss_mb']:.0f}" if t else "not run | not run"
            print(f"| {n} | {code} | {c['seconds']:.1f} ({c['workers']} w, {c['cpu_ms_per_file']:.2f} CPU ms/file) | "
                  f"{c['self_rss_mb']:.0f} | "
                  f"{c['children_rss_mb']:.0f} | {w['seconds']:.2f} | {ep} |")
    for n, r in res["per_n"].items():
        if "train_gpu" in r:
            g = r["train_gpu"]
            print(f"\nepoch on {g['device']} at N={n} (width 32, depth 3): {g['seconds']:.1f} s, "
                  f"{g['images_per_s']:.0f} images/s, host RSS {g['self_rss_mb']:.0f} MB")
    if "big" in res:
        b = res["big"]
        print(f"\nbig: {b['n']} files {b['rows']}px -> {b['image_size']}px: cold {b['cold']['seconds']:.1f} s "
              f"({b['cold']['files_per_s']:.0f} files/s, {b['cold']['workers']} workers), parent "
              f"{b['cold']['self_rss_mb']:.0f} MB, worker {b['cold']['children_rss_mb']:.0f} MB; warm "
              f"{b['warm']['seconds']:.2f} s, parent {b['warm']['self_rss_mb']:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        _child_main(sys.argv[2:])
    else:
        main()
