"""The real ClientApp, called the way Flower's runtime calls it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.data import save_table
from fedvault.errors import DataError
from fedvault.tasks import get_task
from protocols.config import RunSettings

pytestmark = pytest.mark.usefixtures("flower_identity")


def _global(task: str = "digits") -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(get_task(task).build_model().state_dict())


def _msg(kind: str, arrays: ArrayRecord) -> Message:
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, "local-epochs": 1, "batch-size": 32, "learning-rate": 0.05,
         "momentum": 0.9})}), dst_node_id=11, message_type=kind)


def _ctx(node_config: dict[str, Any], run_config: dict[str, Any] | None = None) -> Context:
    return Context(run_id=4242, node_id=11, node_config=node_config, state=RecordDict(),
                   run_config=run_config or dict(RunSettings().to_config()))


def test_train_and_evaluate_on_a_partition() -> None:
    app = build_client_app()
    g = _global()
    reply = app(_msg("train", g), _ctx({"partition-id": 0, "num-partitions": 3}))
    assert not reply.has_error()
    new = reply.content.array_records["arrays"]
    assert list(new.keys()) == list(g.keys())
    changed = [not np.array_equal(new[k].numpy(), g[k].numpy()) for k in g]
    assert all(changed)
    m = reply.content.metric_records["metrics"]
    assert int(m["num-examples"]) > 300 and float(m["train-loss"]) > 0  # type: ignore[arg-type]

    ev = app(_msg("evaluate", new), _ctx({"partition-id": 0, "num-partitions": 3}))
    em = ev.content.metric_records["metrics"]
    assert 0.0 <= float(em["eval-acc"]) <= 1.0  # type: ignore[arg-type]


def test_training_is_deterministic() -> None:
    app = build_client_app()
    a = app(_msg("train", _global()), _ctx({"partition-id": 1, "num-partitions": 3}))
    b = app(_msg("train", _global()), _ctx({"partition-id": 1, "num-partitions": 3}))
    ra, rb = a.content.array_records["arrays"], b.content.array_records["arrays"]
    assert all(np.array_equal(ra[k].numpy(), rb[k].numpy()) for k in ra)


def test_site_with_own_csv(tmp_path: Path) -> None:
    t = get_task("tabular").embedded().subset(np.arange(120))
    p = save_table(t, tmp_path / "site.csv", label_column="y")
    app = build_client_app()
    ctx = _ctx({"data-path": str(p), "label-column": "y"},
               RunSettings(task="tabular").to_config())
    reply = app(_msg("train", _global("tabular")), ctx)
    assert int(reply.content.metric_records["metrics"]["num-examples"]) == 96  # type: ignore[arg-type]


def test_bad_data_path_raises_a_clear_error(tmp_path: Path) -> None:
    app = build_client_app()
    with pytest.raises(DataError, match="does not exist"):
        app(_msg("train", _global()), _ctx({"data-path": str(tmp_path / "nope.csv")}))


def test_model_of_another_shape_is_refused() -> None:
    from fedvault.errors import ConfigError

    app = build_client_app()
    with pytest.raises(ConfigError, match="does not fit task 'digits'"):
        app(_msg("train", _global("tabular")), _ctx({"partition-id": 0, "num-partitions": 3}))
