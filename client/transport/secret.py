"""The SuperExec secret: what signs the warm worker's ``AcquireTask`` calls to its SuperNode.

The site daemon writes a fresh one at each start (``<state_dir>/run/superexec.secret``, mode 0600,
:data:`SECRET_BYTES` random bytes, in the worker's private run directory) and passes it to the
SuperNode (``--superexec-auth-secret-file``) and to the worker (``--secret-file``): another local
user who can reach the SuperNode's Runtime API port cannot take the site's tasks. (The site's own
``site.secret_file``, read by :func:`dicomfl.common.config.read_site_key`, is another secret.)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_NAME = "superexec.secret"
SECRET_BYTES = 32


def write_superexec_secret(run_dir: Path) -> Path:
    """A fresh secret for this start of the daemon, 0600 in the worker's private run folder."""
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = run_dir / SECRET_NAME
    tmp = run_dir / f".{SECRET_NAME}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_superexec_secret(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if len(data) != SECRET_BYTES:
        raise ValueError(f"{path}: not a dicomfl SuperExec secret")
    return data
