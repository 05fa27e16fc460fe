"""Client side: the ClientApp, site data and fingerprints, the budget guard, DP-SGD.

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.app import build_client_app
    from client.budget import SitePolicy, site_policy
    from client.data import fingerprint, load_table, save_table
    from client.dp import DPPlan, plan_round, train_dp
    from client.site import SiteData, resolve_site_data
    from client.training import evaluate, train_local

_EXPORTS: dict[str, str] = {
    "DPPlan": "client.dp",
    "SiteData": "client.site",
    "SitePolicy": "client.budget",
    "build_client_app": "client.app",
    "evaluate": "client.training",
    "fingerprint": "client.data",
    "load_table": "client.data",
    "plan_round": "client.dp",
    "resolve_site_data": "client.site",
    "save_table": "client.data",
    "site_policy": "client.budget",
    "train_dp": "client.dp",
    "train_local": "client.training",
}

__all__ = [
    "DPPlan",
    "SiteData",
    "SitePolicy",
    "build_client_app",
    "evaluate",
    "fingerprint",
    "load_table",
    "plan_round",
    "resolve_site_data",
    "save_table",
    "site_policy",
    "train_dp",
    "train_local",
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
