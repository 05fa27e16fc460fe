"""Partitioning one dataset across simulated sites (a base module: the simulated
ClientApp, the runner, the rehearsal and the scenario compiler all partition the
same way, so it sits below all of them).

``flwr-datasets`` has IID and Dirichlet partitioners, but they work on Hugging
Face ``datasets`` objects and would pull that stack in for an 1,800-row array;
these are the same algorithms on NumPy label arrays, pure and seeded.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols.errors import ConfigError
from protocols.names import Partitioner, site_name, values
from protocols.rundir import load_json_cached

PARTITIONERS = values(Partitioner)


class PartitionError(ConfigError):
    """The data cannot be partitioned as asked; ``site`` is the index of the first
    site left without data (``None`` when no single site is to blame)."""

    def __init__(self, reason: str, *, site: int | None = None) -> None:
        super().__init__(reason if site is None else f"site {site} {reason}")
        self.reason = reason
        self.site = site


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
    if partitioner == Partitioner.IID:
        return iid_partition(len(labels), num_partitions, seed=seed)
    if partitioner == Partitioner.DIRICHLET:
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


def site_partition(
    labels: np.ndarray,
    *,
    kinds: list[str],
    alphas: np.ndarray,
    quantities: np.ndarray,
    allowed: list[tuple[int, ...]],
    seed: int,
    min_partition_size: int = 10,
) -> np.ndarray:
    """Owner site of every sample, for sites that each have their own partition spec.

    Site ``k`` is ``iid`` or ``dirichlet`` (``kinds[k]``, concentration
    ``alphas[k]``), has a relative size ``quantities[k]`` (quantity skew) and may
    hold only the labels in ``allowed[k]`` (empty = any). For each class ``c``
    the eligible sites share its samples in proportions ``q_k * g_k``, where
    ``g_k = 1`` for an IID site and ``g_k ~ Gamma(alpha_k, 1/alpha_k)`` (mean 1)
    for a Dirichlet site: when every site is Dirichlet with one alpha and equal
    quantity, the proportions are exactly Dirichlet(alpha) (Hsu, Qi & Brown 2019,
    arXiv:1909.06335); IID sites get their expected share.

    Every sample has exactly one owner. Sites below ``min_partition_size`` (lowered
    to what the data allows) take samples of labels they may hold from the largest
    sites. Returns an ``int64`` array of site indices, one per sample: memory grows
    with the data, not with the number of sites.
    """
    labels = np.asarray(labels)
    n_sites = len(kinds)
    _check(len(labels), n_sites)
    if not (len(alphas) == len(quantities) == len(allowed) == n_sites):
        raise ValueError("kinds, alphas, quantities and allowed must have one entry per site.")
    rng = np.random.default_rng(seed)
    owners = np.full(len(labels), -1, dtype=np.int64)
    allowed_sets = [set(a) for a in allowed]
    dirichlet = np.array([k == "dirichlet" for k in kinds])
    for c in np.unique(labels):
        eligible = np.array([not a or int(c) in a for a in allowed_sets])
        if not eligible.any():
            raise PartitionError(f"no site may hold label {int(c)}: every sample needs an "
                                 "owner.")
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        g = np.ones(n_sites)
        if dirichlet.any():
            a = alphas[dirichlet]
            g[dirichlet] = rng.gamma(a, 1.0 / a)
        w = np.where(eligible, quantities * g, 0.0)
        if w.sum() <= 0:  # every eligible Dirichlet draw underflowed: share equally
            w = eligible.astype(float)
        cuts = (np.cumsum(w / w.sum())[:-1] * len(idx)).round().astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            owners[chunk] = k
    _fill_small(owners, labels, allowed_sets,
                min(min_partition_size, len(labels) // n_sites), n_sites)
    return owners


def _fill_small(owners: np.ndarray, labels: np.ndarray, allowed: list[set[int]],
                min_size: int, n_sites: int) -> None:
    """Move samples from sites above ``min_size`` to sites below it (in place).

    Label-restricted sites go first, the most restricted first, so that a site that
    may take any label never takes the last sample another one could use. A donor
    only ever shrinks and a filled site stops at exactly ``min_size``, so a sample
    once unusable stays unusable: one forward pointer per label serves all the
    restricted sites, and a heap of donor sizes the others. Total work is
    O(samples log samples + moves log sites). Raises ``PartitionError`` naming the first
    site left without any sample."""
    sizes = np.bincount(owners, minlength=n_sites)
    needy = [int(k) for k in np.flatnonzero(sizes < min_size)]
    if not needy:
        return
    restricted = sorted((k for k in needy if allowed[k]), key=lambda k: (len(allowed[k]), k))
    free = [k for k in needy if not allowed[k]]

    by_label_order = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_label_order]
    by_label: dict[int, list[int]] = {}
    ptr: dict[int, int] = {}
    for c in np.unique(labels):
        lo = int(np.searchsorted(sorted_labels, c, side="left"))
        hi = int(np.searchsorted(sorted_labels, c, side="right"))
        by_label[int(c)] = by_label_order[lo:hi].tolist()
        ptr[int(c)] = 0

    def usable(i: int, k: int) -> bool:
        d = owners[i]
        return d != k and sizes[d] > min_size

    for k in restricted:
        labels_k = sorted(c for c in allowed[k] if c in by_label)
        while sizes[k] < min_size and labels_k:
            for c in list(labels_k):  # round-robin over the site's labels
                lst = by_label[c]
                while ptr[c] < len(lst) and not usable(lst[ptr[c]], k):
                    ptr[c] += 1
                if ptr[c] == len(lst):
                    labels_k.remove(c)  # no donor left for this label
                    continue
                i = lst[ptr[c]]
                ptr[c] += 1
                sizes[owners[i]] -= 1
                owners[i] = k
                sizes[k] += 1
                if sizes[k] >= min_size:
                    break

    order = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[order], np.arange(n_sites + 1))
    members = {int(k): order[bounds[k]:bounds[k + 1]].tolist() for k in range(n_sites)}
    heap = [(-int(sizes[k]), int(k)) for k in range(n_sites) if sizes[k] > min_size]
    heapq.heapify(heap)
    for k in free:
        while sizes[k] < min_size and heap:
            neg, d = heapq.heappop(heap)
            if -neg != sizes[d]:  # stale entry: push back with its current size
                if sizes[d] > min_size:
                    heapq.heappush(heap, (-int(sizes[d]), d))
                continue
            i = members[d].pop()
            owners[i] = k
            sizes[d] -= 1
            sizes[k] += 1
            if sizes[d] > min_size:
                heapq.heappush(heap, (-int(sizes[d]), d))
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise PartitionError(f"(and {len(empty) - 1} more) would hold no data: too few "
                             "samples of the labels it may hold", site=int(empty[0]))


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionPlan:
    """How a scenario's sites share the federated pool, one entry per site: the
    compiled form of a scenario's ``[data]`` and ``[[sites]]`` tables that the
    simulated ClientApps read from ``RUN_DIR/scenario.json``."""

    kinds: tuple[str, ...]
    alphas: tuple[float, ...]
    quantities: tuple[float, ...]
    allowed: tuple[tuple[int, ...], ...]
    groups: tuple[str, ...]
    quantity_skew: float = 0.0

    @property
    def num_sites(self) -> int:
        return len(self.kinds)

    def owners(self, labels: np.ndarray, *, seed: int) -> np.ndarray:
        """Owner site of every sample of the pool (see :func:`site_partition`)."""
        quantities = np.asarray(self.quantities, dtype=float)
        if self.quantity_skew > 0:
            rng = np.random.default_rng([seed, 0x5157])
            quantities = quantities * rng.lognormal(0.0, self.quantity_skew,
                                                    size=len(quantities))
        try:
            return site_partition(labels, kinds=list(self.kinds),
                                  alphas=np.asarray(self.alphas, dtype=float),
                                  quantities=quantities, allowed=list(self.allowed), seed=seed)
        except PartitionError as exc:
            msg = str(exc) if exc.site is None else \
                f"{site_name(exc.site)} of group {self.groups[exc.site]!r} {exc.reason}"
            err = PartitionError(f"cannot partition the data: {msg}")
            err.site = exc.site
            raise err from None

    def to_json(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "alphas": list(self.alphas),
                "quantities": list(self.quantities),
                "allowed": [list(a) for a in self.allowed], "groups": list(self.groups),
                "quantity_skew": self.quantity_skew}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PartitionPlan:
        return cls(kinds=tuple(d["kinds"]), alphas=tuple(float(a) for a in d["alphas"]),
                   quantities=tuple(float(q) for q in d["quantities"]),
                   allowed=tuple(tuple(int(c) for c in a) for a in d["allowed"]),
                   groups=tuple(d["groups"]), quantity_skew=float(d["quantity_skew"]))


def load_plan(path: str) -> PartitionPlan:
    """The partition plan of a compiled scenario (``RUN_DIR/scenario.json``), cached
    per process for as long as the file is unchanged."""
    return load_json_cached(path, _plan_of, what="the partition plan of the run's scenario")


def _plan_of(doc: dict[str, Any]) -> PartitionPlan:
    return PartitionPlan.from_json(doc["partition"])
