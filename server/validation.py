"""Validation of site replies at the server: every reply is parsed once into a typed,
fully checked value before anything aggregates or records it, and a bad reply is
rejected for its site, never a crashed round.

What is checked is what will be *used*, not what is declared (a hostile site writes
the header and the bytes independently):

* the records: exactly those the protocol defines for the reply's kind, no more,
  no fewer (:data:`TRAIN_RECORDS` and the others below);
* every array: its byte length against the global model's layer *before* NumPy
  touches it, then the shape and dtype NumPy reads from the bytes themselves, and
  finite values;
* every metric and field: its type (counts are ``int``), finite, in its range
  (accuracy in [0, 1], losses >= 0, ``num-examples`` in [1, max-examples-per-site]);
* the FedAvg weights: capped so that no site's share exceeds ``max-weight-share``
  (:func:`capped_weights`).

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
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from protocols.errors import UpdateRejected

#: Default of ``max-examples-per-site``: a site claiming more is lying or misconfigured.
DEFAULT_MAX_EXAMPLES = 1_000_000
#: Room for the ``.npy`` header beside an array's raw bytes (NumPy pads it to 64 bytes;
#: 4 KiB is generous for any shape of a real model).
NPY_HEADER_ROOM = 4096
T = TypeVar("T")
#: Longest free text (reasons, names) taken from a reply.
MAX_TEXT = 300
MAX_STEPS = 10**9


# -- the protocol's records ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Shape:
    """The records one kind of reply carries: required and optional names per kind."""

    arrays: frozenset[str] = frozenset()
    metrics: frozenset[str] = frozenset()
    configs: frozenset[str] = frozenset()
    optional_configs: frozenset[str] = frozenset()

    def check(self, content: RecordDict, what: str) -> None:
        got = {"ArrayRecord": set(content.array_records.keys()),
               "MetricRecord": set(content.metric_records.keys()),
               "ConfigRecord": set(content.config_records.keys())}
        want = {"ArrayRecord": (self.arrays, frozenset()),
                "MetricRecord": (self.metrics, frozenset()),
                "ConfigRecord": (self.configs, self.optional_configs)}
        for kind, names in got.items():
            required, optional = want[kind]
            missing = sorted(required - names)
            extra = sorted(names - required - optional)
            if missing or extra:
                raise UpdateRejected(
                    f"{what} must carry {kind}s {sorted(required)}"
                    + (f" (optionally {sorted(optional)})" if optional else "")
                    + f"; missing {_names(missing)}, unexpected {_names(extra)}")


def _names(names: Sequence[str]) -> str:
    shown = [n[:40] for n in names[:3]]
    return repr(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


PLAIN_TRAIN = Shape(arrays=frozenset({"arrays"}), metrics=frozenset({"metrics"}),
                    optional_configs=frozenset({"privacy"}))
ENCRYPTED_TRAIN = Shape(metrics=frozenset({"metrics"}), configs=frozenset({"he-update"}),
                        optional_configs=frozenset({"privacy"}))
REFUSAL = Shape(configs=frozenset({"refusal"}))
GLOBAL_REFUSED = Shape(configs=frozenset({"global-refused"}))
EVALUATION = Shape(metrics=frozenset({"metrics"}))
DECLINED = Shape(configs=frozenset({"declined"}))


# -- typed fields -----------------------------------------------------------------------
def count(rec: Mapping[str, Any], key: str, low: int, high: int, *, what: str) -> int:
    """An ``int`` (not a bool, not a float) in [low, high]."""
    if key not in rec:
        raise UpdateRejected(f"{what} lacks {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise UpdateRejected(f"{what} {key!r} must be an integer. Found {_show(v)}")
    if not low <= v <= high:
        raise UpdateRejected(f"{what} {key!r} must be in [{low}, {high}]. Found {v}")
    return v


def real(rec: Mapping[str, Any], key: str, low: float, high: float = math.inf, *,
         what: str) -> float:
    """A finite ``int`` or ``float`` in [low, high]."""
    if key not in rec:
        raise UpdateRejected(f"{what} lacks {key!r}")
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UpdateRejected(f"{what} {key!r} must be a number. Found {_show(v)}")
    f = float(v)
    if not math.isfinite(f):
        raise UpdateRejected(f"{what} {key!r} must be finite. Found {f}")
    if not low <= f <= high:
        raise UpdateRejected(f"{what} {key!r} must be in [{low}, {high}]. Found {f}")
    return f


def text(rec: Mapping[str, Any], key: str, *, what: str, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise UpdateRejected(f"{what} lacks {key!r}")
        return ""
    v = rec[key]
    if not isinstance(v, str):
        raise UpdateRejected(f"{what} {key!r} must be text. Found {_show(v)}")
    return v[:MAX_TEXT]


def optional(rec: Mapping[str, Any], key: str, parse: Callable[[], T]) -> T | None:
    """``parse()`` if ``key`` is present, else ``None`` (an optional field)."""
    return parse() if key in rec else None


def only_keys(rec: Mapping[str, Any], allowed: Iterable[str], *, what: str) -> None:
    extra = sorted(set(rec.keys()) - set(allowed))
    if extra:
        raise UpdateRejected(f"{what} has unexpected fields {_names(extra)}")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# -- the parsed replies -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReplyPrivacy:
    """What a site reports of its privacy after a round (validated)."""

    site: str
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_record(self) -> dict[str, Any]:
        return {"site": self.site, "epsilon": self.epsilon, "delta": self.delta,
                "accountant": self.accountant, "noise-multiplier": self.noise_multiplier,
                "sample-rate": self.sample_rate, "steps": self.steps}


def parse_privacy(content: RecordDict) -> ReplyPrivacy | None:
    if "privacy" not in content.config_records:
        return None
    rec = content.config_records["privacy"]
    what = "privacy record"
    only_keys(rec, ("site", "epsilon", "delta", "accountant", "noise-multiplier",
                    "sample-rate", "steps"), what=what)
    return ReplyPrivacy(site=text(rec, "site", what=what),
                       epsilon=real(rec, "epsilon", 0.0, what=what),
                       delta=real(rec, "delta", 0.0, 1.0, what=what),
                       accountant=text(rec, "accountant", what=what),
                       noise_multiplier=real(rec, "noise-multiplier", 0.0, what=what),
                       sample_rate=real(rec, "sample-rate", 0.0, 1.0, what=what),
                       steps=count(rec, "steps", 0, MAX_STEPS, what=what))


@dataclass(frozen=True, slots=True)
class Refusal:
    """A site's refusal to train this round (its budget or policy), validated."""

    reason: str
    site: str
    epsilon_limit: float | None
    delta: float | None
    epsilon_spent: float | None

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "site": self.site}
        for key, value in (("epsilon-limit", self.epsilon_limit), ("delta", self.delta),
                           ("epsilon-spent", self.epsilon_spent)):
            if value is not None:
                out[key] = value
        return out


def parse_refusal(content: RecordDict) -> Refusal:
    REFUSAL.check(content, "a refusal")
    rec = content.config_records["refusal"]
    what = "refusal"
    only_keys(rec, ("reason", "site", "epsilon-limit", "delta", "epsilon-spent"), what=what)
    # (a site refusing an app it did not approve, client.runtime, states no budget)
    return Refusal(reason=text(rec, "reason", what=what), site=text(rec, "site", what=what),
                   epsilon_limit=optional(rec, "epsilon-limit",
                                          lambda: real(rec, "epsilon-limit", 0.0, what=what)),
                   delta=optional(rec, "delta", lambda: real(rec, "delta", 0.0, 1.0, what=what)),
                   epsilon_spent=optional(rec, "epsilon-spent",
                                          lambda: real(rec, "epsilon-spent", 0.0, what=what)))


@dataclass(frozen=True, slots=True)
class GlobalRefused:
    """A site's refusal of the global model it was sent (the aggregate check failed)."""

    reason: str
    site: str
    version: int


def parse_global_refused(content: RecordDict) -> GlobalRefused:
    GLOBAL_REFUSED.check(content, "a global-model refusal")
    rec = content.config_records["global-refused"]
    what = "global-model refusal"
    only_keys(rec, ("reason", "site", "version"), what=what)
    return GlobalRefused(reason=text(rec, "reason", what=what),
                         site=text(rec, "site", what=what, required=False),
                         version=count(rec, "version", 0, 10**9, what=what))


@dataclass(frozen=True, slots=True)
class TrainMetrics:
    num_examples: int
    steps: int | None
    train_loss: float | None

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = {}
        if self.steps is not None:
            d["steps"] = float(self.steps)
        if self.train_loss is not None:
            d["train-loss"] = self.train_loss
        return d


def parse_train_metrics(content: RecordDict, *, max_examples: int) -> TrainMetrics:
    rec = content.metric_records["metrics"]
    what = "train metrics"
    only_keys(rec, ("num-examples", "steps", "train-loss"), what=what)
    return TrainMetrics(num_examples=count(rec, "num-examples", 1, max_examples, what=what),
                        steps=optional(rec, "steps",
                                       lambda: count(rec, "steps", 0, MAX_STEPS, what=what)),
                        train_loss=optional(rec, "train-loss",
                                            lambda: real(rec, "train-loss", 0.0, what=what)))


@dataclass(frozen=True, slots=True)
class EvalReply:
    node_id: int
    num_examples: int
    loss: float
    accuracy: float


def parse_evaluation(msg: Message, *, max_examples: int) -> EvalReply:
    EVALUATION.check(msg.content, "an evaluation reply")
    rec = msg.content.metric_records["metrics"]
    what = "evaluation metrics"
    only_keys(rec, ("eval-loss", "eval-acc", "num-examples"), what=what)
    return EvalReply(node_id=msg.metadata.src_node_id,
                     num_examples=count(rec, "num-examples", 1, max_examples, what=what),
                     loss=real(rec, "eval-loss", 0.0, what=what),
                     accuracy=real(rec, "eval-acc", 0.0, 1.0, what=what))


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
        raise UpdateRejected(f"layer {spec.name!r}: serialisation {_show(arr.stype)}, "
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
                             f"{_names(missing)}, unexpected {_names(extra)})")
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
    metrics = parse_train_metrics(msg.content, max_examples=max_examples)
    privacy = parse_privacy(msg.content)
    arrays = parse_arrays(msg.content.array_records["arrays"], spec)
    return PlainUpdate(node_id=msg.metadata.src_node_id, metrics=metrics, privacy=privacy,
                       arrays=arrays, digest=digest_of(a.tobytes() for a in arrays))


def digest_of(parts: Iterable[bytes]) -> str:
    """SHA-256 over an update's payload (arrays or ciphertexts), for replay detection."""
    h = hashlib.sha256(b"fedvault-update-v1")
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


# -- weights ------------------------------------------------------------------------------
def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """FedAvg weights with no share above ``max_share``: each weight becomes
    ``min(w, c)`` with the largest ``c`` for which ``c / sum(min(w, c)) <= max_share``
    (water-filling). With fewer than ``1 / max_share`` sites no cap can hold and the
    weights become equal. Honest weights below the cap are unchanged."""
    n = len(weights)
    if n == 0:
        return []
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError("weights must be finite and > 0")
    if max_share >= 1.0:
        return list(weights)
    if n * max_share <= 1.0:
        return [1.0] * n
    order = sorted(weights, reverse=True)
    total = sum(order)
    if order[0] <= max_share * total:
        return list(weights)
    rest = total
    for k in range(1, n):  # cap the k largest at c
        rest -= order[k - 1]
        c = max_share * rest / (1.0 - k * max_share)
        if k * max_share < 1.0 and order[k] <= c <= order[k - 1]:
            return [min(w, c) for w in weights]
    return [1.0] * n  # not reached for n * max_share > 1; equal weights are safe


def weighted_mean(updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
                  ) -> list[np.ndarray]:
    """The weighted average of checked updates, in float64, cast to each layer's dtype."""
    total = float(sum(weights))
    out = []
    for layer in range(len(updates[0])):
        acc = np.zeros(updates[0][layer].shape, dtype=np.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += u[layer].astype(np.float64) * (w / total)
        out.append(acc.astype(updates[0][layer].dtype))
    return out


def weighted_metrics(rows: Sequence[Mapping[str, float]], weights: Sequence[float]
                     ) -> MetricRecord:
    """Weighted averages of validated metrics (each key over the rows that have it)."""
    out: dict[str, float] = {}
    for key in sorted({k for r in rows for k in r}):
        pairs = [(r[key], w) for r, w in zip(rows, weights, strict=True) if key in r]
        total = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / total
    return MetricRecord(out)  # type: ignore[arg-type]


__all__ = ["DEFAULT_MAX_EXAMPLES", "EvalReply", "GlobalRefused",
           "LayerSpec", "PlainUpdate", "Refusal", "ReplyPrivacy", "capped_weights",
           "digest_of", "model_spec", "parse_evaluation", "parse_global_refused",
           "parse_plain_update", "parse_privacy", "parse_refusal", "weighted_mean",
           "weighted_metrics"]
