"""The wire protocol between the ServerApp and the ClientApp: record keys, metric names, error codes.

Everything that crosses the site boundary is listed here, so the privacy audit (tests) and the
reviewers can check it in one place:

* train reply: ``arrays`` (ArrayRecord: the model's parameters, plain names), ``metrics``
  (MetricRecord: the keys in :data:`TRAIN_METRICS`), optionally ``local-arrays`` /
  ``local-metrics`` (the site's local-only baseline model), ``site`` (ConfigRecord holding only
  the operator-chosen site name, checked against :data:`SITE_NAME_RE`).
* evaluate reply: ``site`` and one MetricRecord ``metrics.<model-id>`` per model (keys in
  :data:`EVAL_METRICS`).
* query reply (feature statistics, before round 1): ``site`` and one MetricRecord ``stats`` with
  the keys in :func:`stats_metrics` (per released numeric feature ``count.<f>``, ``sum.<f>``,
  ``sumsq.<f>`` over the training split, see :mod:`dicomfl.common.fedstats`; ``num-examples``;
  under DP also ``epsilon`` and ``noise-multiplier``; ``declined`` when the budget cannot cover it).
* error reply: a Flower ``Error`` whose code is one of :data:`ERROR_CODES` and whose reason is
  ``dicomfl:<code name>:ref=<random reference>``; the full text stays in the site's log, found by
  the reference.
"""

from __future__ import annotations

import re

from .errors import BadRequest, ConfigError, ModelMismatch, NoTrainingData

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
LOCAL_ARRAYS = "local-arrays"
LOCAL_METRICS = "local-metrics"
SITE = "site"
MODEL_PREFIX = "model."
EVAL_PREFIX = "metrics."

SITE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # use fullmatch (``$`` would let a final newline in)
# A run name as a site accepts it from the coordinator: never a path (no separators, no dot-only names).
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

TRAIN_METRICS = frozenset({
    "num-examples", "train-loss", "steps", "train-seconds", "declined", "epsilon", "delta", "noise-multiplier",
    "target-epsilon", "epsilon-if-trained",
    # the incoming global model on the site's validation split, measured before training
    "val-auroc", "val-loss", "val-balanced_accuracy", "val-num-examples",
})
EVAL_METRICS = frozenset({
    "num-examples", "n", "threshold", "prevalence", "auroc", "auroc_lo", "auroc_hi", "auprc", "accuracy",
    "balanced_accuracy", "sensitivity", "specificity", "brier", "ece", "loss",
    "val-auroc",  # the same model on the site's validation split (model selection, never the test split)
})

# ------------------------------------------------------------ federated feature statistics
# Query message (Flower "query") before round 1: the coordinator asks each site for counts, sums and
# sums of squares of the numeric features over its training split (dicomfl.common.fedstats).
STATS = "stats"
# Config keys of train/evaluate messages carrying the run's global standardization: one number per
# numeric feature of the schema, in schema order (checked by the site: fedstats.check_standardization).
FEATURE_MEAN = "feature-mean"
FEATURE_STD = "feature-std"
STATS_EXTRA = frozenset({"num-examples", "declined", "epsilon", "noise-multiplier", "epsilon-if-released"})


def stats_metrics(features) -> frozenset:
    """Every key a stats reply may hold when the run exchanges statistics of ``features``."""
    from .fedstats import stat_keys

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


# ---------------------------------------------------------------------------- array records
Weights = dict  # parameter name -> numpy array (a model's state; plain names, no Opacus prefix)


def to_record(weights: "Weights"):
    """Weights (name -> numpy array) as a Flower ArrayRecord, in order."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record) -> "Weights":
    """A Flower ArrayRecord as weights (name -> numpy array)."""
    return {k: v.numpy() for k, v in record.items()}
