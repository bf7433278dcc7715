#!/usr/bin/env python
"""Make a federation's CA, the SuperLink's TLS certificate and one SuperNode key pair per site,
then print the commands that register the sites at the coordinator.

    python deployments/make_pki.py OUT_DIR --site hospital-a --site hospital-b [--host coord.example.org]

Send each site its ``sites/<site>.key`` and ``ca.crt`` (never ``ca.key``); the coordinator keeps
``superlink.crt``, ``superlink.key`` and every ``sites/<site>.pub``. Re-running keeps what exists.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomfl.server.pki import make_all


def main() -> None:
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
