"""fedvault's plaintext FedAvg: Flower's Message-API ``FedAvg`` extended with
per-reply validation, a ``min-sites`` floor for aggregation and run recording.

It extends rather than reimplements: sampling, message construction and the
weighted average are Flower's (``aggregate_arrayrecords``); this class only
decides which replies may enter that average and records what happened.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from fedvault.errors import HEError, UpdateRejected
from server.recorder import RunRecorder
from server.validation import check_train_reply, num_examples_of


class FedVaultFedAvg(FedAvg):
    """FedAvg weighted by example count, over validated replies only.

    ``min_sites``: fewer valid training replies than this in a round and no
    aggregate is formed; the global model stays as it was.
    """

    def __init__(self, *, recorder: RunRecorder, min_sites: int,
                 sampling_seed: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if min_sites < 1:
            raise ValueError(f"min_sites must be >= 1. Found {min_sites}.")
        self.recorder = recorder
        self.min_sites = min_sites
        self.sampling_seed = sampling_seed
        self.global_arrays: ArrayRecord | None = None

    @contextmanager
    def _sampling(self, server_round: int, phase: int) -> Iterator[None]:
        """Flower samples with the global ``random``; with ``sampling_seed`` (simulations,
        where node ids are stable) the sample depends only on (seed, round, phase)."""
        if self.sampling_seed is None:
            yield
            return
        state = random.getstate()
        random.seed(f"{self.sampling_seed}/{server_round}/{phase}")
        try:
            yield
        finally:
            random.setstate(state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = arrays
        with self._sampling(server_round, 0):
            messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.note_sampled(server_round, [m.metadata.dst_node_id for m in messages])
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        with self._sampling(server_round, 1):
            return list(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.valid_train_replies(server_round, replies)
        if valid is None:
            return None, None
        contents = [m.content for m in valid]
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        self.recorder.note_trained(server_round, [m.metadata.src_node_id for m in valid],
                                   aggregated=True, metrics=_floats(metrics))
        return arrays, metrics

    def is_update(self, server_round: int, msg: Message) -> bool:
        """False, after recording it, for an error reply or a site's refusal."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            self.recorder.note_site_error(server_round, node, "train",
                                          msg.error.reason or "unknown error")
            return False
        if "refusal" in msg.content.config_records:
            refusal = dict(msg.content.config_records["refusal"])
            log(WARNING, "Round %s: node %s refused: %s", server_round, node,
                refusal.get("reason"))
            self.recorder.note_refused(server_round, node, refusal)
            return False
        return True

    def parse_update(self, server_round: int, msg: Message) -> Any:
        """The hook of :meth:`parsed_train_replies`: check one training reply and return
        what aggregation uses, or raise ``UpdateRejected``. Plaintext FedAvg: the reply
        itself, its arrays checked against the global model's. (``EncryptedFedAvg``
        parses the ciphertexts instead.)"""
        if self.global_arrays is None:
            raise UpdateRejected("no global model was sent this round")
        check_train_reply(msg, self.global_arrays, key=self.weighted_by_key)
        return msg

    def parsed_train_replies(self, server_round: int, replies: Iterable[Message]
                             ) -> list[tuple[Message, Any]] | None:
        """The one validation loop of every fedvault strategy: each reply that may
        enter the aggregate with what :meth:`parse_update` made of it; each bad one
        (an error, a refusal, a second reply from a node, a failed check) recorded for
        its site. ``None`` (and an ``aggregate_refused`` record) if fewer than
        ``min_sites`` remain."""
        valid: list[tuple[Message, Any]] = []
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if not self.is_update(server_round, msg):
                continue
            try:
                parsed = self.parse_update(server_round, msg)
                if node in seen:
                    raise UpdateRejected("a second update from this node in this round")
            except (UpdateRejected, HEError) as exc:
                log(WARNING, "Round %s: rejected update from node %s: %s", server_round, node, exc)
                self.recorder.note_rejected(server_round, node, str(exc))
                continue
            seen.add(node)
            valid.append((msg, parsed))
            if "privacy" in msg.content.config_records:
                self.recorder.note_privacy(node, dict(msg.content.config_records["privacy"]))
        if len(valid) < self.min_sites:
            log(WARNING, "Round %s: %d valid updates < min-sites %d; no aggregate formed",
                server_round, len(valid), self.min_sites)
            self.recorder.note_trained(server_round, [m.metadata.src_node_id for m, _ in valid],
                                       aggregated=False, metrics={})
            return None
        return valid

    def valid_train_replies(self, server_round: int, replies: Iterable[Message]
                            ) -> list[Message] | None:
        """The replies :meth:`parsed_train_replies` lets through (``None``: too few)."""
        parsed = self.parsed_train_replies(server_round, replies)
        return None if parsed is None else [m for m, _ in parsed]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.recorder.note_site_error(server_round, node, "evaluate",
                                              msg.error.reason or "unknown error")
                continue
            if "declined" in msg.content.config_records:
                # the site's policy: exact evaluation metrics are a release outside epsilon
                reason = str(msg.content.config_records["declined"].get("reason", ""))
                self.recorder.events.append("evaluation_declined", round=server_round,
                                            node=node, reason=reason[:300])
                continue
            try:
                num_examples_of(msg, key=self.weighted_by_key)
            except UpdateRejected as exc:
                self.recorder.note_rejected(server_round, node, f"evaluation reply: {exc}")
                continue
            valid.append(msg)
        if not valid:
            return None
        metrics = self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        self.recorder.note_federated_eval(server_round, _floats(metrics))
        return metrics


def _floats(metrics: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
