"""Validation of site replies at the server: every reply is parsed once into a typed,
fully checked value before anything aggregates or records it, and a bad reply is
rejected for its site, never a crashed round.

What is checked is what will be *used*, not what is declared (a hostile site writes
the header and the bytes independently):

* the records: exactly those the protocol defines for the reply's kind, no more,
  no fewer (:class:`protocols.messages.Shape`), each field typed and in range;
* every array: its byte length against the global model's layer *before* NumPy
  touches it, then the shape and dtype NumPy reads from the bytes themselves, and
  finite values;
* every metric and field: its type (counts are ``int``), finite, in its range
  (accuracy in [0, 1], losses >= 0, ``num-examples`` in [1, max-examples-per-site]);
* the FedAvg weights: capped so that no site's share exceeds ``max-weight-share``
  (:func:`server.averaging.capped_weights`).

Flower's own ``validate_message_reply_consistency`` raises for the whole round on the
first inconsistent reply, and ``aggregate_arrayrecords`` re-reads every reply's
bytes and trusts its declared weight; fedvault averages the arrays it checked here.

Transport limits (Flower 1.42): a gRPC message may be up to 2 GiB
(``flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH``); arrays travel in 5 MiB chunks
(``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), so a reply reaches the ServerApp whole before
any of this runs: these checks bound what is *converted and kept*, not what arrives.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from protocols.errors import UpdateRejected
from protocols.messages import (
    ARRAYS,
    PLAIN_TRAIN,
    EvalMetrics,
    ReplyPrivacy,
    TrainMetrics,
    show_names,
    shown,
)

#: Default of ``max-examples-per-site``: a site claiming more is lying or misconfigured.
DEFAULT_MAX_EXAMPLES = 1_000_000
#: Room for the ``.npy`` header beside an array's raw bytes (NumPy pads it to 64 bytes;
#: 4 KiB is generous for any shape of a real model).
NPY_HEADER_ROOM = 4096


# -- the parsed replies (their types and field checks: protocols.messages) -------------
@dataclass(frozen=True, slots=True)
class EvalReply:
    """A checked evaluation reply and the node it came from."""

    node_id: int
    metrics: EvalMetrics


def parse_evaluation(msg: Message, *, max_examples: int) -> EvalReply:
    return EvalReply(node_id=msg.metadata.src_node_id,
                     metrics=EvalMetrics.from_content(msg.content, max_examples=max_examples))


# -- arrays -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LayerSpec:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def model_spec(reference: ArrayRecord) -> tuple[LayerSpec, ...]:
    """The layers of the global model (names, dtypes, shapes), read from our own arrays."""
    out = []
    for name in reference.keys():
        arr = reference[name].numpy()
        out.append(LayerSpec(name=name, dtype=arr.dtype, shape=tuple(arr.shape)))
    return tuple(out)


def parse_layer(arr: Array, spec: LayerSpec) -> np.ndarray:
    """One layer from its bytes: length first (before NumPy reads anything), then the
    dtype and shape NumPy finds in the bytes, then finiteness."""
    if not isinstance(arr, Array):
        raise UpdateRejected(f"layer {spec.name!r} is not an Array")
    if arr.stype != "numpy.ndarray":
        raise UpdateRejected(f"layer {spec.name!r}: serialisation {shown(arr.stype)}, "
                             "expected numpy.ndarray")
    data = arr.data
    if not isinstance(data, bytes):
        raise UpdateRejected(f"layer {spec.name!r}: data is not bytes")
    if not spec.nbytes <= len(data) <= spec.nbytes + NPY_HEADER_ROOM:
        raise UpdateRejected(f"layer {spec.name!r}: {len(data)} bytes, a {spec.dtype}"
                             f"{spec.shape} layer takes {spec.nbytes} (+ its header)")
    try:
        got = np.load(io.BytesIO(data), allow_pickle=False)  # BytesIO shares the bytes
    except Exception as exc:  # any undecodable bytes: np.load raises ValueError/OSError/...
        raise UpdateRejected(f"layer {spec.name!r}: undecodable array ({exc})") from None
    if not isinstance(got, np.ndarray) or got.dtype != spec.dtype or got.shape != spec.shape:
        raise UpdateRejected(
            f"layer {spec.name!r}: its bytes hold {getattr(got, 'dtype', '?')}"
            f"{getattr(got, 'shape', '?')}, expected {spec.dtype}{spec.shape} "
            f"(declared {arr.dtype}{tuple(arr.shape)})")
    if not np.isfinite(got).all():
        raise UpdateRejected(f"layer {spec.name!r} holds NaN or infinite values")
    return got


def parse_arrays(rec: ArrayRecord, spec: Sequence[LayerSpec]) -> tuple[np.ndarray, ...]:
    names = list(rec.keys())
    want = [s.name for s in spec]
    if names != want:
        missing = sorted(set(want) - set(names))
        extra = sorted(set(names) - set(want))
        raise UpdateRejected(f"update layers differ from the global model (missing "
                             f"{show_names(missing)}, unexpected {show_names(extra)})")
    return tuple(parse_layer(rec[s.name], s) for s in spec)


@dataclass(frozen=True, slots=True)
class PlainUpdate:
    """A plaintext training reply, fully checked: what aggregation and recording use."""

    node_id: int
    metrics: TrainMetrics
    privacy: ReplyPrivacy | None
    arrays: tuple[np.ndarray, ...]
    digest: str


def parse_plain_update(msg: Message, spec: Sequence[LayerSpec], *,
                       max_examples: int) -> PlainUpdate:
    PLAIN_TRAIN.check(msg.content, "a training reply")
    metrics = TrainMetrics.from_content(msg.content, max_examples=max_examples)
    privacy = ReplyPrivacy.from_content(msg.content)
    arrays = parse_arrays(msg.content.array_records[ARRAYS], spec)
    return PlainUpdate(node_id=msg.metadata.src_node_id, metrics=metrics, privacy=privacy,
                       arrays=arrays, digest=digest_of(a.tobytes() for a in arrays))


def digest_of(parts: Iterable[bytes]) -> str:
    """SHA-256 over an update's payload (arrays or ciphertexts), for replay detection."""
    h = hashlib.sha256(b"fedvault-update-v1")
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


__all__ = ["DEFAULT_MAX_EXAMPLES", "EvalReply", "LayerSpec", "PlainUpdate", "digest_of",
           "model_spec", "parse_evaluation", "parse_plain_update"]
