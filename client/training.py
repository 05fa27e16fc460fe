"""Local training at a site (plain PyTorch; DP-SGD wraps this). Evaluation is shared
with the server and lives in :mod:`fedvault_tasks.tasks`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedvault_tasks.tasks import Table, to_loader


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    loss: float
    steps: int
    num_examples: int


def train_local(
    model: nn.Module,
    table: Table,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    momentum: float,
    seed: int,
    max_grad_norm: float = 0.0,
) -> TrainResult:
    """SGD on ``table`` for ``epochs`` epochs; returns mean loss of the last epoch.

    ``max_grad_norm > 0`` clips each batch gradient's norm (stabilises the large
    learning rates that suit DP-SGD when the same run config trains without DP)."""
    torch.manual_seed(seed)
    loader = to_loader(table, batch_size=batch_size, shuffle=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = 0
    last = math.nan
    for _ in range(epochs):
        total, n = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            total += float(loss.item()) * len(yb)
            n += len(yb)
            steps += 1
        last = total / max(n, 1)
    return TrainResult(loss=last, steps=steps, num_examples=len(table))

