"""``dicomfl site start``: the site daemon — a supervised Flower SuperNode with our ClientApp.

The SuperNode gets the federation's CA certificate, the site's authentication key, a node config
naming this site's config file, and no runtime dependency installation (its default). Its output
goes to ``<state_dir>/logs/supernode.log``; the ClientApp writes ``<state_dir>/logs/site.log``.
If the SuperNode exits (for instance after giving up on an unreachable coordinator) it is started
again with a back-off; on SIGTERM the whole process group stops.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dicomfl.common.config import SiteConfig
from dicomfl.common.errors import ConfigError
from dicomfl.common.supervise import child_env, supervise

log = logging.getLogger("dicomfl.site")


def supernode_command(cfg: SiteConfig) -> list[str]:
    f = cfg.federation
    exe = Path(sys.executable).with_name("flower-supernode")
    cmd = [str(exe) if exe.exists() else "flower-supernode", "--superlink", f.superlink, "--port", str(f.port),
           "--node-config", f'site-config="{Path(cfg.source).resolve()}"']
    if f.insecure:
        cmd.append("--insecure")
    else:
        if f.root_certificates is None:
            raise ConfigError(f"{cfg.source}: federation.root_certificates: required unless federation.insecure is true")
        cmd += ["--root-certificates", str(f.root_certificates)]
    if f.auth_private_key is not None:
        if f.insecure:
            raise ConfigError(f"{cfg.source}: federation.auth_private_key: SuperNode authentication needs TLS")
        cmd += ["--auth-supernode-private-key", str(f.auth_private_key)]
    return cmd


def start(cfg: SiteConfig) -> int:
    for key in ("root_certificates", "auth_private_key"):
        p = getattr(cfg.federation, key)
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{cfg.source}: federation.{key}: file not found: {p}")
    cmd = supernode_command(cfg)
    state = cfg.site.state_dir
    state.mkdir(parents=True, exist_ok=True)
    env = child_env({"FLWR_HOME": str(state / "flwr-home")})
    log.info("site %s: connecting to %s", cfg.site.name, cfg.federation.superlink)
    return supervise(cmd, env, state / "logs" / "supernode.log", name="SuperNode",
                     backoff_s=cfg.federation.restart_backoff_s)
