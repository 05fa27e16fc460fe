"""Homomorphic encryption with real TenSEAL: exactness, key separation, provisioning."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.federation import load_context, read_manifest
from privacy.he import (
    HEContext,
    HEParams,
    _is_prime,
    ckks_params,
    new_secret_context,
    pack,
    public_bytes,
    quantise,
    unpack,
)
from privacy.provision import provision
from protocols.errors import ConfigError, HEError


@pytest.fixture(scope="module")
def bfv() -> tuple[HEContext, HEContext]:
    p = HEParams()
    ctx = new_secret_context(p)
    return HEContext(ctx, p), HEContext.load(public_bytes(ctx), p)


def test_parameters_are_128_bit_and_wrap_free() -> None:
    p = HEParams()
    t = p.plain_modulus
    assert _is_prime(t) and t % (2 * p.poly_modulus_degree) == 1
    # a full field (max_sites sites at the top level) fits every field of a slot below t/2
    field_max = p.max_sites * ((1 << p.quant_bits) - 1)
    assert p.max_sites * p.max_weight <= field_max  # the weight field too
    assert field_max < (1 << p.field_bits)  # no carry between fields
    k = p.fields_per_slot
    assert k == 3  # the default packs three values per slot
    assert sum(field_max << (j * p.field_bits) for j in range(k)) < t // 2  # no wrap mod t
    with pytest.raises(ConfigError, match="below 128-bit security"):
        HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(ConfigError, match="below 128-bit security"):
        HEParams(scheme="ckks", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60, 60, 60))
    wide = HEParams(quant_bits=24, max_sites=4096)  # 36-bit fields: one per slot
    assert wide.fields_per_slot == 1 and wide.plain_modulus.bit_length() == 38
    with pytest.raises(ConfigError, match="scheme must be"):
        HEParams(scheme="paillier")


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20000), sites=st.integers(1, 16), seed=st.integers(0, 2**31),
       scale=st.floats(0.01, 20.0), data=st.data())
def test_decrypted_mean_equals_plaintext_fedavg_within_the_bound(
        bfv: tuple[HEContext, HEContext], n: int, sites: int, seed: int, scale: float,
        data: st.DataObject) -> None:
    secret, public = bfv
    rng = np.random.default_rng(seed)
    xs = [rng.normal(0, scale, n) for _ in range(sites)]
    ws = data.draw(st.lists(st.integers(1, 5000), min_size=sites, max_size=sites))
    w_scale = max(ws)  # exact example weights: the round's scale is the largest count
    agg = public.add([secret.encrypt(x, rng, weight=w, scale=w_scale)
                      for x, w in zip(xs, ws, strict=True)])
    mean = secret.decrypt_mean(agg, num_values=n, count=sum(ws), scale=w_scale)
    ref = np.average([np.clip(x, -8, 8) for x in xs], axis=0, weights=ws)
    bound = secret.params.error_bound(sites=sites, total_weight=sum(ws), scale=w_scale)
    assert np.abs(mean - ref).max() <= bound + 1e-9


def test_weighted_mean(bfv: tuple[HEContext, HEContext]) -> None:
    secret, public = bfv
    a, b = np.full(1000, 1.0), np.full(1000, -3.0)
    agg = public.add([secret.encrypt(a, weight=3, scale=16), secret.encrypt(b, weight=16,
                                                                            scale=16)])
    mean = secret.decrypt_mean(agg, num_values=1000, count=19, scale=16)
    assert np.allclose(mean, (3 * 1.0 + 16 * -3.0) / 19, atol=secret.params.step)
    with pytest.raises(HEError, match="weight scale must be in"):
        secret.encrypt(a, weight=17, scale=16)
    with pytest.raises(HEError, match="weight must be in"):
        secret.encrypt(a, weight=secret.params.max_weight + 1)


def test_quantisation_is_unbiased() -> None:
    p = HEParams()
    x = np.full(200_000, 0.123456789)
    q = quantise(x, p, np.random.default_rng(1))
    levels = (1 << p.quant_bits) - 1
    back = q / levels * 2 * p.bound - p.bound
    assert abs(back.mean() - 0.123456789) < p.step / 100


def test_pack_roundtrip() -> None:
    p = HEParams()
    q = np.random.default_rng(0).integers(0, 1 << p.field_bits, 30_000)
    assert np.array_equal(unpack(pack(q, p), len(q), p), q)


def test_public_context_cannot_decrypt(bfv: tuple[HEContext, HEContext]) -> None:
    secret, public = bfv
    agg = public.add([secret.encrypt(np.ones(10))])
    assert not public.has_secret_key
    with pytest.raises(HEError, match="no secret key"):
        public.decrypt_mean(agg, num_values=10, count=1)
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL itself refuses too
        ts.bfv_vector_from(public.ctx, agg[0]).decrypt()


def test_garbage_ciphertext_is_a_clear_error(bfv: tuple[HEContext, HEContext]) -> None:
    _, public = bfv
    with pytest.raises(HEError, match="does not parse"):
        public.add([[b"\x00garbage"]])
    with pytest.raises(HEError, match="different numbers of ciphertexts"):
        public.add([[b"a"], [b"a", b"b"]])


def test_bfv_costs_under_8_bytes_per_parameter(bfv: tuple[HEContext, HEContext]) -> None:
    secret, _ = bfv
    n = 1_000_000
    size = sum(len(c) for c in secret.encrypt(np.zeros(n)))
    assert size / n < 8  # 2x the 4 bytes of a float32


def test_ckks_alternative() -> None:
    p = ckks_params()
    ctx = new_secret_context(p)
    secret, public = HEContext(ctx, p), HEContext.load(public_bytes(ctx), p)
    xs = [np.linspace(-50, 50, 5000) * k for k in (1, 2, 3)]
    mean = secret.decrypt_mean(public.add([secret.encrypt(x) for x in xs]), num_values=5000,
                               count=3)
    assert np.abs(mean - np.mean(xs, axis=0)).max() < 1e-4


def test_provisioned_server_side_cannot_decrypt(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    m = provision(fed, sites=3, params=HEParams())
    server = load_context(fed, site=None)
    site = load_context(fed, site="site-1")
    assert server.fingerprint == site.fingerprint == m["he"]["fingerprint"]
    # everything the server side holds, loaded as TenSEAL contexts: no secret key
    for f in (fed / "server").iterdir():
        assert not ts.context_from(f.read_bytes()).has_secret_key()
    agg = server.add([site.encrypt(np.full(100, 0.5)), site.encrypt(np.full(100, 1.5))])
    with pytest.raises(HEError):
        server.decrypt_mean(agg, num_values=100, count=2)
    assert np.allclose(site.decrypt_mean(agg, num_values=100, count=2), 1.0, atol=1e-3)
    for k in range(3):
        secret = fed / "sites" / f"site-{k}" / "he-secret.ctx"
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert read_manifest(fed)["he"]["security_bits"] == 128


def test_passphrase_at_rest(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    provision(fed, sites=2, params=HEParams(), passphrase="correct horse")
    enc = fed / "sites" / "site-0" / "he-secret.ctx.enc"
    assert stat.S_IMODE(os.stat(enc).st_mode) == 0o600
    assert not (fed / "sites" / "site-0" / "he-secret.ctx").exists()
    with pytest.raises(HEError, match="passphrase is needed"):
        load_context(fed, site="site-0")
    with pytest.raises(HEError, match="wrong passphrase"):
        load_context(fed, site="site-0", passphrase="wrong")
    assert load_context(fed, site="site-0", passphrase="correct horse").has_secret_key


def test_tampered_context_fails_the_fingerprint(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    provision(fed, sites=1, params=HEParams())
    other = tmp_path / "other"
    provision(other, sites=1, params=HEParams())
    (fed / "server" / "he-public.ctx").write_bytes((other / "server" / "he-public.ctx")
                                                   .read_bytes())
    with pytest.raises(HEError, match="fingerprint"):
        load_context(fed, site=None)


def test_the_largest_honest_sum_decrypts_exactly(bfv: tuple[HEContext, HEContext]) -> None:
    """max_sites sites at the top of the range, at the largest weight: every field of
    every slot at its maximum, under the real 59-bit plaintext modulus and SEAL's noise."""
    secret, public = bfv
    p = secret.params
    top = np.full(3 * p.poly_modulus_degree, p.bound)  # whole ciphertexts, every field
    w = p.max_weight
    agg = public.add([secret.encrypt(top, weight=w, scale=w) for _ in range(p.max_sites)])
    d = secret.decrypt_sum(agg, num_values=top.size)
    assert np.all(d.values == p.max_sites * ((1 << p.quant_bits) - 1))
    assert d.sites == p.max_sites and d.weight == p.max_sites * w
    mean = secret.verified_mean(agg, num_values=top.size, count=p.max_sites * w,
                                sites=p.max_sites, min_sites=1, scale=w)
    assert np.allclose(mean, p.bound)


def test_the_compact_profile_sums_sixteen_sites_at_the_top_exactly() -> None:
    """bfv-compact: a 60-bit data-level prime and a 50-bit plaintext modulus; SEAL's
    noise after 16 sites at the top of every field still decrypts exactly."""
    from privacy.he import bfv_compact_params_for, params_for
    from protocols.errors import ConfigError as CE

    p = bfv_compact_params_for(10)
    assert p == params_for("bfv-compact", 10)
    assert p.fields_per_slot == 3 and p.plain_modulus.bit_length() == 50
    ctx = new_secret_context(p)
    secret, public = HEContext(ctx, p), HEContext.load(public_bytes(ctx), p)
    top = np.full(3 * p.poly_modulus_degree, p.bound)
    w = p.max_weight
    agg = public.add([secret.encrypt(top, weight=w, scale=w) for _ in range(p.max_sites)])
    assert np.all(secret.decrypt_sum(agg, num_values=top.size).values
                  == p.max_sites * ((1 << p.quant_bits) - 1))
    assert sum(len(c) for c in secret.encrypt(np.zeros(10**6))) / 10**6 < 5.5
    with pytest.raises(CE, match="at most 16 sites"):
        bfv_compact_params_for(17)
    with pytest.raises(CE, match="HE profile must be one of"):
        params_for("paillier", 3)
