"""Client side: the ClientApp, site data and fingerprints, the budget guard, DP-SGD.
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from client.app import build_client_app
    from client.budget import SitePolicy, site_policy
    from client.data import load_table, save_table, table_fingerprint
    from client.dp_sgd import DPPlan, plan_round, train_dp
    from client.site_data import SiteData, resolve_site_data
    from client.training import train_local
    from fedvault_tasks.tasks import evaluate

_EXPORTS: dict[str, str] = {
    "DPPlan": "client.dp_sgd",
    "SiteData": "client.site_data",
    "SitePolicy": "client.budget",
    "build_client_app": "client.app",
    "evaluate": "fedvault_tasks.tasks",
    "table_fingerprint": "client.data",
    "load_table": "client.data",
    "plan_round": "client.dp_sgd",
    "resolve_site_data": "client.site_data",
    "save_table": "client.data",
    "site_policy": "client.budget",
    "train_dp": "client.dp_sgd",
    "train_local": "client.training",
}

# (a literal list: linters and type checkers read it)
__all__ = [
    "DPPlan",
    "SiteData",
    "SitePolicy",
    "build_client_app",
    "evaluate",
    "load_table",
    "plan_round",
    "resolve_site_data",
    "save_table",
    "site_policy",
    "table_fingerprint",
    "train_dp",
    "train_local",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
