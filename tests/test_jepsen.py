"""The fault suite: its checks have teeth, and the real cluster passes it.

The runs start real node processes on distinct 127.0.0.x hosts, behind fault relays, and drive
them with `python -m raftcache.testing.jepsen`, as a user would.
"""

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from raftcache.testing import jepsen
from raftcache.testing.history import History

# ---- the final-read check --------------------------------------------------------------------------


def _ops(*steps):
    """steps: (process, kind, key, value, expected, status, result, t0, t1)."""
    h = History()
    for p, kind, key, value, expected, status, result, t0, t1 in steps:
        op = h.invoke(p, kind, key, value, expected, time=t0)
        if status == "ok":
            h.ok(op, result, time=t1)
        elif status == "fail":
            h.fail(op, time=t1)
        else:
            h.info(op, time=t1)
    return h.operations()


def test_final_read_of_the_last_acknowledged_write_passes():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1),
               (2, "write", "k", "b", None, "ok", 5, 2, 3))
    assert jepsen.lost_writes(ops, {"k": ("b", 5)}) == []


def test_lost_acknowledged_write_is_reported():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1),
               (2, "write", "k", "b", None, "ok", 5, 2, 3))
    [a] = jepsen.lost_writes(ops, {"k": ("a", 3)})
    assert a.kind == "lost-write" and "write('b')" in a.message


def test_acknowledged_write_gone_at_the_end_is_reported():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1))
    [a] = jepsen.lost_writes(ops, {"k": None})
    assert "the key is gone" in a.message


def test_final_value_never_written_is_reported():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1))
    assert jepsen.lost_writes(ops, {"k": ("zzz", 9)})


def test_failed_write_cannot_explain_the_final_value():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1),
               (2, "write", "k", "b", None, "fail", None, 2, 3))
    assert jepsen.lost_writes(ops, {"k": ("b", 5)})


def test_concurrent_and_indeterminate_writes_may_be_last():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 4),
               (2, "write", "k", "b", None, "ok", 5, 1, 2),  # overlaps a: either may be last
               (3, "write", "k", "c", None, "info", None, 0.5, 9),  # may apply any time
               (4, "delete", "k", None, None, "info", None, 5, 9))
    for final in (("a", 3), ("b", 5), ("c", 7), None):
        assert jepsen.lost_writes(ops, {"k": final}) == [], final


def test_swapped_cas_and_acknowledged_delete_count_as_writes():
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1),
               (2, "cas", "k", "b", 3, "ok", (True, None), 2, 3),
               (3, "cas", "k", "c", 1, "ok", (False, None), 4, 5))
    assert jepsen.lost_writes(ops, {"k": ("b", 6)}) == []
    assert jepsen.lost_writes(ops, {"k": ("c", 7)})  # that cas did not swap
    ops = _ops((1, "write", "k", "a", None, "ok", 3, 0, 1),
               (2, "delete", "k", None, None, "ok", True, 2, 3))
    assert jepsen.lost_writes(ops, {"k": None}) == []
    assert jepsen.lost_writes(ops, {"k": ("a", 3)})


def test_key_never_acknowledged_may_be_absent():
    ops = _ops((1, "write", "k", "a", None, "fail", None, 0, 1))
    assert jepsen.lost_writes(ops, {"k": None}) == []


# ---- the counter check -------------------------------------------------------------------------------


def _counter(*steps):
    """steps: (process, kind, value or delta, status, result, t0, t1) on the key "c"."""
    return _ops(*((p, kind, "c", delta, None, status, result, t0, t1)
                  for p, kind, delta, status, result, t0, t1 in steps))


def test_counter_reads_between_acknowledged_and_attempted_increments_pass():
    ops = _counter((1, "incr", 2, "ok", 2, 0, 1),
                   (2, "incr", 3, "info", None, 2, 3),  # may apply, at any time after 2
                   (3, "incr", 5, "fail", None, 2, 3),  # never applied
                   (4, "read", None, "ok", (2, 1), 4, 5),
                   (4, "read", None, "ok", (5, 6), 6, 7),
                   (1, "incr", 1, "ok", 6, 5, 8),  # on top of 2 + 3
                   (5, "read", None, "ok", None, -2, -1))  # before any increment: 0
    assert jepsen.counter_anomalies(ops) == []


def test_counter_read_below_the_acknowledged_increments_is_reported():
    ops = _counter((1, "incr", 2, "ok", 2, 0, 1),
                   (1, "incr", 2, "ok", 4, 2, 3),
                   (2, "read", None, "ok", (2, 1), 4, 5))  # lost one increment
    [a] = jepsen.counter_anomalies(ops)
    assert a.kind == "counter" and "expected a value in [4, 4]" in a.message


def test_counter_above_every_attempted_increment_is_reported():
    # Applied twice (a retry not recognised), or a failed increment that did apply.
    twice = _counter((1, "incr", 2, "ok", 2, 0, 1),
                     (2, "read", None, "ok", (4, 1), 2, 3))
    failed = _counter((1, "incr", 2, "ok", 2, 0, 1),
                      (1, "incr", 3, "fail", None, 1.5, 1.8),
                      (2, "read", None, "ok", (5, 1), 2, 3))
    assert [a.kind for a in jepsen.counter_anomalies(twice)] == ["counter"]
    assert [a.kind for a in jepsen.counter_anomalies(failed)] == ["counter"]


def test_counter_incr_results_are_bounded_too():
    ops = _counter((1, "incr", 2, "ok", 2, 0, 1),
                   (2, "incr", 1, "ok", 1, 2, 3))  # restarted from 0: must be 3
    [a] = jepsen.counter_anomalies(ops)
    assert "incr(+1)" in a.message and "[3, 3]" in a.message


def test_counter_value_that_is_no_number_or_has_two_values_per_version_is_reported():
    ops = _counter((1, "incr", 1, "ok", 1, 0, 1),
                   (2, "read", None, "ok", ("x", 2), 2, 3))
    assert [a.kind for a in jepsen.counter_anomalies(ops)] == ["counter"]
    ops = _counter((1, "incr", 1, "info", None, 0, 9),
                   (2, "incr", 1, "info", None, 0, 9),
                   (3, "read", None, "ok", (1, 7), 1, 2),
                   (3, "read", None, "ok", (2, 7), 3, 4))
    assert [a.kind for a in jepsen.counter_anomalies(ops)] == ["version-conflict"]


def test_history_records_increments_and_the_register_check_refuses_them(tmp_path):
    from raftcache.testing.linearizability import check

    h = History()
    op = h.invoke(1, "incr", "c", 3, time=0)
    h.ok(op, 3, time=1)
    h.dump(tmp_path / "h.jsonl")
    [back] = History.load(tmp_path / "h.jsonl").operations()
    assert (back.kind, back.value, back.result) == ("incr", 3, 3)
    with pytest.raises(ValueError, match="incr needs an int delta"):
        h.invoke(2, "incr", "c", "3")
    with pytest.raises(ValueError, match="a counter, not a register"):
        check(h)


# ---- misses on "linearizable or miss" routes ------------------------------------------------------


def test_key_routes_of_each_backend():
    assert jepsen.may_miss("memcached", "k1") and not jepsen.may_miss("redis", "k1")
    assert [jepsen.may_miss("hybrid", k) for k in ("session:k0", "config:k1", "k2")] == [
        True, False, False]
    # the hybrid prefixes are the routes the cluster runs: the hybrid provider's dev options
    from raftcache.cluster import dev_backend
    from raftcache.pluginapi.manager import PluginSet, make_manager

    hybrid = dev_backend("hybrid", PluginSet(make_manager()))
    routes = {r["match"]: r["to"] for r in hybrid["options"]["routes"]}
    instances = hybrid["options"]["instances"]
    assert instances[routes["session:*"]]["plugin"] == "memcached"
    assert instances[routes["config:*"]]["plugin"] == "redis"
    assert instances[hybrid["options"]["default"]]["plugin"] == "memory"
    # ... and the layout examples/hybrid/hybrid.toml documents
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "hybrid",
                           "hybrid.toml"), "rb") as f:
        assert tomllib.load(f)["backend"] == hybrid


def test_misses_are_dropped_only_where_the_route_may_miss():
    from raftcache.testing.linearizability import check

    ops = _ops((1, "write", "m", "a", None, "ok", 3, 0, 1),
               (2, "read", "m", None, None, "ok", None, 2, 3),  # lost by memcached: allowed
               (1, "write", "r", "a", None, "ok", 4, 0, 1),
               (2, "read", "r", None, None, "ok", None, 4, 5))  # redis: an anomaly
    kept, dropped = jepsen.drop_misses(ops, lambda key: key == "m")
    assert dropped == 1 and [a.key for a in check(kept).anomalies] == ["r"]


def test_an_older_value_on_a_miss_route_is_still_an_anomaly():
    from raftcache.testing.linearizability import check

    ops = _ops((1, "write", "m", "a", None, "ok", 3, 0, 1),
               (1, "write", "m", "b", None, "ok", 5, 2, 3),
               (2, "read", "m", None, None, "ok", None, 4, 5),
               (2, "read", "m", None, None, "ok", ("a", 3), 6, 7))
    kept, dropped = jepsen.drop_misses(ops, lambda key: True)
    assert dropped == 1 and [a.kind for a in check(kept).anomalies] == ["not-linearizable"]


# ---- nemeses and scenarios ---------------------------------------------------------------------------

# The anomalies Jepsen found in Raft-backed stores (RedisRaft, etcd, Consul), each of which must have
# a scenario in the suite.
ANCHOR_ANOMALIES = [
    "total data loss on failover",
    "stale or empty reads after restart",
    "a write reported as failed that had committed",
    "split brain with lost updates during a partition plus a membership change",
    "committed writes lost under crashes plus partitions",
    "empty reads after membership changes",
    "crossed replies when followers proxied requests",
    "a command re-applied forever",
    "crashes when snapshot and log indexes disagreed at start-up",
    "stale reads from a deposed leader serving local reads",
    "every lease revoked while the leader was stuck in a slow fdatasync",
    "stale reads after losing un-fsynced writes",
]


@pytest.mark.parametrize("anomaly", ANCHOR_ANOMALIES)
def test_every_anomaly_jepsen_found_has_a_scenario(anomaly):
    [name] = [n for n, s in jepsen.SCENARIOS.items() if anomaly in s.anomaly]
    scenario = jepsen.SCENARIOS[name]
    assert jepsen.expand_nemeses(scenario.nemesis) == list(scenario.nemesis)
    assert name in SCENARIO_RUNS  # and CI runs it against the real cluster


def test_nemesis_names_and_families():
    everything = jepsen.expand_nemeses(["all"], backend="redis")
    assert set(everything) == set(jepsen.NEMESES)
    # kill-backend only where the backend has servers to kill
    assert set(jepsen.expand_nemeses(["all"])) == set(jepsen.NEMESES) - {"kill-backend"}
    assert jepsen.expand_nemeses(["backend"], backend="hybrid") == ["kill-backend"]
    with pytest.raises(ValueError, match="'kill-backend' needs a backend with servers"):
        jepsen.expand_nemeses(["kill-backend"], backend="memory")
    assert jepsen.expand_nemeses(["kill-one,partition-one", "link", "kill"]) == [
        "kill-one", "partition-one", "slow", "lossy", "reset", "kill-leader", "kill-majority",
        "kill-all"]
    with pytest.raises(ValueError, match="unknown nemesis 'chaos' \\(known: all, backend, clock, "
                                         "clock-ahead, clock-behind, disk, kill"):
        jepsen.expand_nemeses(["chaos"])


# ---- the real cluster --------------------------------------------------------------------------------


def run_jepsen(tmp_path, *args, timeout=240):
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "raftcache.testing.jepsen", "--dir", str(tmp_path / "run"),
         "--json", str(out), *map(str, args)],
        capture_output=True, text=True, timeout=timeout)
    summary = json.loads(out.read_text()) if out.exists() else None
    return proc, summary


# Each scenario once, on a mix of transports, storages and sizes (about 20 s each).
SCENARIO_RUNS = {
    "failover-data-loss": ("thrift", "file-wal", 3),
    "restart-stale-reads": ("tcp-tls", "redis-aof", 3),
    "aborted-read": ("thrift", "redis-aof", 3),
    "membership-split-brain": ("thrift", "file-wal", 5),
    "crash-partition-loss": ("tcp-tls", "file-wal", 5),
    "membership-empty-reads": ("tcp-tls", "file-wal", 3),
    "proxy-crossed-replies": ("thrift", "file-wal", 3),
    "reapplied-command": ("tcp-tls", "redis-aof", 3),
    "snapshot-startup-crash": ("thrift", "file-wal", 3),
    "deposed-leader-reads": ("thrift", "file-wal", 3),
    "lease-slow-disk": ("tcp-tls", "file-wal", 3),
    "unfsynced-write-loss": ("thrift", "redis-aof", 3),
    "clock-skew": ("thrift", "file-wal", 3),  # with auth and encryption (the scenario's)
}


@pytest.mark.parametrize("scenario", sorted(SCENARIO_RUNS))
def test_scenario_finds_no_anomaly_on_the_real_cluster(tmp_path, scenario):
    transport, storage, nodes = SCENARIO_RUNS[scenario]
    proc, s = run_jepsen(tmp_path, "--scenario", scenario, "--time", 12, "--seed",
                         sorted(SCENARIO_RUNS).index(scenario), "--transport", transport,
                         "--storage", storage, "--nodes", nodes, "--clients", 8)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert s["anomalies"] == []
    assert sum(s["faults"].values()) >= 2, s["faults"]  # faults did happen
    assert set(s["faults"]) <= set(jepsen.SCENARIOS[scenario].nemesis)
    assert s["ops"]["ok"] > 200 and s["checked"] >= s["ops"]["ok"]
    assert "anomalies: 0" in proc.stdout
    if scenario == "clock-skew":  # a node's clock was off, with auth and encryption on
        assert s["faults"].get("clock-ahead", 0) + s["faults"].get("clock-behind", 0) >= 1
        assert (s["auth"], s["encryption"]) == (True, True)


def test_the_suite_catches_a_deposed_leader_serving_local_reads(tmp_path):
    """Teeth: the ReadIndex round switched off (test-only mutant), no check-quorum, as in the
    etcd/Consul 2014 bug: an isolated leader answers reads from its own state."""
    for seed in (1, 2):
        proc, s = run_jepsen(tmp_path / str(seed), "--mutant", "read-without-heartbeat",
                             "--set", "raft.check_quorum=false", "--nemesis", "partition-leader",
                             "--time", 15, "--nodes", 3, "--seed", seed)
        if proc.returncode == 1:
            break
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    kinds = {a["kind"] for a in s["anomalies"]}
    assert "not-linearizable" in kinds
    assert "MUTANT read-without-heartbeat" in proc.stdout
    assert (tmp_path / str(seed) / "run" / "history.jsonl").exists()  # kept for reading


def test_the_suite_catches_an_aborted_read(tmp_path):
    """Teeth for the other direction: a node that calls committed writes failed."""
    proc, s = run_jepsen(tmp_path, "--mutant", "report-writes-failed", "--nemesis", "none",
                         "--time", 5, "--nodes", 3)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {a["kind"] for a in s["anomalies"]} & {"not-linearizable", "lost-write"}


def test_the_suite_catches_lost_writes_of_a_storage_that_forgets(tmp_path):
    """Teeth for the final-read check on a real run: the `memory` storage keeps no log across
    kill -9, so a whole-cluster restart loses every acknowledged write."""
    proc, s = run_jepsen(tmp_path, "--storage", "memory", "--nemesis", "kill-all", "--time", 8,
                         "--nodes", 3)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lost-write" in {a["kind"] for a in s["anomalies"]}


# Cache backends: registers (cas too) and counters, lease reads, backend servers kill -9ed and
# restarted empty (about 15 s each).
BACKEND_RUNS = {"redis": 1, "hybrid": 2}  # backend: seed


@pytest.mark.parametrize("backend", sorted(BACKEND_RUNS))
def test_backend_finds_no_anomaly_when_its_servers_restart_empty(tmp_path, backend):
    proc, s = run_jepsen(tmp_path, "--backend", backend, "--nemesis", "kill-backend",
                         "--read", "lease", "--time", 12, "--nodes", 3, "--clients", 8,
                         "--seed", BACKEND_RUNS[backend], timeout=90)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert s["anomalies"] == [] and "anomalies: 0" in proc.stdout
    assert (s["backend"], s["read"]) == (backend, "lease")
    assert s["faults"].get("kill-backend", 0) >= 2, s["faults"]
    for kind in ("read", "write", "cas", "incr"):
        assert s["by_kind"][kind].get("ok", 0) > 50, s["by_kind"]
    assert s["checked"] + s["misses"] >= s["ops"]["ok"]  # every ok op checked, or a miss
    if backend == "redis":
        assert s["misses"] == 0  # a redis backend never loses a value


def test_the_suite_catches_a_node_that_ignores_its_redis_losing_its_data(tmp_path):
    """Teeth for backends: a node that carries on over its Redis restarted empty, instead of
    rebuilding it (test-only mutant), reads the values it lost as not found."""
    proc, s = run_jepsen(tmp_path, "--backend", "redis", "--mutant", "ignore-backend-loss",
                         "--nemesis", "kill-backend", "--time", 8, "--nodes", 3, timeout=90)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A client sees the lost values only if it reads them on that node before they are
    # rewritten; the final read of every node's values sees them in any case (a run caught
    # it there alone).
    assert {a["kind"] for a in s["anomalies"]} & {"not-linearizable", "counter", "lost-write",
                                                  "replicas-diverge"}


def test_the_suite_catches_an_older_value_on_a_memcached_route(tmp_path):
    """Misses are allowed there, older values are not: a node whose Memcached keeps the old
    value of some sets (test-only mutant) is caught on the register keys. Values in plaintext:
    sealed, each is bound to its version and the node refuses the older one itself
    (test_encryption.py), so the checker would see nothing to catch."""
    proc, s = run_jepsen(tmp_path, "--backend", "memcached", "--mutant", "memcached-skips-sets",
                         "--no-encryption", "--nemesis", "none", "--time", 5, "--nodes", 3,
                         timeout=90)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    registers = {a["kind"] for a in s["anomalies"] if a["key"].startswith("'k")}
    assert registers & {"not-linearizable", "version-conflict"}


def test_nodes_join_at_new_addresses_during_partitions(tmp_path):
    """member-join: a node that no config lists joins (its address through the log) while
    partitions cut the cluster, and leaves again; nothing acknowledged is lost."""
    proc, s = run_jepsen(tmp_path, "--nemesis", "member-join", "--nemesis", "partition-halves",
                         "--nemesis", "partition-leader", "--time", 15, "--nodes", 3,
                         "--clients", 8, "--seed", 5, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert s["anomalies"] == []
    assert s["faults"].get("member-join", 0) >= 1, s["faults"]
    with open(tmp_path / "run" / "node4.log") as f:  # the spare: it joined and followed
        log = f.read()
    assert "waiting to be added" in log and re.search(r", leader \d", log), log[-2000:]
    assert s["joins_followed"] >= 1, (s["faults"], s["joins_followed"])


def test_every_joiner_follows_a_leader_before_it_leaves_even_when_faults_are_short(tmp_path):
    """member-join with faults held 50 ms (as when a run's end cuts the last one short): the
    nemesis adds the spare once it answers and removes it only after it followed a leader.
    Added at once and removed at the heal, a spare that a loaded machine starts slowly was
    gone before any leader reached it, and the run showed nothing of the join."""
    proc, s = run_jepsen(tmp_path, "--nemesis", "member-join", "--hold", "0.05", "--time", 10,
                         "--nodes", 3, "--clients", 2, "--seed", 5, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    joins = s["faults"].get("member-join", 0)
    assert joins >= 1 and s["joins_followed"] == joins, (s["faults"], s["joins_followed"])
    with open(tmp_path / "run" / "node4.log") as f:  # one start per join, each following
        starts = f.read().split("waiting to be added")[1:]
    assert len(starts) == joins and all(re.search(r", leader \d", x) for x in starts), starts


def test_auth_required_and_values_encrypted_under_every_fault(tmp_path):
    """The fault suite with tokens required (the workload's grant rw on every key, the
    nemesis' admin: membership changes and transfers) and values sealed at rest."""
    proc, s = run_jepsen(tmp_path, "--auth", "--nemesis", "all", "--time", 15, "--nodes", 5,
                         "--clients", 8, "--seed", 3, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert s["anomalies"] == [] and "auth required, values encrypted" in proc.stdout
    assert (s["auth"], s["encryption"]) == (True, True)
    assert sum(s["faults"].values()) >= 3, s["faults"]
    assert s["refused_admin"] == 0  # the nemesis' admin token was honoured
    for kind in ("read", "write", "cas", "incr"):
        assert s["by_kind"][kind].get("ok", 0) > 50, s["by_kind"]


def test_the_suite_catches_a_node_whose_own_clock_is_cluster_time(tmp_path):
    """Teeth of the clock-skew scenario: nodes whose cluster time is their own clock (test-only
    mutant clock-local, what every node did before issue #22). A leader restarted a year ahead
    stamps the workload's token (valid for the run) expired: the workload is refused."""
    proc, s = run_jepsen(tmp_path, "--scenario", "clock-skew", "--mutant", "clock-local",
                         "--nemesis", "clock-ahead", "--time", 10, "--nodes", 3,
                         "--clients", 6, "--seed", 1, timeout=150)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (s["auth"], s["encryption"]) == (True, True)
    assert any(a["kind"] == "unexpected-error" and "expired" in a["message"]
               for a in s["anomalies"]), s["anomalies"][:5]


def test_list_and_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "raftcache.testing.jepsen", "--list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "scenario deposed-leader-reads" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "raftcache.testing.jepsen", "--nemesis", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown nemesis 'x'" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "raftcache.testing.jepsen", "--nemesis",
                          "kill-backend"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs a backend with servers" in bad.stderr
