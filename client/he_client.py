"""The site's side of encrypted aggregation: decrypt the global model, encrypt the update.

The site's secret HE context comes from the federation directory made by
``fedvault provision``: node config ``he-federation`` (and ``site-name``,
``he-passphrase-env`` when the secret is encrypted at rest); a simulated site
uses the run config's ``he-federation`` and its name ``site-<partition-id>``.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedvault_tasks.tasks import flatten, unflatten
from privacy.federation import load_context
from privacy.he import HEContext
from privacy.noise import UniformSource
from protocols.config import RunSettings
from protocols.errors import AggregateRefused, ConfigError, HEError
from protocols.he_update import EncryptedGlobal, EncryptedUpdate, he_weight
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


#: where a site keeps, in its Flower node state, the last global model it accepted
LAST_ACCEPTED = "fedvault-he-last-accepted"


def load_encrypted_global(model: torch.nn.Module, record: ConfigRecord, he: HEContext, *,
                          min_sites: int, max_change: float, state: RecordDict | None = None
                          ) -> int:
    """Decrypt the aggregate, check it, load its mean into ``model``; its version (the
    round that formed it). Raises ``AggregateRefused`` (nothing is loaded) when the
    aggregate's verification block disagrees with what the server claims or holds
    fewer than ``min_sites`` sites, when a value is outside the honest range
    (``HEContext.verified_mean``), or when it moved from the last global model this
    site accepted (kept in ``state``) by more than ``max_change`` times that model's
    L2 norm."""
    g = EncryptedGlobal.from_record(record)
    if g.fingerprint != he.fingerprint:
        raise HEError("the global model was encrypted under another HE context "
                      "(fingerprint mismatch).")
    mean = he.verified_mean(list(g.ciphertexts), num_values=g.num_values, count=g.count,
                            sites=g.sites, min_sites=min_sites, scale=g.weight_scale)
    if state is not None and max_change > 0 and LAST_ACCEPTED in state.array_records:
        last = state.array_records[LAST_ACCEPTED]["flat"].numpy()
        if last.shape == mean.shape:
            moved = float(np.linalg.norm(mean - last))
            allowed = max_change * max(float(np.linalg.norm(last)), 1.0)
            if moved > allowed:
                raise AggregateRefused(
                    f"the global model moved by {moved:.4g} (L2) from the last one this site "
                    f"accepted; at most {allowed:.4g} is allowed (he-max-change {max_change})")
    model.load_state_dict(unflatten(mean, model.state_dict()), strict=True)
    remember_global(state, mean)
    return g.round


def remember_global(state: RecordDict | None, flat: np.ndarray) -> None:
    """Keep ``flat`` as the last global model this site accepted (for the next check)."""
    if state is not None:
        state[LAST_ACCEPTED] = ArrayRecord({"flat": Array(np.asarray(flat, np.float64))})


def encrypt_update(model: torch.nn.Module, he: HEContext, *, context: Context,
                   server_round: int, num_examples: int, weight_scale: int,
                   rng: UniformSource | None = None) -> EncryptedUpdate:
    """Encrypt the trained model at the round's weight scale (announced by the server
    in the config as ``he-weight-scale``; refused if impossible for this context)."""
    if not 1 <= weight_scale <= he.params.max_weight:
        raise HEError(f"the server announced weight scale {weight_scale}; this federation's "
                      f"HE parameters allow [1, {he.params.max_weight}].")
    flat = flatten(model.state_dict())
    weight = he_weight(num_examples, weight_scale)
    return EncryptedUpdate(
        scheme=he.params.scheme, fingerprint=he.fingerprint, num_values=len(flat),
        quant_bits=he.params.quant_bits, bound=he.params.bound, weight=weight,
        weight_scale=weight_scale, num_examples=num_examples, run_id=context.run_id,
        round=server_round, node_id=context.node_id,
        ciphertexts=tuple(he.encrypt(flat, rng, weight=weight, scale=weight_scale)))
