"""The real ClientApp, called the way Flower's runtime calls it (real Opacus, real files)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.data import save_table
from fedvault.errors import ConfigError, DataError
from fedvault.tasks import get_task
from privacy.ledger import PrivacyLedger
from protocols.config import RunSettings
from protocols.hashchain import read_chain, verify_chain

pytestmark = pytest.mark.usefixtures("flower_identity")


def _global(task: str = "digits") -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(get_task(task).build_model().state_dict())


def _msg(kind: str, arrays: ArrayRecord, server_round: int = 1, epochs: int = 1) -> Message:
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": server_round, "local-epochs": epochs, "batch-size": 64,
         "learning-rate": 0.1, "momentum": 0.9})}), dst_node_id=11, message_type=kind)


def _ctx(node_config: dict[str, Any], run_config: dict[str, Any]) -> Context:
    return Context(run_id=4242, node_id=11, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def _run(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return dict(RunSettings(run_dir=str(tmp_path / "run"), **changes).to_config())


SIM = {"partition-id": 0, "num-partitions": 3}


def _site_csv(tmp_path: Path, rows: int = 120) -> Path:
    t = get_task("tabular").embedded().subset(np.arange(rows))
    return save_table(t, tmp_path / "site.csv", label_column="y")


def test_dp_train_and_evaluate_on_a_partition(tmp_path: Path) -> None:
    app = build_client_app()
    g = _global()
    reply = app(_msg("train", g), _ctx(SIM, _run(tmp_path)))
    assert not reply.has_error() and "refusal" not in reply.content.config_records
    new = reply.content.array_records["arrays"]
    assert list(new.keys()) == list(g.keys())
    assert all(not np.array_equal(new[k].numpy(), g[k].numpy()) for k in g)
    privacy = reply.content.config_records["privacy"]
    assert 0 < float(privacy["epsilon"]) <= 8.0 and privacy["site"] == "site-0"  # type: ignore[arg-type]

    ledger = tmp_path / "run" / "ledgers" / "site-0.jsonl"
    assert stat.S_IMODE(os.stat(ledger).st_mode) == 0o600
    assert verify_chain(ledger).ok
    kinds = [e["kind"] for e in read_chain(ledger)]
    assert kinds == ["dataset_registered", "reservation", "completed"]

    ev = app(_msg("evaluate", new), _ctx(SIM, _run(tmp_path)))
    assert 0.0 <= float(ev.content.metric_records["metrics"]["eval-acc"]) <= 1.0  # type: ignore[arg-type]


def test_training_is_deterministic_without_secure_mode(tmp_path: Path) -> None:
    app = build_client_app()
    outs = []
    for name in ("a", "b"):
        r = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path / name, secure_mode=False)))
        outs.append(r.content.array_records["arrays"])
    assert all(np.array_equal(outs[0][k].numpy(), outs[1][k].numpy()) for k in outs[0])


def test_secure_mode_noise_is_not_reproducible(tmp_path: Path) -> None:
    app = build_client_app()
    outs = []
    for name in ("a", "b"):
        r = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path / name)))
        outs.append(r.content.array_records["arrays"])
    assert not all(np.array_equal(outs[0][k].numpy(), outs[1][k].numpy()) for k in outs[0])


def test_site_with_own_csv_and_node_policy(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    ledger = tmp_path / "site-ledger.jsonl"
    app = build_client_app()
    ctx = _ctx({"data-path": str(p), "label-column": "y", "ledger-path": str(ledger),
                "max-epsilon": 9.0}, _run(tmp_path, task="tabular"))
    reply = app(_msg("train", _global("tabular")), ctx)
    assert int(reply.content.metric_records["metrics"]["num-examples"]) == 96  # type: ignore[arg-type]
    res = [e for e in read_chain(ledger) if e["kind"] == "reservation"]
    assert res[0]["epsilon_limit"] == 9.0 and res[0]["delta"] == 1e-5


def test_real_site_ignores_the_runs_site_limits(tmp_path: Path) -> None:
    """site-max-epsilon in the run config plays *simulated* data owners only."""
    p = _site_csv(tmp_path)
    ledger = tmp_path / "l.jsonl"
    app = build_client_app()
    ctx = _ctx({"data-path": str(p), "label-column": "y", "ledger-path": str(ledger)},
               _run(tmp_path, task="tabular", site_max_epsilon=1000.0))
    app(_msg("train", _global("tabular")), ctx)
    res = [e for e in read_chain(ledger) if e["kind"] == "reservation"]
    assert res[0]["epsilon_limit"] == 10.0  # the documented default, not the server's 1000


def _refusal(reply: Message) -> dict[str, Any]:
    assert "refusal" in reply.content.config_records, reply.content
    assert "arrays" not in reply.content.array_records
    return dict(reply.content.config_records["refusal"])


def test_weaker_noise_than_the_site_minimum_is_refused(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _ctx({**SIM, "min-noise-multiplier": 0.8}, _run(tmp_path, noise_multiplier=0.5))
    r = _refusal(app(_msg("train", _global()), ctx))
    assert "noise multiplier 0.5 is below this site's minimum 0.8" in r["reason"]
    kinds = [e["kind"] for e in read_chain(tmp_path / "run" / "ledgers" / "site-0.jsonl")]
    assert "refusal" in kinds and "reservation" not in kinds


def test_larger_delta_than_the_site_allows_is_refused(tmp_path: Path) -> None:
    app = build_client_app()
    ctx = _ctx({**SIM, "delta": 1e-6}, _run(tmp_path, dp_delta=1e-5))
    assert "above this site's delta" in _refusal(app(_msg("train", _global()), ctx))["reason"]


def test_no_dp_is_refused_by_a_real_site(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    ctx = _ctx({"data-path": str(p), "label-column": "y",
                "ledger-path": str(tmp_path / "l.jsonl")}, _run(tmp_path, task="tabular", dp=False))
    assert "requires DP" in _refusal(app(_msg("train", _global("tabular")), ctx))["reason"]


def test_no_dp_simulation_trains_plainly(tmp_path: Path) -> None:
    app = build_client_app()
    reply = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path, dp=False)))
    assert "privacy" not in reply.content.config_records
    assert not (tmp_path / "run" / "ledgers").exists()


def test_bad_data_path_raises_a_clear_error(tmp_path: Path) -> None:
    app = build_client_app()
    with pytest.raises(DataError, match="does not exist"):
        app(_msg("train", _global()), _ctx({"data-path": str(tmp_path / "nope.csv")},
                                           _run(tmp_path)))


def test_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    app = build_client_app()
    with pytest.raises(ConfigError, match="does not fit task 'digits'"):
        app(_msg("train", _global("tabular")), _ctx(SIM, _run(tmp_path)))


def test_ledger_spend_matches_reply(tmp_path: Path) -> None:
    app = build_client_app()
    reply = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path)))
    led = PrivacyLedger(tmp_path / "run" / "ledgers" / "site-0.jsonl")
    fp = read_chain(led.path)[0]["fingerprint"]
    eps = float(reply.content.config_records["privacy"]["epsilon"])  # type: ignore[arg-type]
    assert abs(led.spent(fp, delta=1e-5) - eps) < 1e-9
