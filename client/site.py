"""Resolve what data a site trains on, from its node config and the run config.

* A real site (a SuperNode on the data owner's premises) sets ``data-path`` in
  its node config: its own CSV/Parquet/NPZ file, loaded here and nowhere else.
* A simulated site has only ``partition-id`` and ``num-partitions`` in its node
  config (Flower's Simulation Engine sets nothing else): it takes its partition
  of the run's table (``data-path`` in the run config) or of the task's
  embedded data, with the central test split held out first.

Node config keys a data owner may set: ``data-path``, ``label-column``, ``task``
(when set, the site refuses runs of another task).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from client.data import fingerprint, load_table, split_site
from fedvault.errors import ConfigError, DataError
from fedvault.tasks import TEST_FRACTION, Table, Task, embedded_split, get_task, split_train_test
from protocols.config import RunSettings
from simulations.partition import partition_indices


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteData:
    """A site's preprocessed train and validation tables and where they came from."""

    train: Table
    validation: Table
    source: str
    fingerprint: str  # of the site's data as loaded, before the split


def _int(node_config: Mapping[str, Any], key: str) -> int:
    try:
        return int(node_config[key])
    except (TypeError, ValueError):
        raise ConfigError(
            f"node-config {key!r} must be an integer. Found {node_config[key]!r}."
        ) from None


def pooled_table(task: Task, settings: RunSettings) -> tuple[Table, Table]:
    """(federated pool, central test split) of the run's table or the embedded data."""
    if settings.data_path:
        label = settings.label_column or task.default_label_column
        full = load_table(settings.data_path, label_column=label)
        return split_train_test(full, test_fraction=TEST_FRACTION, seed=settings.seed)
    return embedded_split(task, seed=settings.seed)


@lru_cache(maxsize=2)
def _pool(settings: RunSettings) -> Table:
    return pooled_table(get_task(settings.task), settings)[0]


@lru_cache(maxsize=2)
def site_owners(settings: RunSettings, num_partitions: int) -> np.ndarray:
    """Owner site of every row of the federated pool: the run's scenario decides when
    it has one, else the run's partitioner. Computed once per process; memory grows
    with the data, not with the number of sites."""
    pool = _pool(settings)
    if settings.scenario:
        from simulations.scenario import load_compiled

        scenario = load_compiled(settings.scenario)
        if scenario.num_sites != num_partitions:
            raise ConfigError(f"the scenario has {scenario.num_sites} sites; this simulation "
                              f"runs {num_partitions}.")
        return scenario.owners(pool.y, seed=settings.seed)
    parts = partition_indices(pool.y, num_partitions, partitioner=settings.partitioner,
                              alpha=settings.alpha, seed=settings.seed)
    owners = np.empty(len(pool), dtype=np.int64)
    for k, part in enumerate(parts):
        owners[part] = k
    return owners


@lru_cache(maxsize=64)
def _partition(settings: RunSettings, partition_id: int, num_partitions: int) -> Table:
    owners = site_owners(settings, num_partitions)
    return _pool(settings).subset(np.flatnonzero(owners == partition_id))


@lru_cache(maxsize=8)
def _file_table(path: str, label_column: str) -> Table:
    return load_table(path, label_column=label_column)


def resolve_site_data(settings: RunSettings, node_config: Mapping[str, Any]) -> SiteData:
    """The site's data for this run; ``DataError``/``ConfigError`` with a clear reason."""
    task = get_task(settings.task)
    site_task = node_config.get("task")
    if site_task and site_task != settings.task:
        raise ConfigError(
            f"this site serves task {site_task!r} (node-config 'task'); "
            f"the run asks for task {settings.task!r}."
        )
    data_path = str(node_config.get("data-path", "") or "")
    if data_path:
        label = str(node_config.get("label-column", "") or settings.label_column
                    or task.default_label_column)
        raw = _file_table(data_path, label)
        source = data_path
    elif "partition-id" in node_config and "num-partitions" in node_config:
        pid, n = _int(node_config, "partition-id"), _int(node_config, "num-partitions")
        if not 0 <= pid < n:
            raise ConfigError(f"partition-id must be in [0, {n - 1}]. Found {pid}.")
        raw = _partition(settings, pid, n)
        source = (f"partition {pid}/{n} of "
                  f"{settings.data_path or task.embedded_name} ({settings.partitioner})")
    else:
        raise DataError(
            "no data for this site: set data-path in the SuperNode's node config "
            "(e.g. --node-config 'data-path=\"/data/site.csv\"')."
        )
    task.check_table(raw, num_features=settings.num_features, num_classes=settings.num_classes)
    fp = fingerprint(raw)
    pre = Table(x=task.preprocess(raw.x), y=raw.y)
    train, val = split_site(pre, seed=settings.seed)
    return SiteData(train=train, validation=val, source=source, fingerprint=fp)
