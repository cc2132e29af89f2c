"""Fixtures several test files share."""

from __future__ import annotations

import pytest


@pytest.fixture
def running():
    """`running(cluster)` starts a LocalCluster, waits for its leader and returns it; every
    cluster started so is stopped when the test ends, however it ends."""
    started = []

    def start(cluster):
        started.append(cluster)
        cluster.start()
        cluster.wait_for_leader()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
