"""Talking to a SuperLink with Flower's own CLI (``flwr``): a private FLWR_HOME holding one
connection, site registration, node listing, run submission."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dicomfl.common.config import CoordinatorConfig
from dicomfl.common.supervise import child_env

CONNECTION = "dicomfl"


def flwr_bin() -> str:
    cand = Path(sys.executable).with_name("flwr")
    return str(cand) if cand.exists() else "flwr"


def write_home(home: Path, coord: CoordinatorConfig) -> Path:
    """A FLWR_HOME with one connection named ``dicomfl`` pointing at the coordinator."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    c = coord.coordinator
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{coord.target}"']
    if c.tls:
        lines.append(f'root-certificates = "{c.pki_dir / "ca.crt"}"')
    else:
        lines.append("insecure = true")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def env_with_home(home: Path) -> dict[str, str]:
    return child_env({"FLWR_HOME": str(home)})


def flwr(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([flwr_bin(), *args], env=env_with_home(home), capture_output=True, text=True, timeout=timeout)


def register(home: Path, public_key: Path) -> tuple[bool, str]:
    """Register a site's public key; a key that is already registered counts as success."""
    r = flwr(home, "supernode", "register", str(public_key), CONNECTION, "--format", "json")
    try:
        payload = json.loads(r.stdout)
    except json.JSONDecodeError:
        return False, (r.stdout + r.stderr).strip()[-300:]
    if payload.get("success"):
        return True, "registered"
    msg = str(payload.get("error-message", "")).strip().splitlines()[-1:] or [""]
    if key_already_registered(msg[0]):
        return True, "already registered"
    return False, msg[0]


def key_already_registered(error_message: str) -> bool:
    """Whether a failed ``flwr supernode register`` says the key is registered already.

    Flower's CLI reports the SuperLink's error only as text (its JSON output has no error code),
    so this is the one place that reads it: against Flower's own public message for
    ``ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE`` (:func:`.flower_adapter.public_key_in_use_message`,
    pinned by tests/test_layers.py).
    """
    from .flower_adapter import public_key_in_use_message

    expected = public_key_in_use_message().rstrip(".")
    return expected.lower() in error_message.lower()


def nodes(home: Path) -> list[dict]:
    r = flwr(home, "supernode", "list", CONNECTION, "--format", "json")
    try:
        return json.loads(r.stdout).get("nodes", [])
    except (json.JSONDecodeError, AttributeError):
        return []


def online_count(home: Path) -> int:
    return sum(1 for n in nodes(home) if n.get("status") == "online")
