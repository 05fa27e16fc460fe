"""fedvault: privacy-preserving federated learning on Flower.

The distribution ships several top-level packages laid out as a Flower App
(see ``../shared/DESIGN.md``): ``server`` (ServerApp), ``client`` (ClientApp),
``privacy``, ``protocols`` and ``simulations``. This package holds what fits
none of them: the built-in tasks, the run directory, the ``fedvault`` command
line and the exception hierarchy.
Public names are imported on first use (:mod:`fedvault.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedvault.lazy import lazy_exports

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

# (a literal list: linters and type checkers read it)
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
