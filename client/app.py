"""The Flower ClientApp: a thin shell over :class:`~dicomfl.client.trainer.SiteTrainer`.

The SuperNode's node config names the site config (``site-config=/path/site.yaml``). Every reply
holds only what :mod:`dicomfl.common.protocol` lists. Any exception — which could quote a file
name or a header value — is logged in full in the site's own log under a random reference, and
the server receives only an error code and that reference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
import traceback
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dicomfl.common import protocol as P
from dicomfl.common.errors import ConfigError
from dicomfl.common.model import ModelConfig
from dicomfl.common.splits import VAL

from .trainer import RoundPlan, SiteTrainer

_T_IMPORT = time.perf_counter()
log = logging.getLogger("dicomfl.site")
if os.environ.get("DICOMFL_TORCH_THREADS"):  # several sites sharing one machine (the local launcher)
    import torch

    torch.set_num_threads(max(1, int(os.environ["DICOMFL_TORCH_THREADS"])))
app = ClientApp()

_cache: dict[str, SiteTrainer] = {}


class _SiteError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(P.ERROR_CODES[code])
        self.code = code


_site_logs: dict[int, logging.Logger] = {}
_preloaded: dict[str, SiteTrainer] = {}


def preload(key: str, trainer: SiteTrainer) -> None:
    """Serve ``site-config=<key>`` from an in-memory site (the benchmark's simulated sites)."""
    _preloaded[key] = trainer


def _trainer(context: Context, cfg: ConfigRecord) -> SiteTrainer:
    from dicomfl.common.config import load_site_config
    from dicomfl.common.logs import site_logger

    path = context.node_config.get("site-config")
    if not path:
        raise _SiteError(P.ERR_CONFIG)
    model_cfg = ModelConfig.model_validate(json.loads(str(cfg["model"])))
    key = f"{path}|{model_cfg.model_dump_json()}"
    if key not in _cache and str(path) in _preloaded:
        pre = _preloaded[str(path)]
        _cache[key] = SiteTrainer(pre.cfg, model_cfg, data=pre.data(), logger=pre.log)
    if key not in _cache:
        site = load_site_config(Path(str(path)))
        _cache[key] = SiteTrainer(site, model_cfg, logger=site_logger(site.site.state_dir, site.site.name))
    _site_logs[context.node_id] = _cache[key].log
    return _cache[key]


def _numbers(d: dict, allowed: frozenset) -> MetricRecord:
    out = {}
    for k, v in d.items():
        if k in allowed and isinstance(v, (int, float, np.floating, np.integer)):
            out[k] = float(v)
    return MetricRecord(out)


def _arrays(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _from_record(rec: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in rec.items()}


def _plan(cfg: ConfigRecord) -> RoundPlan:
    def num(key, default=None, cast=float):
        v = cfg.get(key, default)
        return None if v is None else cast(v)

    steps = num("local-steps", 0, int)
    target = num("target-epsilon", 0.0)
    return RoundPlan(run=str(cfg.get("run", "run")), server_round=num("server-round", 1, int),
                     num_rounds=num("num-rounds", 1, int), local_epochs=num("local-epochs", 1, int),
                     local_steps=steps or None, proximal_mu=num("proximal-mu", 0.0),
                     dp=bool(cfg.get("dp", False)), target_epsilon=target or None, delta=num("delta", 1e-5),
                     seed=num("seed", 0, int))


def _guarded(handler):
    def run(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        try:
            reply = handler(msg, context)
            _site_logs.get(context.node_id, log).info("%s message handled in %.2f s (process up %.2f s)",
                                                      msg.metadata.message_type, time.perf_counter() - t0,
                                                      time.perf_counter() - _T_IMPORT)
            return reply
        except BaseException as exc:  # noqa: BLE001 - nothing of the exception may cross the boundary
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            ref = secrets.token_hex(6)
            code = exc.code if isinstance(exc, _SiteError) else (
                P.ERR_CONFIG if isinstance(exc, ConfigError) else
                P.ERR_BAD_MODEL if isinstance(exc, ValueError) and "do not match the model" in str(exc) else
                P.ERR_NO_DATA if isinstance(exc, ValueError) and "no labelled training" in str(exc) else P.ERR_INTERNAL)
            _site_logs.get(context.node_id, log).error("%s failed (ref=%s): %s\n%s", msg.metadata.message_type, ref, exc,
                                                       traceback.format_exc())
            return Message(Error(code=code, reason=f"dicomfl:{P.ERROR_CODES[code]}:ref={ref}"), reply_to=msg)

    run.__name__ = handler.__name__
    return run


@app.train()
@_guarded
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content[P.CONFIG]
    site = _trainer(context, cfg)
    plan = _plan(cfg)
    global_arrays = _from_record(msg.content[P.ARRAYS])
    metrics: dict[str, float] = {}
    val = site.evaluate(global_arrays, split=VAL)
    for k in ("auroc", "loss", "balanced_accuracy", "num-examples"):
        metrics[f"val-{k}"] = val.get(k, math.nan)
    out = site.train(global_arrays, plan)
    metrics.update(out.metrics)
    if os.environ.get("DICOMFL_TEST_FAULT") == "nan-weights" and out.arrays is not None:
        # Fault injection for the test suite only: a site that sends NaN weights.
        out.arrays = {k: np.full_like(v, np.nan) for k, v in out.arrays.items()}
    content = RecordDict({P.SITE: ConfigRecord({"name": site.name})})
    if out.declined:
        # No update: the server leaves this site out of the round (it is told why by the metrics).
        content[P.METRICS] = _numbers(metrics, P.TRAIN_METRICS)
    else:
        content[P.ARRAYS] = _arrays(out.arrays)
        content[P.METRICS] = _numbers(metrics, P.TRAIN_METRICS)
    if P.LOCAL_ARRAYS in msg.content:
        local_plan = RoundPlan(**{**plan.__dict__, "run": f"{plan.run}.local", "proximal_mu": 0.0})
        lo = site.train(_from_record(msg.content[P.LOCAL_ARRAYS]), local_plan)
        if lo.arrays is not None:
            content[P.LOCAL_ARRAYS] = _arrays(lo.arrays)
        content[P.LOCAL_METRICS] = _numbers(lo.metrics, P.TRAIN_METRICS)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    cfg = msg.content[P.CONFIG]
    site = _trainer(context, cfg)
    content = RecordDict({P.SITE: ConfigRecord({"name": site.name})})
    for key in list(msg.content.keys()):
        if key.startswith(P.MODEL_PREFIX):
            model_id = key[len(P.MODEL_PREFIX):]
            metrics = site.evaluate(_from_record(msg.content[key]))
            content[P.EVAL_PREFIX + model_id] = _numbers(metrics, P.EVAL_METRICS)
    return Message(content=content, reply_to=msg)
