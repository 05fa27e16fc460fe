from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvault_tasks.partition import (
    dirichlet_partition,
    iid_partition,
    label_skew,
    partition_indices,
)
from fedvault_tasks.tasks import get_task


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 500), k=st.integers(1, 20), seed=st.integers(0, 2**31),
       alpha=st.floats(0.05, 100.0), num_classes=st.integers(2, 10),
       kind=st.sampled_from(["iid", "dirichlet"]))
def test_every_sample_in_exactly_one_partition(n: int, k: int, seed: int, alpha: float,
                                               num_classes: int, kind: str) -> None:
    if n < k:
        return
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    parts = partition_indices(labels, k, partitioner=kind, alpha=alpha, seed=seed)
    assert len(parts) == k
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(p) >= 1 for p in parts)


def test_partitions_are_deterministic() -> None:
    y = get_task("digits").embedded().y
    a = dirichlet_partition(y, 10, alpha=0.5, seed=1)
    b = dirichlet_partition(y, 10, alpha=0.5, seed=1)
    c = dirichlet_partition(y, 10, alpha=0.5, seed=2)
    assert all(np.array_equal(x, z) for x, z in zip(a, b, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = get_task("digits").embedded().y
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        s = np.mean([label_skew(y, dirichlet_partition(y, 10, alpha=alpha, seed=seed))
                     for seed in range(5)])
        skews.append(s)
    iid = np.mean([label_skew(y, iid_partition(len(y), 10, seed=s)) for s in range(5)])
    assert skews[0] < skews[1] < skews[2]
    # (alpha=100 splits each class near-evenly, so it is even closer to the global
    # label mix than a random IID shuffle is)
    assert iid < skews[1] and iid < 0.1 and skews[2] > 0.5


def test_dirichlet_respects_min_size() -> None:
    y = get_task("digits").embedded().y
    parts = dirichlet_partition(y, 20, alpha=0.05, seed=0, min_partition_size=10)
    assert min(len(p) for p in parts) >= 10


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(np.zeros(10), 2, alpha=0, seed=0)
    with pytest.raises(ValueError, match="Cannot split 3 samples into 4"):
        iid_partition(3, 4, seed=0)
    with pytest.raises(ValueError, match="partitioner must be one of"):
        partition_indices(np.zeros(10), 2, partitioner="zipf", alpha=1, seed=0)
