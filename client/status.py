"""``dicomfl site status``: what a site has received, ingested and spent, from its state folder.

Read-only and PHI-free: counts, timestamps and reason codes from the files the site's own
processes write (``intake/status.json``, ``reports/ingest.json``, ``privacy/ledger.json``); no
header value, key or path of an image appears in them. The ledger is verified under the site's key
when the key can be read (an edited ledger is reported, never its contents); releases made without
DP are listed by run and kind, so a privacy officer sees them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomfl.common.config import SiteConfig
from dicomfl.common.jsonfile import read_json

from .intake import read_status as intake_status
from dicomfl.common.errors import ConfigError

from dicomfl.common.protocol import RUN_NAME_RE

from .privacy import RELEASE_KINDS, LedgerIntegrityError, site_spend

_INGEST_KEYS = ("seen", "accepted", "rejected", "labelled", "unlabelled", "cache_hits", "decoded", "workers",
                "elapsed_s", "files_per_s", "rejected_by_reason", "splits", "deferred", "deferred_by_reason")


def _mtime(path: Path) -> str | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    except OSError:
        return None


def _plain(v: Any) -> bool:
    """A number, or a flat mapping of names to numbers (what the report holds; anything else in a
    hand-edited or damaged file is left out, never printed)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, dict) and all(isinstance(k, str) and k.replace("-", "").replace("_", "").isalnum()
                                       and isinstance(x, (int, float)) and not isinstance(x, bool) for k, x in v.items())


def last_ingest(state_dir: Path) -> dict[str, Any] | None:
    """The last ingestion's counts (``reports/ingest.json``) and when it was written, or None."""
    path = Path(state_dir) / "reports" / "ingest.json"
    try:
        data = read_json(path)  # bounded (size, depth): a damaged report is "none", never a traceback
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    out = {k: data[k] for k in _INGEST_KEYS if _plain(data.get(k))}
    out["at"] = _mtime(path)
    return out


def site_status(cfg: SiteConfig) -> dict[str, Any]:
    """The site's status: intake counters (when ``site.intake`` is configured), the last
    ingestion, the privacy budget spent, and the opt-in releases its config allows."""
    state = cfg.site.state_dir
    intake = cfg.site.intake
    p = cfg.privacy
    budgets = {"budget": p.lifetime_epsilon, "run_cap": p.run_epsilon}
    try:
        try:
            key = cfg.secret_key
        except ConfigError:  # the key is the daemon's; without it the spend is shown unverified
            key = None
        spend = site_spend(state, p.accountant, p.delta, key=key)
        privacy = {"epsilon_total": float(spend["epsilon_total"]), **budgets, "runs": len(spend["runs"]),
                   "verified": key is not None,
                   "not_private": [{k: r[k] for k in ("run", "kind", "releases")} for r in spend["not_private"]
                                   if RUN_NAME_RE.fullmatch(r["run"]) and r["kind"] in RELEASE_KINDS]}
    except LedgerIntegrityError:
        privacy = {"epsilon_total": None, **budgets, "runs": None, "not_private": None,
                   "error": "privacy/ledger.json cannot be read: it fails its integrity check (the site will not train)"}
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
        privacy = {"epsilon_total": None, **budgets, "runs": None, "not_private": None,
                   "error": "privacy/ledger.json cannot be read"}
    return {
        "site": cfg.site.name,
        "intake": None if intake is None else {"ae_title": intake.ae_title, "port": intake.port,
                                              "tls": intake.tls is not None, **intake_status(state)},
        "ingest": last_ingest(state),
        "privacy": privacy,
        # what the site's config lets leave it beyond weights and whitelisted numbers (site's opt-ins)
        "releases": {"local_model": bool(p.share_local_model), "eval_replicates": int(p.eval_replicates)},
    }
