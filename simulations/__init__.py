"""Simulation of multi-site federations on Flower's Simulation Engine (Ray).
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from fedvault_tasks.partition import (
        dirichlet_partition,
        iid_partition,
        label_skew,
        partition_indices,
    )

_EXPORTS: dict[str, str] = {
    "dirichlet_partition": "fedvault_tasks.partition",
    "iid_partition": "fedvault_tasks.partition",
    "label_skew": "fedvault_tasks.partition",
    "partition_indices": "fedvault_tasks.partition",
}

# (a literal list: linters and type checkers read it)
__all__ = [
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "partition_indices",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
