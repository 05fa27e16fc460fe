"""Hostile replies: what a site running modified code can send instead of an honest
reply, reproducible in the simulator (and in tests) with real Flower messages and
real TenSEAL ciphertexts.

Each attack rewrites the reply an honest ClientApp produced (after it trained and
spent its epsilon), the way a modified ClientApp would. ``simulation_mod`` applies
them at the scenario's attacking sites; the server's validation
(:mod:`server.validation`, :class:`server.he_strategy.EncryptedFedAvg`) must reject
each one, or the honest sites' aggregate check (``HEContext.verified_mean``) must
refuse the global model it corrupted.

=======================  ============================================================
``shape-lie``            a layer's bytes disagree with its declared shape (HE: a
                         10-slot vector in place of a ciphertext)
``non-finite-metrics``   ``train-loss = inf`` in the metrics
``extra-records``        an extra ``MetricRecord`` (without ``num-examples``)
``inflated-examples``    claims 1e9 examples (HE: weight and header agree with it);
                         its evaluation replies claim accuracy 0.99
``oversize``             a layer (HE: a ciphertext) of ``attack-scale`` MiB (default 64)
``duplicate-replies``    its reply is delivered three times (the simulated network)
``replay``               from its second attacking round, resends its first update
                         (HE: relabelled with the current round)
``raw-slots``            (HE) encrypts raw slot values instead of quantised ones
``weight-lie``           (HE) multiplies its ciphertexts by 16, declaring its weight
``foreign-key``          (HE) encrypts under a key of its own, copying the fingerprint
=======================  ============================================================
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.he_client import site_context
from privacy.he import HEContext, new_secret_context
from protocols.config import RunSettings
from protocols.messages import ARRAYS, EVAL_ACC, EVAL_LOSS, HE_UPDATE, METRICS, REFUSAL
from protocols.node_config import NodeConfig
from simulations.scenario import Behaviour

#: where a replaying site keeps its first update (its Flower node state)
REPLAY_KEY = "fedvault-hostile-replay"
DEFAULT_OVERSIZE_MIB = 64.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Hostility:
    """What an attack may use: the run, the site's node config and state, the round."""

    settings: RunSettings
    node: NodeConfig
    state: RecordDict
    server_round: int
    scale: float = 0.0

    def he(self) -> HEContext:
        return site_context(self.settings, self.node)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _first_layer(content: RecordDict) -> tuple[ArrayRecord, str]:
    rec = content.array_records[ARRAYS]
    return rec, next(iter(rec.keys()))


def _he_update(content: RecordDict) -> ConfigRecord | None:
    return content.config_records.get(HE_UPDATE)


def _ciphertexts(up: ConfigRecord) -> list[bytes]:
    cts = up["ciphertexts"]
    return [bytes(c) for c in cts] if isinstance(cts, list) else []  # type: ignore[arg-type]


def _ts() -> Any:
    import tenseal as ts

    return ts


def _raw_vector(he: HEContext, values: list[int] | list[float]) -> bytes:
    ts = _ts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if he.params.scheme == "bfv":
            return bytes(ts.bfv_vector(he.ctx, values).serialize())
        return bytes(ts.ckks_vector(he.ctx, values).serialize())


def shape_lie(content: RecordDict, h: Hostility) -> None:
    up = _he_update(content)
    if up is not None:
        cts = _ciphertexts(up)
        cts[0] = _raw_vector(h.he(), [0] * 10)
        up["ciphertexts"] = cts
        return
    rec, name = _first_layer(content)
    a = rec[name]
    n = int(np.prod(a.shape)) if a.shape else 1
    wrong = np.zeros(4 * n + 1, dtype=np.dtype(a.dtype))
    rec[name] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=_npy(wrong))


def non_finite(content: RecordDict, h: Hostility) -> None:
    content.metric_records[METRICS]["train-loss"] = float("inf")


def extra_records(content: RecordDict, h: Hostility) -> None:
    content["extra"] = MetricRecord({"train-loss": 0.0})


def inflated(content: RecordDict, h: Hostility) -> None:
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        return
    metrics["num-examples"] = 10**9
    if EVAL_ACC in metrics:
        metrics[EVAL_ACC] = 0.99
        metrics[EVAL_LOSS] = 0.01
    up = _he_update(content)
    if up is not None:  # a consistent lie: header and weight agree with the claim
        up["num-examples"] = 10**9
        up["weight"] = int(up["weight-scale"])  # type: ignore[arg-type]


def oversize(content: RecordDict, h: Hostility) -> None:
    size = int((h.scale or DEFAULT_OVERSIZE_MIB) * 2**20)
    up = _he_update(content)
    if up is not None:
        cts = _ciphertexts(up)
        cts[0] = os.urandom(size)
        up["ciphertexts"] = cts
        return
    rec, name = _first_layer(content)
    # a correctly declared array, just far larger than the model's layer
    rec[name] = Array(np.zeros(size // 4, dtype=np.float32))


def duplicate(content: RecordDict, h: Hostility) -> None:
    """Nothing to rewrite: the simulated network delivers the reply three times."""


def replay(content: RecordDict, h: Hostility) -> None:
    up = _he_update(content)
    kept_he = h.state.config_records.get(REPLAY_KEY)
    kept_arrays = h.state.array_records.get(REPLAY_KEY)
    if kept_he is None and kept_arrays is None:
        # the first attacking round: send honestly and keep a copy to replay later
        if up is not None:
            h.state[REPLAY_KEY] = ConfigRecord(dict(up))
        else:
            h.state[REPLAY_KEY] = content.array_records[ARRAYS]
        return
    if up is not None and kept_he is not None:
        old = dict(kept_he)
        old["round"] = h.server_round  # relabelled: the binding matches this round
        content[HE_UPDATE] = ConfigRecord(old)
    elif kept_arrays is not None:
        content[ARRAYS] = kept_arrays


def raw_slots(content: RecordDict, h: Hostility) -> None:
    up = _he_update(content)
    if up is None:
        return
    he = h.he()
    rng = np.random.default_rng()
    half = he.params.plain_modulus // 2
    cts = _ciphertexts(up)
    up["ciphertexts"] = [
        _raw_vector(he, rng.integers(0, half, he.params.poly_modulus_degree).tolist())
        for _ in cts]


def weight_lie(content: RecordDict, h: Hostility) -> None:
    up = _he_update(content)
    if up is None:
        return
    he = h.he()
    factor = 16
    cts = _ciphertexts(up)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        up["ciphertexts"] = [bytes((he.parse(c) * factor).serialize()) for c in cts]


def foreign_key(content: RecordDict, h: Hostility) -> None:
    up = _he_update(content)
    if up is None:
        return
    he = h.he()
    other = HEContext(new_secret_context(he.params), he.params)  # another federation's key
    n = int(up["num-values"])  # type: ignore[arg-type]
    weight = int(up["weight"])  # type: ignore[arg-type]
    fake = np.random.default_rng().normal(0.0, 0.1, n)
    scale = int(up["weight-scale"])  # type: ignore[arg-type]
    up["ciphertexts"] = other.encrypt(fake, weight=weight, scale=scale)  # fingerprint kept


#: one registry of reply attacks, like ``simulations.behaviour.ATTACKS``
REPLY_ATTACKS: dict[Behaviour, Callable[[RecordDict, Hostility], None]] = {
    Behaviour.SHAPE_LIE: shape_lie,
    Behaviour.NON_FINITE: non_finite,
    Behaviour.EXTRA_RECORDS: extra_records,
    Behaviour.INFLATED: inflated,
    Behaviour.OVERSIZE: oversize,
    Behaviour.DUPLICATE: duplicate,
    Behaviour.REPLAY: replay,
    Behaviour.RAW_SLOTS: raw_slots,
    Behaviour.WEIGHT_LIE: weight_lie,
    Behaviour.FOREIGN_KEY: foreign_key,
}
#: attacks that also rewrite evaluation replies
EVAL_ATTACKS = frozenset({Behaviour.INFLATED, Behaviour.NON_FINITE, Behaviour.EXTRA_RECORDS})
#: how many times the simulated network delivers a duplicating site's reply
DUPLICATE_COPIES = 3


def tamper_reply(content: RecordDict, behaviour: str, h: Hostility, *, phase: str) -> bool:
    """Rewrite ``content`` (an honest reply that trained or evaluated) in place as
    ``behaviour`` would; ``False`` if this behaviour leaves this reply alone."""
    b = Behaviour(behaviour)
    attack = REPLY_ATTACKS.get(b)
    if attack is None or REFUSAL in content.config_records:
        return False
    if phase == "evaluate":
        if b not in EVAL_ATTACKS or METRICS not in content.metric_records:
            return False
        if b == Behaviour.NON_FINITE:
            content.metric_records[METRICS][EVAL_LOSS] = float("inf")
            return True
    attack(content, h)
    return True
