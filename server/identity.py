"""Which site sent a reply: the SuperNode's authenticated key, never the name the reply claims.

In a deployment with SuperNode authentication, each site's SuperNode holds the private key whose
public half the coordinator registered (``flwr supernode register sites/<name>.pub``). The
SuperLink checks a signature on every Fleet request from the node and ties the node id to that
public key, and it accepts a reply only from the node the instruction was addressed to. The
ServerApp's ``grid.get_nodes()`` (Flower's ``HttpGrid``) returns ``NodeInfo`` records with
``node_id`` and ``public_key`` (PEM SubjectPublicKeyInfo bytes, as
``flwr.supercore.primitives.asymmetric.public_key_to_bytes`` writes them). This module maps
those keys to the names of the files in ``<pki>/sites/<name>.pub`` (written by
:mod:`dicomfl.server.pki`), comparing keys in one canonical encoding (DER SubjectPublicKeyInfo),
so the PEM bytes Flower stores and the OpenSSH text on disk compare equal.

Without authentication (``--insecure``, no ``--enable-supernode-auth``, or an in-process grid
whose ``get_nodes`` does not report keys), there is no authenticated identity: every node is
``node-<id>``, the name a reply claims is only a label, and :meth:`SiteIdentities.describe`
says so for the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization

from dicomfl.common import protocol as P

Mode = Literal["pki", "trusted", "insecure"]


def canonical_public_key(data: bytes | str) -> bytes:
    """One encoding for a public key: DER SubjectPublicKeyInfo.

    Parameters
    ----------
    data : bytes or str
        A public key as PEM (``-----BEGIN PUBLIC KEY-----``, Flower's storage format), OpenSSH
        (``ecdsa-sha2-nistp384 AAAA...``, what :mod:`dicomfl.server.pki` writes) or DER.

    Returns
    -------
    bytes
        The DER SubjectPublicKeyInfo encoding.

    Raises
    ------
    ValueError
        If the bytes are none of these.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    text = raw.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        elif text.startswith((b"ecdsa-", b"ssh-")):
            key = serialization.load_ssh_public_key(text)
        else:
            key = serialization.load_der_public_key(raw)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a key"
        raise ValueError("not a public key in PEM, OpenSSH or DER form") from exc
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class SiteIdentities:
    """Node id -> site name, from authenticated keys (or, insecure, from nothing at all).

    Build one with :meth:`from_pki` (deployment with SuperNode auth), :meth:`trusted` (an
    in-process grid whose nodes the coordinator itself started) or :meth:`insecure`; call
    :meth:`refresh` with the Grid before each round (nodes come and go), then :meth:`name_for`.

    Attributes
    ----------
    mode : {"pki", "trusted", "insecure"}
        Where names come from.
    keys : dict of bytes to str
        Canonical public key -> site name (``pki`` mode).
    nodes : dict of int to str
        Node id -> site name for the nodes seen so far whose key is known.
    unknown : dict of int to str
        Node ids seen with no (or an unregistered) key -> why.
    claims : dict of int to str
        The last name each node's replies claimed (labels only).
    """

    mode: Mode = "insecure"
    keys: dict[bytes, str] = field(default_factory=dict)
    nodes: dict[int, str] = field(default_factory=dict)
    unknown: dict[int, str] = field(default_factory=dict)
    claims: dict[int, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pki(cls, pki_dir: str | Path) -> SiteIdentities:
        """Load every ``<pki_dir>/sites/<name>.pub`` (or ``<pki_dir>/<name>.pub``).

        Parameters
        ----------
        pki_dir : str or pathlib.Path
            The PKI folder made by :func:`dicomfl.server.pki.make_all`, or its ``sites`` folder.

        Returns
        -------
        SiteIdentities
            In ``pki`` mode, with one key per site.

        Raises
        ------
        ValueError
            If there is no key, a file name is not a valid site name, a file is not a public
            key, or two names share one key (the mapping would be ambiguous).
        """
        folder = Path(pki_dir)
        if (folder / "sites").is_dir():
            folder = folder / "sites"
        keys: dict[bytes, str] = {}
        for pub in sorted(folder.glob("*.pub")):
            name = pub.stem
            if not P.SITE_NAME_RE.fullmatch(name):
                raise ValueError(f"{pub.name}: not a valid site name")
            try:
                key = canonical_public_key(pub.read_bytes())
            except ValueError as exc:
                raise ValueError(f"{pub.name}: {exc}") from None
            if key in keys:
                raise ValueError(f"{pub.name}: the same key as {keys[key]}.pub")
            keys[key] = name
        if not keys:
            raise ValueError(f"no site public keys (*.pub) in {folder}")
        return cls(mode="pki", keys=keys)

    @classmethod
    def trusted(cls, names: Mapping[int, str]) -> SiteIdentities:
        """Names the coordinator assigned itself (an in-process grid: it started the nodes).

        Parameters
        ----------
        names : mapping of int to str
            Node id -> site name.

        Returns
        -------
        SiteIdentities
            In ``trusted`` mode.
        """
        return cls(mode="trusted", nodes=dict(names))

    @classmethod
    def insecure(cls) -> SiteIdentities:
        """No authentication: every node is ``node-<id>``; claimed names are labels only."""
        return cls(mode="insecure")

    # ------------------------------------------------------------------ use
    @property
    def authenticated(self) -> bool:
        """Whether names are backed by something other than the sites' own claims."""
        return self.mode in ("pki", "trusted")

    def observe(self, nodes: Iterable[Any]) -> None:
        """Learn node ids from ``NodeInfo``-like records (``node_id``, ``public_key``).

        Parameters
        ----------
        nodes : iterable
            What ``grid.get_nodes()`` returns. A node without a key, or with a key not in the
            PKI, stays unknown (``node-<id>``). A node whose key moved to another site, which
            Flower's unique-key rule should prevent, is re-mapped to the key's owner.
        """
        if self.mode != "pki":
            return
        for info in nodes:
            try:
                node_id = int(info.node_id)
                raw = bytes(getattr(info, "public_key", b"") or b"")
            except Exception:  # noqa: BLE001
                continue
            if not raw:
                self.unknown[node_id] = "no public key reported"
                continue
            try:
                name = self.keys.get(canonical_public_key(raw))
            except ValueError:
                name = None
            if name is None:
                self.unknown[node_id] = "public key not in the PKI"
                self.nodes.pop(node_id, None)
            else:
                self.nodes[node_id] = name
                self.unknown.pop(node_id, None)

    def refresh(self, grid: Any) -> None:
        """Ask the Grid for its nodes and keys (``grid.get_nodes()``); never raises.

        Parameters
        ----------
        grid : flwr.serverapp.Grid
            The run's grid. One without ``get_nodes`` (or that fails) teaches nothing.
        """
        if self.mode != "pki":
            return
        try:
            nodes = list(grid.get_nodes())
        except Exception:  # noqa: BLE001
            return
        self.observe(nodes)

    def name_for(self, node_id: int) -> str:
        """The site name of a node: authenticated, or ``node-<id>``.

        Parameters
        ----------
        node_id : int
            ``metadata.src_node_id`` of a reply.

        Returns
        -------
        str
            The site's name from its key (``pki``) or the coordinator's own table
            (``trusted``); otherwise ``node-<id>``. Never the name a reply claims.
        """
        if self.mode != "insecure" and node_id in self.nodes:
            return self.nodes[node_id]
        return f"node-{node_id}"

    def note_claim(self, node_id: int, claimed: str | None) -> None:
        """Remember the name a node's reply claimed (a label for the report, nothing more)."""
        if claimed and P.SITE_NAME_RE.fullmatch(claimed):
            self.claims[node_id] = claimed

    def label(self, node_id: int) -> str:
        """A display label: the name, plus the claim when it is unauthenticated or disagrees.

        Returns
        -------
        str
            E.g. ``site-a``, ``node-7 (claims site-a)`` or ``site-b (claims site-a)``.
        """
        name = self.name_for(node_id)
        claim = self.claims.get(node_id)
        return name if claim is None or claim == name else f"{name} (claims {claim})"

    def describe(self) -> dict[str, Any]:
        """What the report should say about identity.

        Returns
        -------
        dict
            ``authenticated`` (bool), ``mode``, ``note`` (a sentence for the report), ``sites``
            (node id -> name), ``unknown_nodes`` and ``mismatched_claims`` (node ids whose
            claimed name differs from the authenticated one).
        """
        notes = {
            "pki": "site identities were authenticated by each SuperNode's registered public key",
            "trusted": "site identities were assigned by the coordinator to nodes it started itself",
            "insecure": ("site identities were NOT authenticated: sites are listed by node id, and the "
                         "names they claimed are labels only"),
        }
        mism = {n: c for n, c in self.claims.items() if self.authenticated and c != self.name_for(n)}
        return {
            "authenticated": self.authenticated,
            "mode": self.mode,
            "note": notes[self.mode],
            "sites": {str(n): s for n, s in sorted(self.nodes.items())},
            "unknown_nodes": {str(n): why for n, why in sorted(self.unknown.items())},
            "claims": {str(n): c for n, c in sorted(self.claims.items())},
            "mismatched_claims": {str(n): c for n, c in sorted(mism.items())},
        }
