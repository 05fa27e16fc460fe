"""Validation of site replies at the server: a bad reply is rejected for that site,
never a crashed round (Flower's own ``validate_message_reply_consistency`` raises
for the whole round on the first inconsistent reply)."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

from fedvault.errors import UpdateRejected

#: A site claiming more examples than this is lying or misconfigured.
MAX_NUM_EXAMPLES = 10**9


def num_examples_of(msg: Message, *, key: str = "num-examples") -> int:
    """The positive integer example count a reply reports in its ``metrics`` record."""
    content = msg.content
    if "metrics" not in content.metric_records:
        raise UpdateRejected("reply has no 'metrics' record")
    metrics = content.metric_records["metrics"]
    if key not in metrics:
        raise UpdateRejected(f"reply metrics lack {key!r}")
    value = metrics[key]
    if isinstance(value, list) or isinstance(value, bool):
        raise UpdateRejected(f"{key!r} must be a number. Found {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0 or v != int(v) or v > MAX_NUM_EXAMPLES:
        raise UpdateRejected(f"{key!r} must be a positive integer <= {MAX_NUM_EXAMPLES}. "
                             f"Found {value!r}")
    return int(v)


def check_train_reply(msg: Message, reference: ArrayRecord, *, key: str = "num-examples") -> None:
    """Raise ``UpdateRejected`` unless ``msg`` carries one finite model update of the
    same layers, shapes and dtypes as ``reference`` and a valid example count."""
    content = msg.content
    arrays = content.array_records
    if list(arrays.keys()) != ["arrays"]:
        raise UpdateRejected(
            f"reply must carry exactly one ArrayRecord 'arrays'. Found {sorted(arrays.keys())}"
        )
    update = arrays["arrays"]
    ref_keys, got_keys = list(reference.keys()), list(update.keys())
    if ref_keys != got_keys:
        missing = sorted(set(ref_keys) - set(got_keys))
        extra = sorted(set(got_keys) - set(ref_keys))
        raise UpdateRejected(
            f"update layers differ from the global model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    for name in ref_keys:
        ref, got = reference[name], update[name]
        if tuple(ref.shape) != tuple(got.shape) or ref.dtype != got.dtype:
            raise UpdateRejected(
                f"layer {name!r}: expected {ref.dtype}{tuple(ref.shape)}, "
                f"got {got.dtype}{tuple(got.shape)}"
            )
        try:
            arr = got.numpy()
        except Exception as exc:  # bytes that do not deserialise
            raise UpdateRejected(f"layer {name!r}: undecodable array ({exc})") from exc
        if not np.isfinite(arr).all():
            raise UpdateRejected(f"layer {name!r} holds NaN or infinite values")
    num_examples_of(msg, key=key)
