"""fedvault: privacy-preserving federated learning on Flower.

The distribution ships its layers as top-level packages of a Flower App, each
importing only the ones below it (``docs/explanation/architecture.md``):
``fedvault`` (this roof: the command line, the rehearsal, the data owner's node
tooling, compliance reports, process supervision) → ``simulations`` →
``server`` (ServerApp) | ``client`` (ClientApp) → ``privacy`` | ``fedvault_tasks``
(built-in tasks, models, embedded data, partitioning) → ``protocols`` (wire
formats, configuration and the base modules: errors, names, the run directory).
The exception hierarchy (:mod:`protocols.errors`) is re-exported here.
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports
from protocols.rundir import fedvault_version

if TYPE_CHECKING:
    from protocols.errors import (
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

__version__ = fedvault_version()

_EXPORTS: dict[str, str] = {
    "ConfigError": "protocols.errors",
    "DataError": "protocols.errors",
    "DeploymentError": "protocols.errors",
    "FedvaultError": "protocols.errors",
    "HEError": "protocols.errors",
    "IntegrityError": "protocols.errors",
    "PrivacyRefused": "protocols.errors",
    "TaskError": "protocols.errors",
    "UpdateRejected": "protocols.errors",
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
