"""fedvault: privacy-preserving federated learning on Flower.

The distribution ships several top-level packages laid out as a Flower App
(see ``../shared/DESIGN.md``): ``server`` (ServerApp), ``client`` (ClientApp),
``privacy``, ``protocols`` and ``simulations``. This package holds what fits
none of them: the built-in tasks, the run directory, the ``fedvault`` command
line and the exception hierarchy.
"""

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
