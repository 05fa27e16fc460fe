"""Client side: the ClientApp, site data loading and fingerprinting, local training."""

from client.app import build_client_app
from client.data import fingerprint, load_table, save_table
from client.site import SiteData, resolve_site_data
from client.training import evaluate, train_local

__all__ = [
    "SiteData",
    "build_client_app",
    "evaluate",
    "fingerprint",
    "load_table",
    "resolve_site_data",
    "save_table",
    "train_local",
]
