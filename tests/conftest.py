"""Fixtures several test files share, and the test tiers.

Tiers (markers registered in setup.cfg [tool:pytest]); every test is in exactly one:

- unit: everything runs inside the pytest process: the pure core, the state machine, storages
  on tmp files, a node or a transport over loopback sockets the test itself serves. No child
  process of any kind. `scripts/test --fast` runs lint and this tier.
- cluster: real processes: raftcache nodes, redis-server, memcached, Node.js, the CLI, the
  linters the tests drive.
- fault: the fault suite and what checks safety under faults: the Jepsen-style runner, kill -9
  crash tests, the deterministic simulator (faults simulated, linearizability checked) and its
  mutants.

A module's tier is in TIERS below (one place); a test in a module of another tier carries its
own tier marker, which wins. A test module that is in no tier stops collection.
"""

from __future__ import annotations

import os

import pytest

TIERS = {
    "unit": [
        "test_certs", "test_commands", "test_config_plugins", "test_hostile_peers",
        "test_linearizability", "test_node", "test_observers", "test_raft_commit",
        "test_raft_election", "test_raft_membership", "test_raft_purity", "test_raft_read",
        "test_raft_refusals", "test_raft_replication", "test_raft_snapshot",
        "test_raft_transfer", "test_raft_units", "test_relay", "test_slow_disk",
        "test_statemachine", "test_storage_file_wal", "test_transport_tcp_tls",
        "test_transport_thrift",
    ],
    "cluster": [
        "test_arrows", "test_auth", "test_backend_cluster", "test_backends", "test_backup",
        "test_bench", "test_cli", "test_cluster_e2e", "test_deploy_files", "test_encryption",
        "test_fuzz", "test_hardening", "test_interop_nodejs", "test_interop_thrift",
        "test_membership_e2e", "test_metrics", "test_rolling_upgrade",
        "test_storage_redis_aof", "test_third_party_plugin", "test_up_backends",
        "test_wal_node_recovery",
    ],
    "fault": ["test_crash", "test_jepsen", "test_sim", "test_sim_mutants"],
}
MODULE_TIER = {module: tier for tier, modules in TIERS.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    lost = set()
    for item in items:
        own = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(set(own)) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked with several tiers: {own}")
        module = os.path.splitext(os.path.basename(str(item.path)))[0]
        tier = own[0] if own else MODULE_TIER.get(module)
        if tier is None:
            lost.add(item.nodeid.split("::")[0])
            continue
        if not own:
            item.add_marker(tier)
    if lost:
        raise pytest.UsageError(
            "test modules in no tier (unit, cluster or fault): " + ", ".join(sorted(lost))
            + "; add each to TIERS in tests/conftest.py")


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
