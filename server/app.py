"""The Flower ServerApp: a thin shell over :class:`~dicomfl.server.federation.Federation`.

Run config keys (set by ``dicomfl run``): ``run-yaml`` (absolute path of the run config on the
coordinator), ``resume`` (continue from the last checkpoint), ``evaluate-only`` (path of a model
``.npz``: cross-site validation only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dicomfl.common import protocol as P
from dicomfl.common.config import load_coordinator_config, load_run_config

from .federation import Federation
from .identity import SiteIdentities

app = ServerApp()
log = logging.getLogger("dicomfl.server")


def _console(kind: str, data: dict) -> None:
    """One short line per event on the ServerApp's output (what ``dicomfl run`` streams)."""
    if kind == "round-start":
        line = f"round {data['round']}/{data['rounds']}: training"
    elif kind == "round-end":
        sites = ", ".join(f"{s} loss={m.get(P.TRAIN_LOSS, float('nan')):.3f} val-auroc={m.get(P.VAL_AUROC, float('nan')):.3f}"
                          for s, m in sorted(data["sites"].items()))
        line = f"round {data['round']}: aggregated {len(data.get('aggregated', []))} site(s) in {data['seconds']:.1f}s; {sites}"
        for key in ("rejected", "errors"):
            for s, why in data.get(key, {}).items():
                line += f"\n  {key[:-1] if key.endswith('s') else key} {s}: {why}"
        if data.get("missing"):
            line += f"\n  no reply: {', '.join(data['missing'])}"
        if data.get("declined"):
            line += f"\n  declined (privacy budget): {', '.join(data['declined'])}"
    elif kind == "cross-site-start":
        line = f"cross-site validation ({data['tag']}): {data['models']} model(s) x {data['sites']} site(s)"
    elif kind == "cross-site-end":
        line = "cross-site AUROC mean per model: " + ", ".join(
            f"{m}={g['mean']:.3f}" if g.get("mean") is not None else f"{m}=n/a" for m, g in data["gaps"].items())
    elif kind == "done":
        line = f"done: report in {data['out_dir']}/report.md"
    elif kind == "resume":
        line = f"resuming after round {data['round']}"
    elif kind == "feature-stats-end":
        line = f"feature statistics from {len(data['sites'])} site(s): {', '.join(data['sites']) or 'none'}"
    else:
        return
    for part in line.split("\n"):
        log.info("[dicomfl] %s", part)
        print(f"[dicomfl] {part}", flush=True)


def identities(coordinator_yaml: str) -> SiteIdentities:
    """Who the nodes are: the registered site keys of an authenticating coordinator, else nobody
    (sites are then listed by node id, and the report says identities were not authenticated)."""
    if not coordinator_yaml:
        return SiteIdentities.insecure()
    coord = load_coordinator_config(Path(coordinator_yaml))
    if not coord.coordinator.supernode_auth:
        return SiteIdentities.insecure()
    return SiteIdentities.from_pki(coord.coordinator.pki_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_run_config(Path(str(rc["run-yaml"])), check_files=False)
    fed = Federation(cfg, grid, on_event=_console, identities=identities(str(rc.get("coordinator-yaml", "") or "")))
    model = str(rc.get("evaluate-only", "") or "")
    if model:
        fed.evaluate_only(Path(model))
        _console("done", {"out_dir": str(fed.out_dir)})
    else:
        fed.run(resume=bool(rc.get("resume", False)))
