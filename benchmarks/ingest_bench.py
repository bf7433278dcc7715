"""Ingestion throughput on the real corpus, side by side (a benchmark, not a test).

Rows (files/s over the accepted image files of pydicom's test data + pydicom-data + deid-data):
  plain       pydicom.dcmread + pixel_array                     (the baseline)
  +deid+feat  the same + dicomfl de-identification + feature vector
  cold        dicomfl ingestion without cache (adds modality LUT, resize, hashing, bookkeeping)
  warm        dicomfl ingestion with a warm cache

Usage: python benchmarks/ingest_bench.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import corpus_files, write_site  # noqa: E402

from dicomfl.common.config import load_site_config  # noqa: E402
from dicomfl.common.deid import Deidentifier  # noqa: E402
from dicomfl.common.features import extract, patient_age_years  # noqa: E402
from dicomfl.common.ingest import ingest, process_file  # noqa: E402
from dicomfl.common.reader import read_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="copies of the corpus (more files, steadier numbers)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="dicomfl-bench-"))
    try:
        src = tmp / "dicom"
        src.mkdir()
        key = b"k" * 32
        probe = tmp / "probe"
        probe.mkdir()
        cfg = load_site_config(write_site(probe, probe))
        deid = Deidentifier(key, cfg.deid)
        n = 0
        for f in corpus_files():
            data = f.read_bytes()
            rec, _, _ = process_file(data, f.name, "x", cfg, deid)
            if rec.status != "accepted":
                continue
            for r in range(args.repeat):
                (src / f"r{r}_{n:05d}").write_bytes(data)
            n += 1
        files = sorted(src.iterdir())
        blobs = [p.read_bytes() for p in files]

        def plain():
            for b in blobs:
                ds = read_dataset(b)  # dcmread(force=True) + transfer syntax for raw datasets
                ds.pixel_array  # noqa: B018

        def plus_deid():
            for b in blobs:
                ds = read_dataset(b)  # dcmread(force=True) + transfer syntax for raw datasets
                age = patient_age_years(ds)
                pid = deid.patient_pseudonym(ds, "f")
                deid.apply(ds, pid)
                extract(ds, age)
                ds.pixel_array  # noqa: B018

        def timed(fn, reps=2):
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best

        t_plain = timed(plain)
        t_deid = timed(plus_deid)
        site_cfg = load_site_config(write_site(tmp, src))
        t_cold = timed(lambda: ingest(site_cfg, use_cache=False), reps=1)
        ingest(site_cfg)  # prime the cache
        t_warm = timed(lambda: ingest(site_cfg))
        rows = [
            ("plain dcmread + pixel_array", t_plain),
            ("+ de-identification + features", t_deid),
            ("dicomfl ingest, no cache", t_cold),
            ("dicomfl ingest, warm cache", t_warm),
        ]
        print(f"{len(files)} files ({n} distinct accepted images x {args.repeat}), {os.cpu_count()} CPUs")
        print(f"| {'path':34s} | {'files/s':>9s} | {'vs plain':>9s} |")
        print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|")
        for name, t in rows:
            print(f"| {name:34s} | {len(files) / t:9.1f} | {t_plain / t:8.2f}x |")
        print(f"de-identification + features overhead over the plain read: {100 * (t_deid / t_plain - 1):.1f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
