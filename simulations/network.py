"""The simulated network between the server and the scenario's sites (server side).

:class:`SimulatedGrid` wraps the Grid that Flower's Simulation Engine hands the
ServerApp, so every strategy (plaintext, encrypted, client-level DP) runs
unchanged on top of it. It

* learns once which Flower node is which scenario site (node ids are random in
  every run: from the order the Simulation Engine registered the nodes, checked
  against every reply, or else a one-off query to every node) and shows the
  strategy stable node ids ``site index + 1``, so sampling and records are the
  same in every run;
* shows the strategy only the sites online in the round being sampled (a
  real SuperLink knows which nodes are disconnected);
* measures the bytes of every message it sends and every reply it receives
  (Flower's protobuf encoding of the message content); uploads that arrive
  after the deadline, or break off mid-upload, count as ``bytes_lost``;
* drops the replies of sites that dropped out or missed the round timeout on
  their simulated link, exactly as a real server would see them: missing;
* advances the simulated clock (``simulations.clock``) and notes each phase in
  the run recorder.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from protocols.errors import SimulationError
from protocols.names import simulated_node_id, site_name
from server.recorder import RunRecorder
from simulations.behaviour import (
    OFFLINE,
    SITE_QUERY,
    fate,
    server_round_of,
    wire_bytes,
)
from simulations.clock import Exchange, Link, phase_seconds, site_seconds
from simulations.netstats import NetworkStats
from simulations.scenario import Scenario, SiteProfile

#: seconds the simulated nodes get to register (plus 1 s per 100 sites)
JOIN_SECONDS = 60.0
#: site queries outstanding at once during discovery, and the pause between polls
DISCOVERY_WINDOW = 256
DISCOVERY_POLL = 0.02


def link_of(p: SiteProfile) -> Link:
    return Link(uplink_mbps=p.uplink_mbps, downlink_mbps=p.downlink_mbps,
                latency_ms=p.latency_ms, compute=p.compute)


class SimulatedGrid(Grid):
    """A Grid with the scenario's sites, links and failures in front of the real one."""

    def __init__(self, grid: Grid, scenario: Scenario, recorder: RunRecorder, *,
                 timeout: float = 3600.0) -> None:
        self.inner = grid
        self.scenario = scenario
        self.recorder = recorder
        self.stats = NetworkStats(recorder)
        self.timeout = timeout
        self._real: dict[int, int] = {}  # virtual node id -> Flower node id
        self._virtual: dict[int, int] = {}  # Flower node id -> virtual node id
        self._last: tuple[int, str] = (0, "evaluate")  # (round, phase) last sent
        self._online: dict[int, list[int]] = {}  # round -> online virtual ids
        self._short: set[int] = set()  # rounds with fewer than min-sites online

    @property
    def num_sites(self) -> int:
        """The whole federation, online or not."""
        return self.scenario.num_sites

    # -- delegation ------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self) -> Any:  # pragma: no cover - not used by Message-API strategies
        raise SimulationError("the simulated grid exposes node ids only (get_node_ids).")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages([self._to_real(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._from_real(m) for m in self.inner.pull_messages(message_ids)]

    # -- identity ----------------------------------------------------------------------
    def _discover(self) -> None:
        if self._real:
            return
        n = self.scenario.num_sites
        # The Simulation Engine registers its nodes while the ServerApp starts: wait
        # for all of them (thousands take a few seconds) before asking who is who.
        wait = JOIN_SECONDS + n / 100
        deadline = time.monotonic() + wait
        while len(nodes := list(self.inner.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise SimulationError(f"only {len(nodes)} of the scenario's {n} sites joined "
                                    f"within {wait:.0f} s.")
            time.sleep(0.2)
        if len(nodes) != n:
            raise SimulationError(f"the Simulation Engine started {len(nodes)} nodes; the "
                                f"scenario has {n} sites.")
        order = self._registration_order(nodes)
        if order is not None:
            for k, nid in enumerate(order):
                self._assign(k, nid)
            return
        for r in self._ask_each(nodes):
            if r.has_error():
                raise SimulationError(f"node {r.metadata.src_node_id} did not say which site "
                                    f"it is: {r.error.reason}")
            k = int(r.content.config_records["simulation"]["site"])  # type: ignore[arg-type]
            self._assign(k, r.metadata.src_node_id)
        if len(self._real) != n:
            raise SimulationError(f"only {len(self._real)} of {n} simulated sites answered.")

    def _assign(self, k: int, node_id: int) -> None:
        """Flower node ``node_id`` is site ``k`` (the strategy sees it as ``k + 1``)."""
        self._real[simulated_node_id(k)] = node_id
        self._virtual[node_id] = simulated_node_id(k)
        self.recorder.name_site(simulated_node_id(k), site_name(k))

    def _registration_order(self, nodes: list[int]) -> list[int] | None:
        """The nodes in the order the Simulation Engine registered them, which is the
        order of their partitions (Flower's ``vce_api._register_nodes`` registers node
        ``i`` for partition ``i``, and the link state stamps each registration with its
        time to the microsecond); ``None`` when the grid does not say, or two stamps
        tie. It is a claim, not a fact: every reply says which site sent it, and
        ``send_and_receive`` stops the run on a mismatch. It spares 10,000 queries,
        each of which Flower's engine would match against every stored message."""
        try:
            infos = list(self.inner.get_nodes())
        except Exception:  # a grid without node information
            return None
        stamps = {int(i.node_id): str(getattr(i, "registered_at", "") or "") for i in infos}
        if set(stamps) != set(nodes) or not all(stamps.values()) \
                or len(set(stamps.values())) != len(stamps):
            return None
        return sorted(stamps, key=lambda nid: stamps[nid])

    def _ask_each(self, nodes: list[int]) -> list[Message]:
        """One site query to every node, at most ``DISCOVERY_WINDOW`` outstanding at a
        time: each poll then asks Flower's link state about the outstanding ones only
        (Flower's ``send_and_receive`` polls every message still unanswered, every
        0.1 s: O(sites) per poll, O(sites^2) in all), and the Simulation Engine's store
        holds at most a window of queries while it looks for each node's next message."""
        todo = iter(nodes)
        outstanding: set[str] = set()
        replies: list[Message] = []
        deadline = time.monotonic() + self.timeout

        def refill() -> None:
            room = DISCOVERY_WINDOW - len(outstanding)
            batch = [Message(RecordDict(), nid, SITE_QUERY, group_id="discovery")
                     for nid in itertools.islice(todo, max(0, room))]
            if batch:
                outstanding.update(self.inner.push_messages(batch))

        refill()
        while outstanding:
            if time.monotonic() > deadline:
                raise SimulationError(f"{len(nodes) - len(replies)} simulated sites did not "
                                      f"say which site they are within {self.timeout:.0f} s.")
            got = list(self.inner.pull_messages(outstanding))
            outstanding.difference_update(r.metadata.reply_to_message_id for r in got)
            replies.extend(got)
            refill()
            if not got:
                time.sleep(DISCOVERY_POLL)
        return replies

    def _sampling_round(self) -> int:
        # Flower's loop samples training of round r+1 after evaluating round r, and
        # evaluation of round r after training it: the round being sampled follows
        # from what was sent last.
        r, phase = self._last
        return r + 1 if phase == "evaluate" else r

    def get_node_ids(self) -> Iterable[int]:
        """The sites online in the round being sampled (a real SuperLink knows which
        nodes are disconnected and never samples them). If fewer than ``min-sites``
        are online, the round is short: all ids are returned so that Flower's
        sampling does not wait forever, but nothing is sent (see send_and_receive)."""
        self._discover()
        r = self._sampling_round()
        if r not in self._online:
            seed = self.recorder.settings.seed
            online: list[int] = []
            offline: list[int] = []
            for vid in sorted(self._real):
                k = vid - 1
                f = fate(self.scenario.site(k), seed=seed, site=k, server_round=r)
                (offline if f == OFFLINE else online).append(vid)
            self._online[r] = online
            self.stats.note_offline(r, offline)
        online = self._online[r]
        if len(online) < self.recorder.settings.min_sites:
            self._short.add(r)
            return sorted(self._real)
        return online

    def _to_real(self, m: Message) -> Message:
        self._discover()
        m.metadata.dst_node_id = self._real[m.metadata.dst_node_id]
        return m

    def _from_real(self, m: Message) -> Message:
        # Flower offers no setter for a reply's source; the strategy must see the same
        # (virtual) id it addressed, so the metadata field is rewritten in place.
        m.metadata.__dict__["_src_node_id"] = self._virtual[m.metadata.src_node_id]
        return m

    def _short_round(self, server_round: int, phase: str, sent: list[Message]
                     ) -> list[Message]:
        """Fewer than min-sites online: nothing is sent, nobody trains or spends ε;
        the server waits out the training phase's timeout and forms no aggregate
        (a real one would wait in Flower's sampling until enough sites connect)."""
        if phase == "train":
            self.recorder.note_skipped(server_round, [m.metadata.dst_node_id for m in sent],
                                       online=len(self._online.get(server_round, [])))
            self.stats.note_skipped(server_round)
        self.stats.note_network(
            server_round, phase,
            simulated_seconds=(float(self.recorder.settings.round_timeout)
                               if phase == "train" else 0.0),
            bytes_down=0, bytes_up=0, bytes_lost=0, fates={})
        return []

    # -- a phase of a round ----------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        if not sent:
            return []
        phase = sent[0].metadata.message_type.split(".")[0]
        server_round = server_round_of(sent[0])
        self._last = (server_round, phase)
        if server_round in self._short:
            return self._short_round(server_round, phase, sent)
        sizes: dict[int, int] = {}  # encrypted rounds share one content between messages
        down: dict[int, int] = {}
        for m in sent:
            if id(m.content) not in sizes:
                sizes[id(m.content)] = wire_bytes(m.content)
            down[m.metadata.dst_node_id] = sizes[id(m.content)]
        # The strategy's timeout is *simulated* time (applied below, per site); the
        # Simulation Engine itself is waited for with the real-time limit.
        replies = [self._from_real(r) for r in
                   self.inner.send_and_receive([self._to_real(m) for m in sent],
                                               timeout=self.timeout)]
        by_site = {r.metadata.src_node_id: r for r in replies}
        vids = sorted(down)  # every sampled site is online: get_node_ids saw to that
        exchanges: list[Exchange] = []
        fates: dict[int, str] = {}
        copies: dict[int, int] = {}
        lost = 0
        for vid in vids:
            r = by_site.get(vid)
            sim: dict[str, Any] = {}
            if r is not None and not r.has_error() and "simulation" in r.content.config_records:
                sim = dict(r.content.config_records["simulation"])
                del r.content["simulation"]
                said = int(sim.get("site", vid - 1))
                if simulated_node_id(said) != vid:
                    raise SimulationError(
                        f"the node taken for {site_name(vid - 1)} is {site_name(said)} (site "
                        "identities from the Simulation Engine's registration order are "
                        "wrong: this Flower version registers nodes differently)")
            # a hostile site (duplicate-replies) gets its reply delivered several times
            copies[vid] = max(1, int(sim.get("copies", 1)))
            fates[vid] = str(sim.get("fate", "online" if r is not None else "no-reply"))
            lost += int(sim.get("bytes-lost", 0))
            dropped = fates[vid] != "online"
            exchanges.append(Exchange(
                link=link_of(self.scenario.site(vid - 1)), bytes_down=down[vid],
                bytes_up=0 if dropped or r is None or r.has_error() else wire_bytes(r.content),
                dropped=dropped, examples=int(sim.get("examples", 0))))
        pt = phase_seconds(exchanges, timeout=float(self.recorder.settings.round_timeout))
        late = {vids[i] for i in pt.timed_out if not exchanges[i].dropped}
        for vid in late:
            fates[vid] = "timed-out"
        up = {vid: x.bytes_up for vid, x in zip(vids, exchanges, strict=True)}
        # the site that set (or, if late, would have set) the pace of this phase
        slowest = max(((vid, site_seconds(x)) for vid, x in zip(vids, exchanges, strict=True)
                       if not x.dropped), key=lambda p: p[1], default=None)
        self.stats.note_network(
            server_round, phase, simulated_seconds=pt.seconds,
            bytes_down=sum(down.values()),
            bytes_up=sum(b for vid, b in up.items() if vid not in late),
            bytes_lost=lost + sum(up[vid] for vid in late), fates=fates, slowest=slowest)
        return [by_site[vid] for vid in vids if fates[vid] == "online"
                for _ in range(copies[vid])]
