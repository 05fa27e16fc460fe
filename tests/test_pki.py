"""Keys and certificates: the central team's CA and the SuperLink's TLS certificate, a
site's node key in the format Flower's SuperNode authentication reads, the site.toml
that points at them, and fingerprints that agree wherever they are printed. (The
loopback tests run them on real Flower processes.)"""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedvault.node import load_site_config
from privacy.pki import (
    certificate_fingerprint,
    check_secret_file,
    new_ca,
    node_key_pair,
    public_key_fingerprint,
    server_certificate,
)
from protocols.errors import ConfigError
from tests.helpers import cli_in_process, write_site_toml


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_superlink_certificate_chains_to_the_ca_for_its_hosts(tmp_path: Path) -> None:
    ca_pem, ca_key = new_ca(tmp_path / "ca")
    tls = server_certificate(tmp_path / "ca", tmp_path / "link",
                             hosts=("127.0.0.1", "link.example.org"))
    assert _mode(ca_key) == 0o600 and _mode(tls.key) == 0o600
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    # another CA's certificate does not verify against this one
    new_ca(tmp_path / "other")
    other = server_certificate(tmp_path / "other", tmp_path / "other-link")
    with pytest.raises(InvalidSignature):  # same CA name, another key
        x509.load_pem_x509_certificate(other.cert.read_bytes()).verify_directly_issued_by(ca)
    # a CA key others can read is refused before it signs anything
    ca_key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        server_certificate(tmp_path / "ca", tmp_path / "link2")


def test_node_key_is_what_flower_reads_and_is_never_overwritten(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    priv, pub = node_key_pair(tmp_path, comment="clinic")
    assert _mode(priv) == 0o600
    key = load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(pub)  # as `flwr supernode register` loads it
    before = priv.read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        node_key_pair(tmp_path)
    assert priv.read_bytes() == before


def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_bytes(b"x")
    f.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640"):
        check_secret_file(f, "key")
    f.chmod(0o600)
    assert check_secret_file(f, "key") == f
    with pytest.raises(ConfigError, match="does not exist"):
        check_secret_file(tmp_path / "none", "key")


def test_a_secure_site_needs_its_ca_and_a_private_node_key(tmp_path: Path) -> None:
    new_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match=r"auth-key.*fedvault site keygen"):
        load_site_config(write_site_toml(tmp_path, 'root-certificates = "ca/ca.pem"'))
    node_key_pair(tmp_path / "keys")
    # paths are relative to site.toml
    cfg = load_site_config(write_site_toml(
        tmp_path, 'root-certificates = "ca/ca.pem"\nauth-key = "keys/node-auth.key"'))
    assert cfg.root_certificates == str(tmp_path / "ca" / "ca.pem")
    assert cfg.auth_key == str(tmp_path / "keys" / "node-auth.key") and not cfg.insecure
    (tmp_path / "keys" / "node-auth.key").chmod(0o644)
    with pytest.raises(ConfigError, match="other users could read it"):
        load_site_config(write_site_toml(
            tmp_path, 'root-certificates = "ca/ca.pem"\nauth-key = "keys/node-auth.key"'))
    with pytest.raises(ConfigError, match="no file"):
        load_site_config(write_site_toml(
            tmp_path, 'root-certificates = "nope.pem"\nauth-key = "keys/node-auth.key"'))


def test_fingerprints_agree_between_keygen_tls_and_show(tmp_path: Path) -> None:
    r = cli_in_process("site", "keygen", "--dir", str(tmp_path / "site"), "--name", "clinic")
    assert r.returncode == 0, r.stderr
    fp_node = public_key_fingerprint(tmp_path / "site" / "node-auth.pub")
    assert fp_node in r.stdout and len(fp_node.split()) == 8
    r = cli_in_process("federation", "tls", "--out", str(tmp_path / "fed"), "--host",
                       "127.0.0.1")
    assert r.returncode == 0, r.stderr
    fp_ca = certificate_fingerprint(tmp_path / "fed" / "ca" / "ca.pem")
    assert fp_ca in r.stdout
    r = cli_in_process("federation", "show", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert fp_node in r.stdout and fp_ca in r.stdout and "SuperLink TLS" in r.stdout
    # the secret halves are never read, let alone printed
    assert "node-auth.key" not in r.stdout and "ca.key" not in r.stdout
    r = cli_in_process("federation", "tls", "--out", str(tmp_path / "fed"), "--host", "x")
    assert r.returncode == 2 and "already holds a CA" in r.stderr
    r = cli_in_process("federation", "show", str(tmp_path / "site" / "node-auth.key"))
    assert r.returncode == 2 and "no certificate" in r.stderr


@pytest.mark.loopback
def test_a_site_refuses_a_superlink_whose_certificate_its_ca_did_not_sign(
        tmp_path: Path) -> None:
    """An impostor SuperLink: real flower-superlink serving a certificate from another CA.
    A SuperNode given the federation's CA (``root-certificates``) never joins it; the
    same node given the impostor's CA does (the control)."""
    from fedvault.node import flower_env
    from fedvault.processes import Deployment, Proc, find_executable, free_port, wait_for_log
    from protocols.errors import DeploymentError

    new_ca(tmp_path / "ours")
    new_ca(tmp_path / "theirs")
    impostor = server_certificate(tmp_path / "theirs", tmp_path / "link")
    port = free_port()
    env = flower_env()
    dep = Deployment(root=tmp_path)
    try:
        link = dep.spawn("superlink", [
            find_executable("flower-superlink"), "--ssl-ca-certfile", str(impostor.ca_cert),
            "--ssl-certfile", str(impostor.cert), "--ssl-keyfile", str(impostor.key),
            "--port", str(port)], env={**env, "FLWR_HOME": str(tmp_path / "lh")})
        wait_for_log(link, "Uvicorn running on https://")

        def node(name: str, ca: Path) -> Proc:
            return dep.spawn(name, [
                find_executable("flower-supernode"), "--root-certificates", str(ca),
                "--superlink", f"127.0.0.1:{port}", "--max-retries", "1",
                "--max-wait-time", "5", "--port", str(free_port())],
                env={**env, "FLWR_HOME": str(tmp_path / name)})

        ours = node("ours", tmp_path / "ours" / "ca.pem")
        with pytest.raises(DeploymentError, match="exited with status"):
            wait_for_log(ours, "SuperNode ID", timeout=60)
        log = (tmp_path / "logs" / "ours.log").read_text()
        assert "SuperNode ID" not in log and "CERTIFICATE_VERIFY_FAILED" in log
        fooled = node("fooled", impostor.ca_cert)
        wait_for_log(fooled, "SuperNode ID", timeout=60)
    finally:
        dep.stop(grace=2)
