#!/usr/bin/env python3
"""Make a federation's CA, the SuperLink's TLS certificate and one SuperNode key pair per site,
then print the commands that register the sites at the coordinator.

    python3 deployments/make_pki.py OUT_DIR --site hospital-a --site hospital-b [--host coord.example.org]

Any Python 3 runs it: one without dicomfl (the system's, no venv activated) hands over to the
repository's ``.venv/bin/python`` when there is one.

Send each site its ``sites/<site>.key`` and ``ca.crt`` (never ``ca.key``); the coordinator keeps
``superlink.crt``, ``superlink.key`` and every ``sites/<site>.pub``. Re-running keeps what exists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: The repository's own environment, where ``make install`` (or the README's set-up) put dicomfl.
REPO_VENV = Path(__file__).resolve().parent.parent / ".venv"


def _dicomfl_or_reexec() -> None:
    """Import dicomfl, or run this script again with the repository's ``.venv/bin/python`` when
    this Python (e.g. the system's ``python3``, no venv activated) does not have it; else say in
    one line how to run it (exit 2)."""
    try:
        import dicomfl.server.pki  # noqa: F401
        return
    except ImportError:
        pass
    venv_python = REPO_VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == REPO_VENV.resolve()
    if venv_python.is_file() and os.access(venv_python, os.X_OK) and not in_venv:
        os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
    print(f"make_pki.py: dicomfl is not installed for {sys.executable}; run it with the Python that has it, "
          f"e.g. .venv/bin/python deployments/make_pki.py (after make install, or bash deployments/install.sh)",
          file=sys.stderr)
    sys.exit(2)


def main() -> None:
    _dicomfl_or_reexec()
    from dicomfl.server.pki import make_all

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--site", action="append", default=[], required=True, help="a site name (repeat)")
    ap.add_argument("--host", action="append", default=[], help="the SuperLink's host name or IP as sites reach it (repeat)")
    a = ap.parse_args()
    pki = make_all(a.out, a.site, a.host or ["127.0.0.1", "localhost"])
    print(f"CA certificate:      {pki.ca_cert}   (to every site and the coordinator)")
    print(f"CA key:              {pki.ca_key}   (keep offline)")
    print(f"SuperLink TLS:       {pki.server_cert}, {pki.server_key}   (coordinator only)")
    for s in a.site:
        print(f"site {s}: private key {pki.site_key(s)} (to the site), public key {pki.site_pub(s)} (coordinator)")
    print("\nRegister the sites (automatic when they are listed in coordinator.authorized_sites), or by hand:")
    for s in a.site:
        print(f"  flwr supernode register {pki.site_pub(s)} <connection>")


if __name__ == "__main__":
    main()
