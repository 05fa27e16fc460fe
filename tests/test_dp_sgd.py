"""DP-SGD at a site runs exactly the mechanism the ledger accounts (real Opacus)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import client.dp_sgd as dp
from client.dp_sgd import plan_round, poisson_batches, train_dp
from fedvault_tasks.tasks import get_task
from privacy.noise import SecureUniform


def _table(n: int = 200) -> Any:
    t = get_task("digits").embedded().subset(np.arange(n))
    return type(t)(x=get_task("digits").preprocess(t.x), y=t.y)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[list[np.ndarray]]:
    seen: list[list[np.ndarray]] = []
    real = dp.poisson_batches

    def spy(n: int, plan: Any, rng: Any) -> list[np.ndarray]:
        out = real(n, plan, rng)
        seen.append(out)
        return out

    monkeypatch.setattr(dp, "poisson_batches", spy)
    return seen


def test_secure_mode_batches_are_secret_even_with_the_same_seed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Amplification by subsampling assumes nobody outside the site knows the batches:
    # with the same run seed, round and site, two runs must sample differently.
    seen = _spy(monkeypatch)
    table = _table()
    plan = plan_round(num_examples=len(table), batch_size=20, epochs=1,
                      noise_multiplier=1.0, max_grad_norm=1.0)
    for _ in range(2):
        train_dp(get_task("digits").build_model(), table, plan, learning_rate=0.1,
                 momentum=0.0, secure_mode=True, seed=1234)
    a, b = seen
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # ... while seeded (insecure) runs repeat them exactly
    seen.clear()
    for _ in range(2):
        train_dp(get_task("digits").build_model(), table, plan, learning_rate=0.1,
                 momentum=0.0, secure_mode=False, seed=1234)
    a, b = seen
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_poisson_sampling_has_the_planned_rate() -> None:
    plan = plan_round(num_examples=1000, batch_size=100, epochs=1, noise_multiplier=1.0,
                      max_grad_norm=1.0)
    batches = poisson_batches(1000, plan, SecureUniform())
    assert len(batches) == plan.steps_per_epoch == 10
    sizes = [len(b) for b in batches]
    assert 700 < sum(sizes) < 1300  # mean 1000, sd ~30


def test_an_empty_batch_is_a_noise_only_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # The analysis counts every planned step as a Gaussian release; an empty batch
    # must still add the full noise (skipping it changes the mechanism) and count.
    table = _table(100)
    plan = plan_round(num_examples=len(table), batch_size=10, epochs=1,
                      noise_multiplier=1.0, max_grad_norm=1.0)
    monkeypatch.setattr(dp, "poisson_batches",
                        lambda n, p, rng: [np.array([], dtype=np.int64)] * p.steps_per_epoch)
    model = get_task("digits").build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dp(model, table, plan, learning_rate=0.1, momentum=0.0,
                      secure_mode=True, seed=0)
    assert result.steps == plan.steps == 10
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.weight" in moved  # the noise moved the weights
    # its spread is sigma * C / expected batch size * lr, summed over 10 steps
    delta = (model.state_dict()["head.weight"] - before["head.weight"]).std().item()
    expected = 0.1 * 1.0 * 1.0 / plan.expected_batch_size * np.sqrt(10)
    assert 0.7 * expected < delta < 1.3 * expected


def test_the_reply_reports_the_planned_steps_not_the_nonempty_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    table = _table(100)
    plan = plan_round(num_examples=len(table), batch_size=2, epochs=2,
                      noise_multiplier=1.0, max_grad_norm=1.0)
    result = train_dp(get_task("digits").build_model(), table, plan, learning_rate=0.1,
                      momentum=0.0, secure_mode=True, seed=0)
    assert result.steps == plan.steps == 100
    assert np.isnan(result.loss)  # no training loss leaves the site
