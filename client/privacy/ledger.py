"""The site's ledger file: where its privacy account lives, signed under the site's key.

``<state_dir>/privacy/ledger.json`` holds the account (:mod:`.account`): one stream per model a run
trained here (``"runs"``, keyed by a display name; each stream names its ``run`` and ``kind``), the
log of every release (``"releases"``), a ``sequence`` number that grows by one with every write, and
``"hmac"``: HMAC-SHA256 under the site's secret key (``site.secret_file``) of
``b"dicomfl-ledger-v1\\0"`` followed by the canonical JSON of everything else (sorted keys, no
spaces). ``<state_dir>/ledger.seal`` holds the sequence number and HMAC of the last ledger written,
itself signed (``b"dicomfl-ledger-seal-v1\\0"``). Together they make these refusals, each one line
naming the file (:class:`LedgerIntegrityError`, a ``ConfigError``: a site answers
``site-config-error`` and does not train):

* an edited or truncated ledger (its HMAC does not match);
* a cleared one (an unsigned or empty ledger where a seal says one was signed);
* a deleted one (the seal exists and counts at least one write);
* an older copy put back (its sequence number is below the seal's).

The ledger is written first, then the seal: a site that stops between the two leaves a ledger one
write ahead of its seal, which is accepted (it verifies under the key) and re-sealed at the next
write. The first locked open of a site writes the seal (sequence 0 when nothing was spent yet), so a
ledger deleted after that is noticed. A ledger of an older dicomfl (unsigned, ``"version": 1``, or the
per-run files of before 0.2) is read as it is and signed at the first locked open: migrated, never
reset. Deleting the seal *and* the ledger, or the seal and then writing an unsigned ledger, cannot be
told from a site that never spent: the key protects the contents, not the folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from contextlib import contextmanager
from pathlib import Path

from dicomfl.common.errors import ConfigError
from dicomfl.common.files import write_bytes

LEDGER_FILE = "ledger.json"
SEAL_FILE = "ledger.seal"
LEDGER_VERSION = 2
_LEDGER_DOMAIN = b"dicomfl-ledger-v1\x00"
_SEAL_DOMAIN = b"dicomfl-ledger-seal-v1\x00"
#: A ledger or seal larger than this is damaged, never read (a site's ledger is kilobytes).
MAX_LEDGER_BYTES = 64 << 20
# The per-run fields of a stream (what the dicomfl before the account kept, plus run and kind).
RUN_FIELDS = ("accountant", "delta", "target_epsilon", "noise_multiplier", "max_grad_norm", "planned_steps", "history",
              "rounds_trained", "rounds_declined", "class_counts", "count_noise_multiplier", "feature_stats",
              "stats_noise_multiplier")


class LedgerIntegrityError(ConfigError):
    """The site's ledger (or its seal) was edited, truncated, cleared, deleted or rolled back, or
    cannot be read: the site refuses to train rather than start from a fresh budget."""


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / "privacy" / LEDGER_FILE


def seal_path(state_dir: Path) -> Path:
    return Path(state_dir) / SEAL_FILE


def _canonical(data: dict) -> bytes:
    return json.dumps({k: v for k, v in data.items() if k != "hmac"}, sort_keys=True, separators=(",", ":")).encode()


def ledger_mac(key: bytes, data: dict) -> str:
    return hmac.new(key, _LEDGER_DOMAIN + _canonical(data), hashlib.sha256).hexdigest()


def _seal_mac(key: bytes, seal: dict) -> str:
    return hmac.new(key, _SEAL_DOMAIN + _canonical(seal), hashlib.sha256).hexdigest()


def refuse(path: Path, why: str) -> LedgerIntegrityError:
    """The one-line refusal, naming the file first."""
    return LedgerIntegrityError(f"{path}: privacy ledger {why}; the site will not train on a fresh budget "
                                f"(restore the ledger and its seal from a backup)")


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


def _load(path: Path) -> dict:
    """A JSON object from ``path``; :class:`ValueError` for anything else (too large, not JSON,
    not an object, nested past Python's recursion limit)."""
    if path.stat().st_size > MAX_LEDGER_BYTES:
        raise ValueError("larger than a ledger")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _legacy_runs(folder: Path) -> dict:
    """Per-run files of dicomfl before 0.2 (``privacy/<run>.json``), folded into one mapping."""
    runs = {}
    for old in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if old.name == LEDGER_FILE:
            continue
        try:
            raw = _load(old)
            runs[str(raw["run"])] = {k: raw.get(k) for k in RUN_FIELDS}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return runs


def read_unverified(state_dir: Path) -> dict:
    """The ledger's contents as stored, not verified (for reading spend where no key is at hand,
    and for tests): ``{"version", "runs": {...}, ...}``; empty if there is none. Raises ValueError
    or OSError on a file that cannot be read."""
    path = ledger_path(state_dir)
    if path.is_file():
        return _load(path)
    return {"version": 1, "runs": _legacy_runs(path.parent)}


def _read_seal(state_dir: Path, key: bytes) -> dict | None:
    path = seal_path(state_dir)
    if not path.exists():
        return None
    try:
        seal = _load(path)
        mac = seal.get("hmac")
        seq = seal.get("sequence")
        if not isinstance(mac, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError("malformed")
    except (OSError, ValueError):
        raise refuse(path, "seal cannot be read") from None
    if not hmac.compare_digest(mac, _seal_mac(key, seal)):
        raise refuse(path, "seal does not verify under the site's key (edited, or signed with another key: after "
                            "a key rotation, run dicomfl privacy reseal)")
    return seal


def read_verified(state_dir: Path, key: bytes) -> tuple[dict, dict | None, bool]:
    """The ledger, checked against its HMAC and its seal: ``(data, seal, signed)``; ``signed`` is
    False for an older dicomfl's unsigned ledger (or none at all) that no seal covers, which is
    read as it is (:func:`migrate` signs it). Raises :class:`LedgerIntegrityError` (one line
    naming the file) when the ledger was edited, truncated, cleared, deleted or rolled back."""
    seal = _read_seal(state_dir, key)
    path = ledger_path(state_dir)
    if not path.exists():
        if seal is not None and seal["sequence"] > 0:
            raise refuse(path, f"is missing but its seal ({SEAL_FILE}) counts {seal['sequence']} write(s)")
        return {"version": 1, "runs": _legacy_runs(path.parent)}, seal, False
    try:
        data = _load(path)
    except (OSError, ValueError) as exc:
        raise refuse(path, f"cannot be read ({exc if isinstance(exc, ValueError) else type(exc).__name__})") from None
    mac = data.get("hmac")
    if mac is None:
        if seal is not None:
            raise refuse(path, f"is unsigned but its seal ({SEAL_FILE}) says it was signed")
        return data, None, False
    if not isinstance(mac, str) or not hmac.compare_digest(mac, ledger_mac(key, data)):
        raise refuse(path, "does not verify under the site's key (edited, or signed with another key: after a key "
                            "rotation, run dicomfl privacy reseal)")
    seq = data.get("sequence")
    if seal is None:
        raise refuse(path, f"is signed but its seal ({SEAL_FILE}) is missing")
    if seq == seal["sequence"]:
        if not hmac.compare_digest(str(seal.get("ledger")), mac):
            raise refuse(path, f"is not the one its seal ({SEAL_FILE}) covers")
    elif seq != seal["sequence"] + 1:  # one ahead: the site stopped between writing the two
        raise refuse(path, f"is at write {seq} but its seal ({SEAL_FILE}) is at write {seal['sequence']} "
                            f"(an older or foreign copy)")
    return data, seal, True


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, blob)  # 0600, temp file + fsync + rename + folder fsync; never through a symlink


def _write_seal(state_dir: Path, key: bytes, sequence: int, ledger: str | None) -> None:
    seal = {"version": 1, "sequence": int(sequence), "ledger": ledger}
    seal["hmac"] = _seal_mac(key, seal)
    _atomic_write(seal_path(state_dir), json.dumps(seal, indent=1).encode())


def stream_label(runs: dict, run: str, kind: str) -> str:
    """The display name of a (run, kind) stream in ``runs``: ``run`` for the global model's,
    ``<run>.<kind>`` for the others (as older ledgers named them); ``<run>#<kind>`` if a run whose
    name is that already holds it (a run name never holds ``#``). Streams are found by their
    ``run`` and ``kind`` fields, never by parsing this name."""
    for label, r in runs.items():
        if isinstance(r, dict) and r.get("run") == run and r.get("kind") == kind:
            return label
    label = run if kind == "train" else f"{run}.{kind}"
    return label if label not in runs else f"{run}#{kind}"


def migrate(data: dict) -> dict:
    """An older ledger's contents in this version's shape, every number kept: each stream gets
    the ``run`` and ``kind`` that its name meant before streams were typed (``<run>.local``: the
    local baseline of ``<run>``, ``<run>.personal``: its personalized model), and the release log
    starts empty (the older versions kept none)."""
    runs = data.get("runs")
    if not isinstance(runs, dict):
        raise ValueError("no runs mapping")
    out = {}
    for label, r in runs.items():
        if not isinstance(r, dict):
            raise ValueError("a run is not a mapping")
        r = dict(r)
        if not isinstance(r.get("run"), str) or r.get("kind") not in ("train", "local", "personal"):
            name, kind = str(label), "train"
            for k in ("local", "personal"):
                if name.endswith(f".{k}") and len(name) > len(k) + 1:
                    name, kind = name[: -len(k) - 1], k
            r["run"], r["kind"] = name, kind
        out[str(label)] = r
    releases = data.get("releases")
    return {**data, "runs": out, "releases": releases if isinstance(releases, list) else []}


def write_signed(state_dir: Path, key: bytes, data: dict, previous: int) -> dict:
    """Write ``data`` as the ledger's next version (sequence ``previous + 1``), signed, then its
    seal. Callers hold :func:`ledger_lock`. Returns what was written."""
    data = {**{k: v for k, v in data.items() if k != "hmac"}, "version": LEDGER_VERSION, "sequence": int(previous) + 1}
    data["hmac"] = ledger_mac(key, data)
    _atomic_write(ledger_path(state_dir), json.dumps(data, indent=1).encode())
    _write_seal(state_dir, key, data["sequence"], data["hmac"])
    return data


def seal_empty(state_dir: Path, key: bytes) -> None:
    """The seal of a site that has spent nothing yet (sequence 0): a ledger written after it and then
    deleted is noticed."""
    _write_seal(state_dir, key, 0, None)


def reseal(state_dir: Path, old_key: bytes, new_key: bytes) -> int:
    """Key rotation: verify the ledger and its seal under ``old_key`` and sign them under
    ``new_key`` (the next sequence number). Returns the sequence written. Raises
    :class:`LedgerIntegrityError` when they do not verify under the old key."""
    with ledger_lock(state_dir):
        data, seal, signed = read_verified(state_dir, old_key)
        if not signed and not ledger_path(state_dir).exists() and seal is None and not data.get("runs"):
            raise ConfigError(f"{ledger_path(state_dir)}: no privacy ledger to reseal")
        previous = int(data.get("sequence") or 0) if signed else int(seal["sequence"]) if seal is not None else 0
        try:
            data = migrate(data)
        except ValueError:
            raise refuse(ledger_path(state_dir), "cannot be read (not a ledger)") from None
        return write_signed(state_dir, new_key, data, previous)["sequence"]
