"""FedAvg over validated replies, with real Flower Messages and records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from protocols.config import RunSettings
from protocols.hashchain import read_chain
from protocols.rundir import RunDirectory
from server.recorder import RunRecorder
from server.strategy import FedVaultFedAvg
from tests.helpers import MessageGrid

pytestmark = pytest.mark.usefixtures("flower_identity")


def _arrays(scale: float) -> ArrayRecord:
    return ArrayRecord(numpy_ndarrays=[np.full((2, 3), scale, np.float32),
                                       np.full(4, -scale, np.float32)])


def _instruction(node: int) -> Message:
    return Message(content=RecordDict({"arrays": _arrays(0.0)}), dst_node_id=node,
                   message_type="train")


def _reply(node: int, arrays: ArrayRecord, n: Any) -> Message:
    return Message(content=RecordDict({"arrays": arrays,
                                       "metrics": MetricRecord({"num-examples": n,
                                                                "train-loss": 1.0})}),
                   reply_to=_instruction(node))


@pytest.fixture
def strategy(tmp_path: Path) -> FedVaultFedAvg:
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(min_sites=2),
                      run_id=1, mode="test")
    s = FedVaultFedAvg(recorder=rec, min_sites=2, max_weight_share=1.0)
    s.global_arrays = _arrays(0.0)
    return s


def test_weighted_average(strategy: FedVaultFedAvg) -> None:
    replies = [_reply(1, _arrays(1.0), 10), _reply(2, _arrays(4.0), 30)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    first = arrays.to_numpy_ndarrays()[0]
    assert np.allclose(first, (1.0 * 10 + 4.0 * 30) / 40)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: _reply(9, _arrays(float("nan")), 10), "NaN or infinite"),
        (lambda: _reply(9, _arrays(float("inf")), 10), "NaN or infinite"),
        (lambda: _reply(9, ArrayRecord(numpy_ndarrays=[np.zeros((3, 2), np.float32),
                                                       np.zeros(4, np.float32)]), 10),
         "expected float32"),
        (lambda: _reply(9, ArrayRecord(numpy_ndarrays=[np.zeros((2, 3), np.float64),
                                                       np.zeros(4, np.float32)]), 10),
         "expected float32"),
        (lambda: _reply(9, ArrayRecord(numpy_ndarrays=[np.zeros((2, 3), np.float32)]), 10),
         "layers differ"),
        (lambda: _reply(9, _arrays(1.0), 0), "must be in [1, 1000000]"),
        (lambda: _reply(9, _arrays(1.0), -5), "must be in [1, 1000000]"),
        (lambda: _reply(9, _arrays(1.0), 2.5), "must be an integer"),
        (lambda: _reply(9, _arrays(1.0), 10**12), "must be in [1, 1000000]"),
        (lambda: Message(content=RecordDict({"arrays": _arrays(1.0)}),
                         reply_to=_instruction(9)), "missing ['metrics']"),
    ],
)
def test_bad_update_is_rejected_and_round_goes_on(strategy: FedVaultFedAvg, bad: object,
                                                   reason: str) -> None:
    replies = [_reply(1, _arrays(1.0), 10), _reply(2, _arrays(3.0), 10), bad()]  # type: ignore[operator]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 2.0)  # the bad one did not count
    events = read_chain(strategy.recorder.dir.events)
    rejected = [e for e in events if e["kind"] == "update_rejected"]
    assert len(rejected) == 1 and rejected[0]["node_id"] == 9
    assert reason in rejected[0]["reason"]


def test_error_reply_is_recorded(strategy: FedVaultFedAvg) -> None:
    err = Message(Error(code=1, reason="site crashed"), reply_to=_instruction(5))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _arrays(1.0), 5),
                                             _reply(2, _arrays(2.0), 5), err])
    assert arrays is not None
    ev = [e for e in read_chain(strategy.recorder.dir.events) if e["kind"] == "site_error"]
    assert ev[0]["node_id"] == 5 and ev[0]["reason"] == "site crashed"


def test_fewer_than_min_sites_forms_no_aggregate(strategy: FedVaultFedAvg) -> None:
    replies = [_reply(1, _arrays(1.0), 10), _reply(2, _arrays(float("nan")), 10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    kinds = [e["kind"] for e in read_chain(strategy.recorder.dir.events)]
    assert "aggregate_refused" in kinds


def test_evaluate_aggregation_skips_bad_replies(strategy: FedVaultFedAvg) -> None:
    good = Message(content=RecordDict({"metrics": MetricRecord(
        {"eval-acc": 0.5, "eval-loss": 1.0, "num-examples": 10})}), reply_to=_instruction(1))
    good2 = Message(content=RecordDict({"metrics": MetricRecord(
        {"eval-acc": 1.0, "eval-loss": 0.0, "num-examples": 30})}), reply_to=_instruction(2))
    bad = Message(content=RecordDict({"metrics": MetricRecord(
        {"eval-acc": 0.0, "num-examples": -1})}), reply_to=_instruction(3))
    m = strategy.aggregate_evaluate(1, [good, good2, bad])
    assert m is not None and abs(float(m["eval-acc"]) - 0.875) < 1e-9  # type: ignore[arg-type]


def test_a_site_that_never_replies_is_recorded_as_silent(strategy: FedVaultFedAvg) -> None:
    """Three sites are sent the round's message; one sends nothing back, not even an
    error (its ClientApp process was killed, say): the round goes on with the other two,
    and the record names the silent site, the phase and the timeout."""
    from flwr.app import ConfigRecord

    strategy.round_timeout = 30.0
    grid: Any = MessageGrid([1, 2, 3])
    sent = strategy.configure_train(1, _arrays(0.0), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3]
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _arrays(1.0), 5),
                                             _reply(2, _arrays(2.0), 5)])
    assert arrays is not None
    strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)
    strategy.aggregate_evaluate(1, [])
    silent = [e for e in read_chain(strategy.recorder.dir.events) if e["kind"] == "sites_silent"]
    assert [(e["phase"], e["node_ids"]) for e in silent] == [("train", [3]),
                                                              ("evaluate", [1, 2, 3])]
    assert "no train reply within 30 s" in silent[0]["reason"]
    summary = strategy.recorder.finish()
    p3 = next(p for p in summary["participants"] if p["node_id"] == 3)
    assert p3["silent"] == 2 and "no evaluate reply" in p3["last_reason"]


def test_a_grid_that_readdresses_the_messages_makes_nobody_silent(
        strategy: FedVaultFedAvg) -> None:
    """The simulated network rewrites each message's destination to Flower's node id in
    place, and hands back replies under the ids the strategy addressed: every site that
    replied is not silent (it recorded all 150 sampled phones of every round as silent,
    because it compared the rewritten ids)."""
    from flwr.app import ConfigRecord

    grid: Any = MessageGrid([1, 2, 3])
    sent = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), grid))
    for m in sent:  # as SimulatedGrid._to_real does before pushing
        m.metadata.dst_node_id = 1000 + m.metadata.dst_node_id
    arrays, _ = strategy.aggregate_train(1, [_reply(k, _arrays(float(k)), 5) for k in (1, 2)])
    assert arrays is not None
    silent = [e for e in read_chain(strategy.recorder.dir.events) if e["kind"] == "sites_silent"]
    assert [e["node_ids"] for e in silent] == [[3]]


def test_the_superlinks_node_unavailable_error_is_the_dead_sites(
        strategy: FedVaultFedAvg) -> None:
    """When a SuperNode stops sending heartbeats, the SuperLink answers its message itself
    (Flower's NODE_UNAVAILABLE error, from the SuperLink's own node id 1): the record
    names the site that went away, not node 1, and that site is not also 'silent'."""
    from flwr.app import ConfigRecord
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    grid: Any = MessageGrid([7, 8, 9])
    sent = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), grid))
    for m in sent:  # as Flower's grids do when they push a message
        m.metadata.__dict__["_message_id"] = m.object_id
    dead = next(m for m in sent if m.metadata.dst_node_id == 9)
    unavailable = create_message_error_unavailable_res_message(dead.metadata, "node_unavail")
    assert unavailable.metadata.src_node_id == 1
    arrays, _ = strategy.aggregate_train(1, [_reply(7, _arrays(1.0), 5),
                                             _reply(8, _arrays(2.0), 5), unavailable])
    assert arrays is not None
    events = read_chain(strategy.recorder.dir.events)
    errors = [e for e in events if e["kind"] == "site_error"]
    assert [e["node_id"] for e in errors] == [9] and "heartbeat" in errors[0]["reason"]
    assert not [e for e in events if e["kind"] == "sites_silent"]
