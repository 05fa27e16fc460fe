"""The one exception hierarchy of fedvault.

::

    FedvaultError                  every error fedvault raises on purpose
    ├── ConfigError                a run config, node config or CLI option is invalid
    ├── TaskError                  unknown task, or a model/data shape mismatch
    ├── DataError                  a site's data cannot be loaded or is malformed
    ├── IntegrityError             a hash-chained record fails verification
    ├── UpdateRejected             a site's reply is invalid; recorded for that
    │                              site, never a crashed round
    ├── HEError                    an HE operation failed: unparsable ciphertext,
    │                              wrong context, missing secret key (TenSEAL errors
    │                              are mapped here)
    ├── PrivacyRefused             a site refuses to train: the round would exceed its
    │                              privacy budget, or the server asks for weaker privacy
    └── DeploymentError            a SuperLink/SuperNode process failed to start or died

Errors from third-party libraries (Flower, gRPC, TenSEAL, torch) are mapped into
this hierarchy with ``raise ... from exc`` where they cross a fedvault API. The
command line prints ``error: <message>`` for any ``FedvaultError`` and exits
with status 2, never a traceback.
"""

from __future__ import annotations


class FedvaultError(Exception):
    """Base class of every error fedvault raises on purpose."""


class ConfigError(FedvaultError, ValueError):
    """A run config, node config or command-line option is invalid."""


class TaskError(FedvaultError, ValueError):
    """Unknown task name, or data/model shapes that do not fit the task."""


class DataError(FedvaultError):
    """A site's data cannot be loaded: missing file, bad format, missing label column."""


class IntegrityError(FedvaultError):
    """A hash-chained log (events, privacy ledger, audit trail) fails verification."""


class UpdateRejected(FedvaultError):
    """A site's reply failed validation; the round goes on without it."""


class HEError(FedvaultError):
    """An HE operation failed: unparsable ciphertext, wrong context, missing secret key."""


class PrivacyRefused(FedvaultError):
    """A site refuses a round: its budget would be exceeded or the privacy asked
    for is weaker than the site allows. The site trains nothing."""


class DeploymentError(FedvaultError):
    """A SuperLink or SuperNode process failed to start, or died during a run."""
