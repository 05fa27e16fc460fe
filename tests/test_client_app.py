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
from fedvault_tasks.tasks import get_task
from privacy.ledger import PrivacyLedger
from protocols.config import RunSettings
from protocols.errors import ConfigError, DataError
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
    app = build_client_app(simulated=True)
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
    # nothing outside epsilon but the planned step count and the example count
    assert set(reply.content.metric_records["metrics"].keys()) == {"num-examples", "steps"}

    ev = app(_msg("evaluate", new), _ctx(SIM, _run(tmp_path)))
    assert 0.0 <= float(ev.content.metric_records["metrics"]["eval-acc"]) <= 1.0  # type: ignore[arg-type]


def test_training_is_deterministic_without_secure_mode(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    outs = []
    for _ in ("a", "b"):  # one site (one secret, so one split), trained twice
        r = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path, secure_mode=False)))
        outs.append(r.content.array_records["arrays"])
    assert all(np.array_equal(outs[0][k].numpy(), outs[1][k].numpy()) for k in outs[0])
    # ... and the ledger says so: whoever knows the seed can undo the noise
    entries = read_chain(tmp_path / "run" / "ledgers" / "site-0.jsonl")
    assert [e["insecure"] for e in entries if e["kind"] == "reservation"] == [True, True]


def test_secure_mode_noise_is_not_reproducible(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
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
    n = int(reply.content.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
    assert 80 <= n <= 112  # about 80% of 120: each record's side is its own keyed hash
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
    app = build_client_app(simulated=True)
    ctx = _ctx({**SIM, "min-noise-multiplier": 0.8}, _run(tmp_path, noise_multiplier=0.5))
    r = _refusal(app(_msg("train", _global()), ctx))
    assert "noise multiplier 0.5 is below this site's minimum 0.8" in r["reason"]
    kinds = [e["kind"] for e in read_chain(tmp_path / "run" / "ledgers" / "site-0.jsonl")]
    assert "refusal" in kinds and "reservation" not in kinds


def test_larger_delta_than_the_site_allows_is_refused(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    ctx = _ctx({**SIM, "delta": 1e-6}, _run(tmp_path, dp_delta=1e-5))
    assert "above this site's delta" in _refusal(app(_msg("train", _global()), ctx))["reason"]


def test_no_dp_is_refused_by_a_real_site(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    ctx = _ctx({"data-path": str(p), "label-column": "y",
                "ledger-path": str(tmp_path / "l.jsonl")}, _run(tmp_path, task="tabular", dp=False))
    assert "requires DP" in _refusal(app(_msg("train", _global("tabular")), ctx))["reason"]


def test_no_dp_simulation_trains_plainly(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    reply = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path, dp=False)))
    assert "privacy" not in reply.content.config_records
    kinds = [e["kind"] for e in read_chain(tmp_path / "run" / "ledgers" / "site-0.jsonl")]
    assert "reservation" not in kinds


def test_bad_data_path_raises_a_clear_error(tmp_path: Path) -> None:
    app = build_client_app()
    with pytest.raises(DataError, match="does not exist"):
        app(_msg("train", _global()), _ctx({"data-path": str(tmp_path / "nope.csv")},
                                           _run(tmp_path)))


def test_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    with pytest.raises(ConfigError, match="does not fit task 'digits'"):
        app(_msg("train", _global("tabular")), _ctx(SIM, _run(tmp_path)))


def test_ledger_spend_matches_reply(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    reply = app(_msg("train", _global()), _ctx(SIM, _run(tmp_path)))
    led = PrivacyLedger(tmp_path / "run" / "ledgers" / "site-0.jsonl")
    eps = float(reply.content.config_records["privacy"]["epsilon"])  # type: ignore[arg-type]
    assert abs(led.spent("site", delta=1e-5) - eps) < 1e-9


# -- what leaves a site ---------------------------------------------------------------------
def _real(tmp_path: Path, p: Path, **extra: Any) -> dict[str, Any]:
    return {"data-path": str(p), "label-column": "y",
            "ledger-path": str(tmp_path / "site-ledger.jsonl"), **extra}


def _everything_in(reply: Message) -> str:
    parts = [str(dict(r)) for r in reply.content.config_records.values()]
    parts += [str(dict(r)) for r in reply.content.metric_records.values()]
    return " ".join(parts)


def test_replies_of_neighbouring_tables_differ_only_in_dp_fields(tmp_path: Path) -> None:
    """Two runs on the same model, on tables that differ in one record: every field of
    the reply that is not the DP-protected model is identical; no training loss, no
    evaluation metrics (a real site with DP does not release them)."""
    from client.data import load_table, record_keys
    from privacy.site_secret import SiteSecret, secret_path_for

    p = _site_csv(tmp_path)
    app = build_client_app()
    run = _run(tmp_path, task="tabular", noise_multiplier=2.0)
    first = app(_msg("train", _global("tabular")), _ctx(_real(tmp_path, p), run))
    key = SiteSecret.load(secret_path_for(tmp_path / "site-ledger.jsonl")).key  # type: ignore[union-attr]
    table = load_table(p, label_column="y")
    side = record_keys(table, key) < 0.2
    # replace record 5 by another one that lands on the same side of the split
    for scale in np.linspace(1.01, 3.0, 200):
        x = table.x.copy()
        x[5] = x[5] * scale
        from fedvault_tasks.tasks import Table

        other = Table(x=x, y=table.y.copy())
        if (record_keys(other, key)[5] < 0.2) == side[5]:
            break
    q = save_table(other, tmp_path / "neighbour.csv", label_column="y")
    second = app(_msg("train", _global("tabular"), server_round=2),
                 _ctx(_real(tmp_path, q), run))
    for reply in (first, second):
        assert set(reply.content.metric_records["metrics"].keys()) == {"num-examples", "steps"}
    m1, m2 = (dict(r.content.metric_records["metrics"]) for r in (first, second))
    assert m1 == m2
    p1, p2 = (dict(r.content.config_records["privacy"]) for r in (first, second))
    for k in ("noise-multiplier", "sample-rate", "steps", "delta", "accountant", "site"):
        assert p1[k] == p2[k], k
    ev = app(_msg("evaluate", _global("tabular")), _ctx(_real(tmp_path, p), run))
    assert not ev.content.metric_records and "declined" in ev.content.config_records


def test_a_site_may_allow_its_evaluation_metrics(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    ev = app(_msg("evaluate", _global("tabular")),
             _ctx(_real(tmp_path, p, **{"release-eval-metrics": True}),
                  _run(tmp_path, task="tabular")))
    assert "eval-acc" in ev.content.metric_records["metrics"]


def test_a_site_that_refused_to_train_does_not_evaluate_that_round(tmp_path: Path) -> None:
    app = build_client_app(simulated=True)
    ctx = _ctx({**SIM, "min-noise-multiplier": 0.8}, _run(tmp_path, noise_multiplier=0.5))
    _refusal(app(_msg("train", _global()), ctx))
    ev = app(_msg("evaluate", _global()), ctx)
    assert "declined" in ev.content.config_records
    assert "refused to train" in str(ev.content.config_records["declined"]["reason"])
    # the next round, having trained, it evaluates again
    ok = _ctx(SIM, _run(tmp_path, noise_multiplier=2.0))
    app(_msg("train", _global(), server_round=2), ok)
    ev2 = app(_msg("evaluate", _global(), server_round=2), ok)
    assert "metrics" in ev2.content.metric_records


def test_no_reply_carries_the_raw_data_hash(tmp_path: Path) -> None:
    from client.data import load_table, table_fingerprint

    p = _site_csv(tmp_path)
    raw = table_fingerprint(load_table(p, label_column="y"))
    app = build_client_app()
    ctx = _ctx(_real(tmp_path, p, **{"max-epsilon": 0.5}),
               _run(tmp_path, task="tabular", noise_multiplier=1.0))
    refused = app(_msg("train", _global("tabular")), ctx)  # a refusal over the budget
    assert "refusal" in refused.content.config_records
    text = _everything_in(refused)
    assert raw[:8] not in text
    # the ledger, on the site, keeps the raw hash; what could leave is keyed
    entries = read_chain(tmp_path / "site-ledger.jsonl")
    reg = next(e for e in entries if e["kind"] == "dataset_registered")
    assert reg["fingerprint"] == raw and raw not in reg["dataset"]


def test_re_exporting_the_data_does_not_reset_the_budget(tmp_path: Path) -> None:
    from client.data import load_table
    from fedvault_tasks.tasks import Table

    p = _site_csv(tmp_path, rows=200)
    app = build_client_app()
    run = _run(tmp_path, task="tabular", noise_multiplier=1.5)
    first = app(_msg("train", _global("tabular")),
                _ctx(_real(tmp_path, p, **{"max-epsilon": 3.0}), run))
    assert "refusal" not in first.content.config_records
    # from now on, room for that one round only: the split (keyed by the site's random
    # secret) sets the sampling rate, so one round costs 2.2-3 here and two rounds
    # compose to ~1.3x one; a limit of 3 would sometimes fit a second round
    one = float(first.content.config_records["privacy"]["epsilon"])  # type: ignore[arg-type]
    limit = {"max-epsilon": round(one * 1.1, 4)}
    t = load_table(p, label_column="y")
    rng = np.random.default_rng(0)
    rows, cols = rng.permutation(len(t)), rng.permutation(t.num_features)
    shuffled = Table(x=t.x[rows][:, cols], y=t.y[rows])
    changed = Table(x=t.x.copy(), y=t.y.copy())
    changed.x[0, 0] += 1e-4
    fewer = t.subset(np.arange(1, len(t)))
    for i, variant in enumerate((shuffled, changed, fewer)):
        q = save_table(variant, tmp_path / f"export-{i}.csv", label_column="y")
        r = app(_msg("train", _global("tabular"), server_round=2 + i),
                _ctx(_real(tmp_path, q, **limit), run))
        assert "privacy budget" in _refusal(r)["reason"]
    # ... nor does moving the same data to a newly declared scope
    r = app(_msg("train", _global("tabular"), server_round=8),
            _ctx(_real(tmp_path, p, **{**limit, "budget-scope": "fresh"}), run))
    assert "already draws on budget scope 'site'" in _refusal(r)["reason"]
    # a data owner who declares other people's data disjoint gives it its own budget,
    # on the record
    other = get_task("tabular").embedded().subset(np.arange(300, 500))
    q = save_table(other, tmp_path / "cohort-b.csv", label_column="y")
    r = app(_msg("train", _global("tabular"), server_round=9),
            _ctx(_real(tmp_path, q, **{"max-epsilon": 3.0, "budget-scope": "cohort-b"}), run))
    assert "refusal" not in r.content.config_records
    kinds = [e["kind"] for e in read_chain(tmp_path / "site-ledger.jsonl")]
    assert "scope_declared" in kinds


def test_a_real_site_refuses_insecure_noise_unless_it_allows_it(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    run = _run(tmp_path, task="tabular", secure_mode=False)
    r = app(_msg("train", _global("tabular")), _ctx(_real(tmp_path, p), run))
    assert "insecure" in _refusal(r)["reason"]
    ok = app(_msg("train", _global("tabular")),
             _ctx(_real(tmp_path, p, **{"allow-insecure-noise": True}), run))
    assert "refusal" not in ok.content.config_records
    res = [e for e in read_chain(tmp_path / "site-ledger.jsonl") if e["kind"] == "reservation"]
    assert res[-1]["insecure"] is True


def test_every_refusal_is_recorded(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    ctx = _ctx(_real(tmp_path, p), _run(tmp_path, task="tabular", dp=False))
    _refusal(app(_msg("train", _global("tabular")), ctx))
    refusals = [e for e in read_chain(tmp_path / "site-ledger.jsonl") if e["kind"] == "refusal"]
    assert len(refusals) == 1 and "requires DP" in refusals[0]["reason"]


def test_a_missing_ledger_refuses_to_train(tmp_path: Path) -> None:
    p = _site_csv(tmp_path)
    app = build_client_app()
    run = _run(tmp_path, task="tabular", noise_multiplier=2.0)
    app(_msg("train", _global("tabular")), _ctx(_real(tmp_path, p), run))
    (tmp_path / "site-ledger.jsonl").unlink()  # moved away: the budget would restart
    r = app(_msg("train", _global("tabular"), server_round=2), _ctx(_real(tmp_path, p), run))
    assert "is missing" in _refusal(r)["reason"]

