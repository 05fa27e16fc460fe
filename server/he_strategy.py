"""Encrypted FedAvg: the server sums TenSEAL ciphertexts it cannot decrypt.

The global model travels between rounds as an ``ArrayRecord`` of ciphertext
bytes (``protocols.he_update.encrypted_arrays``); round 1 starts from the
plaintext initial model (a random initialisation, public). Sites decrypt the
aggregate with the shared secret context, divide by the total weight and train
from it; server-side evaluation is
impossible once the model is encrypted, so federated evaluation at the sites
reports the metrics. Averaging is weighted by each site's example count, exact
up to the round's weight scale, which the server announces in the training
config (``he-weight-scale``): fixed by the run config, or, by default, the
largest example count accepted in the previous round (``FIRST_WEIGHT_SCALE`` in
round 1). Sites fold their weight into the values (``privacy.he``), so weights
cost no bits and the BFV sum provably stays below the plaintext modulus; the
server checks each weight against the example count and sums them in the clear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from privacy.he import HEContext
from protocols.errors import HEError, UpdateRejected
from protocols.he_update import (
    EncryptedUpdate,
    check_update,
    ciphertexts_of,
    encrypted_arrays,
    global_record,
    is_encrypted,
    scale_of,
    sites_of,
)
from protocols.messages import (
    CONFIG,
    ENCRYPTED_TRAIN,
    HE_GLOBAL,
    HE_UPDATE,
    ReplyPrivacy,
    TrainConfig,
    TrainMetrics,
)
from server.averaging import weighted_metrics
from server.strategy import FedVaultFedAvg, _floats
from server.validation import digest_of

#: The weight scale of an adaptive run's first round, before any example count is known.
FIRST_WEIGHT_SCALE = 256


@dataclass(slots=True)
class EncryptedParsed:
    """An encrypted training reply, checked: its ciphertexts parsed (once) until they
    are added to the round's running sum, then dropped."""

    node_id: int
    metrics: TrainMetrics
    privacy: ReplyPrivacy | None
    weight: int
    bytes_up: int
    digest: str
    vectors: list[Any] = field(default_factory=list)


class EncryptedFedAvg(FedVaultFedAvg):
    """FedAvg over encrypted, validated updates; holds only the public HE context.

    Each update is checked (header, weight, then every ciphertext's length, parameter
    set, slot count and scale) and added to the round's running sum as it passes, in
    a ``try`` of its own: an update that cannot be added (TenSEAL refuses the sum) is
    rejected for its site and the sum stays as it was."""

    def __init__(self, *, he: HEContext, num_values: int, run_id: int,
                 weight_scale: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if he.has_secret_key:
            raise HEError("the server must not hold the secret key: give it the public context.")
        self.he = he
        self.num_values = num_values
        self.num_ciphertexts = he.num_ciphertexts(num_values)
        self.slots = he.slot_counts(num_values)
        self.run_id = run_id
        if weight_scale < 0:
            raise ValueError(f"weight_scale must be >= 0 (0: adaptive). Found {weight_scale}.")
        self.weight_scale = weight_scale
        self._scales: dict[int, int] = {}  # round -> the weight scale announced for it
        self._largest_examples = 0  # in the last aggregated round
        self._sum: list[Any] | None = None

    def scale_for(self, server_round: int) -> int:
        """The weight scale announced for ``server_round`` (fixed once announced)."""
        if server_round not in self._scales:
            want = self.weight_scale or self._largest_examples or FIRST_WEIGHT_SCALE
            self._scales[server_round] = max(1, min(self.he.params.max_weight, want))
        return self._scales[server_round]

    def _as_encrypted(self, messages: Iterable[Message], arrays: ArrayRecord,
                      config: ConfigRecord) -> list[Message]:
        """Flower's FedAvg samples the sites and builds the messages; once the global
        model is encrypted, their content becomes the ``he-global`` record instead."""
        out = list(messages)
        if is_encrypted(arrays) and out:
            cts, count, rnd = ciphertexts_of(arrays)
            content = RecordDict({HE_GLOBAL: global_record(
                scheme=self.he.params.scheme, fingerprint=self.he.fingerprint,
                num_values=self.num_values, count=count, sites=sites_of(arrays) or 0,
                weight_scale=scale_of(arrays), server_round=rnd, ciphertexts=cts),
                CONFIG: config})
            for m in out:
                m.content = content
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = TrainConfig.with_weight_scale(config, self.scale_for(server_round))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # after a roll-back the strategy sends the last accepted model, not ``arrays``
        sent = self.global_arrays if self.global_arrays is not None else arrays
        return self.awaiting("train", self._as_encrypted(messages, sent, config))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.awaiting("evaluate", self._as_encrypted(
            super().configure_evaluate(server_round, arrays, config, grid), arrays, config))

    def reply_byte_budget(self) -> int:
        """Twice the ciphertexts of an honest update (each at most 1.5x a fresh one,
        as ``HEContext.parse_checked`` allows), plus 1 MiB."""
        return 2 * self.num_ciphertexts * self.he.ciphertext_bytes() * 3 // 2 + 2**20

    def begin_round(self, server_round: int) -> None:
        self._sum = None

    def parse_update(self, server_round: int, msg: Message) -> EncryptedParsed:
        """The encrypted hook of the validation loop: exactly the records of an encrypted
        reply, typed metrics, the ``he-update`` header (binding, weight from the example
        count) and every ciphertext checked and parsed under the federation's context."""
        ENCRYPTED_TRAIN.check(msg.content, "an encrypted training reply")
        metrics = TrainMetrics.from_content(msg.content, max_examples=self.max_examples)
        privacy = ReplyPrivacy.from_content(msg.content)
        u = EncryptedUpdate.from_record(msg.content.config_records[HE_UPDATE])
        check_update(u, scheme=self.he.params.scheme, fingerprint=self.he.fingerprint,
                     num_values=self.num_values, num_ciphertexts=self.num_ciphertexts,
                     run_id=self.run_id, server_round=server_round,
                     node_id=msg.metadata.src_node_id,
                     weight_scale=self.scale_for(server_round))
        if u.num_examples != metrics.num_examples:
            raise UpdateRejected(f"he-update claims {u.num_examples} examples, its metrics "
                                 f"{metrics.num_examples}")
        digest = digest_of(u.ciphertexts)
        self.check_replay(digest)  # before parsing: a replay costs no TenSEAL work
        try:
            vectors = [self.he.parse_checked(c, slots=k)
                       for c, k in zip(u.ciphertexts, self.slots, strict=True)]
        except HEError as exc:
            raise UpdateRejected(f"ciphertext: {exc}") from None
        return EncryptedParsed(node_id=msg.metadata.src_node_id, metrics=metrics,
                               privacy=privacy, weight=u.weight,
                               bytes_up=sum(len(c) for c in u.ciphertexts), digest=digest,
                               vectors=vectors)

    def include(self, server_round: int, update: Any) -> None:
        """Add the update to the running sum, in place (no new ciphertexts: a third of
        the time of ``a + v``); on failure the ciphertexts already added are subtracted
        again, so the sum stands as it was."""
        p: EncryptedParsed = update
        if self._sum is None:
            self._sum = list(p.vectors)
        else:
            done = 0
            try:
                for a, v in zip(self._sum, p.vectors, strict=True):
                    a.add_(v)
                    done += 1
            except Exception as exc:  # TenSEAL raises ValueError/RuntimeError
                for a, v in zip(self._sum[:done], p.vectors, strict=False):
                    a.sub_(v)
                raise UpdateRejected(f"the homomorphic sum refused it: {exc}") from None
        p.vectors = []  # parsed once, added once, dropped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[EncryptedParsed] | None = self.parsed_train_replies(server_round, replies)
        rolled_back = self.settle(server_round, valid)
        if rolled_back is not None:
            return rolled_back, None
        if valid is None or self._sum is None:
            return None, None
        nodes = [p.node_id for p in valid]
        summed = [v.serialize() for v in self._sum]
        self._sum = None
        up = sum(p.bytes_up for p in valid)
        self.recorder.note_he(server_round, bytes_up=up,
                              bytes_per_update=up / len(valid), num_values=self.num_values)
        # the ciphertexts carry the (integer) weights; the metrics get the same ones
        weights = [float(p.weight) for p in valid]
        metrics = weighted_metrics([p.metrics.as_dict() for p in valid], weights)
        self.recorder.note_trained(server_round, nodes, aggregated=True, metrics=_floats(metrics))
        total = sum(p.weight for p in valid)
        self._largest_examples = max(p.metrics.num_examples for p in valid)
        self._next_version = server_round
        return encrypted_arrays(summed, count=total, server_round=server_round,
                                sites=len(valid), weight_scale=self.scale_for(server_round)
                                ), metrics


__all__ = ["EncryptedFedAvg", "EncryptedParsed"]
