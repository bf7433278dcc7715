"""A site's side of SCAFFOLD (Karimireddy et al., ICML 2020): its control variate ``c_i`` and the
corrected local steps. The rules themselves are in :mod:`dicomfl.common.scaffold`.

A train message of a SCAFFOLD run carries the server control ``c`` (``scaffold-control``). The
site checks it like every other value a coordinator sends (exactly the model's parameter names
and shapes, a real float dtype, finite, L2 norm at most :data:`CONTROL_MAX_NORM`; otherwise
``bad-request`` and nothing is changed), trains with plain SGD on the corrected gradient
``g - c_i + c``, and after ``K`` steps with learning rate ``lr`` (option II of the paper)::

    c_i+ = c_i - c + (x - y_i) / (K * lr)        delta_c_i = c_i+ - c_i   (sent as scaffold-delta)

**Site state.** ``c_i`` lives in ``<state_dir>/scaffold/<run>.npz`` (the run name is checked by
``RUN_NAME_RE`` before it gets here, so it is never a path), written atomically with mode 0600.
The file holds the round that last changed it and ``c_i`` before and after that round: a round
sent again after a coordinator resumed from an earlier checkpoint starts from the "before" copy,
a later round from "after", and a file from a later round than the one asked for (an earlier run
with the same name) is not used. A missing, oversized, unreadable or ill-fitting file counts as
zeros, and the site's log says so. A site whose update the coordinator rejects has still moved
its ``c_i``: the server's ``c`` is then no longer exactly the mean of the sites' controls (the
paper assumes every sampled site is aggregated).

**Optimizer.** SCAFFOLD's control update assumes plain SGD local steps. A site whose
``train.optimizer`` is not ``sgd`` refuses a SCAFFOLD round (site-config-error; its log names the
key), and ``dicomfl run`` refuses such a run config when it lists the site.

**Privacy under DP-SGD.** The correction ``c - c_i`` is added to the gradient after Opacus's
clip-and-noise step (:func:`dicomfl.common.train.train_local`, where FedProx's term goes). ``c``
is the coordinator's, computed from earlier releases; ``c_i`` is a function of the site's earlier
DP-trained models and of ``c``. Given the earlier releases the correction is a constant, so adding
it is post-processing. ``delta_c_i`` is computed from ``x`` (public to the federation), ``c``,
``K``, ``lr`` (not data) and ``y_i`` (the DP-trained model the site sends anyway): it releases
nothing beyond ``y_i``, and the privacy ledger is charged exactly as for any other round.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.common.errors import BadRequest, ConfigError
from dicomfl.common.files import AtomicFile
from dicomfl.common.model import get_weights
from dicomfl.common.scaffold import client_control_update, zeros_like

from .trainer import Outcome, RoundPlan, SiteTrainer

#: The largest L2 norm of a server control ``c`` a site accepts (the coordinator's
#: ``run.max_control_norm`` is at most this).
CONTROL_MAX_NORM = 1e4
_REAL_FLOATS = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})


def check_control(record, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The server control of a train message, checked against the site's own model.

    Raises
    ------
    BadRequest
        Not an ArrayRecord; names or shapes other than the model's; not a real float; NaN or
        infinite values; an L2 norm above :data:`CONTROL_MAX_NORM`. The reason names the record
        (and a parameter name of the site's own model), never a value.
    """
    from flwr.app import Array, ArrayRecord

    where = P.CONTROL
    if not isinstance(record, ArrayRecord):
        raise BadRequest(f"{where}: not an ArrayRecord")
    keys = list(record.keys())
    if keys == P.to_record_keys(reference) and keys[0].startswith(P.FLAT_PREFIX):
        arr = record[keys[0]]
        total_size = sum(int(np.asarray(r).size) for r in reference.values())
        try:  # the flat form to_record sends: its key is exactly the site's own model's layout
            if not isinstance(arr, Array) or tuple(arr.shape) != (total_size,):
                raise ValueError
            values = P.split_flat(arr.numpy(), [(k, tuple(np.asarray(r).shape)) for k, r in reference.items()])
        except Exception:  # noqa: BLE001 - malformed bytes of any kind
            raise BadRequest(f"{where}: not a readable flat record") from None
    elif len(keys) != len(reference) or set(keys) != set(reference):
        raise BadRequest(f"{where}: not the model's parameter names")
    else:
        values = {name: record[name] for name in reference}
    out, total = {}, 0.0
    for name, ref in reference.items():
        arr = values[name]
        if not isinstance(arr, (Array, np.ndarray)):
            raise BadRequest(f"{where}: parameter {name} is not an array")
        try:
            if tuple(arr.shape) != tuple(ref.shape):
                raise BadRequest(f"{where}: parameter {name} has the wrong shape")
            a = arr.numpy() if isinstance(arr, Array) else arr
        except BadRequest:
            raise
        except Exception:  # noqa: BLE001 - malformed bytes of any kind
            raise BadRequest(f"{where}: parameter {name} is not a readable array") from None
        if tuple(a.shape) != tuple(ref.shape):
            raise BadRequest(f"{where}: parameter {name} has the wrong shape")
        if a.dtype.newbyteorder("=") not in _REAL_FLOATS:
            raise BadRequest(f"{where}: parameter {name} is not a real float array")
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(ref.dtype, copy=True)  # float64 beyond float32's range becomes inf, caught here
        if not np.all(np.isfinite(a)):
            raise BadRequest(f"{where}: parameter {name} has NaN or infinite values")
        total += float(np.sum(np.square(a, dtype=np.float64)))
        out[name] = a
    if not math.sqrt(total) <= CONTROL_MAX_NORM:
        raise BadRequest(f"{where}: norm above {CONTROL_MAX_NORM:g}")
    return out


class ControlStore:
    """The site's control variate for one run, on disk (see the module docstring)."""

    def __init__(self, state_dir: Path, run: str, log: logging.Logger) -> None:
        self.path = Path(state_dir) / "scaffold" / f"{run}.npz"
        self.log = log

    def load(self, reference: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        """``c_i`` for ``server_round``: the stored control, or zeros (logged) when there is none
        that fits."""
        if not self.path.is_file():
            self.log.info("SCAFFOLD: no control variate stored for this run yet; starting from zeros")
            return zeros_like(reference)
        limit = 2 * sum(int(np.asarray(v).nbytes) * 2 for v in reference.values()) + (1 << 20)
        try:
            size = self.path.stat().st_size
            if size > limit:
                raise ValueError(f"{size} bytes, more than {limit} for this model")
            with np.load(self.path, allow_pickle=False) as z:
                stored_round = int(z["round"])
                before = {k: z["before." + k] for k in reference}
                after = {k: z["after." + k] for k in reference}
            for arrays in (before, after):
                for k, ref in reference.items():
                    if arrays[k].shape != np.asarray(ref).shape or not np.all(np.isfinite(arrays[k])):
                        raise ValueError(f"parameter {k} does not fit the model or is not finite")
        except Exception as exc:  # noqa: BLE001 - a corrupt file of any kind is zeros, not a crash
            self.log.warning("SCAFFOLD: control variate file %s unusable (%s); starting from zeros", self.path,
                             type(exc).__name__ if not isinstance(exc, ValueError) else exc)
            return zeros_like(reference)
        if server_round > stored_round:
            chosen = after
        elif server_round == stored_round:
            self.log.info("SCAFFOLD: round %d again (the coordinator resumed); using the control from before it",
                          server_round)
            chosen = before
        else:
            self.log.warning("SCAFFOLD: stored control is from round %d, later than round %d (an earlier run of the "
                             "same name); starting from zeros", stored_round, server_round)
            return zeros_like(reference)
        return {k: np.asarray(v, dtype=np.asarray(reference[k]).dtype) for k, v in chosen.items()}

    def save(self, server_round: int, before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
        """Write atomically (a temporary file in the same folder, then a rename), mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        payload = {"round": np.asarray(server_round, dtype=np.int64)}
        payload.update({"before." + k: np.asarray(v) for k, v in before.items()})
        payload.update({"after." + k: np.asarray(v) for k, v in after.items()})
        with AtomicFile(self.path, mode=0o600) as fh:
            np.savez(fh, **payload)


class ScaffoldRound:
    """One SCAFFOLD train round at a site: the checked server control, then training and ``delta_c_i``.

    Build it with :meth:`open` before any work (a bad control or an unsuitable optimizer refuses
    the round before anything is trained or written).
    """

    def __init__(self, site: SiteTrainer, c: dict[str, np.ndarray]) -> None:
        self.site, self.c = site, c

    @classmethod
    def open(cls, site: SiteTrainer, record) -> "ScaffoldRound":
        c = check_control(record, get_weights(site.model()))
        if site.cfg.train.optimizer != "sgd":
            raise ConfigError(f"train.optimizer is {site.cfg.train.optimizer}; a SCAFFOLD run needs sgd "
                              "(plain SGD local steps)")
        return cls(site, c)

    def train(self, global_weights: dict[str, np.ndarray], plan: RoundPlan) -> tuple[Outcome, dict | None]:
        """Train on the corrected gradient; returns the outcome and ``delta_c_i`` (None when declined).

        ``c_i`` is written only after a finite update; on any failure the stored control is unchanged.
        """
        site = self.site
        store = ControlStore(site.cfg.site.state_dir, plan.run, site.log)
        c_i = store.load(self.c, plan.server_round)
        correction = {k: (self.c[k].astype(np.float64) - c_i[k].astype(np.float64)).astype(np.float32) for k in self.c}
        out = site.train(global_weights, plan, correction=correction)
        if out.declined or out.weights is None:
            return out, None
        steps = int(out.metrics.get(P.STEPS, 0))
        new, delta = client_control_update(c_i, self.c, {k: global_weights[k] for k in self.c}, out.weights, steps,
                                           out.lr)
        if not all(np.all(np.isfinite(a)) for a in (*new.values(), *delta.values())):
            raise RuntimeError("SCAFFOLD: the control update is not finite (training diverged); control not stored")
        store.save(plan.server_round, c_i, new)
        return out, delta
