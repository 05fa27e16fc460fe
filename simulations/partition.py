"""Partitioning one dataset across simulated sites.

``flwr-datasets`` has IID and Dirichlet partitioners, but they work on Hugging
Face ``datasets`` objects and would pull that stack in for an 1,800-row array;
these are the same algorithms on NumPy label arrays, pure and seeded.
"""

from __future__ import annotations

import numpy as np

PARTITIONERS = ("iid", "dirichlet")


def iid_partition(num_samples: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle and deal ``num_samples`` indices into ``num_partitions`` near-equal parts."""
    _check(num_samples, num_partitions)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_samples)
    return [np.sort(part) for part in np.array_split(perm, num_partitions)]


def dirichlet_partition(
    labels: np.ndarray,
    num_partitions: int,
    *,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split across partitions in proportions
    drawn from Dirichlet(alpha) (Hsu, Qi & Brown, 2019, arXiv:1909.06335).

    Smaller ``alpha`` means more skew. Draws again (up to ``max_tries``) until
    every partition holds at least ``min_partition_size`` samples; the minimum
    is lowered to what the data allows when it cannot be met.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0. Found {alpha}.")
    labels = np.asarray(labels)
    _check(len(labels), num_partitions)
    min_size = min(min_partition_size, len(labels) // num_partitions)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        # Could not meet the minimum by chance: move samples from the largest parts.
        for k in range(num_partitions):
            while len(parts[k]) < min_size:
                donor = max(range(num_partitions), key=lambda j: len(parts[j]))
                parts[k].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_indices(
    labels: np.ndarray, num_partitions: int, *, partitioner: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Dispatch to the named partitioner (``iid`` or ``dirichlet``)."""
    if partitioner == "iid":
        return iid_partition(len(labels), num_partitions, seed=seed)
    if partitioner == "dirichlet":
        return dirichlet_partition(labels, num_partitions, alpha=alpha, seed=seed)
    raise ValueError(f"partitioner must be one of {PARTITIONERS}. Found {partitioner!r}.")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label distribution and the
    global one: 0 for a perfectly IID split, approaching 1 for one class per part."""
    classes = np.unique(labels)
    glob = np.array([(labels == c).mean() for c in classes])
    dists = []
    for p in parts:
        if len(p) == 0:
            continue
        loc = np.array([(labels[p] == c).mean() for c in classes])
        dists.append(0.5 * np.abs(loc - glob).sum())
    return float(np.mean(dists))


def _check(num_samples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1. Found {num_partitions}.")
    if num_samples < num_partitions:
        raise ValueError(
            f"Cannot split {num_samples} samples into {num_partitions} non-empty partitions."
        )
