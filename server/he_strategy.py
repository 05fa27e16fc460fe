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
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

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

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[tuple[Message, EncryptedUpdate]] = []
        seen: set[int] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if not self.is_update(server_round, msg):
                continue
            records = msg.content.config_records
            try:
                if msg.content.array_records:
                    raise UpdateRejected("plaintext arrays in an encrypted round")
                if "he-update" not in records:
                    raise UpdateRejected("reply has no 'he-update' record")
                u = EncryptedUpdate.from_record(records["he-update"])
                check_update(u, scheme=self.he.params.scheme, fingerprint=self.he.fingerprint,
                             num_values=self.num_values, num_ciphertexts=self.num_ciphertexts,
                             run_id=self.run_id, server_round=server_round, node_id=node,
                             max_weight=self.he.params.max_weight)
                if node in seen:
                    raise UpdateRejected("a second update from this node in this round")
                for c in u.ciphertexts:
                    self.he.parse(c)
                if "metrics" not in msg.content.metric_records:
                    raise UpdateRejected("reply has no 'metrics' record")
            except (UpdateRejected, HEError) as exc:
                log(WARNING, "Round %s: rejected encrypted update from node %s: %s",
                    server_round, node, exc)
                self.recorder.note_rejected(server_round, node, str(exc))
                continue
            seen.add(node)
            valid.append((msg, u))
            if "privacy" in records:
                self.recorder.note_privacy(node, dict(records["privacy"]))
        nodes = [m.metadata.src_node_id for m, _ in valid]
        if len(valid) < self.min_sites:
            log(WARNING, "Round %s: %d valid encrypted updates < min-sites %d; no aggregate",
                server_round, len(valid), self.min_sites)
            self.recorder.note_trained(server_round, nodes, aggregated=False, metrics={})
            return None, None
        summed = self.he.add([list(u.ciphertexts) for _, u in valid])
        up = sum(len(c) for _, u in valid for c in u.ciphertexts)
        self.recorder.note_he(server_round, bytes_up=up,
                              bytes_per_update=up / len(valid), num_values=self.num_values)
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in valid], self.weighted_by_key)
        self.recorder.note_trained(server_round, nodes, aggregated=True, metrics=_floats(metrics))
        total = sum(u.weight for _, u in valid)
        return encrypted_arrays(summed, count=total, server_round=server_round,
                                sites=len(valid)), metrics
