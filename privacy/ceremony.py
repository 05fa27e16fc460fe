"""The HE key ceremony: the secret key is made at a site and reaches the other sites
sealed to their own keys, so the central team, which relays everything, holds none.

1. **Each site** makes its keys (``fedvault site keygen``): a node-authentication pair
   (:mod:`privacy.pki`) and an X25519 key-agreement pair (``kx.key``, mode 0600, and
   ``kx.pub``). Only the public halves leave the site.
2. **The central team** collects the public keys in the federation directory
   (``fedvault federation add-site``: ``FED/sites/NAME/{node-auth.pub,kx.pub}`` and the
   manifest). It never sees a private key.
3. **One site, the key maker**, generates the HE context (``fedvault site he-keys``):
   it keeps its secret context at home, writes the public context (no secret key) to
   ``FED/server/he-public.ctx``, and for every other site a sealed copy of the secret
   context, ``FED/sites/NAME/he-secret.sealed``: an ephemeral X25519 key agreement with
   that site's ``kx.pub``, HKDF-SHA256, AES-256-GCM, the recipient's name and the
   context's fingerprint bound as associated data (a blob moved to another site or
   another federation does not open). The central team relays blobs it cannot open.
4. **Every other site** opens its blob with its ``kx.key`` (``fedvault site he-receive``),
   checks that the context matches the manifest's fingerprint, and keeps it at home
   (mode 0600, or encrypted at rest with a passphrase).
5. **Everyone compares the fingerprint** of the HE context out of band (``fedvault
   federation show`` prints it as eight groups of four hex digits): the key maker reads
   it out; a central team that substituted a context of its own (and so could decrypt)
   is caught here. This comparison is the ceremony's root of trust: the relayed
   public keys could be substituted too, and the fingerprints of those are compared
   the same way.

Each site's home directory is a federation directory of its own (a copy of the
manifest, its secret context), so node-config ``he-federation`` points there and
:func:`privacy.federation.load_context` reads it unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.federation import (
    MANIFEST,
    PUBLIC_CTX,
    SECRET_CTX,
    SECRET_ENC,
    read_manifest,
    seal_secret,
    write_manifest,
)
from privacy.he import HEContext, HEParams, new_secret_context, public_bytes
from privacy.pki import NODE_PUB, check_secret_file, digest_fingerprint, write_secret
from protocols.errors import ConfigError, HEError
from protocols.hashchain import utc_now

KX_KEY = "kx.key"
KX_PUB = "kx.pub"
SEALED = "he-secret.sealed"
FORMAT = "fedvault.federation/2"
_MAGIC = b"FVSEAL1"
_INFO = b"fedvault he-secret seal v1"


# -- key agreement keys ------------------------------------------------------------------
def kx_key_pair(directory: Path) -> tuple[Path, Path]:
    """A site's X25519 key-agreement pair: ``kx.key`` (PKCS#8 PEM, 0600) and ``kx.pub``
    (PEM). Refuses to overwrite an existing key."""
    priv_path, pub_path = directory / KX_KEY, directory / KX_PUB
    if priv_path.exists():
        raise ConfigError(f"{priv_path} exists: a key is never overwritten.")
    key = X25519PrivateKey.generate()
    write_secret(priv_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def kx_fingerprint(path: Path) -> str:
    """The fingerprint of a key-agreement public key (of its 32 raw bytes)."""
    return digest_fingerprint(_raw(load_kx_public(path)))


def load_kx_public(path: Path) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a key-agreement public key ({exc}).") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"{path}: not an X25519 public key.")
    return key


def load_kx_private(path: Path) -> X25519PrivateKey:
    p = check_secret_file(path, "key-agreement key")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), None)
    except ValueError as exc:
        raise ConfigError(f"{p}: not a key-agreement private key ({exc}).") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{p}: not an X25519 private key.")
    return key


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _aead_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=_INFO).derive(shared)


def seal_to(recipient: X25519PublicKey, data: bytes, *, bound: bytes) -> bytes:
    """``data`` readable only with ``recipient``'s private key (ephemeral-static X25519,
    HKDF-SHA256, AES-256-GCM); ``bound`` (the recipient's name, the fingerprint) must be
    given again to open it."""
    eph = X25519PrivateKey.generate()
    eph_pub = _raw(eph.public_key())
    key = _aead_key(eph.exchange(recipient), eph_pub, _raw(recipient))
    nonce = os.urandom(12)
    return _MAGIC + eph_pub + nonce + AESGCM(key).encrypt(nonce, data, _MAGIC + bound)


def open_sealed(private: X25519PrivateKey, blob: bytes, *, bound: bytes) -> bytes:
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 32 + 12 + 16:
        raise HEError("not a fedvault sealed secret.")
    eph_pub = blob[len(_MAGIC):len(_MAGIC) + 32]
    nonce = blob[len(_MAGIC) + 32:len(_MAGIC) + 44]
    key = _aead_key(private.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub,
                    _raw(private.public_key()))
    try:
        return AESGCM(key).decrypt(nonce, blob[len(_MAGIC) + 44:], _MAGIC + bound)
    except InvalidTag:
        raise HEError("the sealed secret does not open with this site's key-agreement key: "
                      "it was sealed to another site or federation, or altered.") from None


def _bound(name: str, fp: str) -> bytes:
    return f"{name}\x00{fp}".encode()


# -- the central team: collect public keys -------------------------------------------------
def add_site(fed: Path, name: str, keys: Path) -> dict[str, Any]:
    """Add site ``name`` with the public keys in ``keys`` (``node-auth.pub``, ``kx.pub``)
    to the federation directory ``fed`` (created if new); returns the manifest."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"a site name is a plain name. Found {name!r}.")
    manifest: dict[str, Any] = read_manifest(fed) if (fed / MANIFEST).exists() else {
        "format": FORMAT, "created": utc_now(), "sites": []}
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{fed} was made by `fedvault provision` (one party holds every "
                          "key); a key ceremony starts from a new directory.")
    if any(s["name"] == name for s in manifest["sites"]):
        raise ConfigError(f"site {name!r} is already in {fed / MANIFEST}.")
    if "he" in manifest:
        raise ConfigError(f"the HE keys of {fed} are made: a new site needs a new "
                          "ceremony (the key maker cannot seal to a site that was not there).")
    kx = load_kx_public(keys / KX_PUB)
    site_dir = fed / "sites" / name
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / KX_PUB).write_bytes(kx.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    entry: dict[str, Any] = {"name": name, "kx_key": f"sites/{name}/{KX_PUB}",
                             "he_context": f"sites/{name}/{SEALED}"}
    if (keys / NODE_PUB).exists():
        shutil.copyfile(keys / NODE_PUB, site_dir / NODE_PUB)
        entry["node_key"] = f"sites/{name}/{NODE_PUB}"
    manifest["sites"].append(entry)
    write_manifest(fed, manifest)
    return manifest


# -- the key maker and the other sites ---------------------------------------------------
def make_he_keys(fed: Path, *, site: str, params: HEParams, home: Path,
                 passphrase: str | None = None) -> dict[str, Any]:
    """At the key-maker site ``site``: generate the HE context; write the public context
    and a sealed secret for every other site into ``fed``; keep the secret at ``home``
    (this site's own federation directory). Returns the manifest."""
    _check_home(home)  # before anything is written to the federation directory
    manifest = read_manifest(fed)
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{fed} is not a key-ceremony federation (`fedvault federation "
                          "add-site` starts one).")
    if "he" in manifest:
        raise ConfigError(f"{fed} already has HE keys (made by "
                          f"{manifest['he'].get('made_by')}).")
    names = [s["name"] for s in manifest["sites"]]
    if site not in names:
        raise ConfigError(f"site {site!r} is not in {fed / MANIFEST} (sites: {names}).")
    if len(names) > params.max_sites:
        raise ConfigError(f"{len(names)} sites exceed the HE parameters' headroom "
                          f"(max_sites {params.max_sites}).")
    ctx = new_secret_context(params)
    he = HEContext(ctx, params)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True,
                           save_galois_keys=False, save_relin_keys=False)
    (fed / "server").mkdir(parents=True, exist_ok=True)
    (fed / "server" / PUBLIC_CTX).write_bytes(public_bytes(ctx))
    for entry in manifest["sites"]:
        if entry["name"] == site:
            entry["he_context"] = "(kept by the key maker)"
            continue
        recipient = load_kx_public(fed / entry["kx_key"])
        (fed / entry["he_context"]).write_bytes(
            seal_to(recipient, secret, bound=_bound(entry["name"], he.fingerprint)))
    manifest["he"] = {**params.to_dict(), "fingerprint": he.fingerprint, "made_by": site,
                      "made": utc_now(),
                      "secret_at_rest": "sealed to each site's X25519 key"}
    manifest["server"] = {"he_context": f"server/{PUBLIC_CTX}"}
    write_manifest(fed, manifest)
    _keep_at_home(home, manifest, site, secret, passphrase)
    return manifest


def receive_he_keys(fed: Path, *, site: str, kx_key: Path, home: Path,
                    passphrase: str | None = None) -> dict[str, Any]:
    """At every other site: open this site's sealed secret with its ``kx_key``, check it
    against the manifest's fingerprint, keep it at ``home``. Returns the manifest."""
    _check_home(home)
    manifest = read_manifest(fed)
    if "he" not in manifest:
        raise ConfigError(f"{fed} has no HE keys yet: the key-maker site runs "
                          "`fedvault site he-keys` first.")
    entry = next((s for s in manifest["sites"] if s["name"] == site), None)
    if entry is None:
        raise ConfigError(f"site {site!r} is not in {fed / MANIFEST}.")
    blob_path = fed / entry["he_context"]
    if not blob_path.is_file():
        raise ConfigError(f"no sealed secret for {site} ({blob_path}).")
    fp = manifest["he"]["fingerprint"]
    secret = open_sealed(load_kx_private(kx_key), blob_path.read_bytes(),
                         bound=_bound(site, fp))
    params = HEParams.from_dict(manifest["he"])
    he = HEContext.load(secret, params)
    if he.fingerprint != fp or not he.has_secret_key:
        raise HEError("the opened context does not match the manifest's fingerprint.")
    _keep_at_home(home, manifest, site, secret, passphrase)
    return manifest


def _check_home(home: Path) -> None:
    if (home / MANIFEST).exists():
        raise ConfigError(f"{home} already holds a federation.")


def _keep_at_home(home: Path, manifest: dict[str, Any], site: str, secret: bytes,
                  passphrase: str | None) -> None:
    """This site's own federation directory: the manifest, its secret context (0600)."""
    name = SECRET_ENC if passphrase else SECRET_CTX
    path = home / "sites" / site / name
    write_secret(path, seal_secret(secret, passphrase) if passphrase else secret)
    local = {**manifest, "sites": [
        {**s, "he_context": f"sites/{site}/{name}"} if s["name"] == site else s
        for s in manifest["sites"]]}
    write_manifest(home, local)
