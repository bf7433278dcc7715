"""A site's personalized model: its own GroupNorm parameters (FedBN's idea) and fine-tuning after
the federation, chosen by its own validation split.

**Local normalization** (``run.local_norm``, sent as ``local-norm``). The GroupNorm affine
parameters (:func:`~dicomfl.common.model.norm_parameter_names`) are the site's: before a round
it replaces the global model's values with its own (kept in ``<state_dir>/personal/<run>.norm.npz``;
the global ones in round 1, so a new run reusing a run name starts afresh), trains all parameters, keeps the trained GroupNorm values, and
sends the *global* values for them, so nothing of its own normalization leaves the site. (The
alternative, sending them and having the coordinator skip them, would release them and need a
second reply schema.) The coordinator checks that those entries equal what it sent.

**Fine-tuning** (``run.personalize``: a ``train.personalize`` message with ``personalize-steps``,
``personalize-lr-scale`` at most 1, ``personalize-checks``). After the last round the coordinator
sends the final global model once more; the site starts from it (with its own GroupNorm values
under ``local-norm``), trains ``steps`` steps in ``checks`` chunks, scores every candidate (the start and each chunk's end) on
its validation split, and keeps the best (ties: the earlier). Under DP each chunk is DP-SGD,
charged to the site's privacy account as the run's ``personal`` stream, under the same lifetime
budget as every other release (so it may be declined, then the best candidate so far is kept). Choosing by validation
AUROC uses the validation split outside the accountant, as the ``val-auroc`` the site reports each
round already does.

**Where the personalized model goes.** It is written to ``<state_dir>/personal/<run>.model.npz``
(0600) and evaluated at home in cross-site validation (``metrics.personal:<site>``). It leaves the
site (``personal-arrays``, to the coordinator and, for cross-site validation, to every other site)
only under the same opt-in as the local-only baseline, ``privacy.share_local_model``: it is
trained on the site's data, and under ``local_norm`` it carries the site's own GroupNorm values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.common.files import AtomicFile
from dicomfl.common.model import get_weights, norm_parameter_names
from dicomfl.common.splits import TRAIN, VAL

from .trainer import RoundPlan, SiteTrainer


def _folder(state_dir: Path) -> Path:
    return Path(state_dir) / "personal"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with AtomicFile(path, mode=0o600) as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})


def _load(path: Path, reference: dict[str, np.ndarray], site: SiteTrainer) -> dict[str, np.ndarray] | None:
    """The arrays in ``path`` with exactly the reference's names and shapes, finite; None (logged)
    when missing or unusable."""
    if not path.is_file():
        return None
    limit = 2 * sum(int(np.asarray(v).nbytes) for v in reference.values()) + (1 << 20)
    try:
        if path.stat().st_size > limit:
            raise ValueError("larger than the model")
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != set(reference):
                raise ValueError("not the model's names")
            out = {k: np.asarray(z[k], dtype=np.asarray(ref).dtype) for k, ref in reference.items()}
        if any(out[k].shape != np.asarray(ref).shape or not np.all(np.isfinite(out[k])) for k, ref in reference.items()):
            raise ValueError("a shape differs or a value is not finite")
    except Exception as exc:  # noqa: BLE001 - a corrupt file is "none", never a crash
        site.log.warning("personal state %s unusable (%s); not used", path.name,
                         exc if isinstance(exc, ValueError) else type(exc).__name__)
        return None
    return out


def norm_names(site: SiteTrainer) -> frozenset[str]:
    return norm_parameter_names(site.model())


def with_local_norms(site: SiteTrainer, run: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with the site's own GroupNorm parameters for ``run`` (the given ones if it has none yet)."""
    names = norm_names(site)
    own = _load(_folder(site.cfg.site.state_dir) / f"{run}.norm.npz", {k: weights[k] for k in names}, site)
    return dict(weights) if own is None else {**weights, **own}


def keep_local_norms(site: SiteTrainer, run: str, trained: dict[str, np.ndarray],
                     sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Store ``trained``'s GroupNorm parameters as the site's own; return what the site sends:
    ``trained`` with the global model's values (``sent``) for them."""
    names = norm_names(site)
    _save(_folder(site.cfg.site.state_dir) / f"{run}.norm.npz", {k: trained[k] for k in names})
    return {k: (np.array(sent[k], copy=True) if k in names else v) for k, v in trained.items()}


def stored_personal_model(site: SiteTrainer, run: str) -> dict[str, np.ndarray] | None:
    """The site's personalized model of ``run``, if it made one that fits the current model."""
    return _load(_folder(site.cfg.site.state_dir) / f"{run}.model.npz", get_weights(site.model()), site)


def _val_auroc(site: SiteTrainer, weights, features=None) -> tuple[float, dict]:
    m = site.evaluate(weights, split=VAL, features=features)
    v = m.get(P.AUROC, math.nan)
    return (v if v is not None and math.isfinite(v) else -math.inf), m


def personalize(site: SiteTrainer, global_weights: dict[str, np.ndarray], plan: RoundPlan, *, steps: int,
                lr_scale: float, checks: int, local_norm: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Make, store and return the site's personalized model and its numbers (see the module docstring).

    Returns
    -------
    (weights, metrics)
        The chosen model and whitelisted numbers: ``num-examples``, ``steps`` (fine-tuning steps of
        the chosen candidate), ``declined`` (1 if the privacy budget stopped the fine-tuning
        early), ``epsilon`` (what the run's personal stream spent, under DP), and the chosen model's
        ``val-auroc`` / ``val-loss`` / ``val-balanced_accuracy`` / ``val-num-examples``.
    """
    start = with_local_norms(site, plan.run, global_weights) if local_norm else dict(global_weights)
    best_score, best_metrics = _val_auroc(site, start, plan.features)
    best, best_steps, done, declined, eps = start, 0, 0, 0.0, None
    current = start
    chunks = [steps // checks + (1 if i < steps % checks else 0) for i in range(checks)] if steps > 0 else []
    for k, chunk in enumerate([c for c in chunks if c > 0], start=1):
        chunk_plan = RoundPlan(run=plan.run, kind="personal", server_round=k, num_rounds=len([c for c in chunks if c > 0]),
                               # as many epochs as it takes: the chunk's steps, not one epoch's, bound it
                               local_epochs=chunk, local_steps=chunk, proximal_mu=0.0, dp=plan.dp,
                               target_epsilon=plan.target_epsilon, delta=plan.delta, seed=plan.seed,
                               lr_scale=lr_scale, features=plan.features)
        out = site.train(current, chunk_plan)
        if P.EPSILON in out.metrics:
            eps = out.metrics[P.EPSILON]
        if out.declined or out.weights is None:
            declined = 1.0
            site.log.warning("personalization of run %s stopped after %d steps: privacy budget", plan.run, done)
            break
        current, done = out.weights, done + int(out.metrics.get(P.STEPS, chunk))
        score, metrics = _val_auroc(site, current, plan.features)
        if score > best_score:
            best, best_score, best_metrics, best_steps = current, score, metrics, done
    _save(_folder(site.cfg.site.state_dir) / f"{plan.run}.model.npz", best)
    site.log.info("personalized model of run %s: %d fine-tuning steps chosen of %d (validation AUROC %.3f)",
                  plan.run, best_steps, done, best_metrics.get(P.AUROC, math.nan))
    metrics = {P.NUM_EXAMPLES: float(len(site.split(TRAIN))), P.STEPS: float(best_steps), P.DECLINED: declined,
               **{P.val_key(k): best_metrics.get(k, math.nan) for k in P.VAL_REPORTED}}
    if eps is not None:
        metrics[P.EPSILON] = eps
    return best, metrics
