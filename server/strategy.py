"""fedvault's plaintext FedAvg: Flower's Message-API ``FedAvg`` extended with
per-reply validation, a ``min-sites`` floor for aggregation, replay detection,
roll-back of a global model the sites refused, and run recording.

It extends rather than reimplements: sampling, message construction and the run
loop are Flower's. What enters the average is fedvault's: every reply is parsed
once by :mod:`server.validation` into a typed, checked update, and the average is
taken over those checked arrays with capped weights (Flower's
``aggregate_arrayrecords`` would re-read the raw bytes and trust the declared weight).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from typing import Any, Protocol

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from protocols.errors import UpdateRejected
from protocols.messages import (
    DECLINED,
    DECLINED_SHAPE,
    GLOBAL_REFUSED,
    REFUSAL,
    Declined,
    GlobalRefused,
    Refusal,
    ReplyPrivacy,
    TrainMetrics,
)
from protocols.run_events import RunEvent
from server.averaging import capped_weights, weighted_mean, weighted_metrics
from server.recorder import RunRecorder
from server.validation import (
    DEFAULT_MAX_EXAMPLES,
    NPY_HEADER_ROOM,
    EvalReply,
    LayerSpec,
    model_spec,
    parse_evaluation,
    parse_plain_update,
)

#: Default ``max-weight-share`` (the run config's): no site takes more than half the weight.
DEFAULT_MAX_WEIGHT_SHARE = 0.5


class Parsed(Protocol):
    """What every strategy's :meth:`FedVaultFedAvg.parse_update` returns."""

    @property
    def node_id(self) -> int: ...
    @property
    def metrics(self) -> TrainMetrics: ...
    @property
    def privacy(self) -> ReplyPrivacy | None: ...
    @property
    def digest(self) -> str: ...


class FedVaultFedAvg(FedAvg):
    """FedAvg weighted by example count, over validated replies only.

    ``min_sites``: fewer valid training replies than this in a round and no
    aggregate is formed; the global model stays as it was. ``max_examples``: the
    largest example count a reply may claim. ``max_weight_share``: no site's share
    of the FedAvg weight exceeds it (weights are capped, :func:`capped_weights`).
    """

    def __init__(self, *, recorder: RunRecorder, min_sites: int,
                 sampling_seed: int | None = None, max_examples: int = DEFAULT_MAX_EXAMPLES,
                 max_weight_share: float = DEFAULT_MAX_WEIGHT_SHARE,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if min_sites < 1:
            raise ValueError(f"min_sites must be >= 1. Found {min_sites}.")
        if not 0 < max_weight_share <= 1:
            raise ValueError(f"max_weight_share must be in (0, 1]. Found {max_weight_share}.")
        self.recorder = recorder
        self.min_sites = min_sites
        self.sampling_seed = sampling_seed
        self.max_examples = max_examples
        self.max_weight_share = max_weight_share
        self.global_arrays: ArrayRecord | None = None
        self._spec: tuple[int, tuple[LayerSpec, ...]] | None = None
        #: digest -> (round, node) of every update accepted in this run (replays)
        self._digests: dict[str, tuple[int, int]] = {}
        #: the last global model the sites trained on without refusing it: (version, arrays)
        self.last_accepted: tuple[int, ArrayRecord] | None = None
        #: versions (the round that formed them) some site refused
        self.refused_versions: set[int] = set()
        #: the version (round that formed it) of the global model sent this round, and of
        #: the one the next round will send
        self._sent_version = 0
        self._next_version = 0
        self._refusing: set[int] = set()  # nodes refusing the model of the current phase
        #: the messages sent in the current phase ("train", "evaluate"); the grid gives
        #: each its message id as it pushes it
        # phase -> (message, its destination as the strategy addressed it): a grid in
        # between (the simulated network) rewrites the message's destination in place
        self._awaiting: dict[str, list[tuple[Message, int]]] = {}
        #: the round's timeout (server/app.py sets the run's), named when a site is silent
        self.round_timeout: float | None = None

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

    # -- configure ------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        version = self._next_version
        if version in self.refused_versions and self.last_accepted is not None:
            # a site refused this model when it was sent for evaluation: train from the
            # last version the sites accepted instead
            arrays = self.roll_back(server_round, refused=version)
            version = self._next_version
        self.global_arrays = arrays
        self._sent_version = version
        if self.last_accepted is None:
            self.last_accepted = (version, arrays)
        with self._sampling(server_round, 0):
            messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.note_sampled(server_round, [m.metadata.dst_node_id for m in messages])
        return self.awaiting("train", messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        with self._sampling(server_round, 1):
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self.awaiting("evaluate", messages)

    def awaiting(self, phase: str, messages: list[Message]) -> list[Message]:
        """Remember the messages of ``phase`` as sent (``EncryptedFedAvg`` calls it again
        with the messages it really sends), to know who never replied."""
        self._awaiting[phase] = [(m, m.metadata.dst_node_id) for m in messages]
        return messages

    def reply_source(self, msg: Message) -> int:
        """The site a reply is about: its source, except for the error replies the
        SuperLink itself makes for a message whose destination stopped sending
        heartbeats (Flower's ``NODE_UNAVAILABLE``, from ``SUPERLINK_NODE_ID``): those
        are the destination's, found by the message they reply to."""
        src = msg.metadata.src_node_id
        if src == SUPERLINK_NODE_ID and msg.has_error():
            for phase in self._awaiting.values():
                for sent, dst in phase:
                    if sent.metadata.message_id == msg.metadata.reply_to_message_id:
                        return dst
        return src

    def note_silent(self, server_round: int, phase: str, replied: set[int]) -> None:
        """Record every site sent a message in ``phase`` that sent nothing back, not even
        an error, within the round's timeout: its SuperNode or its ClientApp process is
        down, it lost its connection, or it is slower than the timeout."""
        sent = {dst for _, dst in self._awaiting.pop(phase, [])}
        silent = sorted(sent - replied)
        if silent:
            limit = f"{self.round_timeout:g} s" if self.round_timeout else "the round timeout"
            log(WARNING, "Round %s: %d site(s) sent no %s reply within %s", server_round,
                len(silent), phase, limit)
            self.recorder.note_silent(
                server_round, silent, phase,
                f"no {phase} reply within {limit}: the site's node or ClientApp process "
                "is down or disconnected, or slower than the timeout")

    def roll_back(self, server_round: int, *, refused: int) -> ArrayRecord:
        """The last accepted global model, recorded as a roll-back from ``refused``."""
        assert self.last_accepted is not None
        version, arrays = self.last_accepted
        self._next_version = version
        log(WARNING, "Round %s: sites refused global model version %s; rolling back to "
            "version %s", server_round, refused, version)
        self.recorder.note_rollback(server_round, refused=refused, to=version)
        return arrays

    # -- training replies -------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.parsed_train_replies(server_round, replies)
        rolled_back = self.settle(server_round, valid)
        if rolled_back is not None:
            return rolled_back, None
        if valid is None:
            return None, None
        weights = self.weights(server_round, valid)
        spec = self.layer_spec()
        mean = weighted_mean([u.arrays for u in valid], weights)
        arrays = ArrayRecord({s.name: Array(a) for s, a in zip(spec, mean, strict=True)})
        metrics = weighted_metrics([u.metrics.as_dict() for u in valid], weights)
        self.recorder.note_trained(server_round, [u.node_id for u in valid],
                                   aggregated=True, metrics=_floats(metrics))
        self._next_version = server_round
        return arrays, metrics

    def settle(self, server_round: int, valid: list[Any] | None) -> ArrayRecord | None:
        """After a round's training replies: if a site refused the global model sent this
        round, the last accepted version (the round forms no aggregate); else that model
        becomes the last accepted one and the round's aggregate (if any) comes next."""
        if self._sent_version in self.refused_versions and self.last_accepted is not None:
            if valid is not None:
                self.recorder.note_trained(
                    server_round, [u.node_id for u in valid], aggregated=False, metrics={},
                    reason=f"sites refused global model version {self._sent_version}")
            return self.roll_back(server_round, refused=self._sent_version)
        if self.global_arrays is not None:
            self.last_accepted = (self._sent_version, self.global_arrays)
        return None

    def weights(self, server_round: int, valid: list[Any]) -> list[float]:
        """Example counts, capped at ``max_weight_share`` (recorded when a cap applies)."""
        claimed = [float(u.metrics.num_examples) for u in valid]
        weights = capped_weights(claimed, self.max_weight_share)
        capped = [u.node_id for u, a, b in zip(valid, claimed, weights, strict=True) if b < a]
        if capped:
            self.recorder.event(RunEvent.WEIGHTS_CAPPED, round=server_round, nodes=capped,
                                        max_share=self.max_weight_share)
        return weights

    def layer_spec(self) -> tuple[LayerSpec, ...]:
        if self.global_arrays is None:
            raise UpdateRejected("no global model was sent this round")
        key = id(self.global_arrays)
        if self._spec is None or self._spec[0] != key:
            self._spec = (key, model_spec(self.global_arrays))
        return self._spec[1]

    def reply_byte_budget(self) -> int:
        """The most bytes an honest training reply of this model takes, doubled, plus
        1 MiB for records and metadata (the deployment grid's budget per reply,
        ``server.transport``)."""
        layers = sum(s.nbytes + NPY_HEADER_ROOM for s in self.layer_spec())
        return 2 * layers + 2**20

    def parse_update(self, server_round: int, msg: Message) -> Any:
        """The hook of :meth:`parsed_train_replies`: parse one training reply into the
        checked update aggregation uses, or raise ``UpdateRejected``. Plaintext FedAvg:
        a :class:`PlainUpdate`. (``EncryptedFedAvg`` parses the ciphertexts instead.)"""
        return parse_plain_update(msg, self.layer_spec(), max_examples=self.max_examples)

    def check_replay(self, digest: str) -> None:
        """``UpdateRejected`` if an update with this digest was accepted in this run, under
        any node id or round. (``EncryptedFedAvg`` calls it before parsing ciphertexts.)"""
        if digest in self._digests:
            r, n = self._digests[digest]
            raise UpdateRejected(f"replay: the same update was accepted from node {n} in "
                                 f"round {r}")

    def include(self, server_round: int, update: Any) -> None:
        """Called for each update as it passes validation (``EncryptedFedAvg`` adds it
        to its running sum here); raising ``UpdateRejected`` rejects it after all."""

    def begin_round(self, server_round: int) -> None:
        """Called before a round's replies are parsed."""

    def _not_an_update(self, server_round: int, msg: Message, node: int) -> bool:
        """True, after recording it, for an error reply, a refusal or a global-model
        refusal (each validated: a malformed one is rejected like a bad update)."""
        if msg.has_error():
            self.recorder.note_site_error(server_round, node, "train",
                                          str(msg.error.reason or "unknown error"))
            return True
        records = msg.content.config_records
        if REFUSAL in records:
            refusal = Refusal.from_content(msg.content)
            log(WARNING, "Round %s: node %s refused: %s", server_round, node, refusal.reason)
            self.recorder.note_refused(server_round, node, refusal)
            return True
        if GLOBAL_REFUSED in records:
            self.note_global_refused(server_round, msg, sent=self._sent_version)
            return True
        return False

    def note_global_refused(self, server_round: int, msg: Message, *, sent: int) -> None:
        """A site refused the global model ``sent`` in this phase (any other version is a
        malformed refusal). Counted, not yet acted on: :meth:`_refused_by_most`."""
        refused = GlobalRefused.from_content(msg.content)
        if refused.version != sent:
            raise UpdateRejected(f"refuses global model version {refused.version}; this "
                                 f"phase sent version {sent}")
        log(WARNING, "Round %s: node %s refused global model version %s: %s", server_round,
            msg.metadata.src_node_id, refused.version, refused.reason)
        self._refusing.add(msg.metadata.src_node_id)
        self.recorder.note_global_refused(server_round, msg.metadata.src_node_id,
                                          version=refused.version, reason=refused.reason,
                                          site=refused.site)

    def _refused_by_most(self, version: int, responders: int) -> bool:
        """Whether more than half of the sites that answered this phase refused ``version``:
        then it is refused for good. (One hostile site's refusal alone cannot make the
        server roll back; a corrupted aggregate is refused by every honest site that
        decrypts it, since they all decrypt the same ciphertexts.)"""
        refusing, self._refusing = len(self._refusing), set()
        if refusing and 2 * refusing > responders:
            self.refused_versions.add(version)
            return True
        if refusing:
            self.recorder.event(RunEvent.GLOBAL_REFUSAL_OUTVOTED, version=version,
                                        refusing=refusing, responders=responders)
        return False

    def parsed_train_replies(self, server_round: int, replies: Iterable[Message]
                             ) -> list[Any] | None:
        """The one validation loop of every fedvault strategy: each reply that may
        enter the aggregate, as :meth:`parse_update` made it; each other one (an error,
        a refusal, a second reply from a node, a replay, a failed check, an exception
        while adding it) recorded for its site. ``None`` (and an ``aggregate_refused``
        record) if fewer than ``min_sites`` remain."""
        self.begin_round(server_round)
        valid: list[Any] = []
        seen: set[int] = set()
        answered = 0  # sites that replied with something other than an error
        for msg in replies:
            node = self.reply_source(msg)
            try:
                if node in seen:
                    raise UpdateRejected("a second reply from this node in this round")
                seen.add(node)
                answered += 0 if msg.has_error() else 1
                if self._not_an_update(server_round, msg, node):
                    continue
                parsed = self.parse_update(server_round, msg)
                self.check_replay(parsed.digest)
                self.include(server_round, parsed)
                if parsed.privacy is not None:
                    self.recorder.note_privacy(node, parsed.privacy)
            except UpdateRejected as exc:
                self._reject(server_round, node, str(exc))
                continue
            except Exception as exc:  # one site's reply never ends the round
                self._reject(server_round, node, f"{type(exc).__name__}: {exc}")
                continue
            self._digests[parsed.digest] = (server_round, node)
            valid.append(parsed)
        self.note_silent(server_round, "train", seen)
        self._refused_by_most(self._sent_version, answered)
        if len(valid) < self.min_sites:
            log(WARNING, "Round %s: %d valid updates < min-sites %d; no aggregate formed",
                server_round, len(valid), self.min_sites)
            self.recorder.note_trained(server_round, [u.node_id for u in valid],
                                       aggregated=False, metrics={})
            return None
        return valid

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log(WARNING, "Round %s: rejected reply from node %s: %s", server_round, node, reason)
        self.recorder.note_rejected(server_round, node, reason[:300])

    # -- evaluation replies -------------------------------------------------------------------
    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Federated evaluation, through the same gate: typed, finite, in range, one reply
        per node, example counts capped; a global-model refusal is recorded."""
        valid: list[EvalReply] = []
        seen: set[int] = set()
        answered = 0
        for msg in replies:
            node = self.reply_source(msg)
            try:
                if node in seen:
                    raise UpdateRejected("a second reply from this node in this round")
                seen.add(node)
                answered += 0 if msg.has_error() else 1
                if msg.has_error():
                    self.recorder.note_site_error(server_round, node, "evaluate",
                                                  str(msg.error.reason or "unknown error"))
                    continue
                records = msg.content.config_records
                if GLOBAL_REFUSED in records:  # of the model just formed
                    self.note_global_refused(server_round, msg, sent=self._next_version)
                    continue
                if DECLINED in records:
                    # the site's policy: exact evaluation metrics are a release outside epsilon
                    DECLINED_SHAPE.check(msg.content, "a declined evaluation")
                    reason = Declined.from_content(msg.content).reason
                    self.recorder.event(RunEvent.EVALUATION_DECLINED, round=server_round,
                                                node=node, reason=reason)
                    continue
                valid.append(parse_evaluation(msg, max_examples=self.max_examples))
            except UpdateRejected as exc:
                self._reject(server_round, node, f"evaluation reply: {exc}")
            except Exception as exc:  # one site's reply never ends the round
                self._reject(server_round, node, f"evaluation reply: {type(exc).__name__}: {exc}")
        self.note_silent(server_round, "evaluate", seen)
        self._refused_by_most(self._next_version, answered)
        if not valid:
            return None
        weights = capped_weights([float(v.metrics.num_examples) for v in valid],
                                 self.max_weight_share)
        metrics = weighted_metrics([v.metrics.as_metrics() for v in valid], weights)
        self.recorder.note_federated_eval(server_round, _floats(metrics))
        return metrics


def _floats(metrics: MetricRecord) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
