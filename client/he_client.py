"""The site's side of encrypted aggregation: decrypt the global model, encrypt the update.

The site's secret HE context comes from the federation directory made by
``fedvault provision``: node config ``he-federation`` (and ``site-name``,
``he-passphrase-env`` when the secret is encrypted at rest); a simulated site
uses the run config's ``he-federation`` and its name ``site-<partition-id>``.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context

from fedvault.errors import ConfigError, HEError
from fedvault.tasks import flatten, unflatten
from privacy.federation import load_context
from privacy.he import HEContext
from privacy.noise import UniformSource
from protocols.config import RunSettings
from protocols.he_update import EncryptedGlobal, EncryptedUpdate
from protocols.node_config import NodeConfig


@lru_cache(maxsize=8)
def _context(federation: str, site: str, passphrase_env: str) -> HEContext:
    passphrase = os.environ.get(passphrase_env) if passphrase_env else None
    return load_context(federation, site=site, passphrase=passphrase)


def site_context(settings: RunSettings, node: NodeConfig) -> HEContext:
    """The site's secret context: its own ``he-federation``; a simulated site may use
    the run's (the simulation provisioned it)."""
    federation = node.he_federation or (settings.he_federation if node.simulated else "")
    if not federation:
        raise ConfigError("encrypted aggregation needs node-config 'he-federation' (the "
                          "federation directory this site was given)."
                          if not node.simulated else
                          "encrypted aggregation needs the run's he-federation.")
    if not node.name:
        raise ConfigError("encrypted aggregation needs node-config 'site-name'.")
    return _context(federation, node.name, node.he_passphrase_env or "")


def load_encrypted_global(model: torch.nn.Module, record: ConfigRecord, he: HEContext) -> None:
    """Decrypt the aggregate, divide by the total weight, load it into ``model``."""
    g = EncryptedGlobal.from_record(record)
    if g.fingerprint != he.fingerprint:
        raise HEError("the global model was encrypted under another HE context "
                      "(fingerprint mismatch).")
    mean = he.decrypt_mean(list(g.ciphertexts), num_values=g.num_values, count=g.count)
    model.load_state_dict(unflatten(mean, model.state_dict()), strict=True)


def he_weight(num_examples: int, unit: int, max_weight: int) -> int:
    """FedAvg weight in coarse units: round(examples / unit), clamped to [1, max_weight]."""
    return max(1, min(max_weight, round(num_examples / unit)))


def encrypt_update(model: torch.nn.Module, he: HEContext, *, context: Context,
                   server_round: int, num_examples: int, weight_unit: int,
                   rng: UniformSource | None = None) -> EncryptedUpdate:
    flat = flatten(model.state_dict())
    weight = he_weight(num_examples, weight_unit, he.params.max_weight)
    return EncryptedUpdate(
        scheme=he.params.scheme, fingerprint=he.fingerprint, num_values=len(flat),
        quant_bits=he.params.quant_bits, bound=he.params.bound, weight=weight,
        num_examples=num_examples, run_id=context.run_id, round=server_round,
        node_id=context.node_id, ciphertexts=tuple(he.encrypt(flat, rng, weight=weight)))
