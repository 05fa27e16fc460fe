"""Simulation of multi-site federations on Flower's Simulation Engine (Ray).

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedvault.partition import dirichlet_partition, iid_partition, label_skew, partition_indices

_EXPORTS: dict[str, str] = {
    "dirichlet_partition": "fedvault.partition",
    "iid_partition": "fedvault.partition",
    "label_skew": "fedvault.partition",
    "partition_indices": "fedvault.partition",
}

__all__ = [
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "partition_indices",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
