"""Records a run into its run directory as it happens (server side).

Every event goes into the hash-chained ``events.jsonl`` (the same format as the
privacy ledgers and the release log), so progress is observable from outside
the ServerApp process (``fedvault rehearse`` tails it) and checkable afterwards
(``fedvault verify RUN_DIR``). The summary's schema is :mod:`protocols.summary`.
"""

from __future__ import annotations

import hashlib
import io
import math
import platform
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import flwr
import torch
from flwr.app import ArrayRecord

from protocols import summary as run_summary
from protocols.config import RunSettings
from protocols.hashchain import HashChainLog, utc_now
from protocols.he_update import is_encrypted
from protocols.messages import EVAL_ACC, EVAL_LOSS, Refusal, ReplyPrivacy
from protocols.run_events import RunEvent
from protocols.rundir import RunDirectory, fedvault_version, write_json_atomic
from protocols.summary import HEBlock, Participant, PrivacyBlock, RoundRow, RunSummary
from server.plots import plot_accuracy


@dataclass
class _SiteStats:
    sampled: int = 0
    trained: int = 0
    rejected: int = 0
    errors: int = 0
    silent: int = 0
    refused: int = 0
    global_refused: int = 0
    last_reason: str = ""
    name: str = ""
    privacy: dict[str, Any] = field(default_factory=dict)


@dataclass
class _RoundState:
    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    silent: int = 0
    refused: int = 0
    global_refused: int = 0
    rolled_back_to: int | None = None
    aggregated: bool = False
    train: dict[str, float] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)


class RunRecorder:
    """Writes run.json, events, per-round models, summary.json and accuracy.png."""

    def __init__(
        self, run_dir: RunDirectory, *, settings: RunSettings, run_id: int, mode: str
    ) -> None:
        self.dir = run_dir.create()
        self.settings = settings
        self.run_id = run_id
        self.mode = mode
        self.events = HashChainLog(run_dir.events)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._round_t0 = self._t0
        self._rounds: dict[int, _RoundState] = defaultdict(_RoundState)
        self._sites: dict[int, _SiteStats] = defaultdict(_SiteStats)
        self._round_columns: list[Callable[[int], RoundRow]] = []
        self._site_columns: list[Callable[[int], Mapping[str, int]]] = []
        self.history: list[RoundRow] = []
        self.num_sites = 0
        self.started = utc_now()
        self.central_privacy: dict[str, Any] = {}
        self.he_rounds: dict[int, dict[str, Any]] = {}
        self.he_params: dict[str, Any] = {}
        self.rollbacks: list[dict[str, int]] = []

    # -- run lifecycle ---------------------------------------------------------------
    def event(self, kind: RunEvent, **fields: Any) -> dict[str, Any]:
        """Append one event to the run's hash-chained log: the one way a run event is
        written (``kind`` from :class:`protocols.run_events.RunEvent`)."""
        return self.events.append(RunEvent(kind), **fields)

    def start(self, *, num_sites: int, num_parameters: int) -> None:
        self.num_sites = num_sites
        write_json_atomic(
            self.dir.run_json,
            {
                "format": "fedvault.run/1",
                "run_id": self.run_id,
                "mode": self.mode,
                "task": self.settings.task,
                "settings": self.settings.to_config(),
                "num_parameters": num_parameters,
                "started": self.started,
                "versions": {
                    "fedvault": fedvault_version(),
                    "flwr": flwr.__version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
            },
        )
        self.event(
            RunEvent.RUN_STARTED, run_id=self.run_id, mode=self.mode, task=self.settings.task,
            rounds=self.settings.num_server_rounds, sites=num_sites,
            num_parameters=num_parameters,
        )

    def finish(self, *, status: str = "completed", error: str = "") -> RunSummary:
        wall = time.monotonic() - self._t0
        ev = self.event(RunEvent.RUN_FINISHED, status=status, error=error,
                                wall_seconds=round(wall, 3))
        summary = self.summary(status=status, wall_seconds=wall, error=error)
        summary["events_last_hash"] = ev["hash"]
        run_summary.write(self.dir, summary)
        if self.history:
            plot_accuracy(dict(summary), self.dir.accuracy_png)
        return summary

    def conclude(self) -> RunSummary:
        """Finish a run whose rounds all ran: ``completed``, unless no round formed an
        aggregate (refusals, rejections, too few sites): then the run produced nothing,
        whatever Flower's loop thinks of it, and ends ``failed`` with the reason."""
        if self.aggregates_formed() == 0:
            return self.finish(status="failed", error=(
                f"no round formed an aggregate in {self.settings.num_server_rounds} "
                "round(s): see the rejections, refusals and errors in events.jsonl"))
        return self.finish(status="completed")

    # -- notes from the strategy -----------------------------------------------------
    def note_sampled(self, server_round: int, node_ids: list[int]) -> None:
        with self._lock:
            self._rounds[server_round].sampled = len(node_ids)
            for n in node_ids:
                self._sites[n].sampled += 1

    def name_site(self, node_id: int, name: str) -> None:
        with self._lock:
            self._sites[node_id].name = name

    def note_rejected(self, server_round: int, node_id: int, reason: str) -> None:
        with self._lock:
            self._rounds[server_round].rejected += 1
            self._sites[node_id].rejected += 1
            self._sites[node_id].last_reason = reason
        self.event(RunEvent.UPDATE_REJECTED, round=server_round, node_id=node_id,
                           reason=reason)

    def note_silent(self, server_round: int, node_ids: list[int], phase: str,
                    reason: str) -> None:
        """Sites that were sent a message this round and never replied (no reply, not
        even an error, before the round's timeout)."""
        if not node_ids:
            return
        with self._lock:
            for n in node_ids:
                self._rounds[server_round].silent += 1
                self._sites[n].silent += 1
                self._sites[n].last_reason = reason
            names = [self._sites[n].name or f"node-{n}" for n in node_ids]
        self.event(RunEvent.SITES_SILENT, round=server_round, phase=phase,
                           node_ids=sorted(node_ids), sites=sorted(names), reason=reason)

    def note_site_error(self, server_round: int, node_id: int, phase: str, reason: str) -> None:
        with self._lock:
            self._rounds[server_round].errors += 1
            self._sites[node_id].errors += 1
            self._sites[node_id].last_reason = reason
        self.event(RunEvent.SITE_ERROR, round=server_round, node_id=node_id, phase=phase,
                           reason=reason)

    def note_refused(self, server_round: int, node_id: int, refusal: Refusal) -> None:
        """A site refused the round (privacy budget or weaker privacy than it allows)."""
        with self._lock:
            self._rounds[server_round].refused += 1
            st = self._sites[node_id]
            st.refused += 1
            st.last_reason = refusal.reason
            st.name = refusal.site or st.name
            if refusal.epsilon_spent is not None:
                st.privacy.setdefault("epsilon", refusal.epsilon_spent)
            st.privacy.setdefault("delta", refusal.delta)
        self.event(RunEvent.SITE_REFUSED, round=server_round, node_id=node_id,
                           site=refusal.site, reason=refusal.reason,
                           epsilon_spent=refusal.epsilon_spent,
                           epsilon_limit=refusal.epsilon_limit)

    def note_privacy(self, node_id: int, privacy: ReplyPrivacy) -> None:
        """The privacy a site reports after a round (the epsilon of this run)."""
        with self._lock:
            st = self._sites[node_id]
            st.name = privacy.site or st.name
            st.privacy = privacy.as_record()

    def note_he(self, server_round: int, *, bytes_up: int, bytes_per_update: float,
                num_values: int) -> None:
        """Encrypted aggregation: ciphertext bytes received this round."""
        with self._lock:
            self.he_rounds[server_round] = {"bytes_up": bytes_up,
                                            "bytes_per_update": bytes_per_update,
                                            "num_values": num_values}

    def note_central_privacy(self, **facts: Any) -> None:
        """Client-level DP: the server ledger's cumulative epsilon after a release."""
        with self._lock:
            self.central_privacy = dict(facts)

    def note_trained(self, server_round: int, node_ids: list[int], aggregated: bool,
                     metrics: dict[str, float], reason: str = "") -> None:
        with self._lock:
            st = self._rounds[server_round]
            st.accepted = len(node_ids)
            st.aggregated = aggregated
            st.train = metrics
            for n in node_ids:
                self._sites[n].trained += 1
        if not aggregated:
            self.event(
                RunEvent.AGGREGATE_REFUSED, round=server_round, valid=len(node_ids),
                min_sites=self.settings.min_sites,
                reason=reason or (f"{len(node_ids)} valid updates < min-sites "
                                  f"{self.settings.min_sites}"),
            )

    def note_global_refused(self, server_round: int, node_id: int, *, version: int,
                            reason: str, site: str = "") -> None:
        """A site refused the global model it was sent (its aggregate check failed)."""
        with self._lock:
            self._rounds[server_round].global_refused += 1
            st = self._sites[node_id]
            st.global_refused += 1
            st.last_reason = reason
            st.name = site or st.name
        self.event(RunEvent.GLOBAL_REFUSED, round=server_round, node_id=node_id,
                           site=site, version=version, reason=reason)

    def note_rollback(self, server_round: int, *, refused: int, to: int) -> None:
        """The server went back to global model version ``to`` after sites refused
        version ``refused``."""
        with self._lock:
            self._rounds[server_round].rolled_back_to = to
            self.rollbacks.append({"round": server_round, "refused_version": refused,
                                   "to_version": to})
        self.event(RunEvent.ROLLED_BACK, round=server_round, refused_version=refused,
                           to_version=to)

    def aggregates_formed(self) -> int:
        """Rounds that formed an aggregate."""
        with self._lock:
            return sum(1 for r, st in self._rounds.items() if r > 0 and st.aggregated)

    def note_skipped(self, server_round: int, node_ids: list[int], *, online: int) -> None:
        """Simulations: too few sites online to form an aggregate, so the round's
        messages (to ``node_ids``, as sampled) were never sent."""
        with self._lock:
            st = self._rounds[server_round]
            st.sampled = 0
            for n in node_ids:
                self._sites[n].sampled -= 1
        self.event(RunEvent.ROUND_SKIPPED, round=server_round, online=online,
                           min_sites=self.settings.min_sites,
                           reason=f"{online} sites online < min-sites {self.settings.min_sites}")

    def note_federated_eval(self, server_round: int, metrics: dict[str, float]) -> None:
        with self._lock:
            self._rounds[server_round].federated = metrics

    def end_round(
        self, server_round: int, arrays: ArrayRecord, central: tuple[float, float] | None
    ) -> RoundRow:
        """Save the round's global model and append its row to the history."""
        buf = io.BytesIO()
        torch.save(arrays.to_torch_state_dict(), buf)
        blob = buf.getvalue()
        sha = hashlib.sha256(blob).hexdigest()
        path = self.dir.model_path(server_round)
        path.write_bytes(blob)
        st = self._rounds[server_round]
        fed = st.federated
        encrypted = is_encrypted(arrays)
        if central is not None:
            loss, acc = central
        else:
            loss = fed.get(EVAL_LOSS, float("nan"))
            acc = fed.get(EVAL_ACC, float("nan"))
        now = time.monotonic()
        row: RoundRow = {
            "round": server_round,
            "accuracy": _num(acc),
            "loss": _num(loss),
            "sites_participated": st.accepted,
            "sites_sampled": st.sampled,
            "rejected": st.rejected,
            "errors": st.errors,
            "silent": st.silent,
            "refused": st.refused,
            "global_refused": st.global_refused,
            "rolled_back_to": st.rolled_back_to,
            "aggregated": st.aggregated if server_round > 0 else True,
            "train_loss": _num(st.train.get("train-loss")),
            "federated_accuracy": _num(fed.get(EVAL_ACC)),
            "federated_loss": _num(fed.get(EVAL_LOSS)),
            "metric_source": "central" if central is not None else "federated",
            "central_accuracy": _num(central[1]) if central else None,
            "central_loss": _num(central[0]) if central else None,
            "seconds": round(now - self._round_t0, 3),
            "model": str(path.relative_to(self.dir.root)),
            "encrypted": encrypted,
            "model_sha256": sha,
        }
        for columns in self._round_columns:  # e.g. the simulated network's
            row.update(columns(server_round))
        self._round_t0 = now
        write_json_atomic(path.with_suffix(".json"), row)
        self.history.append(row)
        self.event(RunEvent.ROUND_COMPLETED, **dict(row))
        return row

    def add_columns(self, *, rounds: Callable[[int], RoundRow] | None = None,
                    sites: Callable[[int], Mapping[str, int]] | None = None) -> None:
        """Let a wrapper of the grid (the simulated network) add its own columns to
        every round's row (``rounds(server_round)``) and participant
        (``sites(node_id)``: its ``dropped``, ``offline`` and ``timed_out``)."""
        if rounds is not None:
            self._round_columns.append(rounds)
        if sites is not None:
            self._site_columns.append(sites)

    def site_label(self, node_id: int) -> str:
        """The site's name, else ``node-<id>``."""
        with self._lock:
            return self._sites[node_id].name or f"node-{node_id}"

    def _participant(self, nid: int, s: _SiteStats) -> Participant:
        p: Participant = {"node_id": nid, "site": s.name, "sampled": s.sampled,
                          "trained": s.trained, "rejected": s.rejected, "errors": s.errors,
                          "silent": s.silent, "refused": s.refused,
                          "global_refused": s.global_refused,
                          "dropped": 0, "offline": 0, "timed_out": 0,
                          "last_reason": s.last_reason}
        for columns in self._site_columns:
            extra = columns(nid)
            p["dropped"] = int(extra.get("dropped", 0))
            p["offline"] = int(extra.get("offline", 0))
            p["timed_out"] = int(extra.get("timed_out", 0))
        return p

    # -- result ----------------------------------------------------------------------
    def _he_summary(self) -> HEBlock:
        if not self.settings.he:
            return {"enabled": False}
        rounds = list(self.he_rounds.values())
        per_update = rounds[-1]["bytes_per_update"] if rounds else None
        n = rounds[-1]["num_values"] if rounds else None
        return {
            "enabled": True,
            "scheme": self.he_params.get("scheme"),
            "poly_modulus_degree": self.he_params.get("poly_modulus_degree"),
            "fingerprint": self.he_params.get("fingerprint"),
            "bytes_up_per_round": (round(sum(r["bytes_up"] for r in rounds) / len(rounds))
                                   if rounds else None),
            "bytes_per_parameter": round(per_update / n, 3) if per_update and n else None,
            "ciphertext_vs_float32": round(per_update / (4 * n), 3) if per_update and n else None,
        }

    def _privacy_summary(self) -> PrivacyBlock:
        s = self.settings
        return {
            "dp": s.dp,
            "level": "sample" if s.dp else "none",
            "accountant": s.accountant,
            "target_epsilon": s.target_epsilon if s.dp and s.noise_multiplier == 0 else None,
            "noise_multiplier": s.noise_multiplier or None,
            "max_grad_norm": s.max_grad_norm if s.dp else None,
            "secure_mode": s.secure_mode,
            "client_level": ({"enabled": True, **self.central_privacy} if s.client_dp
                             else {"enabled": False}),
            "sites": [
                {"site": st.name or f"node-{nid}", "node_id": nid,
                 "epsilon": _num(st.privacy.get("epsilon")),
                 "delta": st.privacy.get("delta"),
                 "accountant": st.privacy.get("accountant"),
                 "noise_multiplier": _num(st.privacy.get("noise-multiplier")),
                 "refused_rounds": st.refused}
                for nid, st in sorted(self._sites.items(), key=_site_key)
            ],
        }

    def summary(self, *, status: str, wall_seconds: float, error: str = "") -> RunSummary:
        final: RoundRow = self.history[-1] if self.history else {}
        out: RunSummary = {
            "format": run_summary.FORMAT,
            "run_id": self.run_id,
            "status": status,
            "error": error,
            "mode": self.mode,
            "task": self.settings.task,
            "rounds": self.settings.num_server_rounds,
            "rounds_completed": max((h["round"] for h in self.history), default=0),
            "sites": self.num_sites,
            "metric_source": final.get("metric_source", "none"),
            "final_accuracy": final.get("accuracy"),
            "final_loss": final.get("loss"),
            "started": self.started,
            "finished": utc_now(),
            "wall_seconds": round(wall_seconds, 3),
            "history": self.history,
            "participants": [
                self._participant(nid, s) for nid, s in sorted(self._sites.items())
            ],
            "privacy": self._privacy_summary(),
            "he": self._he_summary(),
            "settings": self.settings.to_config(),
        }
        if self.rollbacks:
            out["rollbacks"] = list(self.rollbacks)
        simulated = [h for h in self.history if "simulated_seconds" in h]
        if simulated:
            out["simulated_seconds"] = round(sum(h["simulated_seconds"] for h in simulated), 3)
            out["bytes_down"] = sum(h.get("bytes_down", 0) for h in simulated)
            out["bytes_up"] = sum(h.get("bytes_up", 0) for h in simulated)
            out["bytes_lost"] = sum(h.get("bytes_lost", 0) for h in simulated)
            out["dropped"] = sum(h.get("dropped", 0) for h in simulated)
        return out


def _site_key(item: tuple[int, _SiteStats]) -> tuple[str, int]:
    return (item[1].name, item[0])


def _num(v: Any) -> float | None:
    """A number for JSON: ``None`` for anything that is not a finite number (JSON has
    no NaN or infinity; the values that reach here passed server.validation, but the
    recorder must never fail on what a site sent)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None
