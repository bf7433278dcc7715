"""The wire protocol between the ServerApp and the ClientApp: record keys, metric names, error codes.

Everything that crosses the site boundary is listed here, so the privacy audit (tests) and the
reviewers can check it in one place. The keys are spelled once, in :mod:`.keys`; the typed requests
and replies of each message type, with the bounds a site checks and their to/from Flower records,
are in :mod:`.messages`:

* train reply: ``arrays`` (ArrayRecord: the model's parameters, plain names), ``metrics``
  (MetricRecord: the keys in :data:`TRAIN_METRICS`), optionally ``local-arrays`` /
  ``local-metrics`` (the site's local-only baseline model), ``site`` (ConfigRecord holding only
  the operator-chosen site name, checked against :data:`SITE_NAME_RE`), and in a SCAFFOLD run
  ``scaffold-delta`` (ArrayRecord: the change of the site's control variate, the model's names
  and shapes; see :mod:`dicomfl.common.scaffold`: it is ``(x - y_i) / (K * lr) - c``, the site's
  update scaled by one number, and the coordinator checks that it has that form).
* train message (coordinator -> site) in a SCAFFOLD run: ``scaffold-control`` (ArrayRecord: the
  server control ``c``, the model's names and shapes; a site refuses anything else, non-finite
  values or a norm above its bound with ``bad-request``).
* personalize reply (to a ``train.personalize`` message, sent once after the last round; a site
  still takes a plain ``train`` message whose config has ``personalize-steps`` for one release): ``site``, ``personal-metrics`` (MetricRecord, keys in :data:`TRAIN_METRICS`)
  and, only if the site's ``privacy.share_local_model`` says so, ``personal-arrays``
  (ArrayRecord: its personalized model, the model's names and shapes).
* evaluate reply: ``site`` and one MetricRecord ``metrics.<model-id>`` per model (keys in
  :data:`EVAL_METRICS`; all scalars except the replicate AUROCs :data:`AUROC_REPLICATES`, a list
  sent only when the site's ``privacy.eval_replicates`` allows it); when the message's config has ``personal: true``, also
  ``metrics.personal`` for the site's own personalized model (kept at the site when it does not
  share it). The coordinator files it as ``personal:<site>`` under the site's authenticated name:
  the id a site answers with never names it.
* in a ``run.local_norm`` run, the ``arrays`` a site sends hold the global model's own values for
  the GroupNorm affine parameters (:func:`dicomfl.common.model.norm_parameter_names`): the site's
  own stay at the site.
* query reply (to ``query.fedstats``, feature statistics, before round 1): ``site`` and one MetricRecord ``stats`` with
  the keys in :func:`stats_metrics` (per released numeric feature ``count.<f>``, ``sum.<f>``,
  ``sumsq.<f>`` over the training split, see :mod:`dicomfl.common.fedstats`; ``num-examples``;
  under DP also ``epsilon`` and ``noise-multiplier``; ``declined`` when the budget cannot cover it).
* error reply: a Flower ``Error`` whose code is one of :data:`ERROR_CODES` and whose reason is
  ``dicomfl:<code name>:ref=<random reference>``; the full text stays in the site's log, found by
  the reference.
"""

from __future__ import annotations

import re

from dicomfl.common.errors import BadRequest, ConfigError, ModelMismatch, NoTrainingData

from .keys import *  # noqa: F401,F403 - every key, spelled once (keys.py)
from .keys import val_key  # noqa: F401

SITE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # use fullmatch (``$`` would let a final newline in)
# A run name as a site accepts it from the coordinator: never a path (no separators, no dot-only names).
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# ------------------------------------------------------------------ replicate AUROCs (evaluate)
# With the site's consent (site.yaml ``privacy.eval_replicates: B``, default 0 = never) and when the
# evaluate message asks (config ``replicates``: the run's ``cross_site.replicates``), a site adds to
# each model's metrics:
#   auroc-boot     a list of min(asked, allowed) AUROCs, each in [0, 1], of the model on resamples of
#                  the site's test split (by patient, stratified by label; see dicomfl.common.stats).
#                  Replicate r is the same resample for every model the site ever evaluates on that
#                  split (seeded by the site's name and the split's content, never by the model or
#                  run), so the coordinator can pair replicates of two models and bootstrap their
#                  difference. They say no more about the test data than the AUROC itself does about
#                  B subsets of it; the resamples are keyed by the patients' pseudonyms, which the
#                  coordinator cannot compute.
#   auroc-boot-id  a 36-bit id of the test split (an integer), so that replicates from different
#                  runs are paired only when they come from the same split.
MAX_REPLICATES = 5000  # the most a site sends and the coordinator accepts per model
REPLICATES_ID_BITS = 36  # auroc-boot-id is below 2**36: exact as a float, and below replies.MAX_METRIC_ABS

# ------------------------------------------------------------ federated feature statistics
# Query message (``query.fedstats``) before round 1: the coordinator asks each site for counts, sums
# and sums of squares of the numeric features over its training split (dicomfl.common.fedstats).
# Train/evaluate messages then carry the run's global standardization (FEATURE_MEAN, FEATURE_STD:
# one number per numeric feature of the schema, in schema order; checked by fedstats.check_standardization).


def stats_metrics(features) -> frozenset:
    """Every key a stats reply may hold when the run exchanges statistics of ``features``."""
    from dicomfl.common.fedstats import stat_keys

    return stat_keys(features) | STATS_EXTRA


# Error codes a ClientApp may send (Flower Error.code); nothing else about an error leaves the site.
ERR_INTERNAL = 1001
ERR_CONFIG = 1002
ERR_NO_DATA = 1003
ERR_BAD_MODEL = 1004
ERR_BAD_REQUEST = 1005
ERROR_CODES = {ERR_INTERNAL: "internal-error", ERR_CONFIG: "site-config-error", ERR_NO_DATA: "no-training-data",
               ERR_BAD_MODEL: "model-mismatch", ERR_BAD_REQUEST: "bad-request"}
ERROR_REASON_RE = re.compile(r"dicomfl:(" + "|".join(ERROR_CODES.values()) + r"):ref=[0-9a-f]{12}")  # fullmatch

# The one place errors become codes: by type, most specific first; anything else is internal.
_CODE_BY_TYPE: tuple[tuple[type[BaseException], int], ...] = (
    (ModelMismatch, ERR_BAD_MODEL),
    (NoTrainingData, ERR_NO_DATA),
    (BadRequest, ERR_BAD_REQUEST),
    (ConfigError, ERR_CONFIG),
)


def error_code(exc: BaseException) -> int:
    """The error code a site sends for ``exc`` (its text never crosses the boundary)."""
    for kind, code in _CODE_BY_TYPE:
        if isinstance(exc, kind):
            return code
    return ERR_INTERNAL


def error_reason(code: int, ref: str) -> str:
    """The reason string of an error reply: the code's name and a reference into the site's log."""
    return f"dicomfl:{ERROR_CODES[code]}:ref={ref}"


# ---------------------------------------------------------------------------------- model ids
LOCAL_MODEL = "local:"  # cross-site model id of a site's local-only baseline: "local:<site>"
GLOBAL_MODEL = "global"


def local_model_id(site: str) -> str:
    """The cross-site validation id of ``site``'s local-only model."""
    return LOCAL_MODEL + site


def local_model_site(model_id: str) -> str | None:
    """The site a ``local:<site>`` model id names, else None."""
    return model_id[len(LOCAL_MODEL):] if model_id.startswith(LOCAL_MODEL) else None


PERSONAL_MODEL = "personal:"  # cross-site model id of a site's personalized model: "personal:<site>"
OWN_PERSONAL = "personal"  # the id a site reports its own personalized model under (metrics.personal)


def personal_model_id(site: str) -> str:
    """The cross-site validation id of ``site``'s personalized model."""
    return PERSONAL_MODEL + site


def personal_model_site(model_id: str) -> str | None:
    """The site a ``personal:<site>`` model id names, else None."""
    return model_id[len(PERSONAL_MODEL):] if model_id.startswith(PERSONAL_MODEL) else None


# ---------------------------------------------------------------------------- array records
Weights = dict  # parameter name -> numpy array (a model's state; plain names, no Opacus prefix)

#: A model's parameters travel as ONE flat array whose single key names the layout:
#: ``flat1:<name>=<d1>x<d2>...;<name>=...`` (a scalar has no dims), in the model's order. Flower
#: sends every Array of a record as objects of their own, each a request between the ServerApp,
#: the SuperLink, the SuperNode and the site's worker; one array instead of one per tensor cuts a
#: message from about 40 objects to 5, and that is most of a small round's cost. The strategies
#: aggregate element-wise, so one flat array aggregates exactly as the tensors did. Weights of mixed
#: dtypes keep one array per name (no model here has them).
FLAT_PREFIX = "flat1:"
MAX_LAYOUT_CHARS = 1 << 20  # a hostile key is refused before it is parsed
MAX_TENSORS = 10_000
_PARAM_RE = re.compile(r"[A-Za-z0-9_.]{1,256}")
_DIMS_RE = re.compile(r"(?:[0-9]{1,9}(?:x[0-9]{1,9}){0,7})?")


def layout_key(weights: "Weights") -> str:
    """The key of ``weights``' flat record (see :data:`FLAT_PREFIX`)."""
    return FLAT_PREFIX + ";".join(f"{k}={'x'.join(str(int(d)) for d in v.shape)}" for k, v in weights.items())


def parse_layout(key: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) per tensor of a flat record's key; ValueError for anything else (the key may
    come from the other side of the boundary: its length, names and dims are bounded)."""
    if not isinstance(key, str) or not key.startswith(FLAT_PREFIX) or len(key) > MAX_LAYOUT_CHARS:
        raise ValueError("not a flat-record key")
    body = key[len(FLAT_PREFIX):]
    parts = body.split(";") if body else []
    if len(parts) > MAX_TENSORS:
        raise ValueError("flat-record key names too many tensors")
    out, seen = [], set()
    for part in parts:
        name, sep, dims = part.partition("=")
        if not sep or not _PARAM_RE.fullmatch(name) or not _DIMS_RE.fullmatch(dims) or name in seen:
            raise ValueError("flat-record key is malformed")
        seen.add(name)
        out.append((name, tuple(int(d) for d in dims.split("x")) if dims else ()))
    return out


def _uniform(weights: "Weights") -> bool:
    return len(weights) > 0 and len({str(v.dtype) for v in weights.values()}) == 1


def to_record(weights: "Weights"):
    """Weights (name -> numpy array) as a Flower ArrayRecord: one flat array (see :data:`FLAT_PREFIX`)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    arrays = {k: np.asarray(v) for k, v in weights.items()}
    if not _uniform(arrays):  # mixed dtypes (no model here): one array per name
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    flat = np.concatenate([v.reshape(-1) for v in arrays.values()])
    return ArrayRecord({layout_key(arrays): Array(np.ascontiguousarray(flat))})


def to_record_keys(weights: "Weights") -> list[str]:
    """The keys :func:`to_record` gives ``weights``' record."""
    return [layout_key(weights)] if _uniform(weights) else list(weights)


def split_flat(flat, layout: list[tuple[str, tuple[int, ...]]]) -> "Weights":
    """A flat array cut into the layout's tensors (copies); ValueError if the sizes disagree."""
    import numpy as np

    sizes = [int(np.prod(shape, dtype=np.int64)) if shape else 1 for _, shape in layout]
    if flat.ndim != 1 or sum(sizes) != flat.size:
        raise ValueError("flat record's size disagrees with its layout")
    out, at = {}, 0
    for (name, shape), n in zip(layout, sizes):
        out[name] = np.array(flat[at:at + n]).reshape(shape)
        at += n
    return out


def from_record(record) -> "Weights":
    """A Flower ArrayRecord as weights (name -> numpy array); ValueError for a malformed flat record."""
    keys = list(record.keys())
    if len(keys) == 1 and isinstance(keys[0], str) and keys[0].startswith(FLAT_PREFIX):
        return split_flat(record[keys[0]].numpy(), parse_layout(keys[0]))
    return {k: v.numpy() for k, v in record.items()}


from .messages import (  # noqa: E402,F401 - the typed layer (it uses the helpers above)
    BOUNDS, LEGACY_ROUTES, MAX_MODEL_CHARS, REQUESTS, Bound, EvaluateReply, EvaluateRequest, PersonalizeReply,
    PersonalizeRequest, QueryReply, QueryRequest, RoundConfig, TrainReply, TrainRequest, bounded, flag, message_type,
    model_description, numbers, request_from_message, route, run_name, standardization, weights_of,
)
