"""The site's privacy budget: accountant arithmetic and a ledger that survives restarts.

The accountant lives at the site, and the budget belongs to the site's data, not to a run. One
ledger per site, ``<state_dir>/privacy/ledger.json``, keeps every run's history — one
``(noise_multiplier, sample_rate, steps)`` entry per round, exactly as Opacus's accountants keep
it, for the global model's training and for the local baseline (``<run>.local``) alike — and is
written after every round, under a file lock. The site's ``privacy.target_epsilon`` caps the
spend of all of it composed: a new run name opens no new budget.

Before a round the site computes the epsilon it *would* have spent after that round, for the run
and for the site in total; if either is above its budget it declines to train (and says so in
its log and its reply).

The noise multiplier is either fixed in the site config or derived once from the target
(epsilon, delta) over the planned run — rounds x local epochs x steps per epoch — and then kept in
the ledger, so it never drifts between rounds.

Class-balanced loss weights need the site's label counts, which are data too. Under DP they are
released once per run through the Gaussian mechanism (a histogram: adding or removing one record
moves one count by 1, so the L2 sensitivity is 1), charged to the same accountant as a
``(sigma_counts, 1.0, 1)`` entry, kept in the ledger and reused every round (post-processing).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


def epsilon(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a history of (noise_multiplier, sample_rate, steps) entries.

    RDP: Opacus's own arithmetic (``RDPAccountant.get_privacy_spent``: the sum over entries of
    ``compute_rdp(q, sigma, steps)``, which is ``steps`` times the one-step RDP at each order), with
    the one-step RDP of each (q, sigma) computed once per process: a site asks for its epsilon
    several times a round over a growing history, and Opacus recomputes every entry's series each
    time (about 0.35 s per call on this machine). Same numbers, bit for bit."""
    if not history:
        return 0.0
    if accountant == "rdp":
        import numpy as np
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum([np.asarray(_rdp_one_step(float(q), float(sigma))) * steps for sigma, q, steps in history])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" (a looser bound, still valid)
            eps, _ = get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)
    from opacus.accountants import create_accountant  # imported on use: a ClientApp without DP never pays for it

    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP: "optimal order is the largest alpha" (a looser bound, still valid)
        return float(acc.get_epsilon(delta=delta))


def _rdp_orders() -> list:
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


@lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float) -> tuple:
    """RDP of one step of the subsampled Gaussian mechanism at every default order (Opacus's function)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders()))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Opacus's Poisson loader makes ceil(N / B) steps per epoch at sample rate 1 / that."""
    return max(1, math.ceil(n_train / max(1, min(batch_size, n_train))))


def sample_rate(n_train: int, batch_size: int) -> float:
    return 1.0 / steps_per_epoch(n_train, batch_size)


def plan_noise(target_epsilon: float, delta: float, q: float, steps: int, accountant: str = "rdp",
               prefix: list | None = None) -> float:
    """The smallest noise multiplier that keeps ``steps`` steps at sample rate ``q`` within epsilon,
    after the releases already in ``prefix`` (history entries, e.g. the label-count release)."""
    if not prefix:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                              steps=steps, accountant=accountant))
    prefix = [list(h) for h in prefix]
    if epsilon(prefix, delta, accountant) >= target_epsilon:
        raise ValueError(f"the releases before training already spend epsilon >= {target_epsilon}")

    def eps(sigma: float) -> float:
        return epsilon(prefix + [[sigma, q, steps]], delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier keeps {steps} steps within epsilon {target_epsilon}")
    while hi - lo > 0.005 * hi:  # Opacus's own tolerance is 0.01 in epsilon; this is finer
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def count_release(sigma: float) -> list:
    """The accountant entry of one Gaussian release of a label histogram (L2 sensitivity 1)."""
    return [float(sigma), 1.0, 1]


def noisy_counts(labels, n_classes: int, sigma: float) -> list[float]:
    """Label counts plus N(0, sigma^2) each, from OS entropy, floored at 1 (post-processing)."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    rng = np.random.default_rng(secrets.randbits(128))
    return [float(c) for c in np.maximum(counts + rng.normal(0.0, sigma, n_classes), 1.0)]


LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1
_RUN_FIELDS = ("accountant", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm", "planned_steps", "history",
               "rounds_trained", "rounds_declined", "class_counts", "count_noise_multiplier", "feature_stats",
               "stats_noise_multiplier")


@contextmanager
def ledger_lock(state_dir: Path):
    """Hold the site's ledger lock (one private round at a time per site, across processes)."""
    folder = Path(state_dir) / "privacy"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_site_ledger(state_dir: Path) -> dict:
    """The site's whole ledger: ``{"version", "runs": {run: {...}}}`` (numbers only); empty if none.

    Per-run files of dicomfl before 0.2 (``privacy/<run>.json``) are folded in, so an upgrade
    never forgets what was spent.
    """
    folder = Path(state_dir) / "privacy"
    path = folder / LEDGER_FILE
    if path.is_file():
        return json.loads(path.read_text())
    runs = {}
    for old in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            raw = json.loads(old.read_text())
            runs[str(raw["run"])] = {k: raw.get(k) for k in _RUN_FIELDS}
        except (ValueError, KeyError, TypeError):
            continue
    return {"version": LEDGER_VERSION, "runs": runs}


def _write_site_ledger(state_dir: Path, data: dict) -> None:
    folder = Path(state_dir) / "privacy"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ledger-")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, folder / LEDGER_FILE)


def site_spend(state_dir: Path, accountant: str, delta: float) -> dict:
    """What a site has spent: per run and in total (all runs' histories composed), for
    ``dicomfl privacy status`` and the budget check."""
    data = read_site_ledger(state_dir)
    runs = {}
    everything: list = []
    for name, r in sorted(data.get("runs", {}).items()):
        hist = r.get("history") or []
        everything += hist
        runs[name] = {"epsilon": epsilon(hist, delta, accountant), "rounds_trained": len(r.get("rounds_trained") or []),
                      "rounds_declined": len(r.get("rounds_declined") or []), "noise_multiplier": r.get("noise_multiplier"),
                      "label_counts_released": r.get("class_counts") is not None,
                      "feature_stats_released": r.get("feature_stats") is not None}
    return {"runs": runs, "epsilon_total": epsilon(everything, delta, accountant), "accountant": accountant, "delta": delta}


@dataclass
class Ledger:
    """One run's privacy spend at a site, kept in the site's ledger (``<state_dir>/privacy/ledger.json``).

    The budget belongs to the site's data, not to a run: ``others`` is every other run's history
    (the global model's and the local baseline's of every run, across restarts), and a round is
    affordable only if the site's total, all of it composed, stays within ``site_budget``.
    """

    run: str
    accountant: str
    delta: float
    target_epsilon: float | None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    planned_steps: int | None = None
    history: list = field(default_factory=list)
    rounds_trained: list = field(default_factory=list)
    rounds_declined: list = field(default_factory=list)
    # The DP-released label counts (numbers only) and the noise they were released with.
    class_counts: list | None = None
    count_noise_multiplier: float | None = None
    # The DP-released feature statistics (dicomfl.client.fedstats; numbers only) and their noise.
    feature_stats: dict | None = None
    stats_noise_multiplier: float | None = None
    site_budget: float | None = None  # the site's total epsilon over all runs (its privacy.target_epsilon)
    others: list = field(default_factory=list)  # every other run's history entries
    state_dir: Path | None = None  # None: an unsaved ledger (simulations)

    @staticmethod
    def file_for(state_dir: Path, run: str | None = None) -> Path:
        """The site's ledger file (one for all runs)."""
        return Path(state_dir) / "privacy" / LEDGER_FILE

    @classmethod
    def open(cls, state_dir: Path, run: str, *, accountant: str, delta: float, target_epsilon: float | None,
             max_grad_norm: float, site_budget: float | None = None) -> "Ledger":
        """This run's entry of the site's ledger (new if the run is new), with every other run's spend."""
        runs = read_site_ledger(state_dir).get("runs", {})
        others = [h for name, r in sorted(runs.items()) if name != run for h in (r.get("history") or [])]
        if run in runs:
            raw = {k: runs[run].get(k) for k in _RUN_FIELDS if k in runs[run]}
            led = cls(run=run, **{**raw, "history": raw.get("history") or [], "rounds_trained": raw.get("rounds_trained") or [],
                                  "rounds_declined": raw.get("rounds_declined") or []})
            # The site's current policy applies from now on; history is never rewritten.
            led.target_epsilon = target_epsilon
        else:
            led = cls(run=run, accountant=accountant, delta=delta, target_epsilon=target_epsilon,
                      max_grad_norm=max_grad_norm)
        led.site_budget, led.others, led.state_dir = site_budget, others, Path(state_dir)
        return led

    def spent(self) -> float:
        """Epsilon spent by this run."""
        return epsilon(self.history, self.delta, self.accountant)

    def spent_total(self) -> float:
        """Epsilon spent by the site's data over all runs, this one included."""
        return epsilon(self.others + self.history, self.delta, self.accountant)

    def affordable(self, noise_multiplier: float, q: float, steps: int, extra: list = ()) -> tuple[bool, float]:
        """Whether one more round fits this run's target and the site's total budget; and the
        epsilon it would reach (the site's total when that is what it would break)."""
        new = [list(h) for h in extra] + [[noise_multiplier, q, steps]]
        after_run = epsilon(self.history + new, self.delta, self.accountant)
        if self.site_budget is not None:
            after_total = epsilon(self.others + self.history + new, self.delta, self.accountant)
            if after_total > self.site_budget * (1 + 1e-9):
                return False, after_total
        if self.target_epsilon is not None and after_run > self.target_epsilon * (1 + 1e-9):
            return False, after_run
        return True, after_run

    def affordable_release(self, entry: list) -> tuple[bool, float]:
        """Whether one more release (an accountant entry) fits this run's target and the site's
        total budget; and the epsilon it would reach (the site's total when that is what it breaks)."""
        after_run = epsilon(self.history + [list(entry)], self.delta, self.accountant)
        if self.site_budget is not None:
            after_total = epsilon(self.others + self.history + [list(entry)], self.delta, self.accountant)
            if after_total > self.site_budget * (1 + 1e-9):
                return False, after_total
        if self.target_epsilon is not None and after_run > self.target_epsilon * (1 + 1e-9):
            return False, after_run
        return True, after_run

    def record(self, server_round: int, history: list) -> None:
        self.history = [list(h) for h in history]
        self.rounds_trained.append(int(server_round))
        self.save()

    def decline(self, server_round: int) -> None:
        if server_round not in self.rounds_declined:
            self.rounds_declined.append(int(server_round))
        self.save()

    def save(self) -> None:
        """Write this run's entry into the site's ledger atomically (numbers only); an unsaved
        ledger (``state_dir=None``) stays in memory. Callers hold :func:`ledger_lock`."""
        if self.state_dir is None:
            return
        data = read_site_ledger(self.state_dir)
        entry = {k: getattr(self, k) for k in _RUN_FIELDS}
        entry["epsilon"] = self.spent()
        data.setdefault("runs", {})[self.run] = entry
        data["version"] = LEDGER_VERSION
        data["epsilon_total"] = self.spent_total()
        _write_site_ledger(self.state_dir, data)


@dataclass
class RoundBudget:
    """What one private round would cost: its sample rate and steps, and the epsilon after it."""

    sample_rate: float
    steps: int
    epsilon_after: float
    affordable: bool


class PrivacySession:
    """One site's private training of one dataset: the ledger, the noise plan and the label-count
    release, in the order the accountant needs them. The site trainer and the benchmark's pooled
    DP baseline both use it, so both spend the budget the same way.

    Parameters
    ----------
    ledger : Ledger
        The persisted spend (``Ledger.open``) or an unsaved one (``path=None``: simulations).
    policy : PrivacySection
        The site's ``privacy:`` settings (noise, clipping, accountant, class weights).

    Use ``budget(...)`` before a round; if it is affordable, ``settings(labels, n_classes)`` makes
    the pending label-count release (once) and returns the DP-SGD settings; after training,
    ``record(round, history)``; otherwise ``decline(round)``.
    """

    def __init__(self, ledger: "Ledger", policy) -> None:
        self.ledger = ledger
        self.policy = policy

    def _pending(self) -> list:
        """The label-count release still to be made this run (once, before the first private step)."""
        p = self.policy
        return [count_release(p.count_noise_multiplier)] if p.class_weights == "noisy" and self.ledger.class_counts is None else []

    def budget(self, *, n_train: int, batch_size: int, num_rounds: int, local_epochs: int,
               local_steps: int | None) -> RoundBudget:
        """Fix the noise multiplier (once per run: the policy's, or the least noise that keeps the
        planned run within this run's target and within what is left of the site's budget) and
        say what one more round of this size would spend."""
        led, p = self.ledger, self.policy
        q = sample_rate(n_train, batch_size)
        steps = local_steps or local_epochs * steps_per_epoch(n_train, batch_size)
        pending = self._pending()
        if led.noise_multiplier is None:
            total = planned_steps(n_train, batch_size, num_rounds, local_epochs, local_steps)
            sigma = p.noise_multiplier
            if not sigma:
                try:
                    sigma = plan_noise(led.target_epsilon, led.delta, q, total, led.accountant, prefix=led.history + pending)
                    if led.site_budget is not None and led.others:
                        sigma = max(sigma, plan_noise(led.site_budget, led.delta, q, total, led.accountant,
                                                      prefix=led.others + led.history + pending))
                except ValueError:  # the budget is spent already: nothing fits
                    spent = led.spent_total()
                    return RoundBudget(sample_rate=q, steps=steps, epsilon_after=spent, affordable=False)
            led.noise_multiplier = sigma
            led.planned_steps = total
            led.save()
        ok, after = led.affordable(led.noise_multiplier, q, steps, extra=pending)
        return RoundBudget(sample_rate=q, steps=steps, epsilon_after=after, affordable=ok)

    def settings(self, labels, n_classes: int, seed: int | None = None):
        """Make the pending label-count release and return ``(DPSettings, class_counts)``."""
        from dicomfl.common.train import DPSettings

        led, p = self.ledger, self.policy
        pending = self._pending()
        if pending:
            led.class_counts = noisy_counts(labels, n_classes, p.count_noise_multiplier)
            led.count_noise_multiplier = p.count_noise_multiplier
            led.history = led.history + pending
            led.save()
        # No seed: the batches and the noise come from OS entropy (see DPSettings.seed).
        dp = DPSettings(noise_multiplier=led.noise_multiplier, max_grad_norm=p.max_grad_norm, accountant=led.accountant,
                        grad_sample_mode=p.grad_sample_mode, history=led.history, seed=seed)
        return dp, led.class_counts

    def record(self, server_round: int, history: list) -> float:
        """Keep the accountant's history after a trained round; returns the epsilon spent so far."""
        self.ledger.record(server_round, history)
        return self.ledger.spent()

    def decline(self, server_round: int) -> None:
        self.ledger.decline(server_round)


def effective_budget(site_privacy, run_privacy) -> tuple[bool, float | None, float]:
    """(dp on?, target epsilon, delta): a site trains privately if it or the run asks; the stricter budget wins."""
    dp = bool(site_privacy.dp or (run_privacy is not None and run_privacy.dp))
    targets = [t for t in (site_privacy.target_epsilon, getattr(run_privacy, "target_epsilon", None) if run_privacy and run_privacy.dp else None) if t]
    deltas = [site_privacy.delta] + ([run_privacy.delta] if run_privacy is not None and run_privacy.dp else [])
    return dp, (min(targets) if targets else None), min(deltas)


def planned_steps(n_train: int, batch_size: int, rounds: int, local_epochs: int, local_steps: int | None) -> int:
    per_round = local_steps if local_steps else local_epochs * steps_per_epoch(n_train, batch_size)
    return rounds * per_round


def plan_for_site(site, run, n: int) -> dict:
    """The numbers a privacy officer checks before a run (see ``dicomfl privacy plan``).

    Parameters
    ----------
    site : SiteConfig
        The site's config (its budget, batch size and accountant).
    run : RunConfig
        The run's config (rounds, local epochs or steps, its DP request).
    n : int
        The site's number of labelled training images.
    """
    from dicomfl.common.errors import ConfigError

    if n == 0:
        raise ConfigError(f"{site.source}: the site has no labelled training images; nothing to plan")
    _, target, delta = effective_budget(site.privacy, run.privacy)
    b = site.train.batch_size
    q = sample_rate(n, b)
    steps = planned_steps(n, b, run.run.rounds, run.run.local_epochs, run.run.local_steps)
    acc = site.privacy.accountant
    prefix = [count_release(site.privacy.count_noise_multiplier)] if site.privacy.class_weights == "noisy" else []
    # The run's feature statistics (dicomfl.client.fedstats): one Gaussian release before round 1.
    stats = run.model.standardize_features and run.model.mode != "image"
    if stats:
        prefix = [[float(site.privacy.stats_noise_multiplier), 1.0, 1]] + prefix
    plan = {"site": site.site.name, "run": run.run.name, "train_images": n, "batch_size": b, "sample_rate": q,
            "rounds": run.run.rounds, "local_epochs": run.run.local_epochs, "steps_per_round": steps // run.run.rounds,
            "total_steps": steps, "target_epsilon": target, "delta": delta, "accountant": acc,
            "max_grad_norm": site.privacy.max_grad_norm}
    if site.privacy.noise_multiplier:
        plan["noise_multiplier"] = site.privacy.noise_multiplier
        plan["noise_source"] = "fixed in site.yaml"
    elif target is not None:
        try:
            plan["noise_multiplier"] = plan_noise(target, delta, q, steps, acc, prefix)
        except ValueError as e:
            raise ConfigError(f"{site.source}: privacy.target_epsilon: {e}") from None
        plan["noise_source"] = "derived from target epsilon"
    else:
        raise ConfigError(f"{site.source}: privacy: set noise_multiplier or target_epsilon")
    if site.privacy.class_weights == "noisy":
        plan["class_count_noise"] = site.privacy.count_noise_multiplier
        plan["epsilon_of_class_counts_alone"] = epsilon([count_release(site.privacy.count_noise_multiplier)], delta, acc)
    if stats:
        plan["feature_stats_noise"] = site.privacy.stats_noise_multiplier
        plan["epsilon_of_feature_stats_alone"] = epsilon(prefix[:1], delta, acc)
    plan["epsilon_at_end"] = epsilon(prefix + [[plan["noise_multiplier"], q, steps]], delta, acc)
    return plan
