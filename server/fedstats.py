"""The coordinator's side of the federated feature statistics (:mod:`dicomfl.common.fedstats`).

Before round 1 the coordinator sends every site a ``query`` message (the run's config record, as
a train message carries it) and audits each reply (:func:`~.replies.validate_stats_reply`: record
and metric names, finite numbers, counts that are whole numbers within the site's
``num-examples``, sums consistent with the documented ranges). A site whose reply is rejected,
that declined (its privacy budget) or did not answer is left out of the statistics; the rest are
added up (:func:`~dicomfl.common.fedstats.combine`) into the global mean and std that every
train and evaluate message of the run then carries. The result, and who contributed, is kept in
the run's checkpoints, so a resumed run sends the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from dicomfl.common import protocol as P
from dicomfl.common.fedstats import NUMERIC_NAMES, combine, global_standardization, released

from .replies import Rejection, validate_stats_reply

log = logging.getLogger("dicomfl.server")


def wanted(model_cfg) -> bool:
    """Whether a run exchanges statistics: its model standardizes features and uses them."""
    return bool(model_cfg.standardize_features) and model_cfg.mode != "image"


def query_messages(nodes: Iterable[int], config: ConfigRecord) -> list[Message]:
    """One ``query.fedstats`` message per node, each with its own content."""
    return [Message(content=RecordDict({P.CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                    message_type=P.QueryRequest.MESSAGE_TYPE) for n in nodes]


def gather(replies: Iterable[Message], name_of: Callable[[int], str], model_cfg, *, max_examples: float,
           asked: Iterable[str] = ()) -> dict:
    """Audit the sites' replies and combine the usable ones.

    Returns the run's feature-statistics record: ``mean``/``std`` (one per numeric feature of the
    schema, what the messages carry), ``features`` (those exchanged), ``count`` (global count per
    feature), ``sites`` (whose numbers were used), ``declined``, ``rejected``/``errors`` (site ->
    one-line reason) and ``missing``.
    """
    features = released(model_cfg.drop_features)
    used: dict[str, dict[str, float]] = {}
    rec: dict = {"features": list(features), "sites": [], "declined": [], "rejected": {}, "errors": {}, "missing": []}
    replied = set()
    for msg in replies:
        site = name_of(msg.metadata.src_node_id)
        replied.add(site)
        res = validate_stats_reply(msg, features, max_examples=max_examples)
        if isinstance(res, Rejection):
            key = "errors" if res.kind == "error" else "rejected"
            rec[key][site] = res.reason
            log.warning("feature statistics: %s from %s: %s; left out of the statistics",
                        "an error" if key == "errors" else "rejected the reply", site, res.reason)
            continue
        if res.declined:
            rec["declined"].append(site)
            log.warning("feature statistics: %s declined to release them (privacy budget)", site)
            continue
        used[site] = res.stats
    rec["missing"] = sorted(set(asked) - replied)
    pooled = combine([used[s] for s in sorted(used)], features)
    mean, std = global_standardization(pooled)
    rec.update(sites=sorted(used), mean=mean, std=std, count={f: pooled[f].count for f in features})
    log.info("feature statistics from %d site(s) (%s) over %d features", len(used), ", ".join(sorted(used)) or "none",
             len(features))
    return rec


def config_keys(record: dict | None) -> dict:
    """The config entries a train/evaluate message carries for the run's standardization (none: no statistics)."""
    if not record or len(record.get("mean", ())) != len(NUMERIC_NAMES):
        return {}
    return {P.FEATURE_MEAN: [float(v) for v in record["mean"]], P.FEATURE_STD: [float(v) for v in record["std"]]}
