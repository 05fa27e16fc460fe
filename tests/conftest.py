"""Shared fixtures. Tests use real Flower messages, real torch and real files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) the Ray simulations
    run one after another on one worker and the real-process deployments one after
    another on the other: never two Ray clusters, nor two deployments, at once."""
    for item in items:
        for marker, group in (("e2e", "ray-simulations"), ("loopback", "deployments")):
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.xdist_group(group))


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
