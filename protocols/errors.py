"""The one exception hierarchy of fedvault.

::

    FedvaultError                  every error fedvault raises on purpose (never raised
    │                              itself: only its leaves are)
    ├── ConfigError                a run config, node config or CLI option is invalid
    │   │                          (.key: the offending key or option, when there is one)
    │   └── PartitionError         (fedvault_tasks.partition) the data cannot be partitioned
    │                              as asked (.site: the first site left without data)
    ├── TaskError                  unknown task, or a model/data shape mismatch
    ├── DataError                  a site's data cannot be loaded or is malformed
    ├── IntegrityError             a hash-chained record fails verification
    │                              (.path, .defect: torn | tampered | unanchored | schema)
    ├── UpdateRejected             a site's reply is invalid; recorded for that site,
    │                              never a crashed round (.node_id)
    ├── HEError                    an HE operation failed: unparsable ciphertext, wrong
    │                              context, missing secret key (TenSEAL errors mapped here)
    ├── AggregateRefused           a site refuses a decrypted global model: its
    │                              verification block or values show it is not an honest
    │                              aggregate, or it moved too far (.reason)
    ├── PrivacyRefused             a site refuses to train: the round would exceed its
    │                              budget, or the server asks for weaker privacy (.scope,
    │                              .dataset, .epsilon_spent, .epsilon_requested, .limit,
    │                              .delta: what the refusal reply carries, not recomputed)
    ├── SimulationError            a simulated federation could not run to the end
    └── DeploymentError            a SuperLink/SuperNode process failed to start or died
                                   (.process, .returncode)

Errors from third-party libraries (Flower, gRPC, TenSEAL, torch) are mapped into
this hierarchy with ``raise ... from exc`` where they cross a fedvault API. Like
httpx's and dp_accounting's exceptions, each carries the values its handler needs
as attributes, so no caller parses a message. The command line prints
``error: <message>`` for any ``FedvaultError`` and exits with status 2; any other
exception is a bug: one ``error: unexpected ...`` line and exit status 3, with the
traceback under ``fedvault --debug`` (or ``FEDVAULT_DEBUG=1``).
"""

from __future__ import annotations

from typing import Literal

#: what is wrong with a hash-chained file
Defect = Literal["torn", "tampered", "unanchored", "schema"]


class FedvaultError(Exception):
    """Base class of every error fedvault raises on purpose (only leaves are raised)."""


class ConfigError(FedvaultError, ValueError):
    """A run config, node config or command-line option is invalid."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class TaskError(FedvaultError, ValueError):
    """Unknown task name, or data/model shapes that do not fit the task."""


class DataError(FedvaultError):
    """A site's data cannot be loaded: missing file, bad format, missing label column."""


class IntegrityError(FedvaultError):
    """A hash-chained log (events, privacy ledger, audit trail) fails verification."""

    def __init__(self, message: str, *, path: str | None = None,
                 defect: Defect | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.defect = defect


class UpdateRejected(FedvaultError):
    """A site's reply failed validation; the round goes on without it."""

    def __init__(self, reason: str, *, node_id: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.node_id = node_id


class HEError(FedvaultError):
    """An HE operation failed: unparsable ciphertext, wrong context, missing secret key."""


class AggregateRefused(FedvaultError):
    """A site refuses the encrypted global model it decrypted (``privacy.he.HEContext
    .verified_mean``, ``client.he_client``): nothing is trained on or released from it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PrivacyRefused(FedvaultError):
    """A site refuses a round: its budget would be exceeded or the privacy asked
    for is weaker than the site allows. The site trains nothing.

    ``epsilon_spent`` is the scope's epsilon before the round and
    ``epsilon_requested`` what the round would bring it to (``None`` when the refusal
    is not about the budget), both at ``delta``, against ``limit``."""

    def __init__(self, reason: str, *, scope: str | None = None, dataset: str | None = None,
                 epsilon_spent: float | None = None, epsilon_requested: float | None = None,
                 limit: float | None = None, delta: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scope = scope
        self.dataset = dataset
        self.epsilon_spent = epsilon_spent
        self.epsilon_requested = epsilon_requested
        self.limit = limit
        self.delta = delta


class SimulationError(FedvaultError):
    """A simulated federation could not run to the end (the engine failed, sites did
    not join, the ServerApp left no summary)."""


class DeploymentError(FedvaultError):
    """A SuperLink or SuperNode process failed to start, or died during a run."""

    def __init__(self, message: str, *, process: str | None = None,
                 returncode: int | None = None) -> None:
        super().__init__(message)
        self.process = process
        self.returncode = returncode
