"""The simulated network's site discovery: a bounded window of queries, every node asked
once. (Every `fedvault simulate` test runs it on Flower's real Simulation Engine; this
checks the window and the polling on a grid that records what it is asked.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedvault.names import simulated_node_id
from fedvault.rundir import RunDirectory
from protocols.config import RunSettings
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
