"""The simulated network's statistics of a run: per round, the simulated seconds, the
bytes down, up and lost, the dropouts and the slowest site; per site, how often it
was offline, dropped out or was late. The run recorder (server side) knows nothing
of a simulated network: these columns join its rows through ``add_columns``."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from protocols.summary import RoundRow
from server.recorder import RunRecorder


class NetworkStats:
    """Collects what the simulated network saw and hands the recorder its columns."""

    def __init__(self, recorder: RunRecorder) -> None:
        self.recorder = recorder
        self._lock = threading.Lock()
        self._rounds: dict[int, dict[str, Any]] = defaultdict(dict)
        self._sites: dict[int, dict[str, int]] = defaultdict(
            lambda: {"dropped": 0, "offline": 0, "timed_out": 0})
        recorder.add_columns(rounds=self.row, sites=self.site_counts)

    def note_offline(self, server_round: int, node_ids: list[int]) -> None:
        """The sites that were offline when the round started."""
        with self._lock:
            self._rounds[server_round]["offline"] = len(node_ids)
            for n in node_ids:
                self._sites[n]["offline"] += 1

    def note_skipped(self, server_round: int) -> None:
        """Too few sites online: the round's messages were never sent."""
        with self._lock:
            self._rounds[server_round]["skipped"] = True

    def note_network(self, server_round: int, phase: str, *, simulated_seconds: float,
                     bytes_down: int, bytes_up: int, bytes_lost: int,
                     fates: dict[int, str],
                     slowest: tuple[int, float] | None = None) -> None:
        """One phase (train or evaluate) of a round on the simulated network; ``fates``:
        sampled node id -> online | offline | dropped-* | timed-out | no-reply. The
        round's and the sites' dropout counts come from the training phase; the
        evaluation phase's are counted apart (``eval_missing``)."""
        slowest_name = self.recorder.site_label(slowest[0]) if slowest is not None else None
        with self._lock:
            net = self._rounds[server_round]
            net["simulated_seconds"] = net.get("simulated_seconds", 0.0) + simulated_seconds
            net[f"{phase}_seconds"] = simulated_seconds
            for key, v in (("bytes_down", bytes_down), ("bytes_up", bytes_up),
                           ("bytes_lost", bytes_lost)):
                net[key] = net.get(key, 0) + v
            missing = [nid for nid, f in fates.items() if f != "online"]
            if phase != "train":
                net["eval_missing"] = net.get("eval_missing", 0) + len(missing)
                return
            if slowest is not None:
                net["slowest"] = (slowest_name, slowest[1])
            count = net.setdefault("count", {"dropped": 0, "timed_out": 0})
            for nid in missing:
                f = fates[nid]
                key = "timed_out" if f == "timed-out" else "dropped" if f != "offline" else ""
                if key:
                    count[key] += 1
                    self._sites[nid][key] += 1

    def row(self, server_round: int) -> RoundRow:
        """The simulated network's columns of a round's row (none if it saw nothing)."""
        with self._lock:
            net = dict(self._rounds.get(server_round, {}))
        if "simulated_seconds" not in net:
            return {}
        count = net.get("count", {})
        return {"simulated_seconds": round(float(net["simulated_seconds"]), 3),
                "train_seconds_simulated": round(float(net.get("train_seconds", 0.0)), 3),
                "bytes_down": int(net.get("bytes_down", 0)),
                "bytes_up": int(net.get("bytes_up", 0)),
                "bytes_lost": int(net.get("bytes_lost", 0)),
                "dropped": int(count.get("dropped", 0)),
                "timed_out": int(count.get("timed_out", 0)),
                "offline": int(net.get("offline", 0)),
                "eval_missing": int(net.get("eval_missing", 0)),
                "skipped": bool(net.get("skipped", False)),
                "slowest_site": net["slowest"][0] if "slowest" in net else None,
                "slowest_site_seconds": (round(float(net["slowest"][1]), 3)
                                         if "slowest" in net else None)}

    def site_counts(self, node_id: int) -> dict[str, int]:
        with self._lock:
            return dict(self._sites.get(node_id, {"dropped": 0, "offline": 0,
                                                  "timed_out": 0}))
