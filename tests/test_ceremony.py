"""The HE key ceremony: the secret key is made at a site and reaches the others sealed to
their own keys; the central team relays a directory in which nothing decrypts. Each
attack is played by the party the threat model names (docs/explanation/threat-model.md):
the central team reading what it relays or substituting its own key, a blob moved
between sites, a secret left readable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from privacy.ceremony import (
    KX_KEY,
    SEALED,
    add_site,
    kx_key_pair,
    load_kx_public,
    make_he_keys,
    receive_he_keys,
    seal_to,
)
from privacy.federation import load_context, read_manifest, write_manifest
from privacy.he import HEContext, HEParams, bfv_params_for, new_secret_context, public_bytes
from privacy.pki import node_key_pair
from privacy.provision import provision
from protocols.errors import ConfigError, HEError

SITES = ("clinic-a", "clinic-b", "clinic-c")


def _keys(root: Path, name: str) -> Path:
    d = root / name / "keys"
    node_key_pair(d, comment=name)
    kx_key_pair(d)
    return d


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ceremony")
    fed = root / "fed"
    for name in SITES:
        add_site(fed, name, _keys(root, name))
    make_he_keys(fed, site="clinic-a", params=bfv_params_for(3), home=root / "clinic-a" / "he")
    for name in SITES[1:]:
        receive_he_keys(fed, site=name, kx_key=root / name / "keys" / KX_KEY,
                        home=root / name / "he")
    return root


def test_every_site_holds_the_key_and_the_relay_holds_none(ceremony: Path) -> None:
    fed = ceremony / "fed"
    ctxs = [load_context(ceremony / n / "he", site=n) for n in SITES]
    assert all(c.has_secret_key for c in ctxs)
    assert len({c.fingerprint for c in ctxs}) == 1
    assert ctxs[0].fingerprint == read_manifest(fed)["he"]["fingerprint"]
    # what two sites encrypt, the server sums under the public context and a third decrypts
    x, y = np.linspace(-1, 1, 50), np.linspace(1, -1, 50)
    server = load_context(fed, site=None)
    total = server.add([ctxs[1].encrypt(x), ctxs[2].encrypt(y)])
    mean = ctxs[0].verified_mean(total, num_values=50, count=2, sites=2, min_sites=2)
    assert np.allclose(mean, (x + y) / 2, atol=1e-3)
    # the server's context, and everything else the central team relays, cannot decrypt
    assert not server.has_secret_key and server.fingerprint == ctxs[0].fingerprint
    assert not list(fed.rglob("he-secret.ctx")) and not list(fed.rglob("*.key"))


def test_the_central_team_cannot_open_a_sealed_secret(ceremony: Path, tmp_path: Path) -> None:
    """The central team holds the public keys and the blobs: with a key-agreement key of
    its own (or another site's), no blob opens."""
    fed = ceremony / "fed"
    own = tmp_path / "central"
    kx_key_pair(own)
    for name in SITES[1:]:
        with pytest.raises(HEError, match="does not open"):
            receive_he_keys(fed, site=name, kx_key=own / KX_KEY, home=tmp_path / name)
    # clinic-c's key does not open clinic-b's blob, nor a blob moved into c's place
    with pytest.raises(HEError, match="does not open"):
        receive_he_keys(fed, site="clinic-b", kx_key=ceremony / "clinic-c" / "keys" / KX_KEY,
                        home=tmp_path / "b-by-c")
    moved = shutil.copytree(fed, tmp_path / "moved")
    (moved / "sites" / "clinic-c" / SEALED).write_bytes(
        (fed / "sites" / "clinic-b" / SEALED).read_bytes())
    with pytest.raises(HEError, match="does not open"):
        receive_he_keys(moved, site="clinic-c",
                        kx_key=ceremony / "clinic-c" / "keys" / KX_KEY, home=tmp_path / "c")
    # a flipped byte
    blob = bytearray((fed / "sites" / "clinic-b" / SEALED).read_bytes())
    blob[-1] ^= 1
    (moved / "sites" / "clinic-b" / SEALED).write_bytes(bytes(blob))
    with pytest.raises(HEError, match="does not open"):
        receive_he_keys(moved, site="clinic-b",
                        kx_key=ceremony / "clinic-b" / "keys" / KX_KEY, home=tmp_path / "b")


def test_a_substituted_key_shows_in_the_fingerprint(ceremony: Path, tmp_path: Path) -> None:
    """The attack the ceremony cannot stop by cryptography alone: the central team makes
    an HE context of its own (so it could decrypt), seals it to clinic-b's public key and
    rewrites the manifest. clinic-b opens it without error, and the fingerprint it
    prints differs from the one the key maker reads out: the comparison catches it."""
    fed = ceremony / "fed"
    forged = tmp_path / "forged"
    manifest = read_manifest(fed)
    params = HEParams.from_dict(manifest["he"])
    ctx = new_secret_context(params)
    mine = HEContext(ctx, params)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True,
                           save_galois_keys=False, save_relin_keys=False)
    (forged / "server").mkdir(parents=True)
    (forged / "server" / "he-public.ctx").write_bytes(public_bytes(ctx))
    (forged / "sites" / "clinic-b").mkdir(parents=True)
    (forged / "sites" / "clinic-b" / SEALED).write_bytes(seal_to(
        load_kx_public(fed / "sites" / "clinic-b" / "kx.pub"), secret,
        bound=f"clinic-b\x00{mine.fingerprint}".encode()))
    manifest["he"] = {**manifest["he"], "fingerprint": mine.fingerprint}
    write_manifest(forged, manifest)
    got = receive_he_keys(forged, site="clinic-b",
                          kx_key=ceremony / "clinic-b" / "keys" / KX_KEY, home=tmp_path / "b")
    assert got["he"]["fingerprint"] != read_manifest(ceremony / "clinic-a" / "he")["he"][
        "fingerprint"]


def test_a_readable_secret_context_is_refused(ceremony: Path) -> None:
    secret = ceremony / "clinic-c" / "he" / "sites" / "clinic-c" / "he-secret.ctx"
    secret.chmod(0o644)
    try:
        with pytest.raises(ConfigError, match="chmod 600"):
            load_context(ceremony / "clinic-c" / "he", site="clinic-c")
    finally:
        secret.chmod(0o600)


def test_the_ceremony_refuses_what_would_weaken_it(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    a = _keys(tmp_path, "a")
    add_site(fed, "a", a)
    with pytest.raises(ConfigError, match="already in"):
        add_site(fed, "a", a)
    with pytest.raises(ConfigError, match="not in"):
        make_he_keys(fed, site="z", params=bfv_params_for(1), home=tmp_path / "z")
    with pytest.raises(ConfigError, match="no HE keys yet"):
        receive_he_keys(fed, site="a", kx_key=a / KX_KEY, home=tmp_path / "a-he")
    # a key maker whose home already holds a federation stops before writing to the relay
    write_manifest(tmp_path / "taken", {"format": "x", "sites": []})
    with pytest.raises(ConfigError, match="already holds a federation"):
        make_he_keys(fed, site="a", params=bfv_params_for(1), home=tmp_path / "taken")
    assert "he" not in read_manifest(fed) and not (fed / "server").exists()
    make_he_keys(fed, site="a", params=bfv_params_for(1), home=tmp_path / "a-he")
    with pytest.raises(ConfigError, match="new site needs a new ceremony"):
        add_site(fed, "b", _keys(tmp_path, "b"))
    with pytest.raises(ConfigError, match="already has HE keys"):
        make_he_keys(fed, site="a", params=bfv_params_for(1), home=tmp_path / "again")
    # a directory one party provisioned is not a ceremony
    provision(tmp_path / "one-party", sites=2, params=bfv_params_for(2))
    with pytest.raises(ConfigError, match="one party holds every key"):
        add_site(tmp_path / "one-party", "c", a)
