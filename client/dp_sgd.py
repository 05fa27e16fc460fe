"""DP-SGD at the site with Opacus: Poisson sampling, per-sample clipping, Gaussian noise.

The pieces of ``PrivacyEngine.make_private`` are assembled here by hand
(``GradSampleModule``, ``DPOptimizer``, and a Poisson sampler in place of
``DPDataLoader``) for three reasons: the sample rate and step count must be fixed
*before* training so the exact mechanism can be reserved in the site's ledger
first; secure mode needs noise *and* sampling from the OS CSPRNG
(``privacy.noise``), because Opacus's own secure mode requires ``torchcsprng``,
which has no torch-2 build (privacy amplification by subsampling assumes the
batches are secret: a seeded sampler lets anyone who knows the seed recompute
them); and every planned step must run, an empty batch included, as the analysis
assumes (an empty Poisson batch is a step that adds the full noise to a zero sum).
Opacus's per-run accountant is not used: the ledger's accountant composes the
whole history of the dataset across rounds and runs.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn

from client.training import TrainResult
from fedvault_tasks.tasks import Table
from privacy.analysis import poisson_sample_rate, steps_per_epoch
from privacy.events import SubsampledGaussianEvent
from privacy.noise import SecureUniform, UniformSource, secure_gaussian_like
from protocols.errors import TaskError

logger = logging.getLogger("fedvault.client.dp")


@dataclass(frozen=True, slots=True, kw_only=True)
class DPPlan:
    """The exact mechanism one round of DP-SGD will run."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    num_examples: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def expected_batch_size(self) -> int:
        return max(1, round(self.sample_rate * self.num_examples))

    def event(self) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(noise_multiplier=self.noise_multiplier,
                                       sample_rate=self.sample_rate, steps=self.steps)


def plan_round(*, num_examples: int, batch_size: int, epochs: int, noise_multiplier: float,
               max_grad_norm: float) -> DPPlan:
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be > 0. Found {max_grad_norm}.")
    q = poisson_sample_rate(batch_size=batch_size, num_examples=num_examples)
    return DPPlan(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  sample_rate=q, steps_per_epoch=steps_per_epoch(q), epochs=epochs,
                  num_examples=num_examples)


class CsprngDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with noise from the OS CSPRNG (see ``privacy.noise``)."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_gaussian_like(p.summed_grad,
                                         std=self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def check_opacus_compatible(model: nn.Module, task_name: str) -> None:
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        names = "; ".join(str(e) for e in errors[:3])
        raise TaskError(
            f"task {task_name!r}'s model cannot be trained with DP-SGD (Opacus): {names}. "
            "Use GroupNorm/LayerNorm instead of BatchNorm."
        )


def poisson_batches(num_examples: int, plan: DPPlan, rng: UniformSource
                    ) -> list[np.ndarray]:
    """The index sets of one epoch of Poisson sampling: ``plan.steps_per_epoch`` steps,
    each including every record independently with probability ``plan.sample_rate``
    (Opacus's ``UniformWithReplacementSampler``), drawn from ``rng``."""
    out = []
    for _ in range(plan.steps_per_epoch):
        mask = rng.random(num_examples) < plan.sample_rate
        out.append(np.flatnonzero(mask))
    return out


def train_dp(
    model: nn.Module,
    table: Table,
    plan: DPPlan,
    *,
    learning_rate: float,
    momentum: float,
    secure_mode: bool,
    seed: int,
    task_name: str = "",
) -> TrainResult:
    """Run exactly ``plan`` (its sample rate and step count) of DP-SGD on ``table``.

    In secure mode, batches and noise come from the OS CSPRNG; otherwise both come
    from generators seeded with ``seed`` (reproducible, and undoable by whoever knows
    the seed: the ledger marks such rounds ``insecure``). ``TrainResult.steps`` is
    the planned count: every step runs, an empty batch as a noise-only step.
    """
    check_opacus_compatible(model, task_name)
    if len(table) != plan.num_examples:
        raise ValueError(f"plan is for {plan.num_examples} examples. Found {len(table)}.")
    torch.manual_seed(seed)
    rng: UniformSource = SecureUniform() if secure_mode else np.random.default_rng(seed)
    x = torch.from_numpy(np.ascontiguousarray(table.x))
    y = torch.from_numpy(np.ascontiguousarray(table.y))
    gsm = GradSampleModule(model)
    base = torch.optim.SGD(gsm.parameters(), lr=learning_rate, momentum=momentum)
    opt_cls = CsprngDPOptimizer if secure_mode else DPOptimizer
    optimizer = opt_cls(base, noise_multiplier=plan.noise_multiplier,
                        max_grad_norm=plan.max_grad_norm,
                        expected_batch_size=plan.expected_batch_size, loss_reduction="mean")
    loss_fn = nn.CrossEntropyLoss()
    gsm.train()
    steps = 0
    try:
        for _ in range(plan.epochs):
            for idx in poisson_batches(len(table), plan, rng):
                optimizer.zero_grad()
                if len(idx) == 0:
                    # An empty Poisson batch: the clipped sum is zero and the step adds
                    # the full noise, exactly the mechanism the ledger accounted.
                    for p in optimizer.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                else:
                    loss = loss_fn(gsm(x[idx]), y[idx])
                    with warnings.catch_warnings():
                        # Opacus's hooks fire on module outputs when inputs need no
                        # grad: expected here (inputs are data); torch warns every step.
                        warnings.filterwarnings("ignore", message="Full backward hook")
                        loss.backward()
                optimizer.step()
                steps += 1
    finally:
        gsm.remove_hooks()
    if steps != plan.steps:  # pragma: no cover - the loop above runs the plan exactly
        raise RuntimeError(f"ran {steps} DP-SGD steps; the reserved plan says {plan.steps}.")
    # No training loss: it is an exact statistic of the data, outside epsilon.
    return TrainResult(loss=math.nan, steps=steps, num_examples=len(table))
