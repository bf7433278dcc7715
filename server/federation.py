"""The coordinator's round loop, over any Flower ``Grid`` (a real SuperLink or an in-process one).

Per round: Flower's strategy (FedAvg, FedProx or FedAdam) samples the sites and builds the train
messages; each site's local-only baseline model rides along in its own message (so the baseline
is trained alongside the federation with the same budget); replies are checked (names, shapes,
finite values, norm) before the strategy aggregates what passed; everything is checkpointed. At
the end (and every ``cross_site.every`` rounds) every site evaluates every model.

The loop calls the strategy's ``configure_train``/``aggregate_train`` itself instead of
``Strategy.start`` because it must resume from a checkpoint at round k (Flower has no resume),
send per-site baseline models, and filter bad updates before aggregation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.config import RunConfig
from dicomfl.common.model import build_model, get_weights

from . import crosssite
from .checkpoint import Checkpoints, State, clean, read_npz, write_json
from .checks import distance, norm_outliers, update_problem

log = logging.getLogger("dicomfl.server")


class RoundRecord(TypedDict, total=False):
    """What happened in one round: kept in the checkpoints, ``metrics.json`` and the report."""

    round: int
    sampled: int  # sites the strategy sent a train message to
    sites: dict[str, dict[str, float]]  # site -> its train metrics (whitelisted numbers only)
    rejected: dict[str, str]  # site -> why its update was not aggregated
    errors: dict[str, str]  # site -> the error code it replied with
    declined: list[str]  # sites that declined to train (privacy budget)
    missing: list[str]  # sites that did not reply in time
    aggregated: list[str]  # sites whose updates made the new global model
    train_loss: float | None
    seconds: float

Event = Callable[[str, dict], None]


def make_strategy(cfg: RunConfig):
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    r = cfg.run
    common = dict(fraction_train=r.fraction_train, fraction_evaluate=0.0, min_train_nodes=r.min_sites,
                  min_evaluate_nodes=0, min_available_nodes=r.min_sites)
    if r.strategy == "fedprox":
        return FedProx(proximal_mu=r.proximal_mu, **common)
    if r.strategy == "fedadam":
        return FedAdam(eta=r.server_lr, **common)
    return FedAvg(**common)


class Federation:
    """The coordinator's side of a run: rounds, checks, aggregation, checkpoints, cross-site validation.

    Parameters
    ----------
    cfg : RunConfig
        The run (rounds, strategy, model, privacy request, cross-site schedule).
    grid : flwr.serverapp.Grid
        A real SuperLink's grid (in the ServerApp) or an in-process one (benchmark, tests).
    out_dir : Path, optional
        Where checkpoints, ``metrics.json`` and the report go (default: the run's ``out_dir``).
    on_event : callable, optional
        ``on_event(kind, data)`` for progress ("round-start", "round-end", "cross-site-end", ...).

    ``run(resume=False)`` returns the run's summary (history of :class:`RoundRecord`, final
    cross-site matrix, sites); ``evaluate_only(model_path)`` runs cross-site validation only.
    """

    def __init__(self, cfg: RunConfig, grid, out_dir: Path | None = None, on_event: Event | None = None) -> None:
        self.cfg = cfg
        self.grid = grid
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda kind, data: None)
        self.ckpt = Checkpoints(self.out_dir)
        self.node_names: dict[int, str] = {}
        self.strategy = make_strategy(cfg)

    # ------------------------------------------------------------------ helpers
    def name(self, node_id: int) -> str:
        return self.node_names.get(node_id, f"node-{node_id}")

    def _site_of(self, msg: Message, seen: set[str]) -> str:
        """The reply's site name; two nodes claiming one name in a round are told apart by node id."""
        node = msg.metadata.src_node_id
        if msg.has_content() and P.SITE in msg.content:
            name = str(msg.content[P.SITE].get("name", ""))
            if P.SITE_NAME_RE.match(name):
                if name in seen:
                    name = f"{name}#{node}"
                self.node_names[node] = name
        site = self.name(node)
        seen.add(site)
        return site

    def _emit(self, kind: str, **data) -> None:
        self.on_event(kind, data)

    def _base_config(self, server_round: int) -> ConfigRecord:
        r, p = self.cfg.run, self.cfg.privacy
        return ConfigRecord({
            "run": r.name, "server-round": server_round, "num-rounds": r.rounds, "local-epochs": r.local_epochs,
            "local-steps": r.local_steps or 0, "dp": p.dp, "target-epsilon": p.target_epsilon or 0.0,
            "delta": p.delta, "seed": r.seed, "model": self.cfg.model.model_dump_json(),
        })

    # ------------------------------------------------------------------ training
    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        initial = get_weights(build_model(cfg.model, seed=cfg.run.seed))
        state = self.ckpt.latest() if resume else None
        if state is not None:
            start = state.round + 1
            self.node_names.update(state.node_names)
            for k, v in state.strategy_state.items():
                setattr(self.strategy, k, v)
            log.info("resuming run %s after round %d of %d", cfg.run.name, state.round, cfg.run.rounds)
            self._emit("resume", round=state.round)
        else:
            state = State(round=0, global_weights=initial)
            start = 1
        write_json(self.out_dir / "run_config.json", clean(cfg.model_dump(mode="json")))
        for rnd in range(start, cfg.run.rounds + 1):
            self._round(rnd, state, initial)
            if cfg.cross_site.every and rnd % cfg.cross_site.every == 0 and rnd < cfg.run.rounds:
                self.cross_site(self._models(state), tag=f"round-{rnd:04d}")
        final = self.cross_site(self._models(state), tag="final")
        summary = {"run": cfg.run.name, "rounds": state.round, "strategy": cfg.run.strategy, "history": state.history,
                   "cross_site": final, "sites": sorted(set(self.node_names.values()))}
        write_json(self.out_dir / "metrics.json", clean(summary))
        from .report import write_report

        write_report(self.out_dir, cfg, summary)
        self._emit("done", out_dir=str(self.out_dir))
        return summary

    def _models(self, state: State) -> dict[str, dict]:
        models = {P.GLOBAL_MODEL: state.global_weights}
        for site, arr in sorted(state.local_weights.items()):
            models[P.local_model_id(site)] = arr
        return models

    def _round(self, rnd: int, state: State, initial: dict) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        self._emit("round-start", round=rnd, rounds=cfg.run.rounds)
        config = self._base_config(rnd)
        messages = list(self.strategy.configure_train(rnd, P.to_record(state.global_weights), config, self.grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        for m in messages:  # each message gets its own RecordDict (Flower shares one between them)
            content = RecordDict({P.ARRAYS: m.content[P.ARRAYS], P.CONFIG: m.content[P.CONFIG]})
            if cfg.cross_site.local_baseline:
                site = self.node_names.get(m.metadata.dst_node_id)
                content[P.LOCAL_ARRAYS] = P.to_record(state.local_weights.get(site, initial) if site else initial)
            m.content = content
        replies = list(self.grid.send_and_receive(messages, timeout=cfg.run.round_timeout_s))
        rec = RoundRecord(round=rnd, sites={}, rejected={}, errors={}, declined=[], missing=[], sampled=len(sampled))
        candidates: dict[str, Message] = {}
        updates: dict[str, dict[str, np.ndarray]] = {}  # each accepted reply's arrays, converted once
        replied = set()
        seen: set[str] = set()
        for msg in replies:
            replied.add(msg.metadata.src_node_id)
            site = self._site_of(msg, seen)
            if msg.has_error():
                code = int(msg.error.code)
                reason = str(msg.error.reason or "")
                shown = reason if P.ERROR_REASON_RE.match(reason) else P.ERROR_CODES.get(code, f"flower-error-{code}")
                rec["errors"][site] = shown
                log.warning("round %d: %s replied with an error: %s", rnd, site, shown)
                continue
            metrics = {k: float(v) for k, v in msg.content[P.METRICS].items()} if P.METRICS in msg.content else {}
            rec["sites"][site] = metrics
            if P.LOCAL_ARRAYS in msg.content:
                local = P.from_record(msg.content[P.LOCAL_ARRAYS])
                if update_problem(local, initial) is None:
                    state.local_weights[site] = local
            if metrics.get("declined", 0.0) >= 1.0 or P.ARRAYS not in msg.content:
                rec["declined"].append(site)
                log.warning("round %d: %s declined to train (privacy budget)", rnd, site)
                continue
            arrays = P.from_record(msg.content[P.ARRAYS])
            problem = update_problem(arrays, state.global_weights)
            if problem:
                rec["rejected"][site] = problem
                log.warning("round %d: rejected the update from %s: %s", rnd, site, problem)
                continue
            candidates[site] = msg
            updates[site] = arrays
        # Missing: sampled without a reply in time, or known from earlier rounds and gone now.
        replied_names = {self.name(n) for n in replied}
        expected = {self.name(n) for n in sampled} | set(self.node_names.values())
        rec["missing"] = sorted(expected - replied_names)
        for site in rec["missing"]:
            log.warning("round %d: no reply from %s within %.0f s; left out of this round", rnd, site,
                        cfg.run.round_timeout_s)
        dists = {s: distance(updates[s], state.global_weights) for s in candidates}
        for site, why in norm_outliers(dists, cfg.run.max_update_norm_ratio).items():
            rec["rejected"][site] = why
            log.warning("round %d: rejected the update from %s: %s", rnd, site, why)
            candidates.pop(site)
        accepted = []
        for site, msg in candidates.items():
            m = msg.content[P.METRICS]
            msg.content = RecordDict({P.ARRAYS: msg.content[P.ARRAYS],
                                      P.METRICS: MetricRecord({"num-examples": float(m["num-examples"]),
                                                               "train-loss": float(m.get("train-loss", 0.0))})})
            accepted.append(msg)
        rec["aggregated"] = sorted(candidates)
        if len(accepted) >= max(1, min(cfg.run.min_sites, len(sampled))):
            arrays, agg = self.strategy.aggregate_train(rnd, accepted)
            if arrays is not None:
                state.global_weights = P.from_record(arrays)
            rec["train_loss"] = float(agg["train-loss"]) if agg is not None and "train-loss" in agg else None
        else:
            rec["aggregated"] = []
            log.warning("round %d: %d usable updates, fewer than min_sites=%d; the global model is unchanged",
                        rnd, len(accepted), cfg.run.min_sites)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        state.round = rnd
        state.history.append(rec)
        state.node_names = dict(self.node_names)
        state.strategy_state = {k: getattr(self.strategy, k) for k in ("m_t", "v_t")
                                if isinstance(getattr(self.strategy, k, None), dict)}
        self.ckpt.save(state)
        self._emit("round-end", **rec)

    # ------------------------------------------------------------ cross-site
    def cross_site(self, models: dict[str, dict], tag: str = "final") -> dict:
        cfg = self.cfg
        nodes = list(self.grid.get_node_ids())
        content = RecordDict({P.CONFIG: self._base_config(0)})
        for mid, arr in models.items():
            content[P.MODEL_PREFIX + mid] = P.to_record(arr)
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        self._emit("cross-site-start", models=len(models), sites=len(nodes), tag=tag)
        replies = list(self.grid.send_and_receive(messages, timeout=cfg.run.round_timeout_s))
        matrix: dict[str, dict[str, dict]] = {m: {} for m in models}
        errors = {}
        seen: set[str] = set()
        for msg in replies:
            site = self._site_of(msg, seen)
            if msg.has_error():
                errors[site] = str(msg.error.reason or msg.error.code)
                continue
            for key in msg.content.keys():
                if key.startswith(P.EVAL_PREFIX):
                    mid = key[len(P.EVAL_PREFIX):]
                    if mid in matrix:
                        matrix[mid][site] = {k: float(v) for k, v in msg.content[key].items()}
        replied = {m.metadata.src_node_id for m in replies}
        missing = sorted(self.name(n) for n in nodes if n not in replied)
        payload = crosssite.write(self.out_dir, matrix, tag)
        payload["errors"] = errors
        payload["missing"] = missing
        self._emit("cross-site-end", tag=tag, gaps=payload["gaps"]["auroc"], matrix=matrix)
        return clean(payload)

    def evaluate_only(self, model_path: Path) -> dict:
        arrays = read_npz(model_path)
        name = Path(model_path).stem
        payload = self.cross_site({name: arrays}, tag=f"evaluate-{name}")
        write_json(self.out_dir / f"evaluate-{name}.json", payload)
        return payload
