"""fedvault: privacy-preserving federated learning on Flower.

The distribution ships several top-level packages laid out as a Flower App
(see ``../shared/DESIGN.md``): ``server`` (ServerApp), ``client`` (ClientApp),
``privacy``, ``protocols`` and ``simulations``. This package holds what fits
none of them: the built-in tasks, the run directory, the ``fedvault`` command
line and the exception hierarchy.

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedvault.errors import (
        ConfigError,
        DataError,
        DeploymentError,
        FedvaultError,
        HEError,
        IntegrityError,
        PrivacyRefused,
        TaskError,
        UpdateRejected,
    )

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ConfigError": "fedvault.errors",
    "DataError": "fedvault.errors",
    "DeploymentError": "fedvault.errors",
    "FedvaultError": "fedvault.errors",
    "HEError": "fedvault.errors",
    "IntegrityError": "fedvault.errors",
    "PrivacyRefused": "fedvault.errors",
    "TaskError": "fedvault.errors",
    "UpdateRejected": "fedvault.errors",
}

__all__ = [
    "ConfigError",
    "DataError",
    "DeploymentError",
    "FedvaultError",
    "HEError",
    "IntegrityError",
    "PrivacyRefused",
    "TaskError",
    "UpdateRejected",
    "__version__",
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
