"""The coordinator's round loop, over any Flower ``Grid`` (a real SuperLink or an in-process one).

Per round: the run's strategy (its registry entry in :mod:`dicomfl.server.strategies`, inside the
run's wrappers, e.g. the local-only baseline and local GroupNorm) samples the
sites and builds the train messages. The loop calls the strategy interface of
:mod:`dicomfl.server.strategies.base` (``configure_train``, ``check_replies``, ``aggregate_train``,
``state``) and knows none of the methods inside. Every reply is
treated as hostile: a node's second reply counts once (:func:`~.replies.dedupe_replies`), each
reply is validated before anything reads it (:func:`~.replies.validate_train_reply`: schema,
whitelisted numbers, exact names/shapes/real float dtypes, finite values, a bounded and plausible
``num-examples``), the site is named by its authenticated node (:mod:`~.identity`), never by what
the reply claims, and updates pass the norm rules, optional clipping and the weight-share cap
(:func:`~.checks.screen_updates`) before the strategy aggregates them. A rejected reply is logged
with the site's name and the round goes on. Everything is checkpointed. At the end (and every
``cross_site.every`` rounds) every site evaluates every model.

The loop calls the strategy's ``configure_train``/``aggregate_train`` itself instead of
``Strategy.start`` because it must resume from a checkpoint at round k (Flower has no resume) and
filter bad updates before aggregation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.config import RunConfig
from dicomfl.common.model import build_model, get_weights, norm_parameter_names

from . import crosssite, fedstats
from .checkpoint import Checkpoints, State, clean, read_npz, write_json, write_npz
from .checks import ScreenRules, screen_updates
from .identity import SiteIdentities
from .replies import (Rejection, aggregation_message, dedupe_replies, validate_eval_reply, validate_personal_reply,
                      validate_train_reply)
from .selection import BestModel
from .strategies import Registered, for_run
from .strategies.base import StrategyWrapper
from .strategies.local import LocalBaseline, LocalNorm

log = logging.getLogger("dicomfl.server")


class RoundRecord(TypedDict, total=False):
    """What happened in one round: kept in the checkpoints, ``metrics.json`` and the report."""

    round: int
    sampled: int  # sites the strategy sent a train message to
    sites: dict[str, dict[str, float]]  # site -> its train metrics (whitelisted numbers only)
    local: dict[str, dict[str, float]]  # site -> its local-only baseline's train metrics (incl. val-auroc before training)
    rejected: dict[str, str]  # site -> why its update was not aggregated
    errors: dict[str, str]  # site -> the error code it replied with
    declined: list[str]  # sites that declined to train (privacy budget)
    missing: list[str]  # sites that did not reply in time
    aggregated: list[str]  # sites whose updates made the new global model
    duplicates: dict[str, int]  # site -> extra replies it sent this round (each counted once)
    clipped: dict[str, float]  # site -> the factor its update was scaled by (clip_update_norm)
    capped: dict[str, float]  # site -> its aggregation weight after the max_weight_share cap
    train_loss: float | None
    seconds: float  # the round's wall time at the coordinator
    exchange_seconds: float  # of which: from sending the messages to the last reply (or the timeout)

Event = Callable[[str, dict], None]


def lr_scale(schedule: str, server_round: int, rounds: int, min_factor: float) -> float:
    """The factor on the sites' learning rate in ``server_round`` (1 for ``constant``; a cosine
    from 1 at round 1 to ``min_factor`` at the last round). Cross-site evaluation (round 0) gets 1."""
    if schedule == "constant" or rounds <= 1 or server_round < 1:
        return 1.0
    t = (min(server_round, rounds) - 1) / (rounds - 1)
    return float(min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def strategy_for(cfg: RunConfig) -> Registered:
    """The run's strategy, built from its registry entry (see :mod:`dicomfl.server.strategies`)."""
    return for_run(cfg.run)


def round_strategy(cfg: RunConfig, local_model) -> StrategyWrapper:
    """The run's strategy inside the wrappers the run asks for: ``run.local_norm``
    (:class:`~.strategies.local.LocalNorm`) and ``cross_site.local_baseline``
    (:class:`~.strategies.local.LocalBaseline`, which sends ``local_model(node_id)``)."""
    strategy: StrategyWrapper = strategy_for(cfg)
    if cfg.run.local_norm:
        strategy = LocalNorm(strategy, norm_parameter_names(build_model(cfg.model)))
    if cfg.cross_site.local_baseline:
        strategy = LocalBaseline(strategy, local_model)
    return strategy


class Federation:
    """The coordinator's side of a run: rounds, checks, aggregation, checkpoints, cross-site validation.

    Parameters
    ----------
    cfg : RunConfig
        The run (rounds, strategy, model, privacy request, cross-site schedule, reply bounds).
    grid : flwr.serverapp.Grid
        A real SuperLink's grid (in the ServerApp) or an in-process one (benchmark, tests).
    out_dir : Path, optional
        Where checkpoints, ``metrics.json`` and the report go (default: the run's ``out_dir``).
    on_event : callable, optional
        ``on_event(kind, data)`` for progress ("round-start", "round-end", "cross-site-end", ...).
    identities : SiteIdentities, optional
        Who each node is. Default: the names an in-process grid assigned itself
        (``grid.trusted_names()``), else unauthenticated (``node-<id>``; the report says so). The
        ServerApp passes the coordinator's PKI.

    ``run(resume=False)`` returns the run's summary (history of :class:`RoundRecord`, final
    cross-site matrix, sites, identity); ``evaluate_only(model_path)`` runs cross-site validation only.
    """

    def __init__(self, cfg: RunConfig, grid, out_dir: Path | None = None, on_event: Event | None = None,
                 identities: SiteIdentities | None = None) -> None:
        self.cfg = cfg
        self.grid = grid
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda kind, data: None)
        self.ckpt = Checkpoints(self.out_dir)
        if identities is None:
            trusted = getattr(grid, "trusted_names", None)
            identities = SiteIdentities.trusted(trusted()) if callable(trusted) else SiteIdentities.insecure()
        self.identities = identities
        self.strategy = round_strategy(cfg, self._local_model)
        self._state: State | None = None  # the run's state while it runs (the local baselines are in it)
        self._initial: dict | None = None  # the initial model: a site's local baseline before its first reply
        self.feature_stats: dict | None = None  # the run's global feature standardization (server.fedstats)

    # ------------------------------------------------------------------ helpers
    def name(self, node_id: int) -> str:
        """The authenticated name of a node (``node-<id>`` when it has none)."""
        return self.identities.name_for(node_id)

    def _exchange(self, messages: list[Message]) -> list[Message]:
        """Send ``messages`` and collect the replies that arrive within the round timeout, asking
        for them every ``run.poll_interval_s`` (not Flower's fixed 3 s)."""
        from .gridpoll import send_and_collect

        return list(send_and_collect(self.grid, messages, timeout=self.cfg.run.round_timeout_s,
                                     poll_interval=self.cfg.run.poll_interval_s,
                                     compact=self.cfg.run.compact_messages))

    def _replies(self, messages: list[Message]) -> tuple[list[Message], dict[str, int]]:
        """Exchange, learn who the nodes are, and keep one reply per node (and per site)."""
        replies = self._exchange(messages)
        self.identities.refresh(self.grid)
        kept = dedupe_replies(replies, key=lambda m: self.name(m.metadata.src_node_id))
        return kept.replies, {str(k): n for k, n in kept.duplicates.items()}

    def _local_model(self, node_id: int) -> dict:
        """The local-only baseline model to send ``node_id``: its site's latest, else the initial one."""
        return self._state.local_weights.get(self.name(node_id), self._initial)

    def _emit(self, kind: str, **data) -> None:
        self.on_event(kind, data)

    def _base_config(self, server_round: int) -> ConfigRecord:
        r, p = self.cfg.run, self.cfg.privacy
        return ConfigRecord({
            P.RUN: r.name, P.SERVER_ROUND: server_round, P.NUM_ROUNDS: r.rounds, P.LOCAL_EPOCHS: r.local_epochs,
            P.LOCAL_STEPS: r.local_steps or 0, P.DP: p.dp, P.TARGET_EPSILON: p.target_epsilon or 0.0,
            P.DELTA: p.delta, P.SEED: r.seed, P.MODEL: self.cfg.model.model_dump_json(),
            P.LR_SCALE: lr_scale(r.lr_schedule, server_round, r.rounds, r.lr_min_factor), P.LOCAL_NORM: r.local_norm,
            **fedstats.config_keys(self.feature_stats),
        })

    # ------------------------------------------------------- feature statistics
    def _gather_feature_stats(self) -> dict:
        """Ask every site for its feature statistics (before round 1) and combine the usable replies."""
        nodes = list(self.grid.get_node_ids())
        self._emit("feature-stats-start", sites=len(nodes))
        replies, _ = self._replies(fedstats.query_messages(nodes, self._base_config(1)))
        rec = fedstats.gather(replies, self.name, self.cfg.model, max_examples=self.cfg.run.max_examples,
                              asked=[self.name(n) for n in nodes])
        write_json(self.out_dir / "feature_stats.json", clean(rec))
        self._emit("feature-stats-end", sites=rec["sites"])
        return rec

    # ------------------------------------------------------------------ training
    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        initial = get_weights(build_model(cfg.model, seed=cfg.run.seed))
        state = self.ckpt.latest() if resume else None
        if state is not None:
            start = state.round + 1
            self.strategy.set_state(state.strategy_state)
            log.info("resuming run %s after round %d of %d", cfg.run.name, state.round, cfg.run.rounds)
            state.interruptions.append(state.round)
            self._emit("resume", round=state.round)
        else:
            state = State(round=0, global_weights=initial)
            start = 1
        self._state, self._initial = state, initial
        write_json(self.out_dir / "run_config.json", clean(cfg.model_dump(mode="json")))
        self.identities.refresh(self.grid)
        self.feature_stats = state.feature_stats
        if self.feature_stats is None and fedstats.wanted(cfg.model):  # kept in the checkpoints: never re-drawn
            self.feature_stats = state.feature_stats = self._gather_feature_stats()
        for rnd in range(start, cfg.run.rounds + 1):
            self._round(rnd, state, initial)
            if cfg.cross_site.every and rnd % cfg.cross_site.every == 0 and rnd < cfg.run.rounds:
                self.cross_site(self._models(state), tag=f"round-{rnd:04d}")
        models = self._models(state)
        best = BestModel(self.ckpt.dir)
        models = {P.GLOBAL_MODEL: models.pop(P.GLOBAL_MODEL), **best.candidates(state.history, state.round), **models}
        personalized = None
        if cfg.run.personalize is not None or cfg.run.local_norm:
            personalized, shared = self.personalize(state)
            for site, arr in sorted(shared.items()):
                models[P.personal_model_id(site)] = arr
                write_npz(self.ckpt.dir / f"personal-{site}.npz", arr)
        final = self.cross_site(models, tag="final", personal=personalized is not None)
        selected, chosen = best.choose(final, state.round, models, state.global_weights)
        write_npz(self.ckpt.dir / "best.npz", chosen)
        sites = {s for h in state.history for key in ("sites", "errors", "rejected") for s in h.get(key, {})}
        summary = {"run": cfg.run.name, "rounds": state.round, "strategy": cfg.run.strategy, "history": state.history,
                   "cross_site": final, "selected": selected, "sites": sorted(sites | set(state.local_weights)),
                   "identity": self.identities.describe(), "resumed_after": list(state.interruptions),
                   "personalized": personalized, "feature_stats": self.feature_stats}
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

    def _reject(self, rec: RoundRecord, key: str, site: str, why: str) -> None:
        rec[key][site] = why
        if key == "errors":
            log.warning("round %d: %s replied with an error: %s", rec["round"], site, why)
        else:
            log.warning("round %d: rejected the update from %s: %s", rec["round"], site, why)

    def _round(self, rnd: int, state: State, initial: dict) -> None:
        r, t0 = self.cfg.run, time.perf_counter()
        self._emit("round-start", round=rnd, rounds=r.rounds)
        config = self._base_config(rnd)
        messages = list(self.strategy.configure_train(rnd, P.to_record(state.global_weights), config, self.grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        for m in messages:  # each message gets its own RecordDict (Flower shares one between them)
            m.content = RecordDict(dict(m.content.items()))
        t1 = time.perf_counter()
        replies, duplicates = self._replies(messages)
        exchange_s = time.perf_counter() - t1
        rec = RoundRecord(round=rnd, sites={}, rejected={}, errors={}, declined=[], missing=[], sampled=len(sampled),
                          duplicates=duplicates)
        for site, n in duplicates.items():
            log.warning("round %d: %s sent %d extra repl%s; counted once", rnd, site, n, "y" if n == 1 else "ies")
        valid = {}
        for msg in replies:
            site = self.name(msg.metadata.src_node_id)
            res = validate_train_reply(msg, state.global_weights, max_examples=r.max_examples,
                                       previous_examples=state.examples.get(site), max_examples_growth=r.max_examples_growth,
                                       local_reference=initial, expect_control=self.strategy.needs.control_delta)
            if isinstance(res, Rejection):
                self._reject(rec, "errors" if res.kind == "error" else "rejected", site, res.reason)
                continue
            self.identities.note_claim(res.node_id, res.claimed_name)
            rec["sites"][site] = res.metrics
            if res.local_arrays is not None:
                state.local_weights[site] = res.local_arrays
            if res.local_metrics is not None:
                rec.setdefault("local", {})[site] = res.local_metrics
            if res.declined:
                rec["declined"].append(site)
                log.warning("round %d: %s declined to train (privacy budget)", rnd, site)
                continue
            valid[site] = res
            state.examples[site] = res.num_examples
        # Missing: sampled without a reply in time, or known from earlier rounds and gone now.
        replied = {self.name(m.metadata.src_node_id) for m in replies}
        expected = {self.name(n) for n in sampled} | {s for h in state.history for s in h.get("sites", {})}
        rec["missing"] = sorted(expected - replied)
        for site in rec["missing"]:
            log.warning("round %d: no reply from %s within %.0f s; left out of this round", rnd, site, r.round_timeout_s)
        for site, why in sorted(self.strategy.check_replies(rnd, valid).items()):  # the strategy's own rules
            self._reject(rec, "rejected", site, why)
            del valid[site]
        screened = screen_updates({s: v.arrays for s, v in valid.items()}, {s: v.num_examples for s, v in valid.items()},
                                  state.global_weights, rules=ScreenRules.from_run(r))
        for site, why in screened.rejected.items():
            self._reject(rec, "rejected", site, why)
        rec["clipped"] = dict(screened.clipped)
        rec["capped"] = {s: screened.weights[s] for s in screened.capped}
        # In a fixed order (by site): Flower samples nodes in random order and replies arrive in any
        # order, and a float sum depends on its order; sorted, a round's result does not.
        accepted = [aggregation_message(valid[s], arrays=screened.arrays[s], weight=screened.weights[s])
                    for s in sorted(screened.arrays)]
        rec["aggregated"] = sorted(screened.arrays)
        needed = max(1, min(r.min_sites, len(sampled)), self.strategy.min_replies())
        arrays = None
        if len(accepted) >= needed:
            arrays, agg = self.strategy.aggregate_train(rnd, accepted)
            rec["train_loss"] = float(agg[P.TRAIN_LOSS]) if agg is not None and P.TRAIN_LOSS in agg else None
        if arrays is not None:
            state.global_weights = P.from_record(arrays)
        else:
            rec["aggregated"] = []
            log.warning("round %d: %d usable updates (%s needs %d); the global model is unchanged",
                        rnd, len(accepted), r.strategy, needed)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rec["exchange_seconds"] = round(exchange_s, 2)  # messages out until the last reply (or the timeout)
        state.round = rnd
        state.history.append(rec)
        state.node_names = dict(self.identities.nodes)
        state.strategy_state = self.strategy.state()
        self.ckpt.save(state)
        self._emit("round-end", **rec)

    # ----------------------------------------------------------- personalization
    def personalize(self, state: State) -> tuple[dict, dict[str, dict]]:
        """Ask every site for its personalized model of the final global model (client/personal.py).

        Returns
        -------
        (record, shared)
            What happened (``sites``: each site's numbers; ``errors``: who failed and why;
            ``shared``: who sent its model) and the shared models by site.
        """
        from dicomfl.common.config import PersonalizeSection

        p = self.cfg.run.personalize or PersonalizeSection(steps=0)
        nodes = list(self.grid.get_node_ids())
        messages = []
        for n in nodes:
            config = self._base_config(max(state.round, 1))
            config.update({P.PERSONALIZE_STEPS: p.steps, P.PERSONALIZE_LR_SCALE: p.lr_scale, P.PERSONALIZE_CHECKS: p.checks})
            content = RecordDict({P.ARRAYS: P.to_record(state.global_weights), P.CONFIG: config})
            messages.append(Message(content=content, dst_node_id=n, message_type=P.PersonalizeRequest.MESSAGE_TYPE))
        self._emit("personalize-start", sites=len(nodes), steps=p.steps)
        replies, _ = self._replies(messages)
        record: dict = {"steps": p.steps, "sites": {}, "errors": {}, "shared": []}
        shared = {}
        for msg in replies:
            site = self.name(msg.metadata.src_node_id)
            res = validate_personal_reply(msg, state.global_weights)
            if isinstance(res, Rejection):
                record["errors"][site] = res.reason
                log.warning("personalization: %s: %s", site, res.reason)
                continue
            record["sites"][site] = res.metrics
            if res.arrays is not None:
                shared[site] = res.arrays
        record["shared"] = sorted(shared)
        record["missing"] = sorted({self.name(n) for n in nodes} - {self.name(m.metadata.src_node_id) for m in replies})
        self._emit("personalize-end", **record)
        return record, shared

    # ------------------------------------------------------------ cross-site
    def cross_site(self, models: dict[str, dict], tag: str = "final", personal: bool = False) -> dict:
        """Every site evaluates every model; with ``personal`` each site also reports its own
        personalized model (``personal:<site>``; kept at home unless it shared it)."""
        nodes = list(self.grid.get_node_ids())
        config = self._base_config(0)
        config["personal"] = personal
        replicates = self.cfg.cross_site.replicates
        if replicates:  # a site sends at most its own privacy.eval_replicates (default none)
            config[P.REPLICATES_REQUEST] = replicates
        content = RecordDict({P.CONFIG: config})
        for mid, arr in models.items():
            content[P.MODEL_PREFIX + mid] = P.to_record(arr)
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        self._emit("cross-site-start", models=len(models), sites=len(nodes), tag=tag)
        replies, duplicates = self._replies(messages)
        matrix: dict[str, dict[str, dict]] = {m: {} for m in models}
        errors = {}
        for msg in replies:
            site = self.name(msg.metadata.src_node_id)
            res = validate_eval_reply(msg, list(models) + ([P.OWN_PERSONAL] if personal else []),
                                      max_replicates=replicates)
            if isinstance(res, Rejection):
                errors[site] = res.reason
                log.warning("cross-site (%s): %s: %s", tag, site, res.reason)
                continue
            for mid, metrics in res.metrics.items():
                if mid == P.OWN_PERSONAL:  # the site's own personalized model, named by who it is
                    mid = P.personal_model_id(site)
                    if site in matrix.get(mid, {}):  # it shared the model: that row has the cell already
                        continue
                matrix.setdefault(mid, {})[site] = metrics
        replied = {self.name(m.metadata.src_node_id) for m in replies}
        missing = sorted({self.name(n) for n in nodes} - replied)
        payload = crosssite.write(self.out_dir, matrix, tag)
        payload["errors"] = errors
        payload["missing"] = missing
        payload["duplicates"] = duplicates
        self._emit("cross-site-end", tag=tag, gaps=payload["gaps"]["auroc"], matrix=matrix)
        return clean(payload)

    def evaluate_only(self, model_path: Path) -> dict:
        weights = read_npz(model_path)
        name = Path(model_path).stem
        latest = self.ckpt.latest()  # the run's standardization, as its models were trained with
        self.feature_stats = latest.feature_stats if latest is not None else None
        payload = self.cross_site({name: weights}, tag=f"evaluate-{name}")
        write_json(self.out_dir / f"evaluate-{name}.json", payload)
        return payload
