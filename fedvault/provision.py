"""Provisioning a federation: HE contexts for the server and the sites, and a manifest.

``fedvault provision --sites N --out DIR`` writes::

    DIR/manifest.json               HE parameters, security level, context fingerprint,
                                    the sites; every party can check the fingerprint
    DIR/server/he-public.ctx        public context: NO secret key (cannot decrypt)
    DIR/sites/site-K/he-secret.ctx  the shared secret context, mode 0600
                                    (he-secret.ctx.enc instead with --passphrase-env:
                                    scrypt + AES-256-GCM from the `cryptography` package)

TLS certificates and node keys (the deployment issue) will sit beside these,
under ``server/`` and ``sites/site-K/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedvault.errors import ConfigError
from fedvault.rundir import write_json_atomic
from privacy.he import HEContext, HEError, HEParams, new_secret_context, public_bytes
from protocols.hashchain import utc_now

MANIFEST = "manifest.json"
PUBLIC_CTX = "he-public.ctx"
SECRET_CTX = "he-secret.ctx"
SECRET_ENC = "he-secret.ctx.enc"
_MAGIC = b"FVSEC1"


def _kdf(salt: bytes) -> Scrypt:
    return Scrypt(salt=salt, length=32, n=2**15, r=8, p=1)


def seal_secret(data: bytes, passphrase: str) -> bytes:
    """Encrypt a secret context at rest: scrypt(passphrase) -> AES-256-GCM."""
    salt, nonce = os.urandom(16), os.urandom(12)
    key = _kdf(salt).derive(passphrase.encode("utf-8"))
    return _MAGIC + salt + nonce + AESGCM(key).encrypt(nonce, data, _MAGIC)


def open_secret(blob: bytes, passphrase: str) -> bytes:
    if not blob.startswith(_MAGIC):
        raise HEError("not a fedvault encrypted secret context.")
    salt, nonce, ct = blob[6:22], blob[22:34], blob[34:]
    key = _kdf(salt).derive(passphrase.encode("utf-8"))
    try:
        return AESGCM(key).decrypt(nonce, ct, _MAGIC)
    except InvalidTag:
        raise HEError("wrong passphrase for the encrypted secret context.") from None


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def provision(out: str | Path, *, sites: int, params: HEParams,
              passphrase: str | None = None) -> dict[str, Any]:
    """Create a federation directory; returns the manifest."""
    root = Path(out)
    if sites < 1:
        raise ConfigError(f"sites must be >= 1. Found {sites}.")
    if sites > params.max_sites:
        raise ConfigError(f"{sites} sites exceed the HE parameters' headroom "
                          f"(max_sites {params.max_sites}): sums could wrap.")
    if (root / MANIFEST).exists():
        raise ConfigError(f"{root} already holds a federation (manifest.json).")
    ctx = new_secret_context(params)
    pub = public_bytes(ctx)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True,
                           save_galois_keys=False, save_relin_keys=False)
    he = HEContext(ctx, params)
    (root / "server").mkdir(parents=True, exist_ok=True)
    (root / "server" / PUBLIC_CTX).write_bytes(pub)
    names = []
    for k in range(sites):
        site_dir = root / "sites" / f"site-{k}"
        if passphrase:
            _write_secret(site_dir / SECRET_ENC, seal_secret(secret, passphrase))
        else:
            _write_secret(site_dir / SECRET_CTX, secret)
        names.append(f"site-{k}")
    manifest = {
        "format": "fedvault.federation/1",
        "created": utc_now(),
        "he": {**params.to_dict(), "fingerprint": he.fingerprint,
               "secret_at_rest": "scrypt+aes-256-gcm" if passphrase else "plain, mode 0600"},
        "server": {"he_context": f"server/{PUBLIC_CTX}"},
        "sites": [{"name": n, "he_context": f"sites/{n}/"
                   f"{SECRET_ENC if passphrase else SECRET_CTX}"} for n in names],
    }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    p = Path(root) / MANIFEST
    if not p.exists():
        raise ConfigError(f"{root} is not a provisioned federation (no {MANIFEST}).")
    data: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    return data


def load_context(root: str | Path, *, site: str | None,
                 passphrase: str | None = None) -> HEContext:
    """The server's public context (``site=None``) or a site's secret context, checked
    against the manifest's fingerprint."""
    manifest = read_manifest(root)
    params = HEParams.from_dict(manifest["he"])
    base = Path(root)
    if site is None:
        ctx = HEContext.load_file(base / manifest["server"]["he_context"], params)
    else:
        entry = next((s for s in manifest["sites"] if s["name"] == site), None)
        if entry is None:
            raise ConfigError(f"site {site!r} is not in the federation's manifest.")
        path = base / entry["he_context"]
        if path.name == SECRET_ENC:
            if not passphrase:
                raise HEError(f"{path} is encrypted: a passphrase is needed.")
            ctx = HEContext.load(open_secret(path.read_bytes(), passphrase), params)
        else:
            ctx = HEContext.load_file(path, params)
    if ctx.fingerprint != manifest["he"]["fingerprint"]:
        raise HEError(f"HE context fingerprint {ctx.fingerprint[:16]} does not match the "
                      f"manifest's {manifest['he']['fingerprint'][:16]}.")
    return ctx
