"""Server side: the ServerApp, FedAvg with reply validation, client-level DP, run recording.
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from server.app import build_server_app, run_server
    from server.client_level_dp import ClientLevelDP
    from server.recorder import RunRecorder
    from server.strategy import FedVaultFedAvg
    from server.validation import parse_plain_update

_EXPORTS: dict[str, str] = {
    "ClientLevelDP": "server.client_level_dp",
    "FedVaultFedAvg": "server.strategy",
    "RunRecorder": "server.recorder",
    "build_server_app": "server.app",
    "parse_plain_update": "server.validation",
    "run_server": "server.app",
}

# (a literal list: linters and type checkers read it)
__all__ = [
    "ClientLevelDP",
    "FedVaultFedAvg",
    "RunRecorder",
    "build_server_app",
    "parse_plain_update",
    "run_server",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
