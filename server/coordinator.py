"""``dicomfl coordinator start``: the SuperLink, supervised.

TLS and SuperNode authentication on (unless the config says otherwise), state in a database file
under ``state_dir`` so registrations and runs survive a restart, runtime dependency installation
off (sites and coordinator are offline). After each start the sites listed in
``authorized_sites`` are registered (already-registered keys are fine).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from dicomfl.common.config import CoordinatorConfig
from dicomfl.common.supervise import supervise, wait_port

from . import flwrcli

log = logging.getLogger("dicomfl.coordinator")


def superlink_command(cfg: CoordinatorConfig) -> list[str]:
    c = cfg.coordinator
    exe = Path(sys.executable).with_name("flower-superlink")
    cmd = [str(exe) if exe.exists() else "flower-superlink", "--host", c.address, "--port", str(c.port),
           "--database", str(c.state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if c.tls:
        cmd += ["--ssl-ca-certfile", str(c.pki_dir / "ca.crt"), "--ssl-certfile", str(c.pki_dir / "superlink.crt"),
                "--ssl-keyfile", str(c.pki_dir / "superlink.key")]
    else:
        cmd += ["--insecure"]
    if c.supernode_auth:
        cmd += ["--enable-supernode-auth"]
    return cmd


def home(cfg: CoordinatorConfig) -> Path:
    return flwrcli.write_home(cfg.coordinator.state_dir / "flwr-home", cfg)


def register_sites(cfg: CoordinatorConfig) -> None:
    c = cfg.coordinator
    h = home(cfg)
    for site in c.authorized_sites:
        ok, msg = flwrcli.register(h, c.pki_dir / "sites" / f"{site}.pub")
        (log.info if ok else log.error)("site %s: %s", site, msg)


def ready_file(cfg: CoordinatorConfig) -> Path:
    """``<state_dir>/ready.json``: written each time the SuperLink is up and the sites registered."""
    return cfg.coordinator.state_dir / "ready.json"


def write_ready(cfg: CoordinatorConfig, superlink_pid: int) -> None:
    path = ready_file(cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"superlink_pid": superlink_pid, "target": cfg.target, "time": time.time()}))
    os.replace(tmp, path)


def read_ready(cfg: CoordinatorConfig) -> dict | None:
    """The last ready record, or None while the coordinator has not (re)started."""
    try:
        return json.loads(ready_file(cfg).read_text())
    except (OSError, ValueError):
        return None


def start(cfg: CoordinatorConfig) -> int:
    c = cfg.coordinator
    c.state_dir.mkdir(parents=True, exist_ok=True)
    ready_file(cfg).unlink(missing_ok=True)
    h = home(cfg)

    def after_start(proc) -> None:
        if not wait_port(c.address, c.port, 60):
            log.error("SuperLink did not open %s within 60 s", cfg.target)
            return
        log.info("SuperLink listening on %s (tls=%s, supernode auth=%s)", cfg.target, c.tls, c.supernode_auth)
        if c.supernode_auth:
            register_sites(cfg)
        write_ready(cfg, proc.pid)
        log.info("coordinator ready")

    return supervise(superlink_command(cfg), flwrcli.env_with_home(h), c.state_dir / "logs" / "superlink.log",
                     name="SuperLink", backoff_s=3.0, after_start=after_start)
