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
own tier marker, which wins. A test module that is in no tier stops collection, and so does a
name in TIERS that is no module.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import redis

from raftcache.cluster import LocalCluster, free_port_block
from raftcache.servers import RedisServer

TIERS = {
    "unit": [
        "test_certs", "test_commands", "test_config_plugins", "test_docs", "test_hostile_peers",
        "test_linearizability", "test_node", "test_observers", "test_private_files",
        "test_raft_clock", "test_raft_commit",
        "test_raft_election", "test_raft_membership", "test_raft_purity", "test_raft_read",
        "test_raft_refusals", "test_raft_replication", "test_raft_snapshot",
        "test_plugin_boundaries", "test_raft_transfer", "test_raft_units", "test_relay",
        "test_slow_disk",
        "test_statemachine", "test_storage_file_wal", "test_transport_tcp_tls",
        "test_transport_thrift",
    ],
    "cluster": [
        "test_amplification", "test_arrows", "test_auth", "test_backend_cluster", "test_backends",
        "test_backup", "test_bench", "test_cli", "test_clock", "test_cluster_e2e",
        "test_deploy_files", "test_dev_servers", "test_doors", "test_encryption",
        "test_fuzz", "test_hardening", "test_interop_nodejs", "test_interop_thrift",
        "test_membership_e2e", "test_metrics", "test_plain_install", "test_rolling_upgrade",
        "test_storage_redis_aof", "test_third_party_plugin", "test_up_backends",
        "test_wal_node_recovery",
    ],
    "fault": ["test_crash", "test_jepsen", "test_sim", "test_sim_mutants"],
}
MODULE_TIER = {module: tier for tier, modules in TIERS.items() for module in modules}
assert len(MODULE_TIER) == sum(map(len, TIERS.values())), "a module in two tiers"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    stale = sorted(m for m in MODULE_TIER if not os.path.exists(os.path.join(here, m + ".py")))
    if stale:
        raise pytest.UsageError(f"TIERS in tests/conftest.py names missing modules: {stale}")
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


# ================================================================================================
# Clusters: one way to make, start and stop them
# ================================================================================================
def new_cluster(directory, *, nodes: int = 3, ports: int | None = None, metrics: bool = False,
                **kwargs) -> LocalCluster:
    """A LocalCluster of `nodes` in `directory` on free ports: `ports` of them (default one per
    node; more leave room for nodes that join later); `metrics`: a /metrics port per node.
    The other keyword arguments are LocalCluster's (storage, transport, backend, extra, ...)."""
    ports = ports or nodes
    # One block for both: two blocks asked for in turn may overlap, as neither is bound yet.
    base = free_port_block(ports + (nodes if metrics else 0))
    if metrics:
        kwargs["metrics_port"] = base + ports
    return LocalCluster(str(directory), nodes=nodes, port=base, **kwargs)


@contextlib.contextmanager
def started(cluster: LocalCluster):
    """The cluster started, with an agreed leader; stopped however the block ends."""
    try:
        cluster.start()
        cluster.wait_for_leader()
        yield cluster
    finally:
        cluster.stop()


def _argnames(names) -> list[str]:
    return [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)


def pytest_generate_tests(metafunc):
    # In a module with CLUSTERS = {name: shape, ...}, a test that takes `cluster` runs once per
    # shape, unless it names the ones it runs on itself:
    # @pytest.mark.parametrize("cluster", [name, ...], indirect=True, scope="module").
    names = list(getattr(metafunc.module, "CLUSTERS", {}))
    chosen = any("cluster" in _argnames(m.args[0])
                 for m in metafunc.definition.iter_markers("parametrize"))
    if names and "cluster" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("cluster", names, indirect=True, scope="module")


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """A running cluster the module's tests share: for tests that read and write their own keys
    and leave the nodes and the membership as they found them (a test that kills, pauses,
    restarts, adds or removes nodes takes `running`). Its shape is the module's CLUSTER (the
    keyword arguments of `new_cluster`), or CLUSTERS[name] when parametrized with a name;
    tests given the same name share one cluster."""
    if hasattr(request, "param"):
        shape = request.module.CLUSTERS[request.param]
    else:
        shape = getattr(request.module, "CLUSTER", {})
    with started(new_cluster(tmp_path_factory.mktemp("cluster"), **shape)) as c:
        yield c


@pytest.fixture
def running(tmp_path):
    """A cluster of this test's own: `running(**shape)` makes one (`new_cluster`'s keyword
    arguments) in a fresh directory under tmp_path, `running(cluster)` takes a LocalCluster
    made by the test; either is started and has an agreed leader when it is returned, and
    every cluster started so is stopped when the test ends, however it ends."""
    clusters = []

    def start(cluster: LocalCluster | None = None, **shape) -> LocalCluster:
        if cluster is None:
            cluster = new_cluster(tmp_path / f"c{len(clusters)}", **shape)
        clusters.append(cluster)
        cluster.start()
        cluster.wait_for_leader()
        return cluster

    yield start
    with contextlib.ExitStack() as stack:  # every one stopped even when one stop raises
        for cluster in clusters:
            stack.callback(cluster.stop)


# ================================================================================================
# Redis
# ================================================================================================
@pytest.fixture(scope="module")
def redis_server(request, tmp_path_factory):
    """One redis-server for the module's tests: its settings are the module's REDIS (RedisServer's
    keyword arguments); by default the durable ones the redis-aof storage needs (appendonly,
    appendfsync always). A test that needs it empty takes `fresh_redis` too."""
    with RedisServer(str(tmp_path_factory.mktemp("redis")),
                     **getattr(request.module, "REDIS", {})) as server:
        yield server


@pytest.fixture
def fresh_redis(redis_server):
    """A client of `redis_server`, running again (a test before may have killed it) and empty."""
    redis_server.start()
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    yield r
    r.close()
