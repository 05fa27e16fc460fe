"""Server side: the ServerApp, FedAvg with reply validation, client-level DP, run recording.

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import build_server_app, run_server
    from server.dp import ClientLevelDP
    from server.recorder import RunRecorder
    from server.strategy import FedVaultFedAvg
    from server.validation import check_train_reply

_EXPORTS: dict[str, str] = {
    "ClientLevelDP": "server.dp",
    "FedVaultFedAvg": "server.strategy",
    "RunRecorder": "server.recorder",
    "build_server_app": "server.app",
    "check_train_reply": "server.validation",
    "run_server": "server.app",
}

__all__ = [
    "ClientLevelDP",
    "FedVaultFedAvg",
    "RunRecorder",
    "build_server_app",
    "check_train_reply",
    "run_server",
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
