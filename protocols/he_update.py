"""Wire format of encrypted model updates and of the encrypted global model.

Both travel in Flower ``ConfigRecord``s (which carry bytes). Version 3::

    "he-update" (site -> server)          "he-global" (server -> sites)
      version        int = 3                version      int = 3
      scheme         "bfv" | "ckks"         scheme, fingerprint, num-values
      fingerprint    HE context SHA-256     count        total weight summed
      num-values     values encrypted       sites        updates summed
      quant-bits     (bfv) bits per value   weight-scale the round's weight scale
      bound          (bfv) clipping bound   round        the round that formed it
                                            ciphertexts  list[bytes]
      weight         FedAvg weight: the site's example count, capped at the round's
                     weight scale (``he_weight``)
      weight-scale   the weight scale the server announced for this round
                     (config "he-weight-scale"); the values are folded by
                     weight / weight-scale (``privacy.he``)
      num-examples   reported
      run-id, round, node-id               binding: a replay from another run or
      ciphertexts    list[bytes]           round, or for another node, is rejected

The ciphertexts hold the values and, after them, a verification block of
``privacy.he.VERIFY_FIELDS`` values (1 and the weight): summed, it tells a site
decrypting the aggregate how many updates and how much weight it really holds.

Validation rejects, with a reason recorded for that site: a record that does not
parse, another version, scheme or context fingerprint, a wrong number of values
or ciphertexts, a run/round/node that does not match, a weight that does not follow
from the example count, and a second update from the same node in one round (the
server also checks each ciphertext, ``HEContext.parse_checked``, and rejects a
repeat of any update it accepted before, under any node id or round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from protocols.errors import HEError, UpdateRejected

WIRE_VERSION = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedUpdate:
    scheme: str
    fingerprint: str
    num_values: int
    quant_bits: int
    bound: float
    weight: int
    weight_scale: int
    num_examples: int
    run_id: int
    round: int
    node_id: int
    ciphertexts: tuple[bytes, ...]
    version: int = WIRE_VERSION

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({
            "version": self.version, "scheme": self.scheme, "fingerprint": self.fingerprint,
            "num-values": self.num_values, "quant-bits": self.quant_bits, "bound": self.bound,
            "weight": self.weight, "weight-scale": self.weight_scale,
            "num-examples": self.num_examples,
            "run-id": str(self.run_id), "round": self.round, "node-id": str(self.node_id),
            "ciphertexts": list(self.ciphertexts),
        })

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> EncryptedUpdate:
        try:
            cts = rec["ciphertexts"]
            if not isinstance(cts, list) or not all(isinstance(c, bytes) for c in cts):
                raise UpdateRejected("ciphertexts must be a list of bytes")
            return cls(version=_int(rec, "version"), scheme=str(rec["scheme"]),
                       fingerprint=str(rec["fingerprint"]),
                       num_values=_int(rec, "num-values"), quant_bits=_int(rec, "quant-bits"),
                       bound=float(rec["bound"]),  # type: ignore[arg-type]
                       weight=_int(rec, "weight"), weight_scale=_int(rec, "weight-scale"),
                       num_examples=_int(rec, "num-examples"),
                       run_id=int(str(rec["run-id"])), round=_int(rec, "round"),
                       node_id=int(str(rec["node-id"])),
                       ciphertexts=tuple(bytes(c) for c in cts))  # type: ignore[arg-type]
        except UpdateRejected:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRejected(f"encrypted update does not parse: {exc!r}") from None


def _int(rec: ConfigRecord, key: str, error: type[Exception] = UpdateRejected) -> int:
    v: Any = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise error(f"field {key!r} must be an integer. Found {v!r}")
    return v


def he_weight(num_examples: int, scale: int) -> int:
    """FedAvg weight: the example count, exact up to the round's weight scale, clamped
    to [1, scale] (a site with more examples than the scale counts as the scale)."""
    return max(1, min(scale, int(num_examples)))


def check_update(u: EncryptedUpdate, *, scheme: str, fingerprint: str, num_values: int,
                 num_ciphertexts: int, run_id: int, server_round: int, node_id: int,
                 weight_scale: int | None = None) -> None:
    """Raise ``UpdateRejected`` naming the first thing wrong with ``u``."""
    if u.version != WIRE_VERSION:
        raise UpdateRejected(f"wire version {u.version}, expected {WIRE_VERSION}")
    if u.scheme != scheme:
        raise UpdateRejected(f"scheme {u.scheme!r}, expected {scheme!r}")
    if u.fingerprint != fingerprint:
        raise UpdateRejected(f"HE parameter fingerprint {u.fingerprint[:16]}… does not match "
                             f"the federation's {fingerprint[:16]}…")
    if u.num_values != num_values:
        raise UpdateRejected(f"{u.num_values} values, the model has {num_values}")
    if len(u.ciphertexts) != num_ciphertexts:
        raise UpdateRejected(f"{len(u.ciphertexts)} ciphertexts, expected {num_ciphertexts}")
    if u.run_id != run_id or u.round != server_round:
        raise UpdateRejected(f"bound to run {u.run_id} round {u.round}, this is run {run_id} "
                             f"round {server_round} (replay)")
    if u.node_id != node_id:
        raise UpdateRejected(f"bound to node {u.node_id}, sent by node {node_id}")
    if weight_scale is not None and u.weight_scale != weight_scale:
        raise UpdateRejected(f"weight scale {u.weight_scale}, this round's is {weight_scale}")
    if not 1 <= u.weight <= u.weight_scale:
        raise UpdateRejected(f"weight {u.weight} outside [1, {u.weight_scale}] (the sum "
                             "could wrap)")
    if u.num_examples < 1:
        raise UpdateRejected(f"num-examples must be >= 1. Found {u.num_examples}")
    expected = he_weight(u.num_examples, u.weight_scale)
    if u.weight != expected:
        raise UpdateRejected(f"weight {u.weight} does not follow from {u.num_examples} "
                             f"examples (expected {expected})")


def global_record(*, scheme: str, fingerprint: str, num_values: int, count: int,
                  sites: int, weight_scale: int, server_round: int,
                  ciphertexts: list[bytes]) -> ConfigRecord:
    return ConfigRecord({"version": WIRE_VERSION, "scheme": scheme, "fingerprint": fingerprint,
                         "num-values": num_values, "count": count, "sites": sites,
                         "weight-scale": weight_scale, "round": server_round,
                         "ciphertexts": ciphertexts})


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedGlobal:
    """The encrypted global model as the sites receive it ("he-global")."""

    scheme: str
    fingerprint: str
    num_values: int
    count: int  # total weight summed
    sites: int  # updates summed
    weight_scale: int  # the weight scale of the round that formed it
    round: int
    ciphertexts: tuple[bytes, ...]
    version: int = WIRE_VERSION

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> EncryptedGlobal:
        """Parse, raising ``HEError`` naming what is wrong (a site cannot train from it)."""
        try:
            version = _int(rec, "version", HEError)
            if version != WIRE_VERSION:
                raise HEError(f"global model wire version {version}, expected {WIRE_VERSION}")
            cts = rec["ciphertexts"]
            if not isinstance(cts, list) or not all(isinstance(c, bytes) for c in cts):
                raise HEError("the global model's ciphertexts are not a list of bytes.")
            return cls(scheme=str(rec["scheme"]), fingerprint=str(rec["fingerprint"]),
                       num_values=_int(rec, "num-values", HEError),
                       count=_int(rec, "count", HEError), sites=_int(rec, "sites", HEError),
                       weight_scale=_int(rec, "weight-scale", HEError),
                       round=_int(rec, "round", HEError),
                       ciphertexts=tuple(bytes(c) for c in cts),  # type: ignore[arg-type]
                       version=version)
        except KeyError as exc:
            raise HEError(f"the global model record lacks {exc}.") from None


# The encrypted global model between rounds at the server (and as stored in the run
# directory): an ArrayRecord of the ciphertext bytes (ct-NNNN, uint8) plus the total
# weight summed (he-count), the number of sites summed (he-sites), the weight scale of
# the round (he-scale) and the round that formed it (he-round).
def encrypted_arrays(ciphertexts: list[bytes], *, count: int, server_round: int,
                     sites: int, weight_scale: int = 1) -> ArrayRecord:
    d = {f"ct-{i:04d}": Array(np.frombuffer(c, dtype=np.uint8).copy())
         for i, c in enumerate(ciphertexts)}
    d["he-count"] = Array(np.array([count], dtype=np.int64))
    d["he-sites"] = Array(np.array([sites], dtype=np.int64))
    d["he-scale"] = Array(np.array([weight_scale], dtype=np.int64))
    d["he-round"] = Array(np.array([server_round], dtype=np.int64))
    return ArrayRecord(d)


def is_encrypted(arrays: ArrayRecord) -> bool:
    return "he-count" in arrays


def ciphertexts_of(arrays: ArrayRecord) -> tuple[list[bytes], int, int]:
    """(ciphertexts, total weight, round) of an ``encrypted_arrays`` record."""
    cts = [arrays[k].numpy().tobytes() for k in sorted(arrays.keys()) if k.startswith("ct-")]
    return cts, int(arrays["he-count"].numpy()[0]), int(arrays["he-round"].numpy()[0])


def scale_of(arrays: ArrayRecord) -> int:
    """The weight scale of the round that formed an ``encrypted_arrays`` record."""
    return int(arrays["he-scale"].numpy()[0]) if "he-scale" in arrays else 1


def version_of(arrays: ArrayRecord) -> int:
    """The round that formed a global model record (0: the plaintext initial model)."""
    return int(arrays["he-round"].numpy()[0]) if "he-round" in arrays else 0


def sites_of(arrays: ArrayRecord) -> int | None:
    """The number of sites summed in an ``encrypted_arrays`` record (``None``: a record
    written before it was stored)."""
    return int(arrays["he-sites"].numpy()[0]) if "he-sites" in arrays else None
