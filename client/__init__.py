"""Client side: the ClientApp, site data and fingerprints, the budget guard, DP-SGD."""

from client.app import build_client_app
from client.budget import SitePolicy, site_policy
from client.data import fingerprint, load_table, save_table
from client.dp import DPPlan, plan_round, train_dp
from client.site import SiteData, resolve_site_data
from client.training import evaluate, train_local

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
