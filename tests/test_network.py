"""The simulated network's site discovery: a bounded window of queries, every node asked
once. (Every `fedvault simulate` test runs it on Flower's real Simulation Engine; this
checks the window and the polling on a grid that records what it is asked.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from protocols.config import RunSettings
from protocols.errors import SimulationError
from protocols.names import simulated_node_id
from protocols.rundir import RunDirectory
from server.recorder import RunRecorder
from simulations import network
from simulations.behaviour import SITE_QUERY
from simulations.network import SimulatedGrid
from simulations.scenario import load_scenario

pytestmark = pytest.mark.usefixtures("flower_identity")


class RecordingGrid:
    """Answers each site query one poll after it was pushed, as node ``1000 + k`` for
    site k, and records how many queries were outstanding and how many ids each poll
    asked about."""

    def __init__(self, n: int) -> None:
        self.nodes = [1000 + k for k in range(n)]
        self.pending: dict[str, Message] = {}
        self.ready: list[str] = []
        self.max_outstanding = 0
        self.polled: list[int] = []
        self.seq = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            assert m.metadata.message_type == SITE_QUERY
            self.seq += 1
            mid = f"m{self.seq}"
            m.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = m
            ids.append(mid)
        self.max_outstanding = max(self.max_outstanding, len(self.pending))
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        ids = set(message_ids)
        self.polled.append(len(ids))
        out = []
        for mid in [m for m in self.ready if m in ids]:
            q = self.pending.pop(mid)
            self.ready.remove(mid)
            k = q.metadata.dst_node_id - 1000
            reply = Message(RecordDict({"simulation": ConfigRecord({"site": k})}), reply_to=q)
            reply.metadata.__dict__["_src_node_id"] = q.metadata.dst_node_id
            out.append(reply)
        self.ready.extend(m for m in self.pending if m not in self.ready)
        return out


def test_discovery_keeps_a_bounded_window_and_asks_every_node_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "DISCOVERY_WINDOW", 64)
    monkeypatch.setattr(network, "DISCOVERY_POLL", 0.0)
    scenario = load_scenario("cross-device-1000")
    inner = RecordingGrid(scenario.num_sites)
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(), run_id=4242,
                      mode="test")
    grid = SimulatedGrid(inner, scenario, rec)  # type: ignore[arg-type]
    grid._discover()
    assert inner.max_outstanding <= 64
    assert max(inner.polled) <= 64  # no poll ever asks about more than the window
    assert sum(inner.polled) < 3 * scenario.num_sites  # O(sites) in all, not O(sites^2)
    assert inner.seq == scenario.num_sites  # every node asked exactly once
    assert grid._real == {simulated_node_id(k): 1000 + k for k in range(scenario.num_sites)}


class RegisteredGrid(RecordingGrid):
    """Also says when each node registered (as Flower's in-memory grid does), and
    answers a round's messages as the partition each node really holds."""

    def __init__(self, n: int, stamps: list[str], holds: dict[int, int]) -> None:
        super().__init__(n)
        self.stamps = stamps
        self.holds = holds  # node id -> the partition it really serves

    def get_nodes(self) -> list[Any]:
        from flwr.proto.node_pb2 import NodeInfo  # what Flower's in-memory grid returns

        return [NodeInfo(node_id=nid, registered_at=t)
                for nid, t in zip(self.nodes, self.stamps, strict=True)]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        out = []
        for m in messages:
            k = self.holds[m.metadata.dst_node_id]
            reply = Message(RecordDict({"simulation": ConfigRecord(
                {"site": k, "fate": "online"})}), reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(reply)
        return out


def _grid(tmp_path: Path, inner: Any) -> SimulatedGrid:
    scenario = load_scenario("cross-device-1000")
    rec = RunRecorder(RunDirectory(tmp_path / "run"), settings=RunSettings(), run_id=4242,
                      mode="test")
    return SimulatedGrid(inner, scenario, rec)


def _stamp(i: int) -> str:
    return f"2026-11-29T01:00:00.{i:06d}+00:00"


def test_registration_order_spares_every_query_and_is_checked_on_every_reply(
        tmp_path: Path) -> None:
    n = 1000
    # registered in partition order (node 1000 + k for partition k), listed shuffled
    inner = RegisteredGrid(n, [_stamp(k) for k in range(n)], {1000 + k: k for k in range(n)})
    inner.nodes.reverse()
    inner.stamps.reverse()
    grid = _grid(tmp_path / "a", inner)
    grid._discover()
    assert inner.seq == 0  # not one query
    assert grid._real == {simulated_node_id(k): 1000 + k for k in range(n)}
    train = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=simulated_node_id(5), message_type="train")
    assert len(list(grid.send_and_receive([train]))) == 1
    # a node that really serves another partition than its registration says: stop
    swapped = {1000 + k: k for k in range(n)} | {1005: 6, 1006: 5}
    liar = RegisteredGrid(n, [_stamp(k) for k in range(n)], swapped)
    grid = _grid(tmp_path / "b", liar)
    train = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=simulated_node_id(5), message_type="train")
    with pytest.raises(SimulationError, match="the node taken for site-5 is site-6"):
        grid.send_and_receive([train])


def test_tied_registration_times_fall_back_to_asking(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "DISCOVERY_POLL", 0.0)
    n = 1000
    stamps = [_stamp(k) for k in range(n)]
    stamps[7] = stamps[8]  # two nodes in one microsecond: the order is unknown
    inner = RegisteredGrid(n, stamps, {1000 + k: k for k in range(n)})
    grid = _grid(tmp_path, inner)
    grid._discover()
    assert inner.seq == n  # every node asked
    assert grid._real == {simulated_node_id(k): 1000 + k for k in range(n)}
