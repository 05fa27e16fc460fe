"""Keys and certificates of a deployment, made with the `cryptography` package.

* The central team's **CA** (``ca.pem``, ``ca.key``) and the SuperLink's **TLS
  certificate** signed by it (``superlink.pem``, ``superlink.key``), valid for the
  addresses the sites dial. Flower's ``flower-superlink --ssl-ca-certfile/--ssl-certfile/
  --ssl-keyfile`` serves its Fleet, Control and Runtime APIs with them; a site trusts
  ``ca.pem`` (``--root-certificates``).
* A site's **node-authentication key pair** (``node-auth.key``, ``node-auth.pub``): an EC
  P-384 key in OpenSSH format, the format Flower's SuperNode authentication reads
  (``flower-supernode --auth-supernode-private-key``; the central team registers the
  public half with ``flwr supernode register``). The site generates it; the private key
  never leaves the site.
* **Fingerprints** short enough to read over the phone (:func:`fingerprint`): the first
  128 bits of SHA-256, in eight groups of four hex digits.

Every private key is written with mode 0600 (:func:`write_secret`) and checked at
start-up (:func:`check_secret_file`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.errors import ConfigError

SECRET_MODE = 0o600
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.pem"
SERVER_KEY = "superlink.key"
NODE_KEY = "node-auth.key"
NODE_PUB = "node-auth.pub"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def write_secret(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, created with mode 0600 (never readable by others, not
    even for an instant), fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, SECRET_MODE)
    return path


def check_secret_file(path: str | Path, what: str) -> Path:
    """``path`` exists, is a regular file, and neither its group nor others can read or
    write it; otherwise a ``ConfigError`` that says how to fix it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist.")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {p} has mode {mode:04o}: other users could read it. "
                          f"Run `chmod 600 {p}`.")
    return p


def digest_fingerprint(data: bytes) -> str:
    """``'1a2b 3c4d ... '``: the first 128 bits of SHA-256, to compare out of band."""
    return short_hex(hashlib.sha256(data).hexdigest())


def short_hex(digest: str) -> str:
    """A hex digest's first 128 bits, in eight groups of four digits."""
    h = digest[:32]
    return " ".join(h[i:i + 4] for i in range(0, 32, 4))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedvault"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class TLSFiles:
    """Where the CA and the SuperLink's certificate and key are."""

    ca_cert: Path
    cert: Path
    key: Path


def new_ca(directory: Path, *, name: str = "fedvault federation CA", days: int = 3650
           ) -> tuple[Path, Path]:
    """A self-signed CA (EC P-384): ``ca.pem`` and ``ca.key`` (0600) in ``directory``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / CA_CERT
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, write_secret(directory / CA_KEY, _pem_key(key))


def server_certificate(ca_dir: Path, out: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS,
                       days: int = 825) -> TLSFiles:
    """The SuperLink's TLS certificate, signed by the CA in ``ca_dir``, valid for
    ``hosts`` (IP addresses or DNS names): ``superlink.pem`` and ``superlink.key`` (0600)
    in ``out``."""
    if not hosts:
        raise ConfigError("the SuperLink's certificate needs at least one host name or IP.")
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key(
        check_secret_file(ca_dir / CA_KEY, "CA key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY} is not an EC key.")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    out.mkdir(parents=True, exist_ok=True)
    cert_path = out / SERVER_CERT
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_copy = out / CA_CERT
    if ca_copy.resolve() != (ca_dir / CA_CERT).resolve():
        ca_copy.write_bytes((ca_dir / CA_CERT).read_bytes())
    return TLSFiles(ca_cert=ca_copy, cert=cert_path,
                    key=write_secret(out / SERVER_KEY, _pem_key(key)))


def node_key_pair(directory: Path, *, comment: str = "") -> tuple[Path, Path]:
    """A SuperNode authentication key pair in ``directory``: ``node-auth.key`` (EC P-384,
    OpenSSH private key format, 0600) and ``node-auth.pub`` (OpenSSH public key, what the
    central team registers). Refuses to overwrite an existing key."""
    priv_path, pub_path = directory / NODE_KEY, directory / NODE_PUB
    if priv_path.exists():
        raise ConfigError(f"{priv_path} exists: a node key is never overwritten (move it "
                          "away first if you really mean to replace this node's identity).")
    key = ec.generate_private_key(ec.SECP384R1())
    write_secret(priv_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    pub_path.write_bytes(pub + (b" " + comment.encode() if comment else b"") + b"\n")
    return priv_path, pub_path


def public_key_fingerprint(pub_path: Path) -> str:
    """The fingerprint of an OpenSSH public key file (of its key bytes, not the comment)."""
    parts = pub_path.read_bytes().split()
    if len(parts) < 2:
        raise ConfigError(f"{pub_path} is not an OpenSSH public key.")
    return digest_fingerprint(parts[0] + b" " + parts[1])


def certificate_fingerprint(cert_path: Path) -> str:
    """The fingerprint of a PEM certificate (of its DER bytes)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return digest_fingerprint(cert.public_bytes(serialization.Encoding.DER))
