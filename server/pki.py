"""Certificates and keys for a federation, made with the ``cryptography`` package (already a
Flower dependency):

* a CA (``ca.crt``, ``ca.key``: keep the key offline in production),
* the SuperLink's TLS certificate (``superlink.crt``, ``superlink.key``) with the host names and IP
  addresses the sites use to reach it as subject alternative names,
* one SuperNode authentication key pair per site (``sites/<site>.key`` in OpenSSH format, which
  the SuperNode reads, and ``sites/<site>.pub``, the ECDSA P-384 public key in SSH format that
  ``flwr supernode register`` takes). The private key goes to the site, the public key to the
  coordinator; nothing else needs to travel.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pki:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    def site_key(self, site: str) -> Path:
        return self.folder / "sites" / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.folder / "sites" / f"{site}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(pki: Pki, name: str = "dicomfl federation CA", days: int = 3650) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write(pki.ca_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), private=True)
    _write(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(pki: Pki, hosts: list[str], days: int = 825) -> None:
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(pki.server_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), private=True)
    _write(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def make_site_keys(pki: Pki, site: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write(pki.site_key(site), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()), private=True)
    _write(pki.site_pub(site), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")


def make_all(folder: Path, sites: list[str], hosts: list[str] | None = None) -> Pki:
    """CA + SuperLink certificate + one key pair per site; existing files are kept (safe to re-run)."""
    pki = Pki(Path(folder))
    if not pki.ca_cert.is_file():
        make_ca(pki)
    if not pki.server_cert.is_file():
        make_server_cert(pki, hosts or ["127.0.0.1", "localhost"])
    for s in sites:
        if not pki.site_key(s).is_file():
            make_site_keys(pki, s)
    return pki
