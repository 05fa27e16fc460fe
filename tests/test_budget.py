"""Budget enforcement at the site, checked against an independent accountant."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from fedvault_tasks.tasks import get_task
from protocols.config import RunSettings
from protocols.hashchain import read_chain
from tests.test_accountants import pld_epsilon

pytestmark = pytest.mark.usefixtures("flower_identity")


def _round(app: object, tmp_path: Path, r: int, **settings: object) -> Message:
    torch.manual_seed(0)
    arrays = ArrayRecord(get_task("digits").build_model().state_dict())
    msg = Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": r, "local-epochs": 1, "batch-size": 64, "learning-rate": 0.1})}),
        dst_node_id=5, message_type="train")
    ctx = Context(run_id=99, node_id=5, node_config={"partition-id": 1, "num-partitions": 4},
                  state=RecordDict(),
                  run_config=RunSettings(run_dir=str(tmp_path), **settings).to_config())  # type: ignore[arg-type]
    return app(msg, ctx)  # type: ignore[operator]


def test_site_stops_exactly_when_the_next_round_would_exceed(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    # Round 1 tells this site's per-round mechanism (its split is its own keyed hash);
    # then the limit is set half-way between the epsilon after 3 and after 4 rounds
    # (by the PLD oracle).
    probe = _round(app, tmp_path / "run", 1, noise_multiplier=1.5, site_max_epsilon=1000.0)
    p = probe.content.config_records["privacy"]
    sigma, q, steps = float(p["noise-multiplier"]), float(p["sample-rate"]), int(p["steps"])  # type: ignore[arg-type]
    from privacy.events import SubsampledGaussianEvent as E

    def oracle(k: int) -> float:
        return pld_epsilon([E(noise_multiplier=sigma, sample_rate=q, steps=steps * k)], 1e-5)

    limit = (oracle(3) + oracle(4)) / 2
    trained, refused_at = 1, None
    for r in range(2, 8):
        reply = _round(app, tmp_path / "run", r, noise_multiplier=1.5, site_max_epsilon=limit)
        if "refusal" in reply.content.config_records:
            refused_at = r
            reason = str(reply.content.config_records["refusal"]["reason"])
            # the server hears that the limit would be passed, never the scope's
            # cumulative epsilon (the ledger keeps that, below)
            assert f"past the site's limit {limit:g}" in reason
            assert "has spent epsilon" not in reason
            break
        trained += 1
    assert trained == 3 and refused_at == 4
    entries = read_chain(tmp_path / "run" / "ledgers" / "site-1.jsonl")
    res = [e for e in entries if e["kind"] == "reservation"]
    assert res[-1]["epsilon_after"] <= limit
    assert res[-1]["epsilon_after"] == pytest.approx(oracle(3), rel=0.01)
    ref = next(e for e in entries if e["kind"] == "refusal")
    assert "has spent epsilon" in ref["reason"] and f"> limit {limit:g}" in ref["reason"]
    assert ref["epsilon_requested"] > limit
    assert ref["epsilon_requested"] == pytest.approx(oracle(4), rel=0.01)
