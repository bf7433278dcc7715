"""The site's side of the federated feature statistics (:mod:`dicomfl.common.fedstats`).

What leaves the site, once per run, in the reply to the coordinator's ``query`` message: for each
numeric feature the run does not drop, over the site's *training* split only (never validation or
test) and on the images where the feature is present, ``count.<f>``, ``sum.<f>`` and ``sumsq.<f>``
of the value clipped to the feature's documented range and mapped to [0, 1]; and ``num-examples``
(the training split's size, which every train reply already carries).

Without DP these are the exact numbers. Under DP (the site's ``privacy.dp`` or the run's request,
as for training) they are released with the Gaussian mechanism:

* sensitivity: adding or removing one image changes each count, sum and sum of squares by at most
  1 (the values are clipped to [0, 1]), so the vector of ``3 d`` numbers (``d`` released features)
  has L2 sensitivity ``sqrt(3 d)``;
* noise: N(0, (sigma x sqrt(3 d))^2) on every number, sigma = ``privacy.stats_noise_multiplier``
  (default 4), drawn from OS entropy;
* cost: one accountant entry ``(sigma, 1.0, 1)`` (a full-batch Gaussian release) in the run's
  history of the site's ledger, composed by the same accountant (RDP or PRV) with the label-count
  release and every DP-SGD step of every run. At delta 1e-5 under RDP, sigma 4 alone costs epsilon
  1.01; composed with DP-SGD planned for epsilon 8 it adds about 0.11 (q 0.5 x 20 steps: 7.99 ->
  8.10; q 0.04 x 2250 steps: 8.00 -> 8.11), and a run whose noise is derived from its target plans
  DP-SGD after the release, so the target holds (sigma 1.66 -> 1.68, 1.416 -> 1.43);
* a site whose run target or site budget cannot cover the release declines (``declined`` = 1,
  ``epsilon-if-released``) and releases nothing; the run goes on without its statistics;
* the released numbers are post-processed (counts rounded and clamped to [0, num-examples], sums
  to [0, count], sums of squares to [sum^2 / count, sum]), kept in the ledger and sent again if
  the coordinator asks again in the same run (a resumed run): released once, never re-drawn.

The coordinator's answer, the global mean and std in every train/evaluate message, is checked
here before use (:func:`transform_from`): anything else is a ``bad-request``.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from dicomfl.common import protocol as P
from dicomfl.common.errors import BadRequest, NoTrainingData
from dicomfl.common.fedstats import FeatureTransform, STAT_KINDS, iter_blocks, released, stat_key, sums
from dicomfl.common.splits import TRAIN

from .privacy import Release, effective_budget, site_account


def stats_release(sigma: float) -> list:
    """The accountant entry of one Gaussian release of the statistics vector (noise sigma x sensitivity)."""
    return [float(sigma), 1.0, 1]


def sensitivity(n_features: int) -> float:
    """L2 sensitivity of the statistics vector of ``n_features`` features (3 numbers each, each in [0, 1] per image)."""
    return math.sqrt(3 * n_features)


def noisy(exact: dict[str, float], features: tuple[str, ...], n: int, sigma: float,
          rng: np.random.Generator | None = None) -> dict[str, float]:
    """The Gaussian mechanism on ``exact`` (noise sigma x sensitivity), then post-processing into
    numbers the coordinator's audit accepts (integer counts in [0, n], consistent sums)."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    scale = sigma * sensitivity(len(features))
    out: dict[str, float] = {}
    for f in features:
        keys = [stat_key(k, f) for k in STAT_KINDS]  # count, sum, sum of squares
        c, s, ss = (exact[k] + float(rng.normal(0.0, scale)) for k in keys)
        c = float(min(max(round(c), 0), n))
        s = min(max(s, 0.0), c)
        ss = min(max(ss, s * s / c if c else 0.0), s)
        out.update(zip(keys, (c, s, ss)))
    return out


def transform_from(standardization, model_cfg) -> FeatureTransform:
    """The run's feature transform: the model's drops, and the global mean/std when the message
    carries them (``standardization``: the (mean, std) a request checked against the schema's
    ranges, :func:`dicomfl.common.protocol.messages.standardization`; None when it has none)."""
    drop = tuple(model_cfg.drop_features)
    if standardization is None:
        return FeatureTransform(drop=drop)
    mean, std = standardization
    return FeatureTransform(mean=mean, std=std, drop=drop)


def site_statistics(site, plan) -> dict[str, float]:
    """What ``site`` (a :class:`~dicomfl.client.trainer.SiteTrainer`) releases for the run of
    ``plan``: exact without DP, through the Gaussian mechanism and its ledger under DP."""
    train = site.split(TRAIN)
    n = len(train)
    if n == 0:
        raise NoTrainingData("no labelled training images")
    features = released(site.model_cfg.drop_features)
    dp_on, target, delta = effective_budget(site.cfg.privacy, plan if plan.dp else None)
    with site_account(site.cfg) as account:
        if not dp_on:  # exact numbers: logged as a release that is not private
            account.charge(Release("fedstats", plan.run, private=False))
            return {P.NUM_EXAMPLES: float(n), **sums(iter_blocks(train.features), features)}
        return _private(account, site, plan, train, features, target, delta)


def _private(account, site, plan, train, features: tuple[str, ...], target, delta: float) -> dict[str, float]:
    p = site.cfg.privacy
    led = account.stream(plan.run, accountant=p.accountant, delta=delta, target_epsilon=target,
                         max_grad_norm=p.max_grad_norm)
    n = len(train)
    out = {P.NUM_EXAMPLES: float(n), P.NOISE_MULTIPLIER: float(led.stats_noise_multiplier or p.stats_noise_multiplier)}
    kept = led.feature_stats
    if kept is not None and set(kept) == {stat_key(k, f) for f in features for k in STAT_KINDS}:
        site.log.info("run %s: feature statistics already released; sent again (no new spend)", plan.run)
        return {**out, **kept, P.EPSILON: led.spent()}
    if kept is not None:  # another feature list in the same run: a second release would be another spend
        raise BadRequest("query: this run's feature statistics were released for other features")
    decision = account.charge(Release("fedstats", plan.run, entries=(tuple(stats_release(p.stats_noise_multiplier)),)))
    if not decision.granted:
        site.log.warning("run %s: declined to release feature statistics: epsilon would reach %.3f (site total so far "
                         "%.3f; per-run cap %s, lifetime budget %s)", plan.run, decision.epsilon_after,
                         led.spent_total(), target, p.lifetime_epsilon)
        return {**out, P.DECLINED: 1.0, P.EPSILON: led.spent(), P.EPSILON_IF_RELEASED: decision.epsilon_after}
    exact = sums(iter_blocks(train.features), features)
    led.feature_stats = noisy(exact, features, n, p.stats_noise_multiplier)  # what the charge paid for, kept
    led.stats_noise_multiplier = p.stats_noise_multiplier
    led.save()
    stats = led.feature_stats
    site.log.info("run %s: released feature statistics of %d features under DP (sigma %.3g); epsilon spent by the run "
                  "%.3f, by the site %.3f", plan.run, len(features), p.stats_noise_multiplier, led.spent(),
                  led.spent_total())
    return {**out, **stats, P.EPSILON: led.spent()}
