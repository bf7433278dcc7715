"""One privacy account per site's data: every release of it is charged here, and only here.

The budget belongs to the site's data, not to a run. :class:`PrivacyAccount` holds what the data has
released, in the site's ledger (:mod:`.ledger`: one file, signed under the site's key), and
:meth:`PrivacyAccount.charge` is the only way to spend: DP-SGD rounds of the global model, of the
local-only baseline and of the personalized model, the noisy label counts behind the class weights,
the federated feature statistics, and releases without DP, which are recorded as *not private*
(epsilon infinite) so that a privacy officer sees them (``dicomfl site status``). A charge returns a
:class:`Decision`; a refused one spends nothing.

Each release is a typed :class:`Release` (its ``kind``: ``train``, ``local``, ``personal``,
``fedstats``, ``labels``). The accountant's histories are kept per *stream*: one per model a run
trains at the site (``train`` for the global model, with the label-count and feature-statistics
releases made for it; ``local``; ``personal``), each found by its run and kind.

Two budgets, both the site's (``site.yaml`` ``privacy:``):

* ``privacy.run_epsilon``: the most one stream of a run may spend, all its releases composed;
* ``privacy.lifetime_epsilon``: the most the site's data may spend over everything, every stream
  of every run (across restarts and run names) composed by the accountant.

**What run.yaml may ask (the one rule).** A run's ``privacy:`` section may ask a site for *less*
privacy loss, never more; the site decides. So: ``dp: true`` in the run turns DP on at a site whose
config has it off, and ``dp: false`` never turns it off; the run's ``target_epsilon`` (when the run
asks for DP) can only lower the per-run cap (the smaller of it and ``privacy.run_epsilon``) and its
``delta`` can only lower the site's; the lifetime budget, the noise, the clipping bound and the
accountant are the site's alone. :func:`effective_budget` is that rule.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .accountant import count_release, epsilon, noisy_counts, plan_noise, planned_steps, sample_rate, steps_per_epoch
from .ledger import (LEDGER_VERSION, RUN_FIELDS, LedgerIntegrityError, ledger_lock, ledger_path, migrate,
                     read_unverified, read_verified, refuse, seal_empty, stream_label, write_signed)

#: The kinds of release; the first three are also the streams (the models a run trains here).
MODEL_KINDS = ("train", "local", "personal")
RELEASE_KINDS = MODEL_KINDS + ("fedstats", "labels")
_TOLERANCE = 1 + 1e-9


@dataclass(frozen=True)
class Release:
    """One release of the site's data, as the account charges and logs it.

    ``entries`` are its accountant entries, ``(noise_multiplier, sample_rate, steps)`` each; a
    release without DP has none and ``private=False`` (its epsilon is infinite). ``fedstats`` and
    ``labels`` releases belong to the run's ``train`` stream."""

    kind: str
    run: str
    round: int | None = None
    entries: tuple = ()
    private: bool = True

    def __post_init__(self) -> None:
        if self.kind not in RELEASE_KINDS:
            raise ValueError(f"release kind {self.kind!r}: expected one of {RELEASE_KINDS}")
        if self.private and not self.entries:
            raise ValueError("a private release has accountant entries")

    @property
    def stream(self) -> str:
        return self.kind if self.kind in MODEL_KINDS else "train"

    @property
    def epsilon(self) -> float | None:
        """Infinite for a release without DP; None for a DP release, whose cost is its entries,
        composed with the rest of its stream by the stream's accountant (at the stream's delta)."""
        return math.inf if not self.private else None


@dataclass(frozen=True)
class Decision:
    """The account's answer to a charge: granted or not, the stream's and the data's epsilon with
    the release, and which budget refused it (``run_epsilon`` or ``lifetime_epsilon``)."""

    granted: bool
    epsilon_run: float
    epsilon_total: float
    refused_by: str | None = None

    @property
    def epsilon_after(self) -> float:
        """The epsilon the release would reach: the data's total when that is what it breaks."""
        return self.epsilon_total if self.refused_by == "lifetime_epsilon" else self.epsilon_run


@dataclass
class Ledger:
    """One stream of the site's account: one model a run trains here (``kind``), with its
    accountant history, its noise plan and what was released for it (numbers only).

    A stream made directly (``Ledger(run=..., ...)``) belongs to an account of its own, in memory
    (the benchmark's pooled baseline); :meth:`PrivacyAccount.stream` gives the site's."""

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
    kind: str = "train"
    account: "PrivacyAccount | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.account is None:
            self.account = PrivacyAccount.in_memory()
            self.account._streams[(self.run, self.kind)] = self

    @staticmethod
    def file_for(state_dir: Path, run: str | None = None) -> Path:
        """The site's ledger file (one for all runs)."""
        return ledger_path(state_dir)

    @property
    def site_budget(self) -> float | None:
        return self.account.lifetime_epsilon

    @property
    def others(self) -> list:
        """Every other stream's history entries (all runs, all kinds)."""
        return self.account._others(self)

    def spent(self) -> float:
        """Epsilon spent by this stream."""
        return epsilon(self.history, self.delta, self.accountant)

    def spent_total(self) -> float:
        """Epsilon spent by the site's data over all streams, this one included."""
        return epsilon(self.others + self.history, self.delta, self.accountant)

    def save(self) -> None:
        """Write the stream's plan and kept numbers (never its history: only a charge spends)."""
        self.account.save()


class PrivacyAccount:
    """The site's privacy account (see the module docstring): its streams, its release log and its
    budgets. Open it with :func:`site_account` (the ledger lock held, the ledger verified)."""

    def __init__(self, *, data: dict, lifetime_epsilon: float | None, state_dir: Path | None = None,
                 key: bytes | None = None, sequence: int = 0) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.lifetime_epsilon = lifetime_epsilon
        self._key = key
        self._sequence = sequence
        self._data = data
        self._streams: dict[tuple[str, str], Ledger] = {}

    @classmethod
    def in_memory(cls, lifetime_epsilon: float | None = None) -> "PrivacyAccount":
        """An account that is never written (simulations, the benchmark's pooled baseline)."""
        return cls(data={"runs": {}, "releases": []}, lifetime_epsilon=lifetime_epsilon)

    @classmethod
    def open(cls, state_dir: Path, key: bytes, *, lifetime_epsilon: float | None) -> "PrivacyAccount":
        """The site's account from its ledger, verified (:class:`~.ledger.LedgerIntegrityError`
        otherwise); an older unsigned ledger is migrated and signed now, and a site with no ledger
        gets its seal. Callers hold :func:`~.ledger.ledger_lock`."""
        data, seal, signed = read_verified(state_dir, key)
        try:
            data = migrate(data)
        except ValueError:
            raise refuse(ledger_path(state_dir), "cannot be read (not a ledger)") from None
        sequence = int(data.get("sequence") or 0) if signed else (int(seal["sequence"]) if seal is not None else 0)
        acct = cls(data=data, lifetime_epsilon=lifetime_epsilon, state_dir=state_dir, key=key, sequence=sequence)
        if not signed and (ledger_path(state_dir).exists() or data["runs"]):
            acct._write()  # migrated: signed from now on, every number kept
        elif seal is None or (signed and seal["sequence"] != sequence):
            if data["runs"] or signed:
                acct._write()
            else:
                seal_empty(state_dir, key)
        return acct

    # ------------------------------------------------------------------ streams
    def stream(self, run: str, kind: str = "train", *, accountant: str, delta: float, target_epsilon: float | None,
               max_grad_norm: float) -> Ledger:
        """The stream of ``run``'s ``kind`` model (new if there is none). The site's current policy
        (its per-run cap) applies from now on; what was spent is never rewritten."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"stream kind {kind!r}: expected one of {MODEL_KINDS}")
        if (run, kind) in self._streams:
            led = self._streams[(run, kind)]
            led.target_epsilon = target_epsilon
            return led
        runs = self._data["runs"]
        raw = runs.get(stream_label(runs, run, kind))
        if raw is not None and raw.get("run") == run and raw.get("kind") == kind:
            kept = {k: raw.get(k) for k in RUN_FIELDS if k in raw}
            led = Ledger(run=run, kind=kind, account=self,
                         **{**kept, "history": [list(h) for h in kept.get("history") or []],
                            "rounds_trained": list(kept.get("rounds_trained") or []),
                            "rounds_declined": list(kept.get("rounds_declined") or []),
                            "accountant": kept.get("accountant") or accountant,
                            "delta": kept.get("delta") or delta, "target_epsilon": target_epsilon})
        else:
            led = Ledger(run=run, kind=kind, accountant=accountant, delta=delta, target_epsilon=target_epsilon,
                         max_grad_norm=max_grad_norm, account=self)
        self._streams[(run, kind)] = led
        return led

    def _others(self, led: Ledger) -> list:
        mine = (led.run, led.kind)
        out = []
        for r in sorted(self._data["runs"].values(), key=lambda r: (r["run"], r["kind"])):
            if (r["run"], r["kind"]) != mine and (r["run"], r["kind"]) not in self._streams:
                out += [list(h) for h in r.get("history") or []]
        for key, other in sorted(self._streams.items()):
            if key != mine:
                out += [list(h) for h in other.history]
        return out

    # ------------------------------------------------------------------- charge
    def charge(self, *releases: Release) -> Decision:
        """Charge ``releases`` (of one stream, all or none) to the account: granted if the stream
        stays within its per-run cap and the data within its lifetime budget, composed by the
        stream's accountant. A granted charge is written before anything is released (a round
        that fails later keeps its charge: what it released cannot be known). Releases without DP
        are always granted and logged as not private: the site's config allows them, and the
        officer sees them. A refused round is recorded as declined."""
        if not releases:
            raise ValueError("nothing to charge")
        first = releases[0]
        if any((r.run, r.stream) != (first.run, first.stream) for r in releases):
            raise ValueError("one charge is one stream's")
        if not all(r.private for r in releases):
            if any(r.private for r in releases):
                raise ValueError("a charge is private or not, not both")
            for r in releases:
                self._log(r, None)
            self.save()
            return Decision(True, math.inf, math.inf, None)
        led = self._streams.get((first.run, first.stream))
        if led is None:
            raise ValueError(f"no stream {first.run}/{first.stream} open: PrivacyAccount.stream() first")
        new = [list(h) for r in releases for h in r.entries]
        after_run = epsilon(led.history + new, led.delta, led.accountant)
        refused = None
        after_total = after_run
        if self.lifetime_epsilon is not None:
            after_total = epsilon(self._others(led) + led.history + new, led.delta, led.accountant)
            if after_total > self.lifetime_epsilon * _TOLERANCE:
                refused = "lifetime_epsilon"
        if refused is None and led.target_epsilon is not None and after_run > led.target_epsilon * _TOLERANCE:
            refused = "run_epsilon"
        if refused is not None:
            rnd = next((r.round for r in releases if r.kind in MODEL_KINDS and r.round is not None), None)
            if rnd is not None and rnd not in led.rounds_declined:
                led.rounds_declined.append(int(rnd))
                self.save()
            return Decision(False, after_run, after_total, refused)
        led.history = led.history + new
        for r in releases:
            self._log(r, after_run)
        self.save()
        return Decision(True, after_run, after_total, None)

    def settle(self, led: Ledger, server_round: int, history: list) -> None:
        """After a charged round trained: the accountant's own history of it (the charge's entries,
        as Opacus counted the steps taken) replaces the reservation, and the round is trained."""
        led.history = [list(h) for h in history]
        led.rounds_trained.append(int(server_round))
        self.save()

    def _log(self, r: Release, eps_after: float | None) -> None:
        log = self._data.setdefault("releases", [])
        log.append({"seq": len(log) + 1, "kind": r.kind, "run": r.run, "round": r.round, "private": r.private,
                    "entries": [list(h) for h in r.entries],
                    "stream_epsilon": None if eps_after is None else float(eps_after)})

    def releases(self) -> list[Release]:
        """Every release logged, oldest first, as :class:`Release` (the log starts with the ledger
        version that keeps it; what older versions spent is in the streams' histories)."""
        out = []
        for e in self._data.get("releases") or []:
            try:
                out.append(Release(kind=e["kind"], run=e["run"], round=e.get("round"),
                                   entries=tuple(tuple(h) for h in e.get("entries") or ()), private=bool(e["private"])))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    # -------------------------------------------------------------------- write
    def save(self) -> None:
        """Write every open stream into the ledger, signed (an in-memory account writes nothing)."""
        runs = self._data["runs"]
        for (run, kind), led in self._streams.items():
            entry = {k: getattr(led, k) for k in RUN_FIELDS}
            entry.update(run=run, kind=kind, epsilon=led.spent())
            runs[stream_label(runs, run, kind)] = entry
        if self.state_dir is None:
            return
        if self._streams:
            self._data["epsilon_total"] = next(iter(self._streams.values())).spent_total()
        self._write()

    def _write(self) -> None:
        self._data["version"] = LEDGER_VERSION
        written = write_signed(self.state_dir, self._key, self._data, self._sequence)
        self._sequence = written["sequence"]
        self._data = {k: v for k, v in written.items() if k != "hmac"}


@contextmanager
def site_account(cfg):
    """The site's account (``cfg``: its SiteConfig), with the ledger lock held for the block: one
    charge-and-release at a time per site, across processes. Raises
    :class:`~.ledger.LedgerIntegrityError` (a ConfigError naming the file) when the ledger does not
    verify."""
    state = cfg.site.state_dir
    key = cfg.secret_key
    with ledger_lock(state):
        yield PrivacyAccount.open(state, key, lifetime_epsilon=cfg.privacy.lifetime_epsilon)


def effective_budget(site_privacy, run_privacy) -> tuple[bool, float | None, float]:
    """(dp on?, per-run cap, delta) under the one rule (module docstring): the run may ask for
    less privacy loss, never more. DP is on if the site or the run asks; the run's epsilon (only
    when it asks for DP) and delta can only lower the site's ``run_epsilon`` and ``delta``."""
    asks = run_privacy is not None and bool(run_privacy.dp)
    dp = bool(site_privacy.dp or asks)
    targets = [t for t in (site_privacy.run_epsilon, getattr(run_privacy, "target_epsilon", None) if asks else None) if t]
    deltas = [site_privacy.delta] + ([run_privacy.delta] if asks else [])
    return dp, (min(targets) if targets else None), min(deltas)


# ----------------------------------------------------------------------------- reading the spend
def read_site_ledger(state_dir: Path) -> dict:
    """The site's whole ledger as stored, not verified (``{"version", "runs": {name: {...}},
    "releases": [...]}``, numbers only; empty if none): for reading the spend and for tests.
    Per-run files of dicomfl before 0.2 (``privacy/<run>.json``) are folded in."""
    return read_unverified(state_dir)


def _read_unlocked(state_dir: Path, key: bytes) -> dict:
    """The verified ledger, read without the lock (a round may hold it for minutes): a write that
    lands between reading the seal and reading the ledger can look like a rollback, so a failed
    check is tried twice more before it counts."""
    for attempt in range(3):
        try:
            return read_verified(state_dir, key)[0]
        except LedgerIntegrityError:
            if attempt == 2:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def site_spend(state_dir: Path, accountant: str, delta: float, key: bytes | None = None) -> dict:
    """What a site has spent: per stream and in total (all histories composed), and the releases
    made without DP, for ``dicomfl privacy status``, ``dicomfl site status`` and the budget check.
    With ``key`` the ledger is verified first (:class:`~.ledger.LedgerIntegrityError`)."""
    data = migrate(_read_unlocked(state_dir, key) if key is not None else read_unverified(state_dir))
    runs = {}
    everything: list = []
    for name, r in sorted(data["runs"].items()):
        hist = r.get("history") or []
        everything += hist
        runs[name] = {"run": r["run"], "kind": r["kind"], "epsilon": epsilon(hist, delta, accountant),
                      "rounds_trained": len(r.get("rounds_trained") or []),
                      "rounds_declined": len(r.get("rounds_declined") or []), "noise_multiplier": r.get("noise_multiplier"),
                      "label_counts_released": r.get("class_counts") is not None,
                      "feature_stats_released": r.get("feature_stats") is not None}
    not_private: dict[tuple[str, str], dict] = {}
    for e in data.get("releases") or []:
        if isinstance(e, dict) and e.get("private") is False:
            k = (str(e.get("run")), str(e.get("kind")))
            item = not_private.setdefault(k, {"run": k[0], "kind": k[1], "releases": 0, "epsilon": None})
            item["releases"] += 1
    return {"runs": runs, "epsilon_total": epsilon(everything, delta, accountant), "accountant": accountant,
            "delta": delta, "not_private": [not_private[k] for k in sorted(not_private)]}


# ------------------------------------------------------------------------------- private training
@dataclass
class RoundBudget:
    """What one private round would cost: its sample rate and steps, and the epsilon after it."""

    sample_rate: float
    steps: int
    epsilon_after: float
    affordable: bool
    decision: Decision | None = None


class PrivacySession:
    """One stream's private training: the noise plan, the round's charge (with the label-count
    release before the first round), in the order the accountant needs them. The site trainer and
    the benchmark's pooled DP baseline both use it, so both spend the budget the same way.

    Parameters
    ----------
    ledger : Ledger
        The stream (:meth:`PrivacyAccount.stream`, or an in-memory ``Ledger(...)``: simulations).
    policy : PrivacySection
        The site's ``privacy:`` settings (noise, clipping, accountant, class weights).

    ``budget(...)`` before a round charges it (declined when it does not fit); if it is
    affordable, ``settings(labels, n_classes)`` makes the pending label-count release and returns
    the DP-SGD settings; after training, ``record(round, history)``.
    """

    def __init__(self, ledger: Ledger, policy) -> None:
        self.ledger = ledger
        self.policy = policy
        self._base: list | None = None

    def _pending(self) -> list:
        """The label-count release still to be made this run (once, before the first private step)."""
        p = self.policy
        return [count_release(p.count_noise_multiplier)] if p.class_weights == "noisy" and self.ledger.class_counts is None else []

    def budget(self, *, n_train: int, batch_size: int, num_rounds: int, local_epochs: int,
               local_steps: int | None, server_round: int = 1) -> RoundBudget:
        """Fix the noise multiplier (once per stream: the policy's, or the least noise that keeps
        the planned run within the per-run cap and within what is left of the lifetime budget),
        then charge one round of this size (and the label counts, before the first)."""
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
                    others = led.others
                    if led.site_budget is not None and others:
                        sigma = max(sigma, plan_noise(led.site_budget, led.delta, q, total, led.accountant,
                                                      prefix=others + led.history + pending))
                except ValueError:  # the budget is spent already: nothing fits
                    spent = led.spent_total()
                    if server_round not in led.rounds_declined:
                        led.rounds_declined.append(int(server_round))
                        led.save()
                    return RoundBudget(sample_rate=q, steps=steps, epsilon_after=spent, affordable=False)
            led.noise_multiplier = sigma
            led.planned_steps = total
            led.save()
        # the label counts are a release of their own for the global model's stream; the local and
        # personalized streams (which keep counts of their own) charge them with their first round
        releases = [Release("labels", led.run, server_round, (tuple(h),)) for h in pending] if led.kind == "train" else []
        round_entries = (pending if led.kind != "train" else []) + [[led.noise_multiplier, q, steps]]
        releases.append(Release(led.kind, led.run, server_round, tuple(tuple(h) for h in round_entries)))
        d = led.account.charge(*releases)
        if d.granted:
            self._base = led.history[:-1]  # before this round's steps: the accountant adds them as it trains
        return RoundBudget(sample_rate=q, steps=steps, epsilon_after=d.epsilon_after, affordable=d.granted, decision=d)

    def settings(self, labels, n_classes: int, seed: int | None = None):
        """Make the label-count release the round's charge paid for, and return ``(DPSettings, class_counts)``."""
        from dicomfl.common.train import DPSettings

        led, p = self.ledger, self.policy
        if self._base is None:
            raise RuntimeError("settings() before a granted budget()")
        if p.class_weights == "noisy" and led.class_counts is None:
            led.class_counts = noisy_counts(labels, n_classes, p.count_noise_multiplier)
            led.count_noise_multiplier = p.count_noise_multiplier
            led.save()
        # No seed: the batches and the noise come from OS entropy (see DPSettings.seed).
        dp = DPSettings(noise_multiplier=led.noise_multiplier, max_grad_norm=p.max_grad_norm, accountant=led.accountant,
                        grad_sample_mode=p.grad_sample_mode, history=list(self._base), seed=seed)
        return dp, led.class_counts

    def record(self, server_round: int, history: list) -> float:
        """Keep the accountant's history after a trained round; returns the epsilon spent so far."""
        self.ledger.account.settle(self.ledger, server_round, history)
        return self.ledger.spent()


def plan_for_site(site, run, n: int) -> dict:
    """The numbers a privacy officer checks before a run (see ``dicomfl privacy plan``).

    Parameters
    ----------
    site : SiteConfig
        The site's config (its budgets, batch size and accountant).
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
            "total_steps": steps, "target_epsilon": target, "lifetime_epsilon": site.privacy.lifetime_epsilon,
            "delta": delta, "accountant": acc, "max_grad_norm": site.privacy.max_grad_norm}
    if site.privacy.noise_multiplier:
        plan["noise_multiplier"] = site.privacy.noise_multiplier
        plan["noise_source"] = "fixed in site.yaml"
    elif target is not None:
        try:
            plan["noise_multiplier"] = plan_noise(target, delta, q, steps, acc, prefix)
        except ValueError as e:
            raise ConfigError(f"{site.source}: privacy.run_epsilon: {e}") from None
        plan["noise_source"] = "derived from the per-run cap"
    else:
        raise ConfigError(f"{site.source}: privacy: set noise_multiplier or run_epsilon")
    if site.privacy.class_weights == "noisy":
        plan["class_count_noise"] = site.privacy.count_noise_multiplier
        plan["epsilon_of_class_counts_alone"] = epsilon([count_release(site.privacy.count_noise_multiplier)], delta, acc)
    if stats:
        plan["feature_stats_noise"] = site.privacy.stats_noise_multiplier
        plan["epsilon_of_feature_stats_alone"] = epsilon(prefix[:1], delta, acc)
    plan["epsilon_at_end"] = epsilon(prefix + [[plan["noise_multiplier"], q, steps]], delta, acc)
    return plan
