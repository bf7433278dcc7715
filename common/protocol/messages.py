"""One request and one reply type per message type, with the bounds a site checks and their
to/from Flower records.

=========================  ======================  ======================
message type               request                 reply
=========================  ======================  ======================
``train`` (``.default``)   :class:`TrainRequest`   :class:`TrainReply`
``train.personalize``      :class:`PersonalizeRequest`  :class:`PersonalizeReply`
``evaluate``               :class:`EvaluateRequest`  :class:`EvaluateReply`
``query.fedstats``         :class:`QueryRequest`   :class:`QueryReply`
=========================  ======================  ======================

A request's ``from_message`` is what a site runs on what a coordinator sent: every string and
number in it may be an attack, so each value is checked against its pattern or bounds
(:data:`BOUNDS`) and anything else raises :class:`~dicomfl.common.errors.BadRequest` with one line
that names the key, never the value (the reply says only ``bad-request``). Records whose check
needs the site's own model (SCAFFOLD's control, the local-only baseline) are kept as records and
checked by the site's algorithm when it uses them. A reply's ``to_record`` keeps only the
whitelisted numbers (:func:`numbers`); its ``from_message`` reads a reply back (the coordinator's
audit of a reply is :mod:`dicomfl.server.replies`, not this).

flwr and numpy are imported on first use: a CLI that only reads the keys does not pay for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from dicomfl.common.errors import BadRequest
from . import MAX_REPLICATES, RUN_NAME_RE, from_record, stats_metrics, to_record
from . import keys as K

Weights = dict  # parameter name -> numpy array

# ----------------------------------------------------------------------------------- bounds
_INT, _NUM = "int", "number"
MAX_MODEL_CHARS = 10_000  # the model description a site parses at most


@dataclass(frozen=True)
class Bound:
    """What a site accepts for one numeric config key: an integer or a finite number in [lo, hi]."""

    kind: str
    lo: float
    hi: float

    def check(self, key: str, v: Any) -> int | float:
        """``v`` as the key's type; :class:`BadRequest` naming the key (never the value) otherwise."""
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise BadRequest(f"config {key}: not a finite number")
        if self.kind == _INT and float(v) != int(v):
            raise BadRequest(f"config {key}: not an integer")
        if not self.lo <= v <= self.hi:
            raise BadRequest(f"config {key}: outside [{self.lo:g}, {self.hi:g}]")
        return int(v) if self.kind == _INT else float(v)


#: What a site accepts from the coordinator, key by key. Nothing outside these bounds is used.
BOUNDS: dict[str, Bound] = {
    K.SERVER_ROUND: Bound(_INT, 1, 1_000_000), K.NUM_ROUNDS: Bound(_INT, 1, 1_000_000),
    K.LOCAL_EPOCHS: Bound(_INT, 1, 10_000), K.LOCAL_STEPS: Bound(_INT, 0, 10_000_000),
    K.SEED: Bound(_INT, -(2**62), 2**62), K.PROXIMAL_MU: Bound(_NUM, 0.0, 1e6),
    K.TARGET_EPSILON: Bound(_NUM, 0.0, 1e6), K.DELTA: Bound(_NUM, 1e-300, 0.999), K.LR_SCALE: Bound(_NUM, 1e-3, 1.0),
    K.PERSONALIZE_STEPS: Bound(_INT, 0, 100_000), K.PERSONALIZE_LR_SCALE: Bound(_NUM, 1e-3, 1.0),
    K.PERSONALIZE_CHECKS: Bound(_INT, 1, 20),
    K.REPLICATES_REQUEST: Bound(_INT, 0, MAX_REPLICATES),
}


def bounded(cfg, key: str, default: float) -> int | float:
    """Config value ``key`` (``default`` when absent), checked against :data:`BOUNDS`."""
    return BOUNDS[key].check(key, cfg.get(key, default))


def flag(cfg, key: str) -> bool:
    """Boolean config value ``key`` (False when absent)."""
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise BadRequest(f"config {key}: not a boolean")
    return v


def run_name(value) -> str:
    """The run name a message carries, if it is a plain name (it keys the site's privacy ledger)."""
    if not isinstance(value, str) or not RUN_NAME_RE.fullmatch(value):
        raise BadRequest(f"config {K.RUN}: not a run name (letters, digits, '.', '_', '-'; at most 64)")
    return value


def model_description(cfg) -> str:
    """The run's model description (JSON text; the site parses it as a ModelConfig)."""
    raw = cfg.get(K.MODEL)
    if not isinstance(raw, str) or len(raw) > MAX_MODEL_CHARS:
        raise BadRequest(f"config {K.MODEL}: not a model description")
    return raw


def standardization(cfg) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The run's global feature standardization (mean, std), checked against the schema's ranges;
    None when the message carries neither key (both or neither)."""
    from dicomfl.common.fedstats import check_standardization

    has_mean, has_std = K.FEATURE_MEAN in cfg, K.FEATURE_STD in cfg
    if not has_mean and not has_std:
        return None
    if has_mean != has_std:
        raise BadRequest(f"config: {K.FEATURE_MEAN} and {K.FEATURE_STD} come together")
    try:
        mean, std = check_standardization(cfg[K.FEATURE_MEAN], cfg[K.FEATURE_STD])
    except ValueError as exc:  # names the key and the feature only
        raise BadRequest(f"config {exc}") from None
    return tuple(mean), tuple(std)


def weights_of(content, key: str) -> Weights:
    """The model weights in record ``key`` (shapes are checked against the site's own model when
    they are loaded: ModelMismatch). Non-finite, integer, complex or huge values are refused, never cast."""
    from flwr.app import ArrayRecord

    from dicomfl.common.weights import values_problem
    rec = content[key] if key in content else None
    if not isinstance(rec, ArrayRecord):
        raise BadRequest("a model record is not an ArrayRecord")
    try:
        weights = from_record(rec)
    except Exception:  # noqa: BLE001 - a malformed key or array; its text may quote the input
        raise BadRequest("a model record does not hold a model's weights") from None
    if (why := values_problem(weights)) is not None:
        raise BadRequest(f"a model record: {why}")
    return weights


def numbers(d: dict, allowed: frozenset):
    """The whitelisted scalars of ``d`` as a MetricRecord (and its list metrics, :data:`LIST_METRICS`,
    when allowed: sent whole or not at all; a list with a non-finite value is left out, and its id too)."""
    import numpy as np
    from flwr.app import MetricRecord

    out = {k: float(v) for k, v in d.items() if k in allowed and isinstance(v, (int, float, np.floating, np.integer))}
    for k in K.LIST_METRICS & allowed:
        v = d.get(k)
        if v is None:
            continue
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
        if 0 < len(arr) <= MAX_REPLICATES and np.isfinite(arr).all():
            out[k] = [float(x) for x in arr]
        elif k == K.AUROC_REPLICATES:
            out.pop(K.AUROC_REPLICATES_ID, None)
    return MetricRecord(out)


def _config(msg):
    from flwr.app import ConfigRecord

    if not msg.has_content() or K.CONFIG not in msg.content or not isinstance(msg.content[K.CONFIG], ConfigRecord):
        raise BadRequest("message has no config record")
    return msg.content[K.CONFIG]


# ---------------------------------------------------------------------------------- routing
def message_type(category: str, action: str = K.DEFAULT) -> str:
    """Flower's ``message_type`` for (category, action): ``"train"``, ``"train.personalize"``, ..."""
    return category if action == K.DEFAULT else f"{category}.{action}"


#: Message types a site took before they had actions; accepted for one release.
LEGACY_ROUTES = {(K.QUERY, K.DEFAULT): (K.QUERY, K.FEDSTATS)}


def route(kind) -> tuple[str, str]:
    """(category, action) of a Flower message type; :class:`BadRequest` for one a site does not take
    (the reason never quotes it)."""
    if not isinstance(kind, str) or kind.count(".") > 1:
        raise BadRequest("message type: not one a site takes")
    category, _, action = kind.partition(".")
    pair = LEGACY_ROUTES.get((category, action or K.DEFAULT), (category, action or K.DEFAULT))
    if pair[1] not in K.ACTIONS.get(pair[0], ()):
        raise BadRequest("message type: not one a site takes (category or action unknown)")
    return pair


# ---------------------------------------------------------------------------------- requests
@dataclass
class RoundConfig:
    """A train, personalize or query message's plan of the round (the config a site trains by)."""

    run: str = K.DEFAULT_RUN
    server_round: int = 1
    num_rounds: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    proximal_mu: float = 0.0
    dp: bool = False
    target_epsilon: float | None = None
    delta: float = 1e-5
    seed: int = 0
    lr_scale: float = 1.0  # this round's factor on train.lr (the run's schedule), at most 1
    local_norm: bool = False  # the site keeps its own GroupNorm parameters

    @classmethod
    def from_config(cls, cfg) -> "RoundConfig":
        """Every value checked against its pattern or :data:`BOUNDS`; :class:`BadRequest` otherwise."""
        dp, local_norm = flag(cfg, K.DP), flag(cfg, K.LOCAL_NORM)
        steps = bounded(cfg, K.LOCAL_STEPS, 0)
        target = bounded(cfg, K.TARGET_EPSILON, 0.0)
        return cls(run=run_name(cfg.get(K.RUN, K.DEFAULT_RUN)), server_round=bounded(cfg, K.SERVER_ROUND, 1),
                   num_rounds=bounded(cfg, K.NUM_ROUNDS, 1), local_epochs=bounded(cfg, K.LOCAL_EPOCHS, 1),
                   local_steps=steps or None, proximal_mu=bounded(cfg, K.PROXIMAL_MU, 0.0), dp=dp,
                   target_epsilon=target or None, delta=bounded(cfg, K.DELTA, 1e-5), seed=bounded(cfg, K.SEED, 0),
                   lr_scale=bounded(cfg, K.LR_SCALE, 1.0), local_norm=local_norm)

    def to_config(self) -> dict:
        """The config entries of this plan, as the coordinator sends them."""
        return {K.RUN: self.run, K.SERVER_ROUND: self.server_round, K.NUM_ROUNDS: self.num_rounds,
                K.LOCAL_EPOCHS: self.local_epochs, K.LOCAL_STEPS: self.local_steps or 0,
                K.PROXIMAL_MU: self.proximal_mu,
                K.DP: self.dp, K.TARGET_EPSILON: self.target_epsilon or 0.0, K.DELTA: self.delta, K.SEED: self.seed,
                K.LR_SCALE: self.lr_scale, K.LOCAL_NORM: self.local_norm}

    def fields(self) -> dict:
        """The plan as keyword arguments (the site's RoundPlan takes them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _std_config(std) -> dict:
    return {} if std is None else {K.FEATURE_MEAN: list(std[0]), K.FEATURE_STD: list(std[1])}


def _content(records: dict):
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({k: (ConfigRecord(v) if isinstance(v, dict) else v) for k, v in records.items() if v is not None})


def _record(weights):
    return None if weights is None else to_record(weights)


@dataclass
class TrainRequest:
    """``train``: one round of local training from the global model ``arrays``.

    ``control`` (SCAFFOLD's server control) and ``local_record`` (the site's local-only baseline
    model) stay Flower records: the site checks them against its own model when it uses them."""

    MESSAGE_TYPE: ClassVar[str] = K.TRAIN
    config: RoundConfig
    arrays: Weights
    model: str = "{}"
    standardization: tuple | None = None
    control: Any = None
    local_record: Any = None

    @classmethod
    def from_message(cls, msg) -> "TrainRequest":
        cfg = _config(msg)
        config = RoundConfig.from_config(cfg)
        std = standardization(cfg)
        arrays = weights_of(msg.content, K.ARRAYS)
        return cls(config=config, arrays=arrays, model=model_description(cfg), standardization=std,
                   control=msg.content[K.CONTROL] if K.CONTROL in msg.content else None,
                   local_record=msg.content[K.LOCAL_ARRAYS] if K.LOCAL_ARRAYS in msg.content else None)

    def to_record(self):
        cfg = {**self.config.to_config(), K.MODEL: self.model, **_std_config(self.standardization)}
        return _content({K.ARRAYS: _record(self.arrays), K.CONFIG: cfg,
                         K.CONTROL: self.control, K.LOCAL_ARRAYS: self.local_record})


@dataclass
class PersonalizeRequest:
    """``train.personalize``: fine-tune the final global model ``arrays`` at the site."""

    MESSAGE_TYPE: ClassVar[str] = message_type(K.TRAIN, K.PERSONALIZE)
    config: RoundConfig
    arrays: Weights
    steps: int = 0
    lr_scale: float = 1.0
    checks: int = 1
    model: str = "{}"
    standardization: tuple | None = None

    @classmethod
    def from_message(cls, msg) -> "PersonalizeRequest":
        cfg = _config(msg)
        config = RoundConfig.from_config(cfg)
        std = standardization(cfg)
        arrays = weights_of(msg.content, K.ARRAYS)
        return cls(config=config, arrays=arrays, steps=bounded(cfg, K.PERSONALIZE_STEPS, 0),
                   lr_scale=bounded(cfg, K.PERSONALIZE_LR_SCALE, 1.0), checks=bounded(cfg, K.PERSONALIZE_CHECKS, 1),
                   model=model_description(cfg), standardization=std)

    def to_record(self):
        return _content({K.ARRAYS: _record(self.arrays),
                         K.CONFIG: {**self.config.to_config(), K.MODEL: self.model, **_std_config(self.standardization),
                                    K.PERSONALIZE_STEPS: self.steps, K.PERSONALIZE_LR_SCALE: self.lr_scale,
                                    K.PERSONALIZE_CHECKS: self.checks}})


@dataclass
class EvaluateRequest:
    """``evaluate``: every model in ``models`` (id -> weights) on the site's test split; with
    ``personal`` also the site's own personalized model of run ``run``."""

    MESSAGE_TYPE: ClassVar[str] = K.EVALUATE
    models: dict = field(default_factory=dict)
    replicates: int = 0
    personal: bool = False
    run: str | None = None  # read (and checked) only when ``personal`` asks for the run's model
    model: str = "{}"
    standardization: tuple | None = None

    @classmethod
    def from_message(cls, msg) -> "EvaluateRequest":
        cfg = _config(msg)
        std = standardization(cfg)
        replicates = bounded(cfg, K.REPLICATES_REQUEST, 0)
        models = {key[len(K.MODEL_PREFIX):]: weights_of(msg.content, key)
                  for key in list(msg.content.keys()) if key.startswith(K.MODEL_PREFIX)}
        personal = flag(cfg, K.PERSONAL)
        return cls(models=models, replicates=replicates, personal=personal,
                   run=run_name(cfg.get(K.RUN, K.DEFAULT_RUN)) if personal else None, model=model_description(cfg),
                   standardization=std)

    def to_record(self):
        cfg = {K.MODEL: self.model, K.PERSONAL: self.personal, **_std_config(self.standardization)}
        if self.run is not None:
            cfg[K.RUN] = self.run
        if self.replicates:
            cfg[K.REPLICATES_REQUEST] = self.replicates
        return _content({K.CONFIG: cfg, **{K.MODEL_PREFIX + mid: _record(w) for mid, w in self.models.items()}})


@dataclass
class QueryRequest:
    """``query.fedstats``: the site's feature statistics over its training split, for run ``config.run``."""

    MESSAGE_TYPE: ClassVar[str] = message_type(K.QUERY, K.FEDSTATS)
    config: RoundConfig = field(default_factory=RoundConfig)
    model: str = "{}"

    @classmethod
    def from_message(cls, msg) -> "QueryRequest":
        cfg = _config(msg)
        return cls(config=RoundConfig.from_config(cfg), model=model_description(cfg))

    def to_record(self):
        return _content({K.CONFIG: {**self.config.to_config(), K.MODEL: self.model}})


REQUESTS = {(K.TRAIN, K.DEFAULT): TrainRequest, (K.TRAIN, K.PERSONALIZE): PersonalizeRequest,
            (K.EVALUATE, K.DEFAULT): EvaluateRequest, (K.QUERY, K.FEDSTATS): QueryRequest}


def request_from_message(msg):
    """The typed request of a coordinator's message, routed by its type and action.

    A plain ``train`` message whose config holds ``personalize-steps`` is a personalize request
    (how a coordinator of the previous release asks; accepted for one release), and so is a plain
    ``query`` a fedstats query (:data:`LEGACY_ROUTES`)."""
    category, action = route(msg.metadata.message_type)
    if (category, action) == (K.TRAIN, K.DEFAULT) and K.PERSONALIZE_STEPS in _config(msg):
        action = K.PERSONALIZE
    return (category, action), REQUESTS[(category, action)].from_message(msg)


# ------------------------------------------------------------------------------------ replies
def _site_record(name: str) -> dict:
    return {K.SITE_NAME: name}


def _site_of(content) -> str:
    rec = content[K.SITE] if K.SITE in content else None
    name = rec.get(K.SITE_NAME) if rec is not None else None
    if not isinstance(name, str):
        raise ValueError("reply names no site")
    return name


def _weights_or_none(content, key: str):
    return from_record(content[key]) if key in content else None


def _metrics_or_none(content, key: str):
    return dict(content[key]) if key in content else None


@dataclass
class TrainReply:
    """A site's answer to ``train``: its update (none when it declined), its numbers, SCAFFOLD's
    ``delta_c_i`` in a SCAFFOLD round, and the local-only baseline when the site shares it."""

    site: str
    metrics: dict
    arrays: Weights | None = None
    control_delta: Weights | None = None
    local_arrays: Weights | None = None
    local_metrics: dict | None = None

    def to_record(self):
        return _content({K.SITE: _site_record(self.site), K.ARRAYS: _record(self.arrays),
                         K.CONTROL_DELTA: _record(self.control_delta),
                         K.METRICS: numbers(self.metrics, K.TRAIN_METRICS),
                         K.LOCAL_ARRAYS: _record(self.local_arrays),
                         K.LOCAL_METRICS: None if self.local_metrics is None else numbers(self.local_metrics,
                                                                                          K.TRAIN_METRICS)})

    @classmethod
    def from_message(cls, msg) -> "TrainReply":
        c = msg.content
        return cls(site=_site_of(c), metrics=_metrics_or_none(c, K.METRICS) or {},
                   arrays=_weights_or_none(c, K.ARRAYS), control_delta=_weights_or_none(c, K.CONTROL_DELTA),
                   local_arrays=_weights_or_none(c, K.LOCAL_ARRAYS), local_metrics=_metrics_or_none(c, K.LOCAL_METRICS))


@dataclass
class PersonalizeReply:
    """A site's answer to ``train.personalize``: the fine-tuning's numbers and, only under the
    site's ``privacy.share_local_model``, its personalized model."""

    site: str
    metrics: dict
    arrays: Weights | None = None

    def to_record(self):
        return _content({K.SITE: _site_record(self.site), K.PERSONAL_METRICS: numbers(self.metrics, K.TRAIN_METRICS),
                         K.PERSONAL_ARRAYS: _record(self.arrays)})

    @classmethod
    def from_message(cls, msg) -> "PersonalizeReply":
        c = msg.content
        return cls(site=_site_of(c), metrics=_metrics_or_none(c, K.PERSONAL_METRICS) or {},
                   arrays=_weights_or_none(c, K.PERSONAL_ARRAYS))


@dataclass
class EvaluateReply:
    """A site's answer to ``evaluate``: one metrics dict per model id (``personal`` for its own)."""

    site: str
    metrics: dict = field(default_factory=dict)

    def to_record(self):
        return _content({K.SITE: _site_record(self.site),
                         **{K.EVAL_PREFIX + mid: numbers(m, K.EVAL_METRICS) for mid, m in self.metrics.items()}})

    @classmethod
    def from_message(cls, msg) -> "EvaluateReply":
        c = msg.content
        return cls(site=_site_of(c), metrics={k[len(K.EVAL_PREFIX):]: dict(c[k]) for k in c.keys()
                                              if k.startswith(K.EVAL_PREFIX)})


@dataclass
class QueryReply:
    """A site's answer to ``query.fedstats``: its statistics of the released ``features``."""

    site: str
    stats: dict
    features: tuple = ()

    def to_record(self):
        return _content({K.SITE: _site_record(self.site), K.STATS: numbers(self.stats, stats_metrics(self.features))})

    @classmethod
    def from_message(cls, msg, features: tuple = ()) -> "QueryReply":
        c = msg.content
        return cls(site=_site_of(c), stats=_metrics_or_none(c, K.STATS) or {}, features=tuple(features))
