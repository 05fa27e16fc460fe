from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedvault_tasks.tasks import TASKS, Table, embedded_split, get_task, split_train_test
from protocols.errors import TaskError


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(TaskError, match=r"Unknown task 'nope'. Known tasks: digits, tabular"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_model_forward_shapes(name: str) -> None:
    task = get_task(name)
    torch.manual_seed(0)
    model = task.build_model()
    table = task.embedded()
    x = torch.from_numpy(task.preprocess(table.x[:7]))
    out = model(x)
    assert out.shape == (7, task.default_num_classes)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_models_are_opacus_compatible(name: str) -> None:
    model = get_task(name).build_model()
    assert ModuleValidator.validate(model, strict=False) == []


def test_model_init_is_seeded() -> None:
    task = get_task("digits")
    torch.manual_seed(3)
    a = task.build_model().state_dict()
    torch.manual_seed(3)
    b = task.build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_digits_rejects_other_widths() -> None:
    with pytest.raises(TaskError, match="64 features"):
        get_task("digits").build_model(num_features=30)


def test_check_table_names_the_mismatch() -> None:
    task = get_task("tabular")
    t = Table(x=np.zeros((4, 5), np.float32), y=np.array([0, 1, 0, 1]))
    with pytest.raises(TaskError, match=r"expects 30 feature columns\. Found 5"):
        task.check_table(t)
    t2 = Table(x=np.zeros((4, 30), np.float32), y=np.array([0, 1, 2, 1]))
    with pytest.raises(TaskError, match=r"labels in \[0, 1\]"):
        task.check_table(t2)


def test_embedded_split_is_stratified_disjoint_and_complete() -> None:
    task = get_task("digits")
    full = task.embedded()
    pool, test = embedded_split(task, seed=0)
    assert len(pool) + len(test) == len(full) == 1797
    assert 0.18 < len(test) / len(full) < 0.22
    # every class appears in the test split in about its overall proportion
    for c in range(10):
        share = (test.y == c).mean()
        assert abs(share - (full.y == c).mean()) < 0.02
    # disjoint: no row of the test split is a row of the pool (digits has no duplicates
    # that matter here; compare by row bytes)
    pool_rows = {r.tobytes() + bytes([c]) for r, c in zip(pool.x, pool.y, strict=True)}
    overlap = sum(r.tobytes() + bytes([c]) in pool_rows
                  for r, c in zip(test.x, test.y, strict=True))
    assert overlap <= 5  # sklearn digits holds a handful of exact duplicate images


def test_split_is_seeded() -> None:
    t = get_task("tabular").embedded()
    a, _ = split_train_test(t, test_fraction=0.2, seed=1)
    b, _ = split_train_test(t, test_fraction=0.2, seed=1)
    c, _ = split_train_test(t, test_fraction=0.2, seed=2)
    assert np.array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)


def test_table_validates_shapes() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Table(x=np.zeros(3, np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="one label per row"):
        Table(x=np.zeros((3, 2), np.float32), y=np.zeros(2, np.int64))


def test_dp_refuses_a_model_opacus_cannot_train() -> None:
    from client.dp_sgd import check_opacus_compatible

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(TaskError, match="cannot be trained with DP-SGD"):
        check_opacus_compatible(model, "custom")
