"""Encrypted FedAvg: the server sums TenSEAL ciphertexts it cannot decrypt.

The global model travels between rounds as an ``ArrayRecord`` of ciphertext
bytes (``protocols.he_update.encrypted_arrays``); round 1 starts from the
plaintext initial model (a random initialisation, public). Sites decrypt the
aggregate with the shared secret context, divide by the total weight and train
from it; server-side evaluation is
impossible once the model is encrypted, so federated evaluation at the sites
reports the metrics. Averaging is weighted by integer weights in
[1, 2**weight_bits] that each site derives from its example count (in units of
``he-weight-unit``): bounded, so the BFV sum provably stays below the plaintext
modulus; the server checks each weight and sums them in the clear.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedvault.errors import HEError, UpdateRejected
from privacy.he import HEContext
from protocols.he_update import (
    EncryptedUpdate,
    check_update,
    ciphertexts_of,
    encrypted_arrays,
    global_record,
    is_encrypted,
)
from server.strategy import FedVaultFedAvg, _floats


class EncryptedFedAvg(FedVaultFedAvg):
    """FedAvg over encrypted, validated updates; holds only the public HE context."""

    def __init__(self, *, he: HEContext, num_values: int, run_id: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if he.has_secret_key:
            raise HEError("the server must not hold the secret key: give it the public context.")
        self.he = he
        self.num_values = num_values
        self.num_ciphertexts = -(-num_values // he.params.values_per_ciphertext)
        self.run_id = run_id

    def _as_encrypted(self, messages: Iterable[Message], arrays: ArrayRecord,
                      config: ConfigRecord) -> list[Message]:
        """Flower's FedAvg samples the sites and builds the messages; once the global
        model is encrypted, their content becomes the "he-global" record instead."""
        out = list(messages)
        if is_encrypted(arrays) and out:
            cts, count, rnd = ciphertexts_of(arrays)
            content = RecordDict({"he-global": global_record(
                scheme=self.he.params.scheme, fingerprint=self.he.fingerprint,
                num_values=self.num_values, count=count, server_round=rnd, ciphertexts=cts),
                "config": config})
            for m in out:
                m.content = content
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._as_encrypted(super().configure_train(server_round, arrays, config, grid),
                                  arrays, config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._as_encrypted(super().configure_evaluate(server_round, arrays, config, grid),
                                  arrays, config)

    def parse_update(self, server_round: int, msg: Message) -> EncryptedUpdate:
        """The encrypted hook of the validation loop: the reply's "he-update", its
        header checked and every ciphertext parsed under the federation's context."""
        records = msg.content.config_records
        if msg.content.array_records:
            raise UpdateRejected("plaintext arrays in an encrypted round")
        if "he-update" not in records:
            raise UpdateRejected("reply has no 'he-update' record")
        u = EncryptedUpdate.from_record(records["he-update"])
        check_update(u, scheme=self.he.params.scheme, fingerprint=self.he.fingerprint,
                     num_values=self.num_values, num_ciphertexts=self.num_ciphertexts,
                     run_id=self.run_id, server_round=server_round,
                     node_id=msg.metadata.src_node_id, max_weight=self.he.params.max_weight)
        for c in u.ciphertexts:
            self.he.parse(c)
        if "metrics" not in msg.content.metric_records:
            raise UpdateRejected("reply has no 'metrics' record")
        return u

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed = self.parsed_train_replies(server_round, replies)
        if parsed is None:
            return None, None
        valid: list[tuple[Message, EncryptedUpdate]] = parsed
        nodes = [m.metadata.src_node_id for m, _ in valid]
        summed = self.he.add([list(u.ciphertexts) for _, u in valid])
        up = sum(len(c) for _, u in valid for c in u.ciphertexts)
        self.recorder.note_he(server_round, bytes_up=up,
                              bytes_per_update=up / len(valid), num_values=self.num_values)
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in valid], self.weighted_by_key)
        self.recorder.note_trained(server_round, nodes, aggregated=True, metrics=_floats(metrics))
        total = sum(u.weight for _, u in valid)
        return encrypted_arrays(summed, count=total, server_round=server_round,
                                sites=len(valid)), metrics
