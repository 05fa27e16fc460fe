"""Client-level DP (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963) as a strategy wrapper.

Each valid site update (its model minus the global model) is clipped to L2 norm
``clipping_norm`` (Flower's FlatClip, ``clip_inputs_inplace``), the clipped
updates are averaged *uniformly*, and Gaussian noise of standard deviation
``noise_multiplier * clipping_norm / m`` is added to the average, where ``m`` is
the number of updates actually averaged. Each release is one Gaussian mechanism on the sum
(sensitivity ``clipping_norm`` under adding or removing one site), accounted with
no amplification by sampling, in a server-side privacy ledger of the same
format as the sites' ledgers; a release that would exceed ``max_epsilon`` is
not made.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the same job but
does not fit three requirements here, so this wrapper reuses Flower's norm
function and not the class: it calibrates noise to the *configured* number of
sampled clients even when fewer valid updates are averaged (weaker privacy than
accounted), it averages with the wrapped strategy's example-count weights
(sensitivity grows with the largest weight), and it clips before validation, so
a malformed reply would crash the round. Its noise also comes from NumPy's
PRNG; this wrapper's comes from the OS CSPRNG.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from flwr.supercore.differential_privacy import get_norm

from privacy.events import SubsampledGaussianEvent
from privacy.ledger import PrivacyLedger
from privacy.noise import secure_gaussian_like
from protocols.errors import PrivacyRefused
from protocols.run_events import RunEvent
from server.averaging import weighted_metrics
from server.strategy import FedVaultFedAvg


def federation_fingerprint(name: str) -> str:
    """The server ledger's 'dataset' for client-level DP: the federation's sites."""
    return hashlib.sha256(f"fedvault-federation:{name}".encode()).hexdigest()


class ClientLevelDP(Strategy):
    """Wraps :class:`FedVaultFedAvg` with clipping, uniform averaging, noise and a ledger."""

    def __init__(self, strategy: FedVaultFedAvg, *, noise_multiplier: float,
                 clipping_norm: float, ledger: PrivacyLedger, federation: str, run_id: str,
                 delta: float, max_epsilon: float) -> None:
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0. Found {noise_multiplier}.")
        if not clipping_norm > 0:
            raise ValueError(f"clipping_norm must be > 0. Found {clipping_norm}.")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.ledger = ledger
        self.fingerprint = federation_fingerprint(federation)
        self.run_id = run_id
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.current: ArrayRecord | None = None
        # The server ledger's one budget scope is the federation (its sites' records).
        ledger.register(self.fingerprint, scope=self.fingerprint,
                        source=f"client-level DP, federation {federation!r}", rows=0)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.strategy.parsed_train_replies(server_round, replies)
        rolled_back = self.strategy.settle(server_round, valid)
        if rolled_back is not None:
            return rolled_back, None
        if valid is None or self.current is None:
            return None, None
        keys = list(self.current.keys())
        base = self.current.to_numpy_ndarrays()
        total = [np.zeros_like(b, dtype=np.float64) for b in base]
        for parsed in valid:  # each a server.validation.PlainUpdate: checked arrays
            update = [np.asarray(u, dtype=np.float64) - b for u, b in
                      zip(parsed.arrays, base, strict=True)]
            # FlatClip (McMahan et al. 2018) with Flower's norm; Flower's
            # clip_inputs_inplace divides by the norm and fails on a zero update.
            norm = get_norm(update)
            if norm > self.clipping_norm:
                update = [u * (self.clipping_norm / norm) for u in update]
            for t, u in zip(total, update, strict=True):
                t += u
        m = len(valid)
        event = SubsampledGaussianEvent(noise_multiplier=self.noise_multiplier, sample_rate=1.0,
                                        steps=1)
        try:
            reservation = self.ledger.reserve(self.fingerprint, [event], run_id=self.run_id,
                                              server_round=server_round, delta=self.delta,
                                              limit=self.max_epsilon)
        except PrivacyRefused as exc:
            log(WARNING, "Round %s: client-level DP budget: %s", server_round, exc)
            self.strategy.recorder.note_trained(server_round, [], aggregated=False, metrics={})
            self.strategy.recorder.event(RunEvent.RELEASE_REFUSED, round=server_round,
                                                 reason=str(exc))
            return None, None
        # Noise N(0, (sigma * C)^2) on the sum of clipped updates, then divide by m:
        # the average carries noise of standard deviation sigma * C / m.
        new = []
        for b, t in zip(base, total, strict=True):
            noise = secure_gaussian_like(torch.from_numpy(t),
                                         std=self.noise_multiplier * self.clipping_norm).numpy()
            new.append((b + (t + noise) / m).astype(b.dtype))
        self.ledger.complete(reservation, steps_taken=1)
        arrays = ArrayRecord({k: Array(v) for k, v in zip(keys, new, strict=True)})
        # a uniform average (DP-FedAvg weighs every clipped update alike), so the
        # metrics are averaged uniformly too
        metrics = weighted_metrics([p.metrics.as_dict() for p in valid], [1.0] * m)
        self.strategy.recorder.note_trained(
            server_round, [p.node_id for p in valid], aggregated=True,
            metrics={k: float(v) for k, v in metrics.items() if not isinstance(v, list)})
        self.strategy.recorder.note_central_privacy(
            epsilon=float(reservation["epsilon_after"]), delta=self.delta,
            noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm,
            ledger=str(self.ledger.path))
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
