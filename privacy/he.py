"""Homomorphic encryption of model updates with TenSEAL: parameters, packing, contexts.

Two schemes:

``bfv`` (default): quantised integers, exact sums.
    Each value is clipped to ``[-bound, bound]``, multiplied by the site's weight
    fraction ``weight / scale`` (its example count over the round's weight scale,
    which the server announces; FedAvg's weights folded into the values, so they
    cost no bits) and stochastically rounded to one of ``2**quant_bits`` levels
    (unbiased: E[decode(q)] = the folded value). ``fields_per_slot`` quantised
    values share one BFV slot (``v0 + v1 * 2**F + v2 * 2**2F``), where the field
    width ``F = quant_bits + ceil(log2(max_sites))`` leaves headroom so that a sum
    over up to ``max_sites`` sites never carries from one field into the next nor
    wraps modulo the plaintext modulus (at most 60 bits in SEAL). The whole flattened
    update is packed into ``ceil(n / (fields * N))`` ciphertexts (never one per
    layer) and no context travels with the data. The decrypted weighted mean is
    ``(sum q * 2 bound / L - sites * bound) * scale / total_weight`` with
    ``L = 2**quant_bits - 1``; it is within ``step * sites * scale / total_weight``
    of the exact example-weighted mean of the clipped values (``step = 2 bound / L``,
    each site's rounding error at most one step), and unbiased.
``ckks``: approximate real arithmetic (N = 8192, moduli [60, 40, 60], scale 2**40),
    one value per slot; the alternative for models whose values are unbounded.

Security: every parameter set is checked against the HomomorphicEncryption.org
standard (Albrecht et al. 2018, "Homomorphic Encryption Security Standard",
table 1, classical, uniform/ternary secret): at 128-bit security the total
coefficient modulus may have at most 27, 54, 109, 218, 438 or 881 bits for
N = 1024 ... 32768. Anything weaker is refused with a clear error.

One secret context is shared by every site (the known limit of single-key HE,
see docs/explanation/threat-model.md); the server only ever holds the public context, which cannot
decrypt.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.noise import SecureUniform, UniformSource
from protocols.errors import AggregateRefused, ConfigError, HEError
from protocols.names import HE_PROFILES, Scheme, values

#: Max total coefficient-modulus bits for 128-bit classical security (HE standard, table 1).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: Values appended to every encrypted update: 1 (this site) and the site's integer weight
#: (its example count, at most the round's weight scale). In the aggregate they count the
#: sites and the weight it really holds (``verified_mean``).
VERIFY_FIELDS = 2
#: SEAL's largest plaintext modulus (bits).
MAX_PLAIN_BITS = 60
#: SEAL's default BFV coefficient moduli at 128-bit security (``CoeffModulus::BFVDefault``).
SEAL_BFV_DEFAULT = {4096: (36, 36, 37), 8192: (43, 43, 44, 44, 44)}


__all__ = ["HEContext", "HEError", "HEParams", "bfv_compact_params_for",
           "bfv_params_for", "ckks_params", "new_secret_context", "params_for"]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:  # deterministic Miller-Rabin for n < 3.3e24
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(bits: int, poly_modulus_degree: int) -> int:
    """Smallest prime p >= 2**(bits-1) with p = 1 mod 2N (needed for BFV batching)."""
    step = 2 * poly_modulus_degree
    p = ((1 << (bits - 1)) // step + 1) * step + 1
    while not _is_prime(p):
        p += step
    if p.bit_length() != bits:
        raise ConfigError(f"no {bits}-bit batching prime for N={poly_modulus_degree}.")
    return p


@dataclass(frozen=True, slots=True, kw_only=True)
class HEParams:
    """An HE parameter set; validated (128-bit security, no wrap-around) on construction."""

    scheme: str = "bfv"
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = ()
    quant_bits: int = 15
    max_sites: int = 16
    bound: float = 8.0
    ckks_scale_bits: int = 40

    def __post_init__(self) -> None:
        if self.scheme not in values(Scheme):
            raise ConfigError(f"HE scheme must be 'bfv' or 'ckks'. Found {self.scheme!r}.")
        if self.poly_modulus_degree not in MAX_COEFF_BITS_128:
            raise ConfigError(f"poly_modulus_degree must be one of "
                              f"{sorted(MAX_COEFF_BITS_128)}. Found {self.poly_modulus_degree}.")
        bits = sum(self.coeff_moduli)
        limit = MAX_COEFF_BITS_128[self.poly_modulus_degree]
        if bits > limit:
            raise ConfigError(
                f"HE parameters below 128-bit security: N={self.poly_modulus_degree} allows at "
                f"most {limit} bits of coefficient modulus (HomomorphicEncryption.org "
                f"standard). Found {bits} ({list(self.coeff_moduli)}).")
        if self.scheme == "bfv":
            if not 2 <= self.quant_bits <= 24:
                raise ConfigError(f"quant_bits must be in [2, 24]. Found {self.quant_bits}.")
            if not 1 <= self.max_sites <= 4096:
                raise ConfigError(f"max_sites must be in [1, 4096]. Found {self.max_sites}.")
            if self.field_bits + 2 > MAX_PLAIN_BITS:
                raise ConfigError(
                    f"quant_bits {self.quant_bits} with max_sites {self.max_sites} needs a "
                    f"{self.field_bits + 2}-bit plaintext modulus; SEAL allows "
                    f"{MAX_PLAIN_BITS}.")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ConfigError(f"bound must be > 0. Found {self.bound}.")

    @property
    def coeff_moduli(self) -> tuple[int, ...]:
        if self.coeff_mod_bit_sizes:
            return self.coeff_mod_bit_sizes
        if self.scheme == "ckks":
            return (60, 40, 60)
        return SEAL_BFV_DEFAULT.get(self.poly_modulus_degree, (36, 36, 37))

    @property
    def field_bits(self) -> int:
        """Bits of one packed field: a quantised value plus headroom for the sum over
        ``max_sites`` sites (the weights are folded into the values: no bits)."""
        return self.quant_bits + max(1, math.ceil(math.log2(self.max_sites)))

    @property
    def fields_per_slot(self) -> int:
        """Quantised values per BFV slot: as many fields as fit below ``t / 2`` with
        ``t`` at most 60 bits (SEAL decodes batched values to the centred range)."""
        return max(1, (MAX_PLAIN_BITS - 2) // self.field_bits)

    @property
    def max_weight(self) -> int:
        """Largest integer weight (and weight scale) of one site's update: the sum of
        ``max_sites`` weights must fit one field, like the values."""
        return (1 << self.quant_bits) - 1

    @property
    def plain_modulus(self) -> int:
        return batching_prime(self.fields_per_slot * self.field_bits + 2,
                              self.poly_modulus_degree)

    @property
    def values_per_ciphertext(self) -> int:
        """BFV: ``fields_per_slot`` packed values in each of N slots; CKKS: one value in
        each of N/2."""
        n = self.poly_modulus_degree
        return self.fields_per_slot * n if self.scheme == "bfv" else n // 2

    @property
    def step(self) -> float:
        """Quantisation step: the largest rounding error of one (folded) value (BFV)."""
        return 2 * self.bound / ((1 << self.quant_bits) - 1)

    def error_bound(self, *, sites: int, total_weight: int, scale: int) -> float:
        """Largest distance between a decrypted BFV mean and the exact example-weighted
        mean of the clipped values: every site's rounding error is below one step of
        its folded value, and the mean scales the sum by ``scale / total_weight``."""
        return self.step * sites * scale / max(total_weight, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_moduli)
        if self.scheme == "bfv":
            d["plain_modulus"] = self.plain_modulus
        d["security_bits"] = 128
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HEParams:
        keys = {"scheme", "poly_modulus_degree", "coeff_mod_bit_sizes", "quant_bits",
                "max_sites", "bound", "ckks_scale_bits"}
        kw = {k: d[k] for k in keys if k in d}
        kw["coeff_mod_bit_sizes"] = tuple(kw.get("coeff_mod_bit_sizes", ()))
        return cls(**kw)


def bfv_params_for(sites: int) -> HEParams:
    """Default BFV parameters with headroom for ``sites`` sites (at least 16, rounded up
    to a power of two: the headroom is whole bits). Three 19-bit fields fill a 59-bit
    plaintext modulus: 15 quantisation bits up to 16 sites, one fewer per doubling of
    the sites down to 12 bits (128 sites); beyond that two fields per slot."""
    max_sites = max(16, 1 << max(0, sites - 1).bit_length())
    site_bits = max(1, math.ceil(math.log2(max_sites)))
    return HEParams(max_sites=max_sites, quant_bits=max(12, 19 - site_bits))


#: Most sites a ``bfv-compact`` federation takes (its noise margin is measured at 16).
COMPACT_MAX_SITES = 16


def bfv_compact_params_for(sites: int) -> HEParams:
    """Fewer bytes and less CPU for a coarser step: one 60-bit data-level prime (SEAL's
    serialisation is then incompressible, so no zstd on either side) and 12-bit
    quantisation, three 16-bit fields in a 50-bit plaintext modulus: 5.35 bytes per
    parameter and about a twentieth of NVFlare-style CKKS's added CPU, for an 8x
    coarser step than the default (``bench/he_bench.py``). Up to 16 sites: SEAL's noise
    leaves two bits of margin there (a sum of 16 decrypts exactly up to a 52-bit
    plaintext modulus), too little to double the sites."""
    if sites > COMPACT_MAX_SITES:
        raise ConfigError(f"the bfv-compact profile takes at most {COMPACT_MAX_SITES} sites. "
                          f"Found {sites}: use bfv.")
    return HEParams(max_sites=COMPACT_MAX_SITES, quant_bits=12, coeff_mod_bit_sizes=(60, 40))


def params_for(profile: str, sites: int) -> HEParams:
    """The HE parameters of a named profile for a federation of ``sites`` sites."""
    if profile == "bfv":
        return bfv_params_for(sites)
    if profile == "bfv-compact":
        return bfv_compact_params_for(sites)
    if profile == "ckks":
        return ckks_params()
    raise ConfigError(f"HE profile must be one of {', '.join(HE_PROFILES)}. "
                      f"Found {profile!r}.")


def ckks_params(**kw: Any) -> HEParams:
    return HEParams(scheme="ckks", poly_modulus_degree=8192, **kw)


# ----------------------------------------------------------------------------------------
# quantisation and packing (BFV)
# ----------------------------------------------------------------------------------------
def quantise(values: np.ndarray, params: HEParams, rng: UniformSource,
             fold: float = 1.0) -> np.ndarray:
    """Clip to [-bound, bound], multiply by ``fold`` (the site's weight fraction, in
    (0, 1]) and stochastically round to integers in [0, 2**quant_bits).

    Unbiased: E[dequantised] = fold * clip(x). ``rng`` is the secret source of
    the rounding (``privacy.noise.SecureUniform``, the OS CSPRNG, at every real site)."""
    levels = (1 << params.quant_bits) - 1
    y = np.clip(values.astype(np.float64), -params.bound, params.bound) * fold
    x = (y + params.bound) / (2 * params.bound) * levels
    floor = np.floor(x)
    q = floor + (rng.random(x.shape) < (x - floor))
    return np.clip(q, 0, levels).astype(np.int64)


def dequantise_sum(q_sum: np.ndarray, *, sites: int, total_weight: int, scale: int,
                   params: HEParams) -> np.ndarray:
    """The weighted mean from the sum of ``sites`` quantised, weight-folded updates
    whose integer weights total ``total_weight`` at weight scale ``scale``."""
    levels = (1 << params.quant_bits) - 1
    folded = q_sum.astype(np.float64) / levels * (2 * params.bound) - sites * params.bound
    return folded * (scale / total_weight)


def pack(q: np.ndarray, params: HEParams) -> list[np.ndarray]:
    """``fields_per_slot`` quantised values per slot: slot i of chunk c holds values
    i, N + i, 2N + i, ... of that chunk, value j in bits [j F, (j + 1) F)."""
    n, k, f = params.poly_modulus_degree, params.fields_per_slot, params.field_bits
    chunks = []
    for start in range(0, len(q), k * n):
        padded = np.zeros(k * n, dtype=np.int64)
        part = q[start:start + k * n]
        padded[:len(part)] = part
        lanes = padded.reshape(k, n)
        slot = lanes[0].copy()
        for j in range(1, k):
            slot += lanes[j] << (j * f)
        chunks.append(slot)
    return chunks


def unpack(slots: list[np.ndarray], num_values: int, params: HEParams) -> np.ndarray:
    k, f = params.fields_per_slot, params.field_bits
    mask = (1 << f) - 1
    out = []
    for s in slots:
        s = np.asarray(s, dtype=np.int64)
        # the top field keeps the sign: a slot that wrapped modulo t decodes negative
        out.append(np.concatenate([(s >> (j * f)) & mask for j in range(k - 1)]
                                  + [s >> ((k - 1) * f)]))
    return np.concatenate(out)[:num_values] if out else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------
# contexts
# ----------------------------------------------------------------------------------------
def _ts() -> Any:
    import tenseal as ts

    return ts


def new_secret_context(params: HEParams) -> Any:
    """A fresh TenSEAL context holding the secret key (for the sites)."""
    ts = _ts()
    if params.scheme == "bfv":
        ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=params.poly_modulus_degree,
                         plain_modulus=params.plain_modulus,
                         coeff_mod_bit_sizes=list(params.coeff_moduli))
    else:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_moduli))
        ctx.global_scale = 2.0 ** params.ckks_scale_bits
    return ctx


def public_bytes(ctx: Any) -> bytes:
    """The context without its secret key (what the server gets)."""
    pub = ctx.copy()
    pub.make_context_public()
    data: bytes = pub.serialize(save_public_key=True, save_secret_key=False,
                                save_galois_keys=False, save_relin_keys=False)
    return data


def context_fingerprint(public_context: bytes, params: HEParams) -> str:
    """What every party checks: SHA-256 over the parameters and the public context."""
    h = hashlib.sha256(b"fedvault-he-v1")
    h.update(repr(sorted(params.to_dict().items())).encode())
    h.update(public_context)
    return h.hexdigest()


class HEContext:
    """A loaded TenSEAL context plus its parameters; encrypt/decrypt need the secret key."""

    def __init__(self, ctx: Any, params: HEParams) -> None:
        self.ctx = ctx
        self.params = params
        self._ref: tuple[int, list[int], float] | None = None
        self._pub = public_bytes(ctx)
        self.fingerprint = context_fingerprint(self._pub, params)

    @property
    def has_secret_key(self) -> bool:
        return bool(self.ctx.has_secret_key())

    @classmethod
    def load(cls, data: bytes, params: HEParams) -> HEContext:
        ts = _ts()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:  # TenSEAL raises ValueError/RuntimeError
            raise HEError(f"not a TenSEAL context ({exc})") from exc
        return cls(ctx, params)

    @classmethod
    def load_file(cls, path: str | Path, params: HEParams) -> HEContext:
        p = Path(path)
        if not p.exists():
            raise HEError(f"HE context {str(p)!r} does not exist.")
        return cls.load(p.read_bytes(), params)

    # -- the wire layout ------------------------------------------------------------------
    def num_ciphertexts(self, num_values: int) -> int:
        """Ciphertexts of one update of ``num_values`` values plus its verification block."""
        return -(-(num_values + VERIFY_FIELDS) // self.params.values_per_ciphertext)

    def slot_counts(self, num_values: int) -> list[int]:
        """The slot count (``vector.size()``) of each ciphertext of an honest update:
        BFV packs into full vectors of N slots; CKKS fills N/2 slots, the last one partly."""
        k = self.num_ciphertexts(num_values)
        if self.params.scheme == "bfv":
            return [self.params.poly_modulus_degree] * k
        per = self.params.values_per_ciphertext
        total = num_values + VERIFY_FIELDS
        return [min(per, total - i * per) for i in range(k)]

    # -- encryption (sites) ----------------------------------------------------------------
    def encrypt(self, values: np.ndarray, rng: UniformSource | None = None, *,
                weight: int = 1, scale: int = 1) -> list[bytes]:
        """Quantise (BFV) the values folded by ``weight / scale``, append the
        verification block (1 for this site, then ``weight``), pack and encrypt; one
        bytes per ciphertext. ``scale`` is the round's weight scale, the same at every
        site (``1 <= weight <= scale <= max_weight``). (CKKS multiplies the floats by
        ``weight``; it has no scale.)"""
        ts = _ts()
        if not 1 <= weight <= self.params.max_weight:
            raise HEError(f"weight must be in [1, {self.params.max_weight}]. Found {weight}.")
        if self.params.scheme == "bfv" and not weight <= scale <= self.params.max_weight:
            raise HEError(f"weight scale must be in [{weight}, {self.params.max_weight}]. "
                          f"Found {scale}.")
        flat = np.asarray(values, dtype=np.float64).ravel()
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.params.scheme == "bfv":
                q = quantise(flat, self.params, rng or SecureUniform(), fold=weight / scale)
                full = np.concatenate([q, np.array([1, weight], dtype=np.int64)])
                for chunk in pack(full, self.params):
                    out.append(ts.bfv_vector(self.ctx, chunk.tolist()).serialize())
            else:
                full_f = np.concatenate([weight * flat, [1.0, float(weight)]])
                n = self.params.poly_modulus_degree // 2
                for start in range(0, len(full_f), n):
                    out.append(ts.ckks_vector(self.ctx, full_f[start:start + n].tolist())
                               .serialize())
        return out

    # -- aggregation (server: public context suffices) --------------------------------------
    def parse(self, data: bytes) -> Any:
        ts = _ts()
        try:
            if self.params.scheme == "bfv":
                return ts.bfv_vector_from(self.ctx, data)
            return ts.ckks_vector_from(self.ctx, data)
        except Exception as exc:
            raise HEError(f"ciphertext does not parse under this context ({exc})") from exc

    def _reference(self) -> tuple[int, list[int], float]:
        """(serialised length, parms_id, scale) of a fresh encryption under this context:
        what every honest ciphertext of an update looks like."""
        if self._ref is None:
            ts = _ts()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = (ts.bfv_vector(self.ctx, [0] * self.params.poly_modulus_degree)
                        if self.params.scheme == "bfv" else
                        ts.ckks_vector(self.ctx, [0.0] * (self.params.poly_modulus_degree // 2)))
            ct = full.ciphertext()[0]
            self._ref = (len(full.serialize()), list(ct.parms_id()), float(ct.scale))
        return self._ref

    def ciphertext_bytes(self) -> int:
        """Serialised size of one fresh, full ciphertext of this context."""
        return self._reference()[0]

    def parse_checked(self, data: bytes, *, slots: int) -> Any:
        """Parse one ciphertext of a site's update and check it can be added to the others:
        its length (before TenSEAL reads it), its parameter set (``parms_id``: the same
        moduli at the same level), two polynomials, not transparent, ``slots`` slots and,
        for CKKS, the context's scale. Raises ``HEError`` naming what is wrong."""
        ref_len, parms_id, scale = self._reference()
        # a fresh ciphertext's serialised size varies a little (compression); 1.5x is far
        # above that and far below a hostile blob
        if not 0 < len(data) <= ref_len * 3 // 2:
            raise HEError(f"ciphertext of {len(data)} bytes; one of this context takes "
                          f"about {ref_len}")
        vec = self.parse(data)
        cts = vec.ciphertext()
        if len(cts) != 1:
            raise HEError(f"{len(cts)} ciphertexts in one vector, expected 1")
        ct = cts[0]
        if list(ct.parms_id()) != parms_id:
            raise HEError("ciphertext at another parameter set or level (parms_id differs)")
        if ct.size() != 2:
            raise HEError(f"ciphertext of {ct.size()} polynomials, expected 2")
        if ct.is_transparent():
            raise HEError("transparent ciphertext (it encrypts nothing)")
        if vec.size() != slots:
            raise HEError(f"vector of {vec.size()} slots, expected {slots}")
        if self.params.scheme == "ckks" and not math.isclose(float(ct.scale), scale,
                                                            rel_tol=1e-9):
            raise HEError(f"CKKS scale 2^{math.log2(max(float(ct.scale), 1.0)):.1f}, "
                          f"expected 2^{math.log2(scale):.1f}")
        return vec

    def add(self, updates: list[list[bytes]]) -> list[bytes]:
        """Homomorphic sum of several sites' ciphertext lists (same length each)."""
        if not updates:
            raise HEError("nothing to add.")
        length = len(updates[0])
        if any(len(u) != length for u in updates):
            raise HEError("updates have different numbers of ciphertexts.")
        out = []
        for i in range(length):
            acc = self.parse(updates[0][i])
            for u in updates[1:]:
                acc = acc + self.parse(u[i])
            out.append(acc.serialize())
        return out

    # -- decryption (sites) ------------------------------------------------------------------
    def decrypt_sum(self, chunks: list[bytes], *, num_values: int) -> Decrypted:
        """Decrypt an aggregate: the summed (weighted, quantised for BFV) values and its
        verification block (how many sites, how much weight it really holds)."""
        if not self.has_secret_key:
            raise HEError("this context holds no secret key: it cannot decrypt.")
        if len(chunks) != self.num_ciphertexts(num_values):
            raise HEError(f"{len(chunks)} ciphertexts, an aggregate of {num_values} values "
                          f"takes {self.num_ciphertexts(num_values)}")
        slots = [np.asarray(self.parse(c).decrypt(), dtype=np.int64 if
                            self.params.scheme == "bfv" else np.float64) for c in chunks]
        if self.params.scheme == "bfv":
            full = unpack(slots, num_values + VERIFY_FIELDS, self.params)
            # centred decoding: a slot that wrapped modulo t decodes negative, so its
            # high field does too (unpack shifts arithmetically)
        else:
            full = np.concatenate(slots)[:num_values + VERIFY_FIELDS]
        return Decrypted(values=full[:num_values], sites=float(full[num_values]),
                         weight=float(full[num_values + 1]))

    def decrypt_mean(self, chunks: list[bytes], *, num_values: int, count: int,
                     scale: int = 1) -> np.ndarray:
        """The weighted mean of an aggregate whose weights total ``count`` at weight
        scale ``scale`` (unchecked: use :meth:`verified_mean` for anything a site
        trains on or releases)."""
        if count < 1:
            raise HEError(f"count must be >= 1. Found {count}.")
        d = self.decrypt_sum(chunks, num_values=num_values)
        if self.params.scheme == "bfv":
            return dequantise_sum(d.values, sites=round(d.sites), total_weight=count,
                                  scale=scale, params=self.params)
        return (d.values / count).astype(np.float64)

    def verified_mean(self, chunks: list[bytes], *, num_values: int, count: int, sites: int,
                      min_sites: int, scale: int = 1) -> np.ndarray:
        """Decrypt an aggregate the server says sums ``sites`` updates of total weight
        ``count`` at weight scale ``scale``, check it, and return its mean. Raises
        ``AggregateRefused`` when its verification block disagrees (another number of
        sites or another weight than claimed: a weight lie, a replayed or single update
        handed out as the aggregate, a ciphertext under another key), when it holds
        fewer than ``min_sites`` sites, when the scale is impossible, or when a value
        lies outside what honest contributions can sum to (BFV: a value beyond
        ``(2**quant_bits - 1) * sites``, i.e. raw slots or a wrapped sum)."""
        if count < 1 or sites < 1:
            raise AggregateRefused(f"the server claims {sites} sites of total weight {count}")
        d = self.decrypt_sum(chunks, num_values=num_values)
        if abs(d.sites - sites) > 0.5:
            raise AggregateRefused(f"the aggregate holds {_show(d.sites)} site contributions, "
                                   f"the server claims {sites}")
        if abs(d.weight - count) > 0.5:
            raise AggregateRefused(f"the aggregate holds total weight {_show(d.weight)}, the "
                                   f"server claims {count} (a weight lie)")
        if sites < min_sites:
            raise AggregateRefused(f"the aggregate holds {sites} sites, fewer than min-sites "
                                   f"{min_sites}")
        if self.params.scheme == "bfv":
            if not 1 <= scale <= self.params.max_weight or count > sites * scale:
                raise AggregateRefused(f"weight scale {scale} with {sites} sites cannot hold "
                                       f"total weight {count}")
            top = ((1 << self.params.quant_bits) - 1) * sites
            bad = int(np.count_nonzero((d.values < 0) | (d.values > top)))
            if bad:
                raise AggregateRefused(f"{bad} of {num_values} values outside [0, {top}], the "
                                       "range honest quantised updates sum to (raw slots or "
                                       "a wrapped sum)")
            return dequantise_sum(d.values, sites=sites, total_weight=count, scale=scale,
                                  params=self.params)
        if not np.isfinite(d.values).all():
            raise AggregateRefused("non-finite values in the aggregate")
        return (d.values / count).astype(np.float64)


@dataclass(frozen=True, slots=True)
class Decrypted:
    """A decrypted aggregate: the summed values and its verification block."""

    values: np.ndarray
    sites: float
    weight: float


def _show(x: float) -> str:
    return str(int(x)) if abs(x) < 1e15 and float(x).is_integer() else f"{x:.4g}"
