"""Each node's Prometheus endpoint: the names a dashboard relies on, counters that move with
the work, the probes, and `raftcache status` as a health check."""

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from raftcache import errors
from raftcache.node.metrics import NodeMetrics

NAMES = {  # what examples/grafana/raftcache.json and alerting rules use
    "raftcache_requests_total", "raftcache_request_duration_seconds",
    "raftcache_storage_sync_duration_seconds", "raftcache_snapshot_duration_seconds",
    "raftcache_snapshots_installed_total", "raftcache_elections_total",
    "raftcache_leader_changes_total", "raftcache_term", "raftcache_leader_id",
    "raftcache_commit_index", "raftcache_applied_index", "raftcache_log_first_index",
    "raftcache_log_last_index", "raftcache_log_entries", "raftcache_apply_lag",
    "raftcache_pending_writes", "raftcache_pending_reads", "raftcache_keys", "raftcache_role",
    "raftcache_snapshot_bytes", "raftcache_backend_up", "raftcache_dropped_peer_messages_total",
    "raftcache_refused_snapshots_total", "raftcache_peer_up",
    "raftcache_peer_queue_dropped_messages_total",
}


# The module's shared `cluster` (tests/conftest.py).
CLUSTER = {"metrics": True, "storage": "file-wal",
           "extra": {"raft": {"snapshot_entries": 100, "snapshot_keep_entries": 10}}}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(cluster, node_id) -> dict:
    """(metric sample name, labels as a sorted tuple) -> value."""
    status, text = get(f"http://{cluster.metrics_address(node_id)}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_node_exposes_the_names_and_the_counters_move(cluster):
    before = {i: scrape(cluster, i) for i in (1, 2, 3)}
    for i in (1, 2, 3):
        names = {name for name, _ in before[i]}
        missing = {n for n in NAMES if n not in names and n + "_count" not in names
                   and n + "_bucket" not in names}
        assert not missing, (i, missing)
    leader = cluster.wait_for_leader()
    with cluster.client() as c:
        for n in range(150):  # past raft.snapshot_entries: every node snapshots
            c.set(f"k{n}", "v")
        assert c.get("k1") == b"v"
        assert c.cas("k1", 999, "x") is False
        with pytest.raises(errors.InvalidRequest):
            c.transfer_leader(9)
    # Followers apply, and every node snapshots, after the leader answers: scrape until they did
    # (then the checks below; they need no more than this).
    def settled(i, a):
        return (sample(a, "raftcache_applied_index")
                >= sample(before[i], "raftcache_applied_index") + 150
                and sample(a, "raftcache_snapshot_duration_seconds_count") >= 1
                and sample(a, "raftcache_log_entries") < 150)

    deadline = time.monotonic() + 10
    while True:
        after = {i: scrape(cluster, i) for i in (1, 2, 3)}
        if all(settled(i, a) for i, a in after.items()):
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    ours = after[leader]
    ok_puts = sample(ours, "raftcache_requests_total", op="put", outcome="ok")
    assert ok_puts - sample(before[leader], "raftcache_requests_total", op="put",
                            outcome="ok") == 150
    assert sample(ours, "raftcache_requests_total", op="transfer_leader",
                  outcome="InvalidRequest") == 1
    assert sample(ours, "raftcache_request_duration_seconds_count", op="put") >= 150
    assert sample(ours, "raftcache_role", role="leader") == 1
    for i in (1, 2, 3):
        a, b = after[i], before[i]
        assert sample(a, "raftcache_applied_index") >= sample(b, "raftcache_applied_index") + 150
        assert sample(a, "raftcache_storage_sync_duration_seconds_count") > sample(
            b, "raftcache_storage_sync_duration_seconds_count")
        assert sample(a, "raftcache_snapshot_duration_seconds_count") >= 1
        assert sample(a, "raftcache_snapshot_bytes") > 0
        assert sample(a, "raftcache_keys") >= 150
        assert sample(a, "raftcache_leader_id") == leader
        assert sample(a, "raftcache_backend_up") == 1
        # the log is bounded by the snapshots: far fewer entries than were written
        assert sample(a, "raftcache_log_entries") < 150
    # The leader's links to both followers are up (a link may be between two connections at
    # one scrape: up within a few).
    deadline = time.monotonic() + 5
    while not all(sample(scrape(cluster, leader), "raftcache_peer_up", peer=str(p)) == 1
                  for p in (1, 2, 3) if p != leader):
        assert time.monotonic() < deadline, scrape(cluster, leader)
        time.sleep(0.1)


def test_probes_and_status_as_a_health_check(cluster, tmp_path):
    assert get(f"http://{cluster.metrics_address(1)}/healthz") == (200, "ok\n")
    assert get(f"http://{cluster.metrics_address(1)}/readyz") == (200, "ready\n")
    assert get(f"http://{cluster.metrics_address(1)}/nothing")[0] == 404

    def status(*args):
        return subprocess.run([sys.executable, "-m", "raftcache", "status", "--endpoints",
                               ",".join(cluster.endpoints()), "--timeout", "1", *args],
                              capture_output=True, text=True, timeout=60)

    healthy = status("--json")
    assert healthy.returncode == 0, healthy.stderr
    assert f"http://{cluster.metrics_address(2)}/metrics" in healthy.stdout
    # Two of three nodes down: the last one knows no leader after an election timeout.
    leader = cluster.wait_for_leader()
    alone = next(i for i in (1, 2, 3) if i != leader)
    others = [i for i in (1, 2, 3) if i != alone]
    for i in others:
        cluster.pause(i)
    try:
        deadline = time.monotonic() + 10
        while get(f"http://{cluster.metrics_address(alone)}/readyz")[0] != 503:
            assert time.monotonic() < deadline, "still ready without a leader"
            time.sleep(0.1)
        code, text = get(f"http://{cluster.metrics_address(alone)}/readyz")
        assert text == "no leader known\n"
        assert get(f"http://{cluster.metrics_address(alone)}/healthz")[0] == 200  # alive
        unhealthy = status()
        assert unhealthy.returncode == 2
        assert "unreachable" in unhealthy.stderr and "no leader" in unhealthy.stderr
    finally:
        for i in others:
            cluster.resume(i)
    cluster.wait_for_leader()


def test_hostile_operation_names_and_outcomes_add_no_series():
    metrics = NodeMetrics(node=None)
    for n in range(100):
        metrics.request(f"op{n}", f"Error{n}", 0.001)
    metrics.request("get", None, 0.001)
    names = {(s.labels["op"], s.labels["outcome"]) for family in metrics.requests.collect()
             for s in family.samples if s.name == "raftcache_requests_total"}
    assert names == {("unknown", "other"), ("get", "ok")}


def test_the_grafana_dashboard_uses_only_metrics_the_nodes_expose():
    import json
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "grafana", "raftcache.json")
    with open(path) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"raftcache_[a-z_]+", e)}
    exposed = NAMES | {f"{n}_{suffix}" for n in NAMES for suffix in ("bucket", "sum", "count")}
    assert used and used <= exposed, used - exposed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
