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

from dataclasses import dataclass

from client.data import split_site, table_fingerprint
from fedvault_tasks.datasets import (
    central_bounds,
    file_table,
    parse_feature_bounds,
    partition_table,
)
from fedvault_tasks.tasks import FeatureBounds, Table, Task, get_task
from protocols.config import RunSettings
from protocols.errors import ConfigError, DataError
from protocols.node_config import NodeConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteData:
    """A site's preprocessed train and validation tables and where they came from."""

    train: Table
    validation: Table
    source: str
    fingerprint: str  # raw-data hash of the site's data as loaded: never leaves the site


def site_bounds(settings: RunSettings, node: NodeConfig, task: Task,
                num_features: int) -> FeatureBounds | None:
    """The declared bounds this site scales its features with (``None``: the task
    scales its inputs by a fixed rule, or no bounds are declared)."""
    if task.fixed_scale is not None:
        return None
    if node.feature_bounds:
        return parse_feature_bounds(node.feature_bounds, num_features)
    if node.simulated and not node.data_path:  # the run's bounds, as the server's
        return central_bounds(settings, task, num_features)
    if task.embedded_bounds is not None and len(task.embedded_bounds) == num_features \
            and not settings.data_path:
        return task.embedded_bounds
    return None  # Task.preprocess then says what to declare


def resolve_site_data(settings: RunSettings, node: NodeConfig, *,
                      key: bytes) -> SiteData:
    """The site's data for this run, split with the site's secret ``key``;
    ``DataError``/``ConfigError`` with a clear reason."""
    task = get_task(settings.task)
    site_task = node.task
    if site_task and site_task != settings.task:
        raise ConfigError(
            f"this site serves task {site_task!r} (node-config 'task'); "
            f"the run asks for task {settings.task!r}."
        )
    data_path = node.data_path or ""
    if data_path:
        label = node.label_column or settings.label_column or task.default_label_column
        raw = file_table(data_path, label)
        source = data_path
    elif node.simulated and node.partition_id is not None and node.num_partitions is not None:
        pid, n = node.partition_id, node.num_partitions
        if not 0 <= pid < n:
            raise ConfigError(f"partition-id must be in [0, {n - 1}]. Found {pid}.")
        raw = partition_table(settings, pid, n)
        source = (f"partition {pid}/{n} of "
                  f"{settings.data_path or task.embedded_name} ({settings.partitioner})")
    else:
        raise DataError(
            "no data for this site: set data-path in the SuperNode's node config "
            "(e.g. --node-config 'data-path=\"/data/site.csv\"')."
        )
    task.check_table(raw, num_features=settings.num_features, num_classes=settings.num_classes)
    fp = table_fingerprint(raw)
    # split the records as loaded (the key hashes each raw record), then scale each
    train_raw, val_raw = split_site(raw, key=key)
    bounds = site_bounds(settings, node, task, raw.num_features)
    train = Table(x=task.preprocess(train_raw.x, bounds), y=train_raw.y)
    val = Table(x=task.preprocess(val_raw.x, bounds), y=val_raw.y)
    return SiteData(train=train, validation=val, source=source, fingerprint=fp)
