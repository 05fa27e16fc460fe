"""Release of a model trained with encrypted aggregation: ``fedvault model decrypt``.

A key holder (a site, with the shared secret context) turns a stored encrypted
version of the global model into a plaintext PyTorch state dict. Every release
is recorded in the run's hash-chained ``releases.jsonl``: when, which round,
which site's key, the HE fingerprint, where the plaintext went and its SHA-256.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedvault_tasks.tasks import get_task, unflatten
from privacy.federation import load_context
from protocols.config import RunSettings
from protocols.errors import ConfigError, HEError
from protocols.hashchain import HashChainLog
from protocols.he_update import ciphertexts_of, is_encrypted, scale_of, sites_of
from protocols.run_events import ReleaseEvent
from protocols.rundir import RunDirectory

RELEASES = "releases.jsonl"


def latest_encrypted_round(run: RunDirectory) -> int:
    rounds = sorted(int(p.stem.split("-")[1]) for p in run.models.glob("round-*.pt"))
    for r in reversed(rounds):
        meta = run.model_path(r).with_suffix(".json")
        if meta.exists() and json.loads(meta.read_text()).get("encrypted"):
            return r
    raise ConfigError(f"{run.root} holds no encrypted model version.")


def decrypt_model(run_dir: str | Path, *, federation: str | Path, site: str,
                  server_round: int | None = None, out: str | Path | None = None,
                  passphrase: str | None = None) -> dict[str, Any]:
    run = RunDirectory(Path(run_dir))
    if not run.run_json.exists():
        raise ConfigError(f"{run.root} is not a run directory (no run.json).")
    info = json.loads(run.run_json.read_text())
    settings = RunSettings.from_config(info["settings"])
    rnd = server_round if server_round is not None else latest_encrypted_round(run)
    path = run.model_path(rnd)
    if not path.exists():
        raise ConfigError(f"{run.root} has no model for round {rnd}.")
    stored = ArrayRecord(torch_state_dict=torch.load(path, map_location="cpu",
                                                     weights_only=True))
    if not is_encrypted(stored):
        raise ConfigError(f"the round-{rnd} model is not encrypted: nothing to decrypt.")
    he = load_context(federation, site=site, passphrase=passphrase)
    if not he.has_secret_key:
        raise HEError(f"{site}'s context holds no secret key.")
    cts, count, _ = ciphertexts_of(stored)
    sites = sites_of(stored)
    task = get_task(settings.task)
    model = task.build_model(num_features=settings.num_features, num_classes=settings.num_classes)
    template = model.state_dict()
    n = sum(int(t.numel()) for t in template.values())
    if sites is None:
        raise HEError(f"the round-{rnd} model records no site count (written by an older "
                      "fedvault): it cannot be verified, so it is not released.")
    # the same check a site makes before training on it: a corrupted aggregate (raw
    # slots, a weight lie, a single update) is refused here too (AggregateRefused)
    mean = he.verified_mean(cts, num_values=n, count=count, sites=sites,
                            min_sites=settings.min_sites, scale=scale_of(stored))
    plain = unflatten(mean, template)
    model.load_state_dict(plain, strict=True)
    target = Path(out) if out else run.root / f"model-round-{rnd:04d}.plaintext.pt"
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buf.getvalue())
    entry = HashChainLog(run.root / RELEASES).append(
        ReleaseEvent.MODEL_DECRYPTED, round=rnd, site=site, he_fingerprint=he.fingerprint,
        sites_in_aggregate=sites, total_weight=count, output=str(target.resolve()),
        output_sha256=hashlib.sha256(buf.getvalue()).hexdigest(), by=getpass.getuser())
    return entry
