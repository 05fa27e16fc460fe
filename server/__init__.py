"""Server side: the ServerApp, the FedAvg strategy with reply validation, run recording."""

from server.app import build_server_app, run_server
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg
from server.validation import check_train_reply

__all__ = ["FedVaultFedAvg", "RunRecorder", "build_server_app", "check_train_reply", "run_server"]
