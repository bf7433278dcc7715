"""The site's privacy: one account per site's data, its signed ledger, and the accountant's arithmetic.

* :mod:`.accountant`: epsilon of a history of DP releases and the noise a target needs (Opacus's
  arithmetic, loaded without torch);
* :mod:`.ledger`: the ledger file, signed under the site's key, its seal, migration and key rotation;
* :mod:`.account`: :class:`PrivacyAccount` (``charge(release) -> Decision``, the only way to spend),
  the two budgets and the one rule for what a run may ask (:func:`effective_budget`).

Before a round the site charges the epsilon it *would* have spent after that round; if the stream's
per-run cap or the data's lifetime budget would be broken it declines to train (and says so in its
log and its reply). The noise multiplier is either fixed in the site config or derived once from the
per-run cap over the planned run (rounds x local epochs x steps per epoch) and kept in the ledger, so
it never drifts between rounds. Class-balanced loss weights need the site's label counts, which are
data too: under DP they are released once per stream through the Gaussian mechanism (a histogram:
adding or removing one record moves one count by 1, so the L2 sensitivity is 1), charged as a
``(sigma_counts, 1.0, 1)`` entry, kept in the ledger and reused every round (post-processing).
"""

from .account import (MODEL_KINDS, RELEASE_KINDS, Decision, Ledger, PrivacyAccount, PrivacySession, Release,
                      RoundBudget, effective_budget, plan_for_site, read_site_ledger, site_account, site_spend)
from .accountant import (count_release, epsilon, noisy_counts, plan_noise, planned_steps, sample_rate,
                         steps_per_epoch)
from .ledger import LEDGER_FILE, LedgerIntegrityError, ledger_lock, reseal

__all__ = ["MODEL_KINDS", "RELEASE_KINDS", "Decision", "Ledger", "PrivacyAccount", "PrivacySession", "Release",
           "RoundBudget", "effective_budget", "plan_for_site", "read_site_ledger", "site_account", "site_spend",
           "count_release", "epsilon", "noisy_counts", "plan_noise", "planned_steps", "sample_rate", "steps_per_epoch",
           "LEDGER_FILE", "LedgerIntegrityError", "ledger_lock", "reseal"]
