"""The accountant's arithmetic: epsilon of a history of DP releases, and the noise a target needs.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, exactly as Opacus's
accountants keep it. The numbers come from Opacus's own analysis code, loaded without Opacus's
package ``__init__`` (which imports torch through its optimizers): ``opacus/accountants/rdp.py``,
``prv.py`` and ``analysis/`` are plain numpy/scipy, and only their shared base class,
``accountant.py``, imports the optimizers. :func:`_opacus` loads those files under a
private package name with a stand-in for that base class (:func:`_opacus`), so ``dicomfl privacy epsilon`` starts
without torch and gives Opacus's numbers, bit for bit (tests/test_privacy_account.py compares them
with the real Opacus classes and with recorded reference values).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import secrets
import sys
import types
import warnings
from functools import lru_cache

_PKG = "_dicomfl_opacus_accountants"
_BASE = "_dicomfl_opacus_accountants.accountant"  # the stand-in for Opacus's accountants/accountant.py


class _IAccountant:
    """Stand-in for ``opacus.accountants.accountant.IAccountant`` (its real module imports the
    optimizers, hence torch): the RDP and PRV accountants only need ``history`` from it."""

    def __init__(self) -> None:
        self.history = []


def _opacus(module: str):
    """One of Opacus's accountant modules (``rdp``, ``prv``, ``analysis.rdp``), loaded from the
    installed Opacus's files under a private package name (see the module docstring), on first use:
    the PRV accountant needs scipy.signal, which the RDP arithmetic does not. Raises ImportError
    without Opacus."""
    if _PKG not in sys.modules:
        spec = importlib.util.find_spec("opacus")  # finds the package; does not run its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("opacus is not installed")
        pkg = types.ModuleType(_PKG)
        # submodules are found in Opacus's folder, but neither its __init__ nor accountants/__init__ runs
        pkg.__path__ = [f"{list(spec.submodule_search_locations)[0]}/accountants"]
        pkg.__package__ = _PKG
        base = types.ModuleType(_BASE)
        base.IAccountant = _IAccountant
        sys.modules[_BASE] = base
        sys.modules[_PKG] = pkg
    return importlib.import_module(f"{_PKG}.{module}")


def create_accountant(name: str):
    """A fresh accountant of Opacus's (``rdp`` or ``prv``)."""
    if name == "rdp":
        return _opacus("rdp").RDPAccountant()
    if name == "prv":
        return _opacus("prv").PRVAccountant()
    raise ValueError(f"accountant {name!r}: expected rdp or prv")


def epsilon(history: list, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a history of (noise_multiplier, sample_rate, steps) entries.

    RDP: Opacus's own arithmetic (``RDPAccountant.get_privacy_spent``: the sum over entries of
    ``compute_rdp(q, sigma, steps)``, which is ``steps`` times the one-step RDP at each order), with
    the one-step RDP of each (q, sigma) computed once per process: a site asks for its epsilon
    several times a round over a growing history, and Opacus would recompute every entry's series
    each time. Same numbers, bit for bit. PRV: Opacus's ``PRVAccountant`` over the history."""
    if not history:
        return 0.0
    if accountant == "rdp":
        import numpy as np

        rdp = sum([np.asarray(_rdp_one_step(float(q), float(sigma))) * steps for sigma, q, steps in history])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" (a looser bound, still valid)
            eps, _ = _opacus("analysis.rdp").get_privacy_spent(orders=_rdp_orders(), rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def _rdp_orders() -> list:
    return _opacus("rdp").RDPAccountant.DEFAULT_ALPHAS


@lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float) -> tuple:
    """RDP of one step of the subsampled Gaussian mechanism at every default order (Opacus's function)."""
    return tuple(_opacus("analysis.rdp").compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders()))


#: Opacus's ``get_noise_multiplier`` gives up above this noise multiplier.
_MAX_SIGMA = 1e6


def _noise_for(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
               epsilon_tolerance: float = 0.01) -> float:
    """Opacus's ``opacus.accountants.utils.get_noise_multiplier`` (the same bisection, with its
    accountant), run on the accountants loaded here: that module imports Opacus's package."""
    eps_high = float("inf")
    acc = create_accountant(accountant)
    sigma_low, sigma_high = 0, 10
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        acc.history = [(sigma_high, q, steps)]
        eps_high = acc.get_epsilon(delta=delta)
        if sigma_high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        acc.history = [(sigma, q, steps)]
        eps = acc.get_epsilon(delta=delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def plan_noise(target_epsilon: float, delta: float, q: float, steps: int, accountant: str = "rdp",
               prefix: list | None = None) -> float:
    """The smallest noise multiplier that keeps ``steps`` steps at sample rate ``q`` within epsilon,
    after the releases already in ``prefix`` (history entries, e.g. the label-count release)."""
    if not prefix:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(_noise_for(target_epsilon, delta, q, steps, accountant))
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


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Opacus's Poisson loader makes ceil(N / B) steps per epoch at sample rate 1 / that."""
    return max(1, math.ceil(n_train / max(1, min(batch_size, n_train))))


def sample_rate(n_train: int, batch_size: int) -> float:
    return 1.0 / steps_per_epoch(n_train, batch_size)


def planned_steps(n_train: int, batch_size: int, rounds: int, local_epochs: int, local_steps: int | None) -> int:
    per_round = local_steps if local_steps else local_epochs * steps_per_epoch(n_train, batch_size)
    return rounds * per_round


def count_release(sigma: float) -> list:
    """The accountant entry of one Gaussian release of a label histogram (L2 sensitivity 1)."""
    return [float(sigma), 1.0, 1]


def noisy_counts(labels, n_classes: int, sigma: float) -> list[float]:
    """Label counts plus N(0, sigma^2) each, from OS entropy, floored at 1 (post-processing)."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    rng = np.random.default_rng(secrets.randbits(128))
    return [float(c) for c in np.maximum(counts + rng.normal(0.0, sigma, n_classes), 1.0)]
