"""Resolve what data a site trains on, from its node config and the run config.

* A real site (a SuperNode on the data owner's premises) sets ``data-path`` in
  its node config: its own CSV/Parquet/NPZ file, loaded here and nowhere else.
* A simulated site has only ``partition-id`` and ``num-partitions`` in its node
  config (Flower's Simulation Engine sets nothing else): it takes its partition
  of the run's table (``data-path`` in the run config) or of the task's
  embedded data, with the central test split held out first.

Node config keys a data owner may set: ``data-path``, ``label-column``, ``task``
(when set, the site refuses runs of another task), ``feature-bounds`` (the range
of each feature, declared, for tasks that scale features: ``"LOW:HIGH"`` for
every feature, or a JSON file ``{"low": [...], "high": [...]}``).

Preprocessing is a function of each record alone (declared bounds, fixed scales)
and the train/validation split is a keyed hash of each record alone
(:func:`client.data.split_site`), so neighbouring tables under the ledger stay
neighbouring training sets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from client.data import fingerprint, load_table, split_site
from fedvault.errors import ConfigError, DataError
from fedvault.tasks import (
    TEST_FRACTION,
    FeatureBounds,
    Table,
    Task,
    embedded_split,
    get_task,
    split_train_test,
)
from protocols.config import RunSettings
from simulations.partition import partition_indices


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteData:
    """A site's preprocessed train and validation tables and where they came from."""

    train: Table
    validation: Table
    source: str
    fingerprint: str  # raw-data hash of the site's data as loaded: never leaves the site


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


def site_bounds(settings: RunSettings, node_config: Mapping[str, Any], task: Task,
                num_features: int) -> FeatureBounds | None:
    """The declared bounds this site scales its features with (``None``: the task
    scales its inputs by a fixed rule, or uses its documented bounds)."""
    if task.fixed_scale is not None:
        return None
    spec = str(node_config.get("feature-bounds", "") or "")
    if spec:
        return parse_feature_bounds(spec, num_features)
    simulated = not node_config.get("data-path")
    if simulated and settings.feature_bounds:
        return parse_feature_bounds(settings.feature_bounds, num_features)
    if task.embedded_bounds is not None and len(task.embedded_bounds) == num_features \
            and not settings.data_path:
        return task.embedded_bounds
    if simulated:
        # The simulation plays every data owner and holds the whole (public) pool:
        # its range stands for the bounds real data owners would declare.
        return pool_bounds(settings)
    return None  # Task.preprocess then says what to declare


@lru_cache(maxsize=2)
def pool_bounds(settings: RunSettings) -> FeatureBounds:
    pool = _pool(settings)
    lo, hi = pool.x.min(axis=0), pool.x.max(axis=0)
    return FeatureBounds(low=lo, high=np.where(hi > lo, hi, lo + 1.0).astype(np.float32))


def resolve_site_data(settings: RunSettings, node_config: Mapping[str, Any], *,
                      key: bytes) -> SiteData:
    """The site's data for this run, split with the site's secret ``key``;
    ``DataError``/``ConfigError`` with a clear reason."""
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
    # split the records as loaded (the key hashes each raw record), then scale each
    train_raw, val_raw = split_site(raw, key=key)
    bounds = site_bounds(settings, node_config, task, raw.num_features)
    train = Table(x=task.preprocess(train_raw.x, bounds), y=train_raw.y)
    val = Table(x=task.preprocess(val_raw.x, bounds), y=val_raw.y)
    return SiteData(train=train, validation=val, source=source, fingerprint=fp)
