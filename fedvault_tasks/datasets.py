"""The data every party prepares the same way: the run's pool and central test
split, the simulated sites' partitions of it, and declared feature bounds.

A base module: the ServerApp (central evaluation), the simulated ClientApps (their
partition), the simulation runner and the rehearsal all read the pool through it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedvault_tasks.partition import load_plan, partition_indices
from fedvault_tasks.tables import load_table
from fedvault_tasks.tasks import (
    TEST_FRACTION,
    FeatureBounds,
    Table,
    Task,
    embedded_split,
    get_task,
    split_train_test,
)
from protocols.config import RunSettings
from protocols.errors import ConfigError


def pooled_table(task: Task, settings: RunSettings) -> tuple[Table, Table]:
    """(federated pool, central test split) of the run's table or the embedded data."""
    if settings.data_path:
        label = settings.label_column or task.default_label_column
        full = load_table(settings.data_path, label_column=label)
        return split_train_test(full, test_fraction=TEST_FRACTION, seed=settings.seed)
    return embedded_split(task, seed=settings.seed)


@lru_cache(maxsize=2)
def pool(settings: RunSettings) -> Table:
    return pooled_table(get_task(settings.task), settings)[0]


@lru_cache(maxsize=2)
def site_owners(settings: RunSettings, num_partitions: int) -> np.ndarray:
    """Owner site of every row of the federated pool: the run's scenario decides when
    it has one, else the run's partitioner. Computed once per process; memory grows
    with the data, not with the number of sites."""
    table = pool(settings)
    if settings.scenario:
        plan = load_plan(settings.scenario)
        if plan.num_sites != num_partitions:
            raise ConfigError(f"the scenario has {plan.num_sites} sites; this simulation "
                              f"runs {num_partitions}.")
        return plan.owners(table.y, seed=settings.seed)
    parts = partition_indices(table.y, num_partitions, partitioner=settings.partitioner,
                              alpha=settings.alpha, seed=settings.seed)
    owners = np.empty(len(table), dtype=np.int64)
    for k, part in enumerate(parts):
        owners[part] = k
    return owners


@lru_cache(maxsize=64)
def partition_table(settings: RunSettings, partition_id: int, num_partitions: int) -> Table:
    owners = site_owners(settings, num_partitions)
    return pool(settings).subset(np.flatnonzero(owners == partition_id))


@lru_cache(maxsize=8)
def file_table(path: str, label_column: str) -> Table:
    return load_table(path, label_column=label_column)


def parse_feature_bounds(spec: str, num_features: int) -> FeatureBounds:
    """``"LOW:HIGH"`` (every feature) or the path of a JSON file with ``low`` and
    ``high`` lists; ``ConfigError`` naming the problem."""
    spec = spec.strip()
    try:
        if ":" in spec and not Path(spec).expanduser().exists():
            lo, hi = (float(v) for v in spec.split(":", 1))
            return FeatureBounds.uniform(lo, hi, num_features)
        p = Path(spec).expanduser()
        d = json.loads(p.read_text(encoding="utf-8"))
        b = FeatureBounds(low=np.asarray(d["low"], dtype=np.float32),
                          high=np.asarray(d["high"], dtype=np.float32))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"feature-bounds {spec!r}: {exc}. Use \"LOW:HIGH\" or a JSON "
                          "file with \"low\" and \"high\" lists.") from None
    if len(b) != num_features:
        raise ConfigError(f"feature-bounds {spec!r} declares {len(b)} features; the data has "
                          f"{num_features}.")
    return b


def central_bounds(settings: RunSettings, task: Task, num_features: int) -> FeatureBounds | None:
    """The bounds the run's own data is scaled with: the server's central test split
    and the simulated sites (``None``: the task scales by a fixed rule)."""
    if task.fixed_scale is not None:
        return None
    if settings.feature_bounds:
        return parse_feature_bounds(settings.feature_bounds, num_features)
    if task.embedded_bounds is not None and len(task.embedded_bounds) == num_features \
            and not settings.data_path:
        return task.embedded_bounds
    # The simulation plays every data owner and holds the whole (public) pool:
    # its range stands for the bounds real data owners would declare.
    return pool_bounds(settings)


@lru_cache(maxsize=2)
def pool_bounds(settings: RunSettings) -> FeatureBounds:
    table = pool(settings)
    lo, hi = table.x.min(axis=0), table.x.max(axis=0)
    return FeatureBounds(low=lo, high=np.where(hi > lo, hi, lo + 1.0).astype(np.float32))


def central_test_table(task: Task, settings: RunSettings, *, deployment: bool = False
                       ) -> Table | None:
    """The central test data, preprocessed: the central team's own table
    (``central-test-path``), else in a simulation the held-out split of the pool;
    ``None`` when disabled, and in a deployment without a table of its own (the embedded
    data says nothing about the sites' data there)."""
    if not settings.central_eval:
        return None
    if settings.central_test_path:
        test = load_table(settings.central_test_path,
                          label_column=settings.label_column or task.default_label_column)
    elif deployment:
        return None
    else:
        _, test = pooled_table(task, settings)
    # scaled like the simulated sites' data: declared bounds, never test-set statistics
    bounds = central_bounds(settings, task, test.num_features)
    return Table(x=task.preprocess(test.x, bounds), y=test.y)
