"""The federation directory's format: the manifest, the context files, sealed secrets.

``fedvault provision`` writes a federation directory (see :mod:`privacy.provision`);
the server and the sites only read it, through this module, so the format sits in
the privacy layer below both of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from privacy.he import HEContext, HEParams
from privacy.pki import check_secret_file
from protocols.errors import ConfigError, HEError
from protocols.rundir import write_json_atomic

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


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(root) / MANIFEST, manifest)


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
        if path.exists():  # a secret context others can read is refused (mode 0600)
            check_secret_file(path, f"secret HE context of {site}")
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
