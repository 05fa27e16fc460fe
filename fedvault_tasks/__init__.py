"""Tasks and data: the built-in tasks and their models, the embedded default data,
tables (CSV, Parquet, NPZ), the simulated pool and its partitioning across sites.

Named ``fedvault_tasks`` so that it neither shadows nor is shadowed by a user's own
``tasks`` or ``data`` module on ``sys.path`` (Flower imports the app from its root).
It sits beside :mod:`privacy`, above :mod:`protocols`, below the server and the
client. Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

if TYPE_CHECKING:
    from fedvault_tasks.partition import PartitionPlan, partition_indices
    from fedvault_tasks.tables import Table, load_table, save_table
    from fedvault_tasks.tasks import TASKS, FeatureBounds, Task, evaluate, get_task

_EXPORTS: dict[str, str] = {
    "FeatureBounds": "fedvault_tasks.tasks",
    "PartitionPlan": "fedvault_tasks.partition",
    "TASKS": "fedvault_tasks.tasks",
    "Table": "fedvault_tasks.tables",
    "Task": "fedvault_tasks.tasks",
    "evaluate": "fedvault_tasks.tasks",
    "get_task": "fedvault_tasks.tasks",
    "load_table": "fedvault_tasks.tables",
    "partition_indices": "fedvault_tasks.partition",
    "save_table": "fedvault_tasks.tables",
}

# (a literal list: linters and type checkers read it)
__all__ = [
    "TASKS",
    "FeatureBounds",
    "PartitionPlan",
    "Table",
    "Task",
    "evaluate",
    "get_task",
    "load_table",
    "partition_indices",
    "save_table",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
