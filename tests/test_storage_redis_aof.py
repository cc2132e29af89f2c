"""The redis-aof storage against a real redis-server (started here on a free port, in a tmp dir:
appendonly yes, appendfsync always), including kill -9 of the server and a 3-node cluster."""

import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from raftcache.cluster import LocalCluster, free_port_block
from raftcache.core.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from raftcache.node.config import ConfigError
from raftcache.plugins.storage.redis_aof import RedisAofError, RedisAofStorage
from raftcache.servers import RedisServer


@pytest.fixture
def server(redis_server, fresh_redis):
    """The module's redis-server (tests/conftest.py; the durable default settings), empty."""
    return redis_server


@pytest.fixture
def open_storage(tmp_path, server):
    opened = []

    def open_(node_id=1, data_dir=None, **options):
        options.setdefault("url", server.url)
        options.setdefault("retry_timeout", 5)
        if data_dir is None:
            data_dir = str(tmp_path / f"node{node_id}")
        s = RedisAofStorage(node_id, data_dir, options)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def entries(first, last, term=1, size=0):
    return [Entry(term=term, index=i, type=EntryType.NORMAL,
                  data=(b"v%d\x00\r\n" % i).ljust(size, b"x")) for i in range(first, last + 1)]


def snapshot(index, term=1, data=b"image"):
    conf = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}))
    return Snapshot(SnapshotMeta(index=index, term=term, conf_state=conf), data)


def test_plugin_is_found_by_name():
    from raftcache.pluginapi.manager import PluginSet, make_manager

    assert PluginSet(make_manager()).get("storage", "redis-aof").factory is RedisAofStorage


def test_round_trip_across_reopen(open_storage):
    s = open_storage()
    assert s.load() == (HardState(), None, [])
    log = entries(1, 50) + [Entry(term=2, index=51, type=EntryType.CONF_CHANGE, data=b"[]"),
                            Entry(term=2, index=52, data=b"")]
    s.save(HardState(term=2, vote=3, commit=0), log[:10], None, True)
    s.save(HardState(term=2, vote=3, commit=40), log[10:], None, True)
    s.save(HardState(term=2, vote=3, commit=52), (), None, False)  # commit only: deferred
    s.close()
    hs, snap, got = open_storage().load()
    assert hs == HardState(term=2, vote=3, commit=52)  # close() wrote the deferred commit
    assert snap is None and got == log


def test_commit_only_change_waits_for_the_next_write(open_storage, server):
    s = open_storage()
    s.load()
    s.save(HardState(term=1, vote=1, commit=0), entries(1, 3), None, True)
    s.save(HardState(term=1, vote=1, commit=3), (), None, False)
    hs, _, _ = open_storage(1).load()  # a second reader sees what a crash would leave
    assert hs.commit == 0
    s.save(None, entries(4, 4), None, True)
    hs, _, got = open_storage(1).load()
    assert hs.commit == 3 and len(got) == 4


def test_truncates_a_conflicting_suffix(open_storage):
    s = open_storage()
    s.load()
    s.save(HardState(term=1, vote=1, commit=5), entries(1, 10), None, True)
    s.save(HardState(term=2, vote=2, commit=5), entries(6, 7, term=2), None, True)
    _, _, got = open_storage().load()
    assert [(e.index, e.term) for e in got] == [(i, 1) for i in range(1, 6)] + [(6, 2), (7, 2)]


def test_snapshot_in_save_replaces_the_log(open_storage):
    s = open_storage()
    s.load()
    s.save(HardState(term=1, vote=1, commit=10), entries(1, 10), None, True)
    snap = snapshot(20, term=3)
    s.save(HardState(term=3, vote=0, commit=20), entries(21, 25, term=3), snap, True)
    hs, got_snap, got = open_storage().load()
    assert got_snap == snap and hs.commit == 20
    assert [e.index for e in got] == [21, 22, 23, 24, 25]
    s.compact(snapshot(10))  # an older snapshot never replaces a newer one
    assert open_storage().load()[1] == snap


def test_compaction_bounds_entries_and_aof(tmp_path):
    """64 MiB of log through one node: the log keeps only what the last snapshot does not
    cover, and Redis's own AOF rewrites keep the files far below the history."""
    # A small rewrite threshold so Redis rewrites its AOF often; 1 KiB entries.
    with RedisServer(str(tmp_path / "redis"),
                     extra_args=["--auto-aof-rewrite-min-size", "1mb"]) as server:
        s = RedisAofStorage(1, str(tmp_path / "n1"), {"url": server.url})
        s.load()
        r = redis.Redis.from_url(server.url)
        aof = os.path.join(server.dir, "appendonlydir")
        most_entries = most_bytes = 0
        for first in range(1, 65536, 64):
            batch = entries(first, first + 63, size=1024)
            s.save(HardState(term=1, vote=1, commit=first + 63), batch, None, True)
            if (first + 63) % 1024 == 0:
                s.compact(snapshot(first + 63 - 256, data=b"x" * 10000))
                most_bytes = max(most_bytes, r.info("persistence")["aof_current_size"])
            most_entries = max(most_entries, r.zcard("{raftcache:1}:log"))
        assert most_entries <= 1024 + 256  # one compaction interval plus the kept tail
        hs, snap, got = s.load()
        assert snap.meta.index == got[0].index - 1 and got[-1].index == 65536
        size = sum(os.path.getsize(os.path.join(aof, f)) for f in os.listdir(aof))
        # Redis rewrites when the AOF doubles since the last rewrite, whose size includes what
        # arrived while it ran: bounded by the live data and the write rate, not the history
        # (here a peak of 18-23 MiB and 9-16 MiB at the end, of 64 MiB written).
        assert r.info("persistence")["aof_rewrites"] >= 3
        assert size < 24 << 20 and most_bytes < 32 << 20, (size, most_bytes)
        r.close()
        s.close()


@pytest.mark.parametrize("setting", [("everysec", True), ("always", False)])
def test_durability_check_refuses_weak_servers(tmp_path, setting):
    fsync, appendonly = setting
    with RedisServer(str(tmp_path / "redis"), appendfsync=fsync,
                     appendonly=appendonly) as server:
        with pytest.raises(ConfigError) as err:
            RedisAofStorage(1, str(tmp_path / "n1"), {"url": server.url})
        message = str(err.value)
        assert server.url in message and "accept_weak_durability" in message
        if fsync == "everysec":
            assert "appendfsync is 'everysec'" in message and "--appendfsync always" in message
        else:
            assert "appendonly is 'no'" in message and "--appendonly yes" in message
        s = RedisAofStorage(1, str(tmp_path / "n1"),
                            {"url": server.url, "accept_weak_durability": True})
        s.load()
        s.save(HardState(term=1, vote=1), entries(1, 2), None, True)
        assert len(s.load()[2]) == 2
        s.close()


def test_nodes_sharing_one_redis_do_not_see_each_other(open_storage, tmp_path):
    a, b = open_storage(1), open_storage(2)
    c = open_storage(1, data_dir=str(tmp_path / "other-n1"), cluster="other")
    for s, term in ((a, 1), (b, 2), (c, 3)):
        s.load()
        s.save(HardState(term=term, vote=term), entries(1, term * 3, term=term), None, True)
    for node_id, cluster, data_dir, term in ((1, "raftcache", "node1", 1),
                                             (2, "raftcache", "node2", 2),
                                             (1, "other", "other-n1", 3)):
        hs, _, got = open_storage(node_id, str(tmp_path / data_dir), cluster=cluster).load()
        assert hs.term == term and len(got) == term * 3 and {e.term for e in got} == {term}


def test_refuses_another_nodes_keys_and_lost_data(open_storage, tmp_path, server):
    s = open_storage(1)
    s.load()
    s.save(HardState(term=1, vote=1), entries(1, 3), None, True)
    # Another cluster with the same namespace and node id, in another data dir.
    with pytest.raises(RedisAofError, match="another cluster or node shares"):
        open_storage(1, data_dir=str(tmp_path / "intruder")).load()
    r = redis.Redis.from_url(server.url)
    r.flushall()
    # While running: a save must not write a log with holes into the emptied Redis.
    with pytest.raises(RedisAofError, match="vanished"):
        s.save(HardState(term=1, vote=1), entries(4, 4), None, True)
    # At start: the data dir remembers that Redis held this node's vote and log.
    with pytest.raises(RedisAofError, match="could make this node vote twice"):
        open_storage(1).load()
    os.remove(tmp_path / "node1" / "redis-aof.json")  # the documented way to start afresh
    assert open_storage(1).load() == (HardState(), None, [])
    r.close()


def test_option_errors_are_clear(server):
    with pytest.raises(ConfigError, match="storage.options.url: missing"):
        RedisAofStorage(1, "", {})
    with pytest.raises(ConfigError, match=r"accepted: accept_weak_durability, cluster"):
        RedisAofStorage(1, "", {"url": server.url, "fsync": "always"})
    with pytest.raises(ConfigError, match="socket_timeout: expected"):
        RedisAofStorage(1, "", {"url": server.url, "socket_timeout": "10"})


def test_kill_9_of_redis_loses_no_acknowledged_save(tmp_path, server, caplog):
    """Saves stream from a thread; redis-server is killed -9 mid-stream and restarted from its
    AOF. Every save that returned must be there; the saver rides through the outage."""
    data_dir = str(tmp_path / "n1")
    s = RedisAofStorage(1, data_dir, {"url": server.url, "retry_timeout": 20})
    s.load()
    acked = []
    stop = threading.Event()
    failure = []

    def saver():
        index = 0
        try:
            while not stop.is_set():
                index += 1
                s.save(HardState(term=1, vote=1, commit=index), entries(index, index), None,
                       True)
                acked.append(index)
        except Exception as exc:  # reported below
            failure.append(exc)

    t = threading.Thread(target=saver, daemon=True)
    t.start()
    started = time.monotonic()
    for _ in range(3):
        time.sleep(0.3)
        before = len(acked)
        server.kill()
        time.sleep(0.1)
        server.start()
        time.sleep(0.3)
        assert len(acked) > before, "saves did not resume after the restart"
    stop.set()
    t.join(30)
    assert not t.is_alive() and not failure, failure
    s.close()
    server.kill()  # and once more, with nothing running
    server.start()
    hs, _, got = RedisAofStorage(1, data_dir, {"url": server.url}).load()
    assert [e.index for e in got][: len(acked)] == acked
    assert all(e.data == b"v%d\x00\r\n" % e.index for e in got)
    assert hs.commit >= acked[-1] and len(acked) > 100
    assert time.monotonic() - started < 30
    assert any("retrying" in r.getMessage() for r in caplog.records)  # it was mid-stream


def test_usable_from_the_gevent_threadpool(server, tmp_path):
    """The node is monkey-patched and calls save() from threadpool threads, load() and
    commit-only saves from the hub: a patched socket would fail there with "Cannot switch to a
    different thread". Redis is killed -9 and restarted meanwhile: the saves ride through."""
    code = f"""
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from raftcache.core.raft.messages import Entry, HardState
from raftcache.plugins.storage.redis_aof import RedisAofStorage
s = RedisAofStorage(1, {str(tmp_path / 'n1')!r}, {{"url": {server.url!r}}})
s.load()
print("saving", flush=True)
pool = gevent.get_hub().threadpool
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in iter(int, 1)])
i, end = 0, time.monotonic() + 1.5
while time.monotonic() < end:
    i += 1
    pool.apply(s.save, (HardState(1, 1, i - 1), [Entry(1, i, data=b"x")], None, True))
    s.save(HardState(1, 1, i), (), None, False)  # commit only: the node calls it on the hub
assert [e.index for e in s.load()[2]] == list(range(1, i + 1))
assert len(ticks) > 50  # the hub kept running while saves waited for Redis
s.close()
print(i)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    # Kill it mid-stream: once the child is saving (its start-up alone may take a second on a
    # busy machine), not at a fixed time after the spawn.
    line = child.stdout.readline()
    assert line == "saving\n", (line, child.communicate(timeout=60))
    time.sleep(0.5)
    server.kill()
    time.sleep(0.2)
    server.start()
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and int(out) > 100, err
    assert "retrying" in err


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_local_cluster_runs_its_own_redis_servers(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3), storage="redis-aof",
                           extra={"raft": {"tick_ms": 10, "election_tick": 10,
                                           "snapshot_entries": 100,
                                           "snapshot_keep_entries": 20}})
    pids = []
    try:
        cluster.start()
        pids = [cluster.servers[i]["storage"].pid for i in (1, 2, 3)]
        for i in (1, 2, 3):
            assert cluster.servers[i]["storage"].dir.startswith(
                os.path.join(cluster.data_dir, f"node{i}"))
        leader = cluster.wait_for_leader()
        with cluster.client(timeout=5.0) as c:
            for n in range(300):
                c.set(f"k{n}", f"v{n}")
        victim = next(i for i in (1, 2, 3) if i != leader)
        cluster.kill(victim)
        cluster.kill_server(victim, "storage")
        with cluster.client(timeout=5.0) as c:
            for n in range(300, 400):
                c.set(f"k{n}", f"v{n}")
        cluster.restart_server(victim, "storage")
        cluster.start(victim)
        cluster.kill(leader)  # the restarted node must now be part of any majority
        cluster.start(leader)
        cluster.wait_for_leader(timeout=30)
        with cluster.client(timeout=5.0) as c:
            assert [c.get(f"k{n}") for n in range(400)] == [b"v%d" % n for n in range(400)]
            deadline = time.monotonic() + 20
            while c.status(cluster.address(victim)).applied < 400:
                assert time.monotonic() < deadline, "the restarted node did not catch up"
                time.sleep(0.1)
    finally:
        cluster.stop()
    assert len(pids) == 3 and not any(_alive(p) for p in pids)
    assert not any(s.running() for i in (1, 2, 3) for s in cluster.servers[i].values())


def test_a_marker_from_a_newer_format_is_refused(open_storage, tmp_path):
    import json

    from raftcache.plugins.storage.redis_aof import FORMAT_VERSION

    s = open_storage(1)
    s.load()
    s.save(HardState(term=1, vote=1), entries(1, 2), None, True)
    marker = tmp_path / "node1" / "redis-aof.json"
    body = json.loads(marker.read_text())
    assert body["format"] == FORMAT_VERSION
    assert open_storage(1).load()[0] == HardState(term=1, vote=1)  # this version reads it
    marker.write_text(json.dumps({**body, "format": FORMAT_VERSION + 1}))
    with pytest.raises(RedisAofError, match=f"written by a newer raftcache .redis-aof format "
                                            f"{FORMAT_VERSION + 1}; this build reads up to "
                                            f"{FORMAT_VERSION}"):
        open_storage(1).load()
