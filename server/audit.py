"""The coordinator's side of the cross-site shortcut audit (:mod:`dicomfl.common.audit`).

Every site sends, per audited feature, its effect on the label with a standard error, and the
feature's count, mean and variance (:func:`dicomfl.common.audit.summarize`). Here they are
combined as a multicenter meta-analysis does:

* **random effects** (:func:`random_effects`): DerSimonian-Laird, with statsmodels'
  ``combine_effects`` (not hand-written statistics): pooled effect with its 95% interval,
  Cochran's Q with its p-value, I^2 and tau^2, over the sites where the effect is estimable
  (``se`` > 0);
* **site-specific shortcut** (:func:`is_shortcut`): the effect is heterogeneous
  (I^2 >= :data:`I2_MIN`), *strong* at one site at least (``|effect| >=`` :data:`STRONG_G` for a
  Hedges' g, :data:`STRONG_LOG_OR` for a log odds ratio, about the same size: log OR ~ 1.81 g,
  and significant, ``|effect| >= 1.96 se``), and *reversed* (strong with the opposite sign) or
  *absent* (95% interval covering 0 and ``|effect|`` under half the strong threshold) at
  another. A feature predictive the same way at every site is homogeneous and is never flagged,
  however strong;
* **site proxy** (:func:`is_proxy`): the feature's between-site variance share (the sites' count,
  mean and variance give the exact pooled decomposition ``SS_between / SS_total``, an ICC-like
  ratio, :func:`between_site_share`) is at least :data:`PROXY_SHARE`, *and* the sites' label
  rates differ (a chi-square test of homogeneity at :data:`RATE_ALPHA` and a spread of at least
  :data:`RATE_GAP`): a model can then learn each site's prevalence from it.

The policy (``features.shortcuts``: ``drop`` | ``warn`` | ``keep``, default ``drop``) turns the
flags into the schema features to drop (:func:`features_to_drop`), which feed the existing
``model.drop_features`` mechanism. No list of names exists here: only the sites' numbers decide.
Image statistics are not model inputs: their flags warn, they are never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as sps
from statsmodels.stats.meta_analysis import combine_effects

from dicomfl.common.audit import (SiteEstimate, audit_features, is_binary, parse_reply, schema_feature)

Z95 = 1.959963984540054
STRONG_G = 0.8  # Cohen's "large" standardized difference
STRONG_LOG_OR = 1.45  # the same size as a log odds ratio (pi / sqrt(3) x 0.8)
I2_MIN = 0.75  # "considerable" heterogeneity (Cochrane handbook: 75-100%)
PROXY_SHARE = 0.5  # half the feature's variance lies between sites
RATE_ALPHA = 0.05
RATE_GAP = 0.05
POLICIES = ("drop", "warn", "keep")
DEFAULT_POLICY = "drop"


@dataclass(frozen=True)
class Meta:
    """A DerSimonian-Laird random-effects meta-analysis of ``k`` estimates."""

    k: int
    pooled: float
    se: float
    ci_low: float
    ci_high: float
    q: float
    q_pvalue: float
    i2: float
    tau2: float


def random_effects(effects, ses, alpha: float = 0.05) -> Meta:
    """Random-effects (DerSimonian-Laird) pooling of estimates with standard errors ``ses`` (all
    > 0), by statsmodels' ``combine_effects``. One estimate: itself, Q = I^2 = tau^2 = 0."""
    e = np.asarray(effects, dtype=np.float64)
    v = np.asarray(ses, dtype=np.float64) ** 2
    if len(e) == 0:
        raise ValueError("no estimates to combine")
    if len(e) == 1:
        se = math.sqrt(v[0])
        z = sps.norm.ppf(1 - alpha / 2)
        return Meta(1, float(e[0]), se, float(e[0] - z * se), float(e[0] + z * se), 0.0, 1.0, 0.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):  # its HKSJ variants, unused here, can be sqrt(<0)
        r = combine_effects(e, v, method_re="dl", use_t=False, alpha=alpha)
        _, (lo, hi), _, _ = r.conf_int(alpha=alpha, use_t=False)  # (fixed, random, fixed wls, random wls)
    q = float(r.q)
    p = float(sps.chi2.sf(q, len(e) - 1))
    if not r.tau2 > 0:
        # DerSimonian-Laird truncates tau^2 at 0 (Q <= k - 1): the random-effects estimate is then
        # the fixed-effect one. statsmodels 0.14-0.15 does not truncate for "dl" and weights by
        # 1 / (v + tau^2) with tau^2 < 0, so its fixed-effect numbers are taken instead.
        with np.errstate(invalid="ignore", divide="ignore"):
            (flo, fhi), _, _, _ = r.conf_int(alpha=alpha, use_t=False)
        return Meta(len(e), float(r.mean_effect_fe), float(r.sd_eff_w_fe), float(flo), float(fhi), q, p, 0.0, 0.0)
    return Meta(len(e), float(r.mean_effect_re), float(r.sd_eff_w_re), float(lo), float(hi), q, p,
                float(max(r.i2, 0.0)), float(r.tau2))


def pooled_moments(ns, means, variances) -> tuple[float, float, float]:
    """(n, mean, population variance) of the union of groups from each group's n, mean and
    population variance (exact)."""
    n = np.asarray(ns, dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    tot = n.sum()
    if tot <= 0:
        return 0.0, math.nan, math.nan
    mean = float((n * m).sum() / tot)
    var = float((n * (v + (m - mean) ** 2)).sum() / tot)
    return float(tot), mean, var


def between_site_share(ns, means, variances) -> float:
    """``SS_between / SS_total`` of a feature over the sites (eta^2, an ICC-like ratio: 1 when
    the feature is constant within each site and differs between them, 0 when every site has the
    same mean); 0 when the feature does not vary at all."""
    n = np.asarray(ns, dtype=np.float64)
    m = np.asarray(means, dtype=np.float64)
    v = np.asarray(variances, dtype=np.float64)
    keep = n > 0
    if keep.sum() < 2:
        return 0.0
    tot, mean, var = pooled_moments(n[keep], m[keep], v[keep])
    if not var > 1e-18:
        return 0.0
    between = float((n[keep] * (m[keep] - mean) ** 2).sum() / tot)
    return min(max(between / var, 0.0), 1.0)


def label_rates_differ(ns, rates) -> tuple[bool, float]:
    """(differ, p): a chi-square test of homogeneity of the sites' label rates (2 x k table)
    rejects at :data:`RATE_ALPHA` and the rates spread by at least :data:`RATE_GAP`."""
    n = np.asarray(ns, dtype=np.float64)
    r = np.asarray(rates, dtype=np.float64)
    keep = n > 0
    n, r = n[keep], r[keep]
    if len(n) < 2:
        return False, 1.0
    pos = n * r
    table = np.stack([pos, n - pos])
    if (table.sum(axis=1) <= 0).any():
        return False, 1.0
    p = float(sps.chi2_contingency(table, correction=False)[1])
    return bool(p < RATE_ALPHA and r.max() - r.min() >= RATE_GAP), p


@dataclass
class FeatureAudit:
    """One feature across the sites: each estimable site's effect and SE, the meta-analysis, and
    the flags with the reason for each."""

    feature: str
    schema_feature: str | None  # what model.drop_features names; None: an image statistic
    sites: list[str]  # sites where the effect is estimable, in reply order
    effects: list[float]
    ses: list[float]
    meta: Meta | None
    strong_positive: list[str] = field(default_factory=list)
    strong_negative: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    between_share: float = 0.0
    shortcut: bool = False
    proxy: bool = False

    @property
    def flagged(self) -> bool:
        return self.shortcut or self.proxy

    @property
    def sign_disagreement(self) -> bool:
        return bool(self.strong_positive and self.strong_negative)

    def reason(self) -> str:
        parts = []
        if self.shortcut:
            m = self.meta
            how = "reversed" if self.sign_disagreement else "absent"
            parts.append(f"site-specific shortcut: I2 {m.i2:.2f}, strong + at {', '.join(self.strong_positive) or '-'}, "
                         f"strong - at {', '.join(self.strong_negative) or '-'}, {how} at "
                         f"{', '.join(self.absent) if not self.sign_disagreement else 'the others'}")
        if self.proxy:
            parts.append(f"site proxy: between-site share {self.between_share:.2f} and the sites' label rates differ")
        return "; ".join(parts)


@dataclass
class AuditResult:
    sites: list[str]  # sites whose reply was read
    label_n: dict[str, float]
    label_rate: dict[str, float]
    label_rate_p: float
    label_rates_differ: bool
    features: dict[str, FeatureAudit]
    refused: dict[str, str]  # site -> one line: why its reply was left out

    @property
    def flagged(self) -> list[FeatureAudit]:
        return [fa for fa in self.features.values() if fa.flagged]

    @property
    def shortcuts(self) -> list[str]:
        return [fa.feature for fa in self.features.values() if fa.shortcut]

    @property
    def proxies(self) -> list[str]:
        return [fa.feature for fa in self.features.values() if fa.proxy]


def strong_threshold(feature: str) -> float:
    return STRONG_LOG_OR if is_binary(feature) else STRONG_G


def is_shortcut(feature: str, meta: Meta | None, sites, effects, ses) -> tuple[bool, list[str], list[str], list[str]]:
    """(flag, strong positive sites, strong negative sites, absent sites), the rule of the module
    docstring."""
    t = strong_threshold(feature)
    pos, neg, absent = [], [], []
    for s, e, se in zip(sites, effects, ses):
        significant = abs(e) >= Z95 * se
        if significant and abs(e) >= t:
            (pos if e > 0 else neg).append(s)
        elif not significant and abs(e) < t / 2:
            absent.append(s)
    flag = (meta is not None and meta.k >= 2 and meta.i2 >= I2_MIN and bool(pos or neg)
            and (bool(pos and neg) or bool(absent)))
    return flag, pos, neg, absent


def is_proxy(share: float, rates_differ: bool) -> bool:
    return share >= PROXY_SHARE and rates_differ


def combine(replies: Mapping[str, Mapping[str, float]]) -> AuditResult:
    """The audit of a federation from each site's reply ({site: metrics}). A reply that is not a
    well-formed audit is left out (``refused``: one line naming the key, never a value); the
    others are combined."""
    names = audit_features()
    parsed: dict[str, dict[str, SiteEstimate]] = {}
    label_n, label_rate, refused = {}, {}, {}
    for site, metrics in replies.items():
        try:
            est, (n, rate) = parse_reply(metrics, names)
        except ValueError as exc:
            refused[site] = str(exc)
            continue
        parsed[site] = est
        label_n[site], label_rate[site] = n, rate
    sites = list(parsed)
    differ, p = label_rates_differ([label_n[s] for s in sites], [label_rate[s] for s in sites])
    out: dict[str, FeatureAudit] = {}
    for f in names:
        per = [(s, parsed[s][f]) for s in sites]
        est = [(s, e) for s, e in per if e.estimable]
        meta = random_effects([e.effect for _, e in est], [e.se for _, e in est]) if est else None
        fs = [s for s, _ in est]
        eff = [e.effect for _, e in est]
        ses = [e.se for _, e in est]
        flag, pos, neg, absent = is_shortcut(f, meta, fs, eff, ses)
        share = between_site_share([e.n for _, e in per], [e.mean for _, e in per], [e.var for _, e in per])
        out[f] = FeatureAudit(f, schema_feature(f), fs, eff, ses, meta, pos, neg, absent, share,
                              shortcut=flag, proxy=is_proxy(share, differ))
    return AuditResult(sites, label_n, label_rate, p, differ, out, refused)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"features.shortcuts must be one of {', '.join(POLICIES)}")
    return policy


FLAG_KINDS = ("shortcut", "proxy")


def features_to_drop(result: AuditResult, policy: str = DEFAULT_POLICY, kinds=FLAG_KINDS) -> list[str]:
    """The schema features (``model.drop_features`` names, sorted) the policy drops: under
    ``drop`` every schema feature with an audited feature flagged as one of ``kinds`` (default
    both; a flagged categorical level drops its whole group), under ``warn`` and ``keep`` none.
    Image statistics never drop."""
    if check_policy(policy) != "drop":
        return []
    bad = set(kinds) - set(FLAG_KINDS)
    if bad:
        raise ValueError(f"flag kinds are {', '.join(FLAG_KINDS)}")
    return sorted({fa.schema_feature for fa in result.features.values() if fa.schema_feature is not None
                   and ((fa.shortcut and "shortcut" in kinds) or (fa.proxy and "proxy" in kinds))})


def forest_plot(fa: FeatureAudit, path: Path) -> Path:
    """A forest plot PNG of one feature: each site's effect with its 95% interval (square sized by
    weight) and the random-effects pooled effect as a diamond, with Q, I^2 and tau^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(fa.sites)
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.45 * (k + 1)))
    try:
        w = np.array([1 / s ** 2 for s in fa.ses]) if k else np.zeros(0)
        size = 30 + 120 * w / w.max() if k else w
        for i, (s, e, se) in enumerate(zip(fa.sites, fa.effects, fa.ses)):
            y = k - i
            ax.plot([e - Z95 * se, e + Z95 * se], [y, y], color="black", lw=1)
            ax.scatter([e], [y], marker="s", s=size[i], color="tab:blue", zorder=3)
        labels = list(fa.sites)
        if fa.meta is not None:
            m = fa.meta
            ax.fill([m.ci_low, m.pooled, m.ci_high, m.pooled], [0, 0.2, 0, -0.2], color="tab:red")
            labels.append("pooled (RE)")
            ax.set_title(f"{fa.feature}: Q {m.q:.1f} (p {m.q_pvalue:.2g}), I\u00b2 {m.i2:.2f}, "
                         f"\u03c4\u00b2 {m.tau2:.3g}", fontsize=9)
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        ax.set_yticks(list(range(k, -1, -1))[:len(labels)], labels)
        ax.set_xlabel("log odds ratio" if is_binary(fa.feature) else "Hedges' g (positives - negatives)")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def forest_plots(result: AuditResult, out_dir: Path) -> list[Path]:
    """One forest plot per flagged feature, ``<out_dir>/forest-<feature>.png`` ('=' -> '_')."""
    return [forest_plot(fa, Path(out_dir) / f"forest-{fa.feature.replace('=', '_')}.png") for fa in result.flagged]
