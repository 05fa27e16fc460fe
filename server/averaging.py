"""The averaging arithmetic of the plaintext strategies: FedAvg over checked updates,
with no site's weight share above ``max-weight-share`` (water-filling)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import MetricRecord


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


__all__ = ["capped_weights", "weighted_mean", "weighted_metrics"]
