"""Validation of the sites' reply messages, before anything else reads them.

A reply from a broken or malicious site must never crash or hijack the coordinator. The functions
here look at a reply defensively (every access guarded, nothing trusted: record types, record
keys, metric keys and values, array names, shapes, dtypes and bytes, ``num-examples``) and
return either a cleaned, typed view of it (:class:`ValidTrain`, :class:`ValidEval`) or a
:class:`Rejection` with a short reason the coordinator logs next to the site's name. They never
raise, whatever the input.

The reasons are built only from the protocol's own vocabulary (record and metric names from
:mod:`dicomfl.common.protocol`, the model's parameter names, numbers, dtypes): never from a
site's free text, which could carry PHI. A key the protocol does not know is reported as
"an unexpected record" without echoing it.

The site's *name* is never taken from the reply: ``claimed_name`` is the ``site`` record's value,
a label at most. The authenticated name comes from :mod:`dicomfl.server.identity`.

Train reply (what :func:`validate_train_reply` accepts)::

    arrays         ArrayRecord   the model's names and shapes, real float, finite
                                 (absent only when the site declined: metrics["declined"] == 1)
    metrics        MetricRecord  keys in TRAIN_METRICS, numeric scalars; num-examples required
    local-arrays   ArrayRecord   optional, same checks as arrays (against the local reference)
    local-metrics  MetricRecord  optional, same checks as metrics (num-examples not required)
    site           ConfigRecord  optional, {"name": str matching SITE_NAME_RE}
    scaffold-delta ArrayRecord   in a SCAFFOLD run (``expect_control=True``) exactly when arrays
                                 are sent, same checks as arrays; never in another run

Personalize reply (:func:`validate_personal_reply`): ``personal-metrics`` (keys in
TRAIN_METRICS), optionally ``personal-arrays`` (same checks as arrays) and ``site``.

Evaluate reply (:func:`validate_eval_reply`): ``site`` and ``metrics.<model-id>`` MetricRecords
(keys in EVAL_METRICS) for model ids that were sent (and ``personal`` for the replying site's own
personalized model, when the coordinator asked for it). Only when replicates were asked for, a
record may hold ``auroc-boot`` (a list of at most that many numbers, each finite and in [0, 1])
and with it ``auroc-boot-id`` (an integer below 2**36).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.wire import WireError, is_packed, unpack

from .checks import dtype_problem

NUM_EXAMPLES = P.NUM_EXAMPLES
"""The weight key Flower's strategies aggregate by (their ``weighted_by_key`` default)."""
TRAIN_LOSS = P.TRAIN_LOSS
DECLINED = P.DECLINED

#: Train metrics the coordinator computes with: these must be finite. The others are
#: informational and may be NaN ("not available": e.g. ``val-auroc`` on a one-class split,
#: ``target-epsilon`` without a target), never infinite.
FINITE_TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, "steps", DECLINED})
#: Eval metrics that must be finite (counts); the scores may be NaN (one class in a split).
FINITE_EVAL_METRICS = frozenset({NUM_EXAMPLES, "n"})
#: Largest magnitude accepted for any metric: keeps weighted sums of metrics finite.
MAX_METRIC_ABS = 1e12
#: The Flower serialization type the arrays must have (``flwr.common.constant.SType.NUMPY``).
NUMPY_STYPE = "numpy.ndarray"

Outcome = Literal["error", "invalid"]


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Rejection:
    """A reply that cannot be used.

    Attributes
    ----------
    node_id : int or None
        The replying node (``metadata.src_node_id``), None if even that could not be read.
    reason : str
        Short, PHI-free; log it with the site's (authenticated) name.
    kind : {"error", "invalid"}
        "error": the site sent a Flower ``Error`` (it failed and said so). "invalid": the reply
        broke the protocol (a broken or malicious site).
    """

    node_id: int | None
    reason: str
    kind: Outcome = "invalid"


@dataclass
class ValidTrain:
    """A train reply that passed every check, with its contents converted once.

    Attributes
    ----------
    node_id : int
        The replying node.
    message : flwr.app.Message
        The original reply (its metadata are reused by :func:`aggregation_message`).
    arrays : dict of str to numpy.ndarray or None
        The model update, in the reference's names, order and dtypes; None if the site declined.
    num_examples : int or None
        The validated training-set size (the aggregation weight); None only if a declining
        site left it out.
    metrics : dict of str to float
        The ``metrics`` record (whitelisted keys, numeric).
    declined : bool
        The site declined to train this round (privacy budget): no update.
    local_arrays : dict of str to numpy.ndarray or None
        The site's local-only baseline model, if sent.
    local_metrics : dict of str to float or None
        Its metrics, if sent.
    claimed_name : str or None
        The name the reply claims (``site`` record): a label, never an identity.
    """

    node_id: int
    message: Message
    arrays: dict[str, np.ndarray] | None
    num_examples: int | None
    metrics: dict[str, float]
    declined: bool = False
    local_arrays: dict[str, np.ndarray] | None = None
    local_metrics: dict[str, float] | None = None
    claimed_name: str | None = None
    control_delta: dict[str, np.ndarray] | None = None

    @property
    def train_loss(self) -> float:
        """The reported training loss (0.0 if absent)."""
        return float(self.metrics.get(TRAIN_LOSS, 0.0))


@dataclass
class ValidEval:
    """An evaluate reply that passed every check.

    Attributes
    ----------
    node_id : int
        The replying node.
    metrics : dict of str to dict of str to float
        Model id -> that model's metrics on the site's test split.
    missing : list of str
        Model ids that were sent and not answered.
    claimed_name : str or None
        The name the reply claims: a label, never an identity.
    """

    node_id: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    claimed_name: str | None = None


class _Invalid(Exception):
    """Internal: carries a rejection reason out of the nested checks."""


# ---------------------------------------------------------------------------- small checks
def _node_id(msg: Any) -> int | None:
    try:
        n = msg.metadata.src_node_id
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None
    except Exception:  # noqa: BLE001 - anything a broken object raises
        return None


def error_reason(msg: Message) -> str:
    """The loggable reason of an error reply: the protocol's reason form, or a code name.

    A reason that does not fully match :data:`~dicomfl.common.protocol.ERROR_REASON_RE` with
    one of the protocol's code names (it could hold a stack trace with patient data, Flower
    PR #3191) is replaced by the code's name.

    Parameters
    ----------
    msg : flwr.app.Message
        A reply for which ``has_error()`` is True.

    Returns
    -------
    str
        E.g. ``dicomfl:no-training-data:ref=0123456789ab`` or ``flower-error-3``.
    """
    try:
        err = msg.error
        reason = err.reason
        # fullmatch (``$`` lets a trailing newline through) and a known code name: the
        # ``[a-z-]+`` of the pattern could otherwise spell out a patient's name
        if (isinstance(reason, str) and P.ERROR_REASON_RE.fullmatch(reason)
                and reason.split(":")[1] in P.ERROR_CODES.values()):
            return reason
        code = err.code
        if isinstance(code, int) and not isinstance(code, bool):
            return P.ERROR_CODES.get(code, f"flower-error-{code}")
        return "flower-error"
    except Exception:  # noqa: BLE001
        return "unreadable error"


def _metric_value(key: str, v: Any, must_be_finite: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        kind = "a list" if isinstance(v, list) else "not a number"
        raise _Invalid(f"metric {key} is {kind}")
    f = float(v) if not isinstance(v, int) or abs(v) <= 2**63 else math.inf
    if math.isnan(f):
        if must_be_finite:
            raise _Invalid(f"metric {key} is NaN")
        return f
    if math.isinf(f) or abs(f) > MAX_METRIC_ABS:
        raise _Invalid(f"metric {key} is infinite or out of range")
    return f


def _metrics(rec: Any, where: str, allowed: frozenset[str], finite: frozenset[str],
             max_list: int = 0) -> dict[str, Any]:
    """The record's metrics: scalars, and the protocol's list metrics (:data:`P.LIST_METRICS`) when
    ``max_list`` > 0 (at most that many entries each)."""
    if not isinstance(rec, MetricRecord):
        raise _Invalid(f"record {where} is not a MetricRecord")
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if not isinstance(k, str) or k not in allowed:
            raise _Invalid(f"record {where} has a metric outside the protocol")
        if k in P.LIST_METRICS:
            out[k] = _replicates(k, v, max_list)
        else:
            out[k] = _metric_value(k, v, k in finite)
    return out


def _replicates(key: str, v: Any, max_len: int) -> list[float]:
    """A list of replicate AUROCs: asked for, 1 to ``max_len`` numbers, each finite and in [0, 1]."""
    if max_len <= 0:
        raise _Invalid(f"metric {key} was not asked for")
    if not isinstance(v, list):
        raise _Invalid(f"metric {key} is not a list")
    if not 1 <= len(v) <= max_len:
        raise _Invalid(f"metric {key} has {len(v)} values, expected 1 to {max_len}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise _Invalid(f"metric {key} holds a value that is not a number")
        f = float(x) if not isinstance(x, int) or abs(x) <= 2**63 else math.inf
        if not math.isfinite(f):
            raise _Invalid(f"metric {key} holds NaN or infinite values")
        if not 0.0 <= f <= 1.0:
            raise _Invalid(f"metric {key} holds values outside [0, 1]")
        out.append(f)
    return out


def check_num_examples(value: Any, *, max_examples: float, previous_examples: float | None = None,
                       max_growth: float = 2.0) -> int:
    """Validate a site's ``num-examples`` claim.

    Parameters
    ----------
    value : Any
        The claim (a MetricRecord value).
    max_examples : float
        The largest training set any site may have (an operator setting).
    previous_examples : float or None, optional
        What this site (by authenticated identity) reported when last accepted.
    max_growth : float, optional
        The claim may be at most ``max_growth * previous_examples``. A site's training split
        does not change within a run, so a jump is a hijack attempt (or a re-ingest: then the
        run should be restarted). Decreases are accepted (they only lower the site's weight).

    Returns
    -------
    int
        The validated count.

    Raises
    ------
    ValueError
        With a short reason when the claim is unusable.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("num-examples is not a number")
    if isinstance(value, int):
        if value > 2**53:
            raise ValueError("num-examples is above max_examples")
        f = float(value)
    else:
        f = value
    if not math.isfinite(f):
        raise ValueError("num-examples is NaN or infinite")
    if f <= 0:
        raise ValueError("num-examples is not positive")
    if f != math.floor(f):
        raise ValueError("num-examples is not a whole number")
    if f > max_examples:
        raise ValueError(f"num-examples {f:.3g} is above max_examples {max_examples:.3g}")
    if previous_examples is not None and previous_examples > 0 and f > max_growth * previous_examples:
        raise ValueError(f"num-examples {f:.3g} is more than {max_growth:g}x this site's "
                         f"previous {previous_examples:.3g}")
    return int(f)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse a .npy header without allocating the array: (shape, fortran_order, dtype, offset)."""
    from numpy.lib import format as npf

    f = io.BytesIO(data)
    version = npf.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npf.read_array_header_1_0(f, max_header_size=10000)
    elif version == (2, 0):
        shape, fortran, dtype = npf.read_array_header_2_0(f, max_header_size=10000)
    else:
        raise ValueError("unsupported .npy version")
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), f.tell()


def _decode(arr: Any, name: str, ref: np.ndarray) -> np.ndarray:
    """One Array -> a checked ndarray in the reference's dtype, without trusting its metadata."""
    if not isinstance(arr, Array):
        raise _Invalid(f"parameter {name} is not an Array")
    try:
        stype, data = arr.stype, arr.data
    except Exception:  # noqa: BLE001
        raise _Invalid(f"parameter {name} is unreadable") from None
    if stype != NUMPY_STYPE:
        raise _Invalid(f"parameter {name} is not a numpy array")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _Invalid(f"parameter {name} has no byte data")
    data = bytes(data)
    try:
        shape, fortran, dtype, offset = _npy_header(data)
    except Exception:  # noqa: BLE001 - malformed header of any kind
        raise _Invalid(f"parameter {name} is not a valid array") from None
    if shape != tuple(ref.shape):
        raise _Invalid(f"parameter {name} has shape {shape}, expected {tuple(ref.shape)}")
    why = dtype_problem(dtype, ref.dtype)
    if why:
        raise _Invalid(f"parameter {name} has {why}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) - offset != count * dtype.itemsize:
        raise _Invalid(f"parameter {name} has {len(data) - offset} data bytes, expected {count * dtype.itemsize}")
    # the metadata Flower shows must agree with the bytes (a mismatch confuses Flower's own code)
    try:
        meta_ok = tuple(arr.shape) == shape and np.dtype(arr.dtype) == dtype
    except Exception:  # noqa: BLE001
        meta_ok = False
    if not meta_ok:
        raise _Invalid(f"parameter {name} metadata disagree with its data")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    a = a.reshape(shape, order="F" if fortran else "C")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a.astype(ref.dtype.newbyteorder("="), copy=True))
    if out.dtype.kind == "f" and not np.all(np.isfinite(out)):
        # checked after the cast: a finite float64 can overflow float32
        raise _Invalid(f"parameter {name} has NaN or infinite values")
    return out


def _arrays(rec: Any, where: str, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The record's weights: one flat array under the reference's layout key (what
    :func:`~dicomfl.common.protocol.to_record` sends) or one array per parameter name, each checked
    against the reference's shapes and dtype without trusting the Array's metadata."""
    if not isinstance(rec, ArrayRecord):
        raise _Invalid(f"record {where} is not an ArrayRecord")
    keys = list(rec.keys())
    ref_arrays = {k: np.asarray(v) for k, v in reference.items()}
    if len(keys) == 1 and keys == P.to_record_keys(ref_arrays) and keys[0].startswith(P.FLAT_PREFIX):
        total = sum(int(v.size) for v in ref_arrays.values())
        dtype = next(iter(ref_arrays.values())).dtype
        flat = _decode(rec[keys[0]], "(flat)", np.empty(total, dtype=dtype))
        return P.split_flat(flat, [(k, tuple(v.shape)) for k, v in ref_arrays.items()])
    if any(not isinstance(k, str) for k in keys) or set(keys) != set(reference) or len(keys) != len(reference):
        known = [k for k in keys if isinstance(k, str) and k in reference]
        missing = sorted(set(reference) - set(known))
        n_extra = len(keys) - len(known)
        raise _Invalid(f"record {where} has the wrong parameter names "
                       f"(missing {missing[:2]}{'...' if len(missing) > 2 else ''}, {n_extra} unexpected)")
    return {k: _decode(rec[k], k, np.asarray(ref)) for k, ref in reference.items()}


def _site_name(rec: Any) -> str:
    if not isinstance(rec, ConfigRecord):
        raise _Invalid(f"record {P.SITE} is not a ConfigRecord")
    if set(rec.keys()) != {"name"}:
        raise _Invalid(f"record {P.SITE} must hold only a name")
    name = rec["name"]
    if not isinstance(name, str) or not P.SITE_NAME_RE.fullmatch(name):
        raise _Invalid(f"record {P.SITE} has an invalid name")
    return name


def _content(msg: Any) -> RecordDict:
    """The reply's content, or :class:`_Invalid` (error replies are handled before)."""
    if not msg.has_content():
        raise _Invalid("reply has no content")
    content = msg.content
    if not isinstance(content, RecordDict):
        raise _Invalid("reply content is not a RecordDict")
    if is_packed(content):  # the deployment's compact form (common/wire.py): read it, then check as always
        try:
            content = unpack(content)
        except WireError as exc:
            raise _Invalid(str(exc)) from None
        msg.content = content
    return content


def _guarded(fn: Callable[..., ValidTrain | ValidEval]) -> Callable[..., ValidTrain | ValidEval | Rejection]:
    """Run a validator so that nothing escapes it: errors become rejections."""

    def run(msg: Any, *args: Any, **kwargs: Any) -> ValidTrain | ValidEval | Rejection:
        node = _node_id(msg)
        if node is None:
            return Rejection(None, "reply metadata are unreadable")
        try:
            if msg.has_error():
                return Rejection(node, error_reason(msg), kind="error")
            return fn(msg, node, *args, **kwargs)
        except _Invalid as exc:
            return Rejection(node, str(exc))
        except Exception as exc:  # noqa: BLE001 - a reply must never crash the coordinator
            return Rejection(node, f"reply could not be read ({type(exc).__name__})")

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# ---------------------------------------------------------------------------- validators
TRAIN_RECORDS = frozenset({P.ARRAYS, P.METRICS, P.LOCAL_ARRAYS, P.LOCAL_METRICS, P.SITE, P.CONTROL_DELTA})


def _validate_train(msg: Message, node: int, reference_arrays: Mapping[str, np.ndarray], *, max_examples: float,
                    previous_examples: float | None = None, max_examples_growth: float = 2.0,
                    local_reference: Mapping[str, np.ndarray] | None = None,
                    expect_control: bool = False) -> ValidTrain:
    content = _content(msg)
    keys = list(content.keys())
    if any(not isinstance(k, str) or k not in TRAIN_RECORDS for k in keys):
        raise _Invalid("reply has an unexpected record")
    if P.CONTROL_DELTA in content and not expect_control:
        raise _Invalid(f"reply has a {P.CONTROL_DELTA} record outside a SCAFFOLD run")
    if P.METRICS not in content:
        raise _Invalid(f"reply has no {P.METRICS} record")
    metrics = _metrics(content[P.METRICS], P.METRICS, P.TRAIN_METRICS, FINITE_TRAIN_METRICS)
    declined_v = metrics.get(DECLINED, 0.0)
    if declined_v not in (0.0, 1.0):
        raise _Invalid(f"metric {DECLINED} is neither 0 nor 1")
    declined = declined_v == 1.0
    has_arrays = P.ARRAYS in content
    if declined and has_arrays:
        raise _Invalid("reply declined to train but sent arrays")
    if not declined and not has_arrays:
        raise _Invalid(f"reply has no {P.ARRAYS} record")
    num_examples: int | None = None
    if NUM_EXAMPLES in metrics or not declined:
        if NUM_EXAMPLES not in metrics:
            raise _Invalid(f"reply has no {NUM_EXAMPLES}")
        try:
            num_examples = check_num_examples(content[P.METRICS][NUM_EXAMPLES], max_examples=max_examples,
                                              previous_examples=previous_examples, max_growth=max_examples_growth)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    arrays = _arrays(content[P.ARRAYS], P.ARRAYS, reference_arrays) if has_arrays else None
    control_delta = None
    if expect_control and has_arrays != (P.CONTROL_DELTA in content):
        raise _Invalid(f"reply has {P.ARRAYS} without {P.CONTROL_DELTA}" if has_arrays
                       else f"reply has {P.CONTROL_DELTA} without {P.ARRAYS}")
    if P.CONTROL_DELTA in content:
        control_delta = _arrays(content[P.CONTROL_DELTA], P.CONTROL_DELTA, reference_arrays)
    local_ref = reference_arrays if local_reference is None else local_reference
    local_arrays = _arrays(content[P.LOCAL_ARRAYS], P.LOCAL_ARRAYS, local_ref) if P.LOCAL_ARRAYS in content else None
    local_metrics = (_metrics(content[P.LOCAL_METRICS], P.LOCAL_METRICS, P.TRAIN_METRICS, FINITE_TRAIN_METRICS)
                     if P.LOCAL_METRICS in content else None)
    claimed = _site_name(content[P.SITE]) if P.SITE in content else None
    return ValidTrain(node_id=node, message=msg, arrays=arrays, num_examples=num_examples, metrics=metrics,
                      declined=declined, local_arrays=local_arrays, local_metrics=local_metrics,
                      claimed_name=claimed, control_delta=control_delta)


def validate_train_reply(msg: Message, reference_arrays: Mapping[str, np.ndarray], *, max_examples: float,
                         previous_examples: float | None = None, max_examples_growth: float = 2.0,
                         local_reference: Mapping[str, np.ndarray] | None = None,
                         expect_control: bool = False) -> ValidTrain | Rejection:
    """Check a train reply before anything else reads it. Never raises.

    Parameters
    ----------
    msg : flwr.app.Message
        The reply as the Grid returned it.
    reference_arrays : mapping of str to numpy.ndarray
        The global model the site was sent: the names, shapes and dtypes the update must have.
    max_examples : float
        The largest ``num-examples`` any site may claim.
    previous_examples : float or None, optional
        This site's last accepted ``num-examples`` (look it up by authenticated identity).
    max_examples_growth : float, optional
        A claim above ``max_examples_growth * previous_examples`` is rejected.
    local_reference : mapping of str to numpy.ndarray or None, optional
        What ``local-arrays`` must match (default: ``reference_arrays``; same architecture).
    expect_control : bool, optional
        A SCAFFOLD run: a reply with arrays must carry ``scaffold-delta`` (checked like the
        arrays); otherwise that record is refused.

    Returns
    -------
    ValidTrain or Rejection
        The cleaned reply, or why it cannot be used (``kind="error"`` for a Flower ``Error``).
    """
    return _guarded(_validate_train)(msg, reference_arrays, max_examples=max_examples,
                                     previous_examples=previous_examples, max_examples_growth=max_examples_growth,
                                     local_reference=local_reference, expect_control=expect_control)


@dataclass
class ValidPersonal:
    """A personalize reply that passed every check: the numbers, and the model if the site shared it."""

    node_id: int
    metrics: dict[str, float]
    arrays: dict[str, np.ndarray] | None = None
    claimed_name: str | None = None


PERSONAL_RECORDS = frozenset({P.PERSONAL_METRICS, P.PERSONAL_ARRAYS, P.SITE})


def _validate_personal(msg: Message, node: int, reference_arrays: Mapping[str, np.ndarray]) -> ValidPersonal:
    content = _content(msg)
    if any(not isinstance(k, str) or k not in PERSONAL_RECORDS for k in list(content.keys())):
        raise _Invalid("reply has an unexpected record")
    if P.PERSONAL_METRICS not in content:
        raise _Invalid(f"reply has no {P.PERSONAL_METRICS} record")
    metrics = _metrics(content[P.PERSONAL_METRICS], P.PERSONAL_METRICS, P.TRAIN_METRICS, FINITE_TRAIN_METRICS)
    arrays = (_arrays(content[P.PERSONAL_ARRAYS], P.PERSONAL_ARRAYS, reference_arrays)
              if P.PERSONAL_ARRAYS in content else None)
    claimed = _site_name(content[P.SITE]) if P.SITE in content else None
    return ValidPersonal(node_id=node, metrics=metrics, arrays=arrays, claimed_name=claimed)


def validate_personal_reply(msg: Message, reference_arrays: Mapping[str, np.ndarray]) -> ValidPersonal | Rejection:
    """Check a personalize reply (the site's fine-tuning after the last round). Never raises.

    Parameters
    ----------
    msg : flwr.app.Message
        The reply.
    reference_arrays : mapping of str to numpy.ndarray
        The final global model: the names, shapes and dtypes a shared personalized model must have.

    Returns
    -------
    ValidPersonal or Rejection
        The numbers (and the shared model), or why the reply cannot be used.
    """
    return _guarded(_validate_personal)(msg, reference_arrays)


def _validate_eval(msg: Message, node: int, model_ids: Iterable[str], max_replicates: int = 0) -> ValidEval:
    ids = [m for m in model_ids]
    content = _content(msg)
    expected = {P.EVAL_PREFIX + m: m for m in ids}
    out = ValidEval(node_id=node)
    for k in list(content.keys()):
        if not isinstance(k, str):
            raise _Invalid("reply has an unexpected record")
        if k == P.SITE:
            out.claimed_name = _site_name(content[k])
        elif k in expected:
            mid = expected[k]
            m = out.metrics[mid] = _metrics(content[k], P.EVAL_PREFIX + "<model>", P.EVAL_METRICS,
                                            FINITE_EVAL_METRICS, max_list=max_replicates)
            for cnt in FINITE_EVAL_METRICS & set(m):
                v = m[cnt]
                if v < 0 or v != math.floor(v):
                    raise _Invalid(f"metric {cnt} is not a count")
            if (P.AUROC_REPLICATES in m) != (P.AUROC_REPLICATES_ID in m):
                raise _Invalid(f"metrics {P.AUROC_REPLICATES} and {P.AUROC_REPLICATES_ID} come only together")
            if P.AUROC_REPLICATES_ID in m:
                sid = m[P.AUROC_REPLICATES_ID]
                if not (0 <= sid < 2 ** P.REPLICATES_ID_BITS) or sid != math.floor(sid):
                    raise _Invalid(f"metric {P.AUROC_REPLICATES_ID} is not a split id")
        else:
            raise _Invalid("reply has an unexpected record")
    out.missing = [m for m in ids if m not in out.metrics]
    return out


def validate_eval_reply(msg: Message, model_ids: Iterable[str], max_replicates: int = 0) -> ValidEval | Rejection:
    """Check an evaluate (cross-site) reply. Never raises.

    Parameters
    ----------
    msg : flwr.app.Message
        The reply.
    model_ids : iterable of str
        The model ids that were sent (``model.<id>`` records); the reply may answer each once
        as ``metrics.<id>``.
    max_replicates : int, optional
        How many replicate AUROCs the coordinator asked for (``auroc-boot``: a list of at most this
        many numbers in [0, 1], with its ``auroc-boot-id``); 0: a reply with replicates is refused.

    Returns
    -------
    ValidEval or Rejection
        The metrics per model (and the ids not answered), or why the reply cannot be used.
    """
    return _guarded(_validate_eval)(msg, list(model_ids) if model_ids is not None else [],
                                    max_replicates=int(max_replicates))


@dataclass
class ValidStats:
    """A feature-statistics (query) reply that passed every check (:func:`validate_stats_reply`).

    ``stats`` holds the ``count.<f>``/``sum.<f>``/``sumsq.<f>`` numbers (empty when the site
    declined: its privacy budget cannot cover the release); ``metrics`` everything the reply held.
    """

    node_id: int
    num_examples: int
    declined: bool
    stats: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    claimed_name: str | None = None


STATS_RECORDS = frozenset({P.STATS, P.SITE})


def _validate_stats(msg: Message, node: int, features: tuple[str, ...], *, max_examples: float) -> ValidStats:
    from dicomfl.common.fedstats import stat_keys

    from .checks import stats_problem

    content = _content(msg)
    if any(not isinstance(k, str) or k not in STATS_RECORDS for k in content.keys()):
        raise _Invalid("reply has an unexpected record")
    if P.STATS not in content:
        raise _Invalid(f"reply has no {P.STATS} record")
    wanted = stat_keys(features)
    metrics = _metrics(content[P.STATS], P.STATS, P.stats_metrics(features), wanted | {NUM_EXAMPLES, DECLINED})
    declined_v = metrics.get(DECLINED, 0.0)
    if declined_v not in (0.0, 1.0):
        raise _Invalid(f"metric {DECLINED} is neither 0 nor 1")
    declined = declined_v == 1.0
    if NUM_EXAMPLES not in metrics:
        raise _Invalid(f"reply has no {NUM_EXAMPLES}")
    try:
        n = check_num_examples(content[P.STATS][NUM_EXAMPLES], max_examples=max_examples)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    stats = {k: v for k, v in metrics.items() if k in wanted}
    if declined and stats:
        raise _Invalid("reply declined to release statistics but sent some")
    if not declined:
        why = stats_problem(stats, features, n)
        if why is not None:
            raise _Invalid(why)
    claimed = _site_name(content[P.SITE]) if P.SITE in content else None
    return ValidStats(node_id=node, num_examples=n, declined=declined, stats=stats, metrics=metrics,
                      claimed_name=claimed)


def validate_stats_reply(msg: Message, features: Iterable[str], *, max_examples: float) -> ValidStats | Rejection:
    """Check a feature-statistics reply (the query before round 1). Never raises.

    Parameters
    ----------
    msg : flwr.app.Message
        The reply.
    features : iterable of str
        The numeric features the run exchanges statistics of (not dropped).
    max_examples : float
        The largest ``num-examples`` any site may claim; every count is bounded by the site's own.

    Returns
    -------
    ValidStats or Rejection
        The audited numbers, or why the reply cannot be used.
    """
    return _guarded(_validate_stats)(msg, tuple(features), max_examples=max_examples)


# ---------------------------------------------------------------------------- helpers
def aggregation_message(valid: ValidTrain, arrays: Mapping[str, np.ndarray] | None = None,
                        weight: float | None = None) -> Message:
    """A clean reply for Flower's ``strategy.aggregate_train``: one ArrayRecord, one MetricRecord.

    Flower's strategies need exactly one ArrayRecord and one MetricRecord per reply, with the
    same metric keys in all of them, and they may empty the records they aggregate (FedMedian
    and FedTrimmedAvg ``pop`` the arrays). Build a fresh message per reply from the validated
    values: the original reply is left alone.

    Parameters
    ----------
    valid : ValidTrain
        A validated, non-declined reply.
    arrays : mapping of str to numpy.ndarray or None, optional
        The arrays to aggregate (e.g. clipped by :func:`dicomfl.server.checks.screen_updates`);
        default: the validated ones.
    weight : float or None, optional
        The aggregation weight (e.g. after the share cap); default: the validated num-examples.

    Returns
    -------
    flwr.app.Message
        A reply with the original metadata, ``arrays`` and ``metrics`` = {num-examples,
        train-loss}, and the validated ``scaffold-delta`` when the reply had one (a SCAFFOLD run:
        :class:`dicomfl.server.scaffold.Scaffold` aggregates it).
    """
    from copy import copy

    src = valid.arrays if arrays is None else arrays
    if src is None:
        raise ValueError("a declined reply has no arrays to aggregate")
    w = float(valid.num_examples if weight is None else weight)
    content = RecordDict({
        P.ARRAYS: P.to_record({k: np.ascontiguousarray(v) for k, v in src.items()}),  # the form the strategy sent
        P.METRICS: MetricRecord({NUM_EXAMPLES: w, TRAIN_LOSS: valid.train_loss}),
    })
    if valid.control_delta is not None:  # SCAFFOLD's wrapper takes it out before its FedAvg sees the reply
        content[P.CONTROL_DELTA] = P.to_record(valid.control_delta)
    return Message(content=content, metadata=copy(valid.message.metadata))


@dataclass
class Deduped:
    """What :func:`dedupe_replies` kept and dropped.

    Attributes
    ----------
    replies : list of flwr.app.Message
        The first reply per key, in arrival order.
    duplicates : dict
        Key -> number of extra replies dropped for it.
    """

    replies: list[Message]
    duplicates: dict[Hashable, int]


def dedupe_replies(replies: Iterable[Message], key: Callable[[Message], Hashable] | None = None) -> Deduped:
    """Keep the first reply per node (or per ``key``), so a node's second reply counts once.

    Parameters
    ----------
    replies : iterable of flwr.app.Message
        One round's replies.
    key : callable, optional
        What counts as "the same sender": default ``metadata.src_node_id``. Pass e.g.
        ``lambda m: identities.name_for(m.metadata.src_node_id)`` to also count two nodes that
        authenticate as the same site once.

    Returns
    -------
    Deduped
        The kept replies and the count of dropped duplicates per key. A reply whose key cannot
        be read is dropped and counted under ``None``.
    """
    keyfn = key or (lambda m: m.metadata.src_node_id)
    seen: set[Hashable] = set()
    kept: list[Message] = []
    dups: dict[Hashable, int] = {}
    for msg in replies:
        try:
            k = keyfn(msg)
            hash(k)
        except Exception:  # noqa: BLE001
            dups[None] = dups.get(None, 0) + 1
            continue
        if k in seen:
            dups[k] = dups.get(k, 0) + 1
            continue
        seen.add(k)
        kept.append(msg)
    return Deduped(kept, dups)
