"""``dicomfl synth`` speed: files/s of the whole generator, and its writer against pydicom's
``dcmwrite`` on the same datasets, side by side (run it pinned to one core: ``taskset -c 0``).

    python benchmarks/synth_bench.py [--per-site 100]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np

from dicomfl.workbench import synth as S


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-site", type=int, default=100)
    a = ap.parse_args()
    S.synth(tempfile.mkdtemp(), sites=1, per_site=5, seed=1)  # warm-up (imports, anatomy cache)
    print("| what | files | seconds | files/s |")
    print("| --- | ---: | ---: | ---: |")
    for sites in (1, 3):
        t = time.perf_counter()
        r = S.synth(tempfile.mkdtemp(), sites=sites, per_site=a.per_site, seed=0)
        dt = time.perf_counter() - t
        print(f"| dicomfl synth, {sites} site(s) | {r.files_written} | {dt:.2f} | {r.files_written / dt:.0f} |")
    pat = {"id": "X1", "name": "Doe^Jane", "sex": "F", "birth": S.dt.date(1950, 1, 1), "first_study": S.dt.date(2022, 1, 1),
           "referrer": "Ref^Doc", "house": 12, "age": 70.0}
    rng = np.random.default_rng(0)
    for p in S.PROFILES:
        dss = [S._image_dataset(p, S._base_dataset(p, 0, pat, 0, k, np.random.default_rng(k)),
                                S.phantom(rng, p.matrix, False, False, p), "PA") for k in range(a.per_site)]
        out = Path(tempfile.mkdtemp())
        rates = {}
        for name in ("pydicom dcmwrite", "dicomfl writer"):
            work = [copy.deepcopy(d) for d in dss]
            w = S._Writer(S.SYNTAXES[p.syntax])
            t = time.perf_counter()
            for k, d in enumerate(work):
                if name == "pydicom dcmwrite":
                    S._save(d, out / f"a{k}", S.SYNTAXES[p.syntax], d.SOPClassUID)
                else:
                    w.save(d, out / f"b{k}", d.SOPClassUID)
            rates[name] = len(work) / (time.perf_counter() - t)
        same = all((out / f"a{k}").read_bytes() == (out / f"b{k}").read_bytes() for k in range(len(dss)))
        print(f"| write only, {p.name} ({p.syntax}, {p.matrix}px): dcmwrite / dicomfl writer | {len(dss)} | "
              f"ratio {rates['dicomfl writer'] / rates['pydicom dcmwrite']:.2f}x | "
              f"{rates['pydicom dcmwrite']:.0f} / {rates['dicomfl writer']:.0f} (byte-identical: {same}) |")


if __name__ == "__main__":
    main()
