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

from pathlib import Path
from typing import Any

from privacy.federation import (
    MANIFEST,
    PUBLIC_CTX,
    SECRET_CTX,
    SECRET_ENC,
    seal_secret,
    write_manifest,
)
from privacy.he import HEContext, HEParams, new_secret_context, public_bytes
from privacy.pki import write_secret
from protocols.errors import ConfigError
from protocols.hashchain import utc_now
from protocols.names import site_name
from protocols.rundir import check_output_dir


def provision(out: str | Path, *, sites: int, params: HEParams,
              passphrase: str | None = None) -> dict[str, Any]:
    """Create a federation directory; returns the manifest."""
    root = Path(out)
    if sites < 1:
        raise ConfigError(f"sites must be >= 1. Found {sites}.")
    if sites > params.max_sites:
        raise ConfigError(f"{sites} sites exceed the HE parameters' headroom "
                          f"(max_sites {params.max_sites}): sums could wrap.")
    check_output_dir(root, what="federation directory")  # before generating any key
    if (root / MANIFEST).exists():
        raise ConfigError(f"{root} already holds a federation (manifest.json).")
    try:
        return _provision(root, sites=sites, params=params, passphrase=passphrase)
    except OSError as exc:
        raise ConfigError(f"cannot write the federation in {root}: {exc}") from None


def _provision(root: Path, *, sites: int, params: HEParams, passphrase: str | None
               ) -> dict[str, Any]:
    ctx = new_secret_context(params)
    pub = public_bytes(ctx)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True,
                           save_galois_keys=False, save_relin_keys=False)
    he = HEContext(ctx, params)
    (root / "server").mkdir(parents=True, exist_ok=True)
    (root / "server" / PUBLIC_CTX).write_bytes(pub)
    names = []
    for k in range(sites):
        site_dir = root / "sites" / site_name(k)
        if passphrase:
            write_secret(site_dir / SECRET_ENC, seal_secret(secret, passphrase))
        else:
            write_secret(site_dir / SECRET_CTX, secret)
        names.append(site_name(k))
    manifest = {
        "format": "fedvault.federation/1",
        "created": utc_now(),
        "he": {**params.to_dict(), "fingerprint": he.fingerprint,
               "secret_at_rest": "scrypt+aes-256-gcm" if passphrase else "plain, mode 0600"},
        "server": {"he_context": f"server/{PUBLIC_CTX}"},
        "sites": [{"name": n, "he_context": f"sites/{n}/"
                   f"{SECRET_ENC if passphrase else SECRET_CTX}"} for n in names],
    }
    write_manifest(root, manifest)
    return manifest


