"""Checkpoints: after every round the global model, the local-only baselines, the strategy's own
state (FedAdam's moments) and the history are written to ``<out_dir>/checkpoints/``, atomically.

``latest.json`` names the newest complete checkpoint; a run resumed with ``--resume`` continues
from it and ends with the same number of rounds. Model files are ``.npz`` (plain parameter names),
loadable with ``numpy.load`` and usable with ``dicomfl run --evaluate-only``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomfl.common.files import AtomicFile


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, mode=0o600) as fh:
        np.savez(fh, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_json(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path, mode=0o600, text=True) as fh:
        json.dump(payload, fh, indent=2, allow_nan=False, default=_jsonable)


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def clean(o):
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


@dataclass
class State:
    round: int
    global_weights: dict
    local_weights: dict = field(default_factory=dict)  # site name -> arrays
    strategy_state: dict = field(default_factory=dict)  # name -> arrays (e.g. FedAdam m_t, v_t)
    history: list = field(default_factory=list)
    node_names: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # site -> its last accepted num-examples
    interruptions: list = field(default_factory=list)  # rounds after which the run was resumed
    feature_stats: dict | None = None  # the run's federated feature statistics (server.fedstats.gather)


class Checkpoints:
    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir) / "checkpoints"

    def save(self, st: State) -> Path:
        d = self.dir / f"round-{st.round:04d}"
        write_npz(d / "global.npz", st.global_weights)
        for site, arr in st.local_weights.items():
            write_npz(d / f"local-{site}.npz", arr)
        for name, arr in st.strategy_state.items():
            write_npz(d / f"strategy-{name}.npz", arr)
        write_json(d / "state.json", clean({"round": st.round, "history": st.history, "local_sites": sorted(st.local_weights),
                                            "strategy_state": sorted(st.strategy_state),
                                            "node_names": {str(k): v for k, v in st.node_names.items()},
                                            "examples": st.examples, "interruptions": st.interruptions,
                                            "feature_stats": st.feature_stats}))
        write_json(self.dir / "latest.json", {"round": st.round, "path": d.name})
        return d

    def latest(self) -> State | None:
        marker = self.dir / "latest.json"
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        d = self.dir / info["path"]
        meta = json.loads((d / "state.json").read_text())
        return State(
            round=int(meta["round"]),
            global_weights=read_npz(d / "global.npz"),
            local_weights={s: read_npz(d / f"local-{s}.npz") for s in meta["local_sites"]},
            strategy_state={n: read_npz(d / f"strategy-{n}.npz") for n in meta["strategy_state"]},
            history=meta["history"],
            node_names={int(k): v for k, v in meta.get("node_names", {}).items()},
            examples={str(k): int(v) for k, v in meta.get("examples", {}).items()},
            interruptions=[int(x) for x in meta.get("interruptions", [])],
            feature_stats=meta.get("feature_stats"),
        )
