"""What a site does with one message from the coordinator, independent of how it arrived.

:class:`SiteHandler` turns a train or evaluate :class:`flwr.app.Message` into its reply. The
ClientApp (:mod:`dicomfl.client.app`) is a thin shell over it; the in-process grid of the
benchmark and the tests call it directly, with their own :class:`SiteResolver`.

Every reply holds only what :mod:`dicomfl.common.protocol` lists. Any exception — which could
quote a file name or a header value — is logged in full in the site's own log under a random
reference, and the coordinator receives only an error code (chosen by the exception's type, in
:func:`dicomfl.common.protocol.error_code`) and that reference.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.config import ModelConfig
from dicomfl.common.errors import BadRequest, ConfigError
from dicomfl.common.fedstats import released
from dicomfl.common.splits import VAL
from dicomfl.common.weights import values_problem
from dicomfl.common.wire import WireError, is_packed, pack, unpack

from .personal import keep_local_norms, personalize, stored_personal_model, with_local_norms
from .scaffold import ScaffoldRound
from .fedstats import site_statistics, transform_from
from .trainer import RoundPlan, SiteTrainer

log = logging.getLogger("dicomfl.site")


class SiteResolver:
    """Finds the :class:`SiteTrainer` a message is for, from the node config and the run's model.

    The default reads ``site-config=<path of site.yaml>`` from the SuperNode's node config and
    keeps one trainer per (site config, model config), so a long-lived process opens a site's
    data once. At most :attr:`max_trainers` are kept (the least recently used goes first): a
    coordinator that sends many model descriptions cannot make the site hold a trainer for each.
    The benchmark passes a resolver of its own (simulated sites held in memory).
    """

    #: Trainers kept at once. A run uses one model description (two with a local baseline).
    max_trainers = 4

    def __init__(self) -> None:
        self._trainers: OrderedDict[str, SiteTrainer] = OrderedDict()

    def load(self, site_config: str, model_cfg: ModelConfig) -> SiteTrainer:
        """A new trainer for ``site_config`` (override to serve sites from elsewhere)."""
        from dicomfl.common.config import load_site_config
        from dicomfl.common.logs import site_logger

        site = load_site_config(Path(site_config))
        return SiteTrainer(site, model_cfg, logger=site_logger(site.site.state_dir, site.site.name))

    def __call__(self, node_config: Mapping, model_cfg: ModelConfig) -> SiteTrainer:
        path = node_config.get("site-config")
        if not path:
            raise ConfigError("node config: site-config is not set")
        key = f"{path}|{model_cfg.model_dump_json()}"
        if key in self._trainers:
            self._trainers.move_to_end(key)
            return self._trainers[key]
        trainer = self.load(str(path), model_cfg)  # raises (not kept) for a model past the site's bounds
        self._trainers[key] = trainer
        while len(self._trainers) > self.max_trainers:
            self._trainers.popitem(last=False)
        return trainer


class InMemorySites(SiteResolver):
    """Sites held in memory, named by key: ``site-config=<key>`` selects one (simulations)."""

    def __init__(self, sites: Mapping[str, SiteTrainer]) -> None:
        super().__init__()
        self.sites = dict(sites)

    def load(self, site_config: str, model_cfg: ModelConfig) -> SiteTrainer:
        base = self.sites.get(site_config)
        if base is None:
            raise ConfigError(f"node config: no simulated site {site_config!r}")
        return SiteTrainer(base.cfg, model_cfg, data=base.data(), logger=base.log)


def _numbers(d: dict, allowed: frozenset) -> MetricRecord:
    """The whitelisted scalars of ``d`` (and its list metrics, :data:`~dicomfl.common.protocol.LIST_METRICS`,
    when allowed: sent whole or not at all; a list with a non-finite value is left out, and its id too)."""
    out = {k: float(v) for k, v in d.items() if k in allowed and isinstance(v, (int, float, np.floating, np.integer))}
    for k in P.LIST_METRICS & allowed:
        v = d.get(k)
        if v is None:
            continue
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if 0 < len(arr) <= P.MAX_REPLICATES and np.isfinite(arr).all():
            out[k] = [float(x) for x in arr]
        elif k == P.AUROC_REPLICATES:
            out.pop(P.AUROC_REPLICATES_ID, None)
    return MetricRecord(out)


# What a site accepts from the coordinator, key by key: (type, lowest, highest). Every string and
# number in a message may be an attack on the site: nothing outside these bounds is used, and no
# value is ever echoed back (the reply says only ``bad-request``).
_INT, _NUM = "int", "number"
PLAN_BOUNDS: dict[str, tuple[str, float, float]] = {
    "server-round": (_INT, 1, 1_000_000), "num-rounds": (_INT, 1, 1_000_000), "local-epochs": (_INT, 1, 10_000),
    "local-steps": (_INT, 0, 10_000_000), "seed": (_INT, -(2**62), 2**62), "proximal-mu": (_NUM, 0.0, 1e6),
    "target-epsilon": (_NUM, 0.0, 1e6), "delta": (_NUM, 1e-300, 0.999), "lr-scale": (_NUM, 1e-3, 1.0),
    "personalize-steps": (_INT, 0, 100_000), "personalize-lr-scale": (_NUM, 1e-3, 1.0), "personalize-checks": (_INT, 1, 20),
    P.REPLICATES_REQUEST: (_INT, 0, P.MAX_REPLICATES),
}


def _bounded(cfg: ConfigRecord, key: str, default: float) -> float:
    kind, lo, hi = PLAN_BOUNDS[key]
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise BadRequest(f"config {key}: not a finite number")
    if kind == _INT and float(v) != int(v):
        raise BadRequest(f"config {key}: not an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"config {key}: outside [{lo:g}, {hi:g}]")
    return int(v) if kind == _INT else float(v)


def _weights(msg: Message, key: str) -> dict:
    """The model weights in record ``key`` of the coordinator's message (shapes are checked against
    the site's own model when they are loaded: ModelMismatch)."""
    rec = msg.content[key] if key in msg.content else None
    if not isinstance(rec, ArrayRecord):
        raise BadRequest("a model record is not an ArrayRecord")
    try:
        weights = P.from_record(rec)
    except Exception:  # noqa: BLE001 - a malformed key or array; its text may quote the input
        raise BadRequest("a model record does not hold a model's weights") from None
    if (why := values_problem(weights)) is not None:  # int, complex, NaN, huge: refused, never cast
        raise BadRequest(f"a model record: {why}")
    return weights


def run_name(value) -> str:
    """The run name a message carries, if it is a plain name (it keys the site's privacy ledger)."""
    if not isinstance(value, str) or not P.RUN_NAME_RE.fullmatch(value):
        raise BadRequest("config run: not a run name (letters, digits, '.', '_', '-'; at most 64)")
    return value


def round_plan(cfg: ConfigRecord) -> RoundPlan:
    """The round's plan from a train message's config record, every value checked against its
    pattern or bounds (:data:`PLAN_BOUNDS`); raises :class:`BadRequest` otherwise."""
    dp, local_norm = _flag(cfg, "dp"), _flag(cfg, "local-norm")
    steps = _bounded(cfg, "local-steps", 0)
    target = _bounded(cfg, "target-epsilon", 0.0)
    return RoundPlan(run=run_name(cfg.get("run", "run")), server_round=_bounded(cfg, "server-round", 1),
                     num_rounds=_bounded(cfg, "num-rounds", 1), local_epochs=_bounded(cfg, "local-epochs", 1),
                     local_steps=steps or None, proximal_mu=_bounded(cfg, "proximal-mu", 0.0), dp=dp,
                     target_epsilon=target or None, delta=_bounded(cfg, "delta", 1e-5), seed=_bounded(cfg, "seed", 0),
                     lr_scale=_bounded(cfg, "lr-scale", 1.0), local_norm=local_norm)


def _flag(cfg: ConfigRecord, key: str) -> bool:
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise BadRequest(f"config {key}: not a boolean")
    return v


class SiteHandler:
    """A site's answers to the coordinator's messages.

    Parameters
    ----------
    resolver : SiteResolver, optional
        Maps a message's node config and model to the site's trainer (default: site.yaml on disk).
    """

    def __init__(self, resolver: SiteResolver | None = None) -> None:
        self.resolver = resolver or SiteResolver()
        self._started = time.perf_counter()

    # ----------------------------------------------------------------- entry point
    def handle(self, msg: Message, context: Context) -> Message:
        """The reply to ``msg``: a train or evaluate result, or an error code and a log reference."""
        handlers: dict[str, Callable[[Message, SiteTrainer, ConfigRecord], Message]] = {
            "train": self.train, "evaluate": self.evaluate, "query": self.query}
        kind = msg.metadata.message_type
        t0 = time.perf_counter()
        site_log = log
        try:
            handler = handlers.get(kind)
            if handler is None:
                raise ConfigError(f"message type {kind!r} is not handled by a site")
            packed = msg.has_content() and is_packed(msg.content)
            if packed:  # the deployment's compact form (common/wire.py): read it, answer in it
                try:
                    msg.content = unpack(msg.content)
                except WireError as exc:
                    raise BadRequest(str(exc)) from None
            site, cfg = self._site(msg, context)
            site_log = site.log
            reply = handler(msg, site, cfg)
            if packed and reply.has_content():
                reply.content = pack(reply.content)
            site_log.info("%s message handled in %.2f s (handler up %.2f s)", kind, time.perf_counter() - t0,
                          time.perf_counter() - self._started)
            return reply
        except Exception as exc:  # noqa: BLE001 - nothing of the exception may cross the boundary
            return self._error(msg, exc, site_log)
        except BaseException as exc:  # noqa: BLE001 - e.g. a native binding's panic; not an exit
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return self._error(msg, exc, site_log)

    def _error(self, msg: Message, exc: BaseException, site_log: logging.Logger) -> Message:
        ref = secrets.token_hex(6)
        code = P.error_code(exc)
        # The traceback goes in as exc_info: the log's formatter keeps it readable on its own lines,
        # while the message itself (which may quote a path) is escaped to one line.
        site_log.error("%s failed (ref=%s): %s", msg.metadata.message_type, ref, exc,
                       exc_info=(type(exc), exc, exc.__traceback__))
        return Message(Error(code=code, reason=P.error_reason(code, ref)), reply_to=msg)

    def _site(self, msg: Message, context: Context) -> tuple[SiteTrainer, ConfigRecord]:
        if P.CONFIG not in msg.content or not isinstance(msg.content[P.CONFIG], ConfigRecord):
            raise BadRequest("message has no config record")
        cfg = msg.content[P.CONFIG]
        raw = cfg.get("model")
        if not isinstance(raw, str) or len(raw) > 10_000:
            raise BadRequest("config model: not a model description")
        try:
            model_cfg = ModelConfig.model_validate(json.loads(raw))
        except ValueError:  # JSON or schema: the text may quote the value, so it is not kept
            raise BadRequest("config model: not a valid model description") from None
        return self.resolver(context.node_config, model_cfg), cfg

    # ---------------------------------------------------------------------- train
    def train(self, msg: Message, site: SiteTrainer, cfg: ConfigRecord) -> Message:
        """Evaluate the incoming global model on validation data, train it, and train the local-only
        baseline if the message carries one."""
        plan = round_plan(cfg)
        plan.features = transform_from(cfg, site.model_cfg)
        global_weights = _weights(msg, P.ARRAYS)
        if "personalize-steps" in cfg:
            return self.personalize(msg, site, cfg, plan, global_weights)
        # SCAFFOLD: the server control is checked (and the optimizer) before any work is done
        scaffold = ScaffoldRound.open(site, msg.content[P.CONTROL]) if P.CONTROL in msg.content else None
        if scaffold is not None and plan.local_norm:
            raise BadRequest("config local-norm: not in a SCAFFOLD round")
        metrics: dict[str, float] = {}
        val = site.evaluate(global_weights, split=VAL, features=plan.features)
        for k in ("auroc", "loss", "balanced_accuracy", "num-examples"):
            metrics[f"val-{k}"] = val.get(k, math.nan)
        delta_c = None
        if scaffold is not None:
            out, delta_c = scaffold.train(global_weights, plan)
        elif plan.local_norm:
            # round 1 starts from the global values: norms stored under this run name are from an earlier run
            start = with_local_norms(site, plan.run, global_weights) if plan.server_round > 1 else global_weights
            out = site.train(start, plan)
            if not out.declined:  # the trained GroupNorm values stay here; the global ones go back
                out.weights = keep_local_norms(site, plan.run, out.weights, global_weights)
        else:
            out = site.train(global_weights, plan)
        metrics.update(out.metrics)
        content = RecordDict({P.SITE: ConfigRecord({"name": site.name})})
        if not out.declined:  # declined: no update; the metrics tell the coordinator why
            content[P.ARRAYS] = P.to_record(out.weights)
        if delta_c is not None:
            content[P.CONTROL_DELTA] = P.to_record(delta_c)
        content[P.METRICS] = _numbers(metrics, P.TRAIN_METRICS)
        if P.LOCAL_ARRAYS in msg.content and site.cfg.privacy.share_local_model:  # the site's opt-in, never the coordinator's
            local_plan = RoundPlan(**{**plan.__dict__, "kind": "local", "proximal_mu": 0.0})
            local_weights = _weights(msg, P.LOCAL_ARRAYS)
            # the incoming local model on validation data, as for the global model (its learning curve)
            lval = site.evaluate(local_weights, split=VAL, features=plan.features)
            lo = site.train(local_weights, local_plan)
            if lo.weights is not None:
                content[P.LOCAL_ARRAYS] = P.to_record(lo.weights)
            content[P.LOCAL_METRICS] = _numbers({**{f"val-{k}": lval.get(k, math.nan) for k in
                                                    ("auroc", "loss", "balanced_accuracy", "num-examples")},
                                                 **lo.metrics}, P.TRAIN_METRICS)
        return Message(content=content, reply_to=msg)

    # ---------------------------------------------------------------- personalize
    def personalize(self, msg: Message, site: SiteTrainer, cfg: ConfigRecord, plan: RoundPlan,
                    global_weights: dict) -> Message:
        """Fine-tune the final global model at this site (client/personal.py); the personalized
        model leaves the site only under ``privacy.share_local_model``."""
        weights, metrics = personalize(site, global_weights, plan, steps=_bounded(cfg, "personalize-steps", 0),
                                       lr_scale=_bounded(cfg, "personalize-lr-scale", 1.0),
                                       checks=_bounded(cfg, "personalize-checks", 1), local_norm=plan.local_norm)
        content = RecordDict({P.SITE: ConfigRecord({"name": site.name}),
                              P.PERSONAL_METRICS: _numbers(metrics, P.TRAIN_METRICS)})
        if site.cfg.privacy.share_local_model:  # the site's opt-in, never the coordinator's
            content[P.PERSONAL_ARRAYS] = P.to_record(weights)
        return Message(content=content, reply_to=msg)

    # ------------------------------------------------------------------- evaluate
    def evaluate(self, msg: Message, site: SiteTrainer, cfg: ConfigRecord) -> Message:
        """Every model in the message, on this site's test split (threshold from its validation split);
        with ``personal: true`` also the site's own personalized model, if it has one for the run."""
        content = RecordDict({P.SITE: ConfigRecord({"name": site.name})})
        features = transform_from(cfg, site.model_cfg)
        # replicate AUROCs: as many as the coordinator asks, at most what the site allows (default none)
        reps = min(_bounded(cfg, P.REPLICATES_REQUEST, 0), site.cfg.privacy.eval_replicates)
        for key in list(msg.content.keys()):
            if key.startswith(P.MODEL_PREFIX):
                model_id = key[len(P.MODEL_PREFIX):]
                metrics = site.evaluate(_weights(msg, key), features=features, replicates=reps)
                content[P.EVAL_PREFIX + model_id] = _numbers(metrics, P.EVAL_METRICS)
        if _flag(cfg, "personal"):  # under a fixed id: the coordinator names it by the authenticated site
            stored = stored_personal_model(site, run_name(cfg.get("run", "run")))
            if stored is not None:
                content[P.EVAL_PREFIX + P.OWN_PERSONAL] = _numbers(
                    site.evaluate(stored, features=features, replicates=reps), P.EVAL_METRICS)
        return Message(content=content, reply_to=msg)

    # ---------------------------------------------------------------------- query
    def query(self, msg: Message, site: SiteTrainer, cfg: ConfigRecord) -> Message:
        """The site's feature statistics over its training split, for the run's global standardization
        (exact, or released under DP and accounted: :mod:`dicomfl.client.fedstats`)."""
        plan = round_plan(cfg)
        stats = site_statistics(site, plan)
        content = RecordDict({P.SITE: ConfigRecord({"name": site.name})})
        content[P.STATS] = _numbers(stats, P.stats_metrics(released(site.model_cfg.drop_features)))
        return Message(content=content, reply_to=msg)
