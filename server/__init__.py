"""Server side: the ServerApp, FedAvg with reply validation, client-level DP, run recording."""

from server.app import build_server_app, run_server
from server.dp import ClientLevelDP
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg
from server.validation import check_train_reply

__all__ = [
    "ClientLevelDP",
    "FedVaultFedAvg",
    "RunRecorder",
    "build_server_app",
    "check_train_reply",
    "run_server",
]
