"""Round overhead of a real deployment, before the warm site worker, through a forwarder, and direct.

    python benchmarks/round_bench.py [--sites 3 10] [--rounds 5] [--per-site 40] [--out DIR]

Round overhead = the round's wall time (the coordinator's ``seconds`` in metrics.json) minus the
slowest site's handler time in that round (the handler's "train message handled in X s" line in
the site's own log). Each configuration runs a real SuperLink and N site daemons on loopback with
TLS and SuperNode authentication (``LocalFederation``), a tiny model (width 4, depth 1, 32 px) and
a few images per site, so the work is small and the overhead shows:

* **before**: what the deployment did before the warm worker: the site daemon without its worker
  (``federation.warm_worker: false``), so the ClientApp handles each message in the process Flower
  starts for it (imports torch and dicomfl, re-opens the site's data), SuperExec polling every 1 s
  (Flower's default), the SuperNode's own 3 s idle wait, the coordinator asking for replies every
  3 s (what ``HttpGrid.send_and_receive`` does) and the SuperLink's state in a database file;
* **forwarder**: the warm worker reached through a forwarding ClientApp that Flower starts per
  message (``federation.message_path: forwarder``), SuperExec polling every 0.25 s, the SuperNode's
  own 3 s idle wait, the coordinator polling every ``run.poll_interval_s`` (default 0.5 s), the
  SuperLink's state in memory;
* **objects**: as direct, but with the messages in Flower's own form (``run.compact_messages:
  false``): each record, Array and chunk is an object of its own, fetched with a request of its
  own at every hop (a train reply with the local baseline is 11 objects);
* **polled**: as direct, but the worker is not woken by its SuperNode
  (``federation.wake_worker: false``): it asks for a task every ``federation.task_poll_s`` (0.1 s);
* **direct**: dicomfl's default, messages in the compact form (3 objects each, ``common/wire.py``): the warm worker takes the SuperNode's tasks itself (no process per
  message, ``dicomfl.client.transport.tasks``) and the SuperNode's idle wait is capped at
  ``federation.idle_poll_s`` (0.25 s, ``dicomfl.client.transport.supernode``), and the SuperNode wakes the
  worker as soon as a message has arrived (``dicomfl.client.transport.wakeup.Wakeup``).

The table also gives the spread of the moments the sites' workers received the same round's
message (latest minus earliest): that is where the SuperNode's idle wait shows.
All site caches are warmed first, so both paths read the site's data from its cache.
"""

from __future__ import annotations


# ---------------------------------------------------------------------------- the benchmark
MODEL = {"mode": "fused", "image_size": 32, "width": 4, "depth": 1, "meta_hidden": 8, "head_hidden": 8}


def _sites(cohort, workdir, n: int):
    """``n`` site configs under ``workdir``, each with its own name, key and state dir."""
    from pathlib import Path

    import yaml

    base = sorted(p.parent for p in Path(cohort).glob("site-*/site.yaml"))
    out = []
    for i in range(n):
        src = base[i % len(base)]
        raw = yaml.safe_load((src / "site.yaml").read_text())
        name = f"site-{i + 1:02d}"
        d = Path(workdir) / "sites" / name
        d.mkdir(parents=True, exist_ok=True)
        key = d / "site.key"
        key.write_text((src / "site.key").read_text())
        key.chmod(0o600)
        raw["site"].update({"name": name, "dicom_dir": str((src / raw["site"]["dicom_dir"]).resolve()),
                            "labels": str((src / raw["site"]["labels"]).resolve()), "secret_file": str(key),
                            "state_dir": str(d / "state")})
        y = d / "site.yaml"
        y.write_text(yaml.safe_dump(raw, sort_keys=False))
        out.append(y)
    return out


def _handler_seconds(state_dir, start: int) -> list[float]:
    import re

    text = (state_dir / "logs" / "site.log").read_bytes()[start:].decode("utf-8", "replace")
    return [float(x) for x in re.findall(r"train message handled in ([0-9.]+) s", text)]


def _clientapp_ages(state_dir, start: int) -> list[float]:
    """How long before reaching the worker each train message's ``flwr-clientapp`` process started
    (Flower's start-up of that process, which the warm worker cannot save)."""
    import re

    text = (state_dir / "logs" / "site.log").read_bytes()[start:].decode("utf-8", "replace")
    return [float(x) for x in re.findall(r"train message from ClientApp pid \d+ \(torch imported in the ClientApp: "
                                         r"\w+; it started ([0-9.]+) s before\)", text)]


def _received_at(state_dir, start: int) -> list[float]:
    """When the worker got each train message (site log timestamps), seconds since the epoch."""
    import re
    from datetime import datetime

    text = (state_dir / "logs" / "site.log").read_bytes()[start:].decode("utf-8", "replace")
    out = []
    for stamp in re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: worker \(pid \d+\): train message", text, re.M):
        out.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


#: Flower's own SuperExec poll interval, for the "before" path (the daemon sets 0.25 s unless the
#: environment already names one).
BEFORE_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}


def run_config(cohort, out, n: int, mode: str, rounds: int, before_state: str = "file") -> dict:
    import json
    import os
    import time
    from pathlib import Path

    import yaml

    from dicomfl.common.config import load_site_config, run_config_dict
    from dicomfl.common.ingest import ingest
    from dicomfl.workbench.launcher import LocalFederation

    work = Path(out) / f"{mode}-{n}"
    sites = _sites(cohort, work, n)
    for y in sites:  # warm caches: both paths open the site from its cache
        ingest(load_site_config(y))
    raw = run_config_dict(f"{mode}-{n}", rounds=rounds, local_epochs=1, min_sites=n, round_timeout_s=600,
                          out_dir=work / "run", model=MODEL, sites=sites)
    if mode == "objects":
        raw["run"]["compact_messages"] = False  # each record, array and chunk its own Flower object
    if mode == "before":
        raw["run"]["poll_interval_s"] = 3.0  # what HttpGrid.send_and_receive waits
    run_yaml = work / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))
    # The coordinator service and the site daemons inherit this process's environment.
    for k, v in BEFORE_ENV.items():
        if mode == "before":
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    t0 = time.perf_counter()
    before = mode == "before"
    site_fed = {"before": {"warm_worker": False, "idle_poll_s": 3.0},
                "forwarder": {"message_path": "forwarder", "idle_poll_s": 3.0},
                "objects": {}, "polled": {"wake_worker": False}, "direct": {}}[mode]
    fed = LocalFederation(work / "federation", sites, site_federation=site_fed,
                          coordinator={"superlink_state": before_state if before else "memory"})
    try:
        names = list(fed.sites)
        fed.start(timeout=600)
        if not before:
            for s in names:
                fed.wait_worker(s, 300)
        started = time.perf_counter() - t0
        states = {s: fed.state_dir(s) for s in names}
        offsets = {s: (states[s] / "logs" / "site.log").stat().st_size if (states[s] / "logs" / "site.log").exists() else 0
                   for s in names}
        t1 = time.perf_counter()
        code = fed.run(run_yaml, echo=lambda line: None, timeout=3600)
        wall = time.perf_counter() - t1
    finally:
        fed.close()
    if code != 0:
        why = f"the run did not finish; see {work}/federation/logs and {work}/run/flwr-run.log"
        return {"mode": f"before ({before_state} state)" if mode == "before" else mode, "sites": n, "rounds": [], "start_s": round(started, 1), "run_s": round(wall, 1),
                "clientapp_start_s": None, "failed": why}
    hist = json.loads((work / "run" / "metrics.json").read_text())["history"]
    handled = {s: _handler_seconds(states[s], offsets[s]) for s in names}
    received = {s: _received_at(states[s], offsets[s]) for s in names}
    ages = [a for s in names for a in _clientapp_ages(states[s], offsets[s])]
    rows = []
    for i, h in enumerate(hist):
        slowest = max(handled[s][i] for s in names)
        rec = [received[s][i] for s in names if len(received[s]) > i]
        rows.append({"round": h["round"], "seconds": h["seconds"], "exchange_s": h.get("exchange_seconds"),
                     "slowest_handler_s": slowest,
                     "overhead_s": round(h["seconds"] - slowest, 2),
                     "pickup_spread_s": round(max(rec) - min(rec), 2) if len(rec) == n else None})
    label = f"before ({before_state} state)" if mode == "before" else mode
    return {"mode": label, "sites": n, "rounds": rows, "start_s": round(started, 1), "run_s": round(wall, 1),
            "clientapp_start_s": _median(ages)}


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def table(results: list[dict]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.2f}"

    lines = ["| path | sites | rounds | round s (median) | slowest handler s (median) | overhead s (median) | "
             "overhead s (max) | overhead s (rounds 2+, median) | pickup spread s (median) | "
             "ClientApp process start s (median) | daemons up s | run s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rows = r["rounds"]
        if not rows:
            lines.append(f"| {r['mode']} | {r['sites']} | did not finish | - | - | - | - | - | - | - | {r['start_s']} | {r['run_s']} |")
            continue
        lines.append(f"| {r['mode']} | {r['sites']} | {len(rows)} | {f(_median([x['seconds'] for x in rows]))} | "
                     f"{f(_median([x['slowest_handler_s'] for x in rows]))} | {f(_median([x['overhead_s'] for x in rows]))} | "
                     f"{f(max(x['overhead_s'] for x in rows))} | {f(_median([x['overhead_s'] for x in rows[1:]]))} | "
                     f"{f(_median([x['pickup_spread_s'] for x in rows]))} | {f(r.get('clientapp_start_s'))} | "
                     f"{r['start_s']} | {r['run_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import os
    import tempfile
    from pathlib import Path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-site", type=int, default=40)
    ap.add_argument("--modes", nargs="+", default=["before", "forwarder", "direct"], choices=["before", "forwarder", "objects", "polled", "direct"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--before-state", choices=["file", "memory"], default="file",
                    help="the SuperLink's state for 'before' (file: as it was; with 10 sites on 2 cores its SQLite "
                         "failed pushes with 'database is locked' and the run did not finish)")
    args = ap.parse_args(argv)
    out = (args.out or Path(tempfile.mkdtemp(prefix="round-bench-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from dicomfl.workbench.synth import synth

    cohort = out / "cohort"
    if not (cohort / "run.yaml").exists():
        synth(cohort, sites=3, per_site=args.per_site, seed=0, image_size=32)
    print(f"round overhead benchmark in {out} ({os.cpu_count()} CPUs); model {MODEL}", flush=True)
    results = []
    for n in args.sites:
        for mode in args.modes:
            r = run_config(cohort, out, n, mode, args.rounds, args.before_state)
            if r.get("failed"):
                print(f"{mode}, {n} sites: {r['failed']}", flush=True)
                results.append(r)
                continue
            results.append(r)
            print(f"{mode}, {n} sites: " + ", ".join(f"r{x['round']} {x['seconds']:.1f}s (handler {x['slowest_handler_s']:.2f}s)"
                                                   for x in r["rounds"]), flush=True)
            (out / "round_bench.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
