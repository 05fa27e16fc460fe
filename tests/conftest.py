"""Shared fixtures. Tests use real Flower messages, real torch and real files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def flower_identity() -> Iterator[None]:
    """Flower's Message constructor reads the process's task identity, which a
    Flower runtime sets; unit tests that build Messages outside one set it here."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old
