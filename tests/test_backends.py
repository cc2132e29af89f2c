"""The cache backends against real redis-server and memcached processes: the protocol every
backend keeps (tests/test_backends.py::contract), what each adds (keys applications can read,
native expiries, bookkeeping that notices a server that lost its data, evictions every replica
agrees on), and the state machine restarting over a backend that already holds its entries."""

from __future__ import annotations

import tracemalloc

import pymemcache
import pytest

from raftcache.core.cache.commands import Envelope, Incr, MSet, Put, encode_envelope
from raftcache.core.cache.statemachine import StateMachine
from raftcache.node.backend import make_backend
from raftcache.node.config import ConfigError
from raftcache.pluginapi import BackendLost, BackendUnavailable, Change
from raftcache.pluginapi.manager import PluginSet, make_manager
from raftcache.plugins.backend.memcached import memcached_key
from raftcache.plugins.backend.memory import PER_KEY_OVERHEAD, MemoryBackend
from raftcache.servers import MemcachedServer, RedisServer

OWNER = "cluster 1 node 1"


# The module's `redis_server` (tests/conftest.py): a cache's settings.
REDIS = {"appendonly": False, "extra_args": ["--maxmemory-policy", "noeviction"]}


@pytest.fixture(scope="module")
def memcached_server(tmp_path_factory):
    with MemcachedServer(str(tmp_path_factory.mktemp("memcached"))) as server:
        yield server


@pytest.fixture
def fresh_memcached(memcached_server):
    # Restarted, not flush_all'd: flush_all has one-second granularity and also drops items
    # set later within the same second.
    memcached_server.restart()
    host, port = memcached_server.address.rsplit(":", 1)
    c = pymemcache.Client((host, int(port)))
    yield c
    c.close()


@pytest.fixture
def plugins():
    return PluginSet(make_manager())


def _options(kind, redis_server, memcached_server):
    if kind == "memory":
        return "memory", {}
    if kind == "redis":
        return "redis", {"url": redis_server.url}
    if kind == "memcached":
        return "memcached", {"address": memcached_server.address}
    return "hybrid", {
        "default": "local",
        "routes": [{"match": "session:*", "to": "sessions"}, {"match": "config:", "to": "cfg"}],
        "instances": {"sessions": {"plugin": "memcached", "address": memcached_server.address},
                      "cfg": {"plugin": "redis", "url": redis_server.url},
                      "local": {"plugin": "memory"}},
    }


@pytest.fixture(params=["memory", "redis", "memcached", "hybrid"])
def backend(request, plugins, redis_server, memcached_server, fresh_redis, fresh_memcached):
    name, options = _options(request.param, redis_server, memcached_server)
    b = make_backend(plugins, name, 1, options)
    b.open(OWNER)
    yield b
    b.close()


# ================================================================================================
# The contract every backend keeps
# ================================================================================================
KEYS = [b"plain", b"session:42", b"config:db", b"bin\x00\xff key", b"x" * 300]


def test_contract_apply_get_load(backend):
    assert backend.get_many(KEYS) == [None] * len(KEYS)
    backend.apply(1, [Change(k, b"v-" + k) for k in KEYS])
    assert backend.get_many(KEYS) == [b"v-" + k for k in KEYS]
    assert backend.get(b"session:42") == b"v-session:42"
    backend.apply(2, [Change(b"plain", None), Change(b"config:db", b"\x00binary\xff")])
    assert backend.get_many([b"plain", b"config:db"]) == [None, b"\x00binary\xff"]
    # A snapshot install: its items set, stale keys deleted, the rest left as is.
    backend.load(7, [Change(b"session:42", b"s2", 60_000), Change(b"new", b"n")],
                 [b"config:db", b"bin\x00\xff key"])
    assert backend.get_many([b"session:42", b"new", b"config:db", b"bin\x00\xff key"]) == [
        b"s2", b"n", None, None]


# ================================================================================================
# Redis
# ================================================================================================
def _redis(plugins, server, **options):
    b = make_backend(plugins, "redis", 1, {"url": server.url, **options})
    return b


def test_redis_keeps_values_under_the_applications_keys(plugins, redis_server, fresh_redis):
    b = _redis(plugins, redis_server, prefix="app1:")
    assert b.open(OWNER) is None  # empty: the node loads it
    b.apply(3, [Change(b"user:1", b"alice"), Change(b"tmp", b"t", 2_000)])
    assert fresh_redis.get(b"app1:user:1") == b"alice"
    # The native expiry is raftcache's plus the slack, never less.
    assert 2_000 + 9_000 < fresh_redis.pttl(b"app1:tmp") <= 12_000
    assert fresh_redis.get(b"__raftcache__:app1:applied") == f"{OWNER}|3".encode()
    b.close()


def test_redis_keys_under_the_reserved_prefix_cannot_touch_the_bookkeeping(
        plugins, redis_server, fresh_redis):
    b = _redis(plugins, redis_server)
    b.open(OWNER)
    b.apply(1, [Change(b"__raftcache__:applied", b"hostile")])
    assert b.get(b"__raftcache__:applied") == b"hostile"
    assert fresh_redis.get(b"__raftcache__:applied") == f"{OWNER}|1".encode()
    b.apply(2, [Change(b"k", b"v")])  # its own bookkeeping still holds
    b.close()


def test_redis_restart_reports_what_it_holds_and_refuses_another_owner(
        plugins, redis_server, fresh_redis):
    b = _redis(plugins, redis_server)
    b.open(OWNER)
    b.apply(5, [Change(b"k", b"v")])
    b.apply(5, [Change(b"k", b"v")])  # the same batch again (its reply was lost): fine
    b.close()
    again = _redis(plugins, redis_server)
    assert again.open(OWNER) == 5
    again.close()
    other = _redis(plugins, redis_server)
    with pytest.raises(ConfigError, match="holds the data of cluster 1 node 1 .*, not of cluster 1 node 2"):
        other.open("cluster 1 node 2")
    other.close()


def test_redis_notices_a_server_that_lost_its_data(plugins, redis_server, fresh_redis):
    b = _redis(plugins, redis_server)
    b.open(OWNER)
    b.apply(1, [Change(b"k", b"v")])
    fresh_redis.flushall()  # what a restart without persistence leaves
    with pytest.raises(BackendLost):
        b.get(b"k")  # never "not found" for a key that exists
    with pytest.raises(BackendLost):
        b.apply(2, [Change(b"k2", b"v")])
    b.load(2, [Change(b"k", b"v"), Change(b"k2", b"v")], [])
    assert b.get_many([b"k", b"k2"]) == [b"v", b"v"]
    b.close()


def test_redis_down_is_unavailable_not_a_miss(plugins, tmp_path):
    server = RedisServer(str(tmp_path / "r"), appendonly=False).start()
    b = _redis(plugins, server, socket_timeout=0.5, socket_connect_timeout=0.5)
    b.open(OWNER)
    b.apply(1, [Change(b"k", b"v")])
    server.kill()
    with pytest.raises(BackendUnavailable):
        b.get(b"k")
    with pytest.raises(BackendUnavailable):
        b.apply(2, [Change(b"k", b"w")])
    server.start()  # same port, empty
    with pytest.raises(BackendLost):
        b.get(b"k")
    b.close()
    server.stop()


# ================================================================================================
# Memcached
# ================================================================================================
def test_memcached_keys_are_the_applications_where_memcached_allows(
        plugins, memcached_server, fresh_memcached):
    b = make_backend(plugins, "memcached", 1, {"address": memcached_server.address})
    odd = [b"with space", b"x" * 300, b"__raftcache__:k:abc", b"ctl\n"]
    b.apply(1, [Change(b"session:1", b"s"), *(Change(k, k) for k in odd)])
    assert fresh_memcached.get(b"session:1") == b"s"  # what an application reads
    assert b.get_many(odd) == odd
    stored = [memcached_key(b"", k) for k in odd]
    assert len(set(stored)) == len(odd) and all(s.startswith(b"__raftcache__:") for s in stored)
    assert all(fresh_memcached.get(s) == k for s, k in zip(stored, odd, strict=True))
    assert memcached_key(b"", b"y" * 300).startswith(b"__raftcache__:h:")
    b.close()


def test_memcached_refusing_a_value_never_leaves_the_older_one(plugins, memcached_server,
                                                                fresh_memcached):
    b = make_backend(plugins, "memcached", 1, {"address": memcached_server.address})
    b.apply(1, [Change(b"big", b"small"), Change(b"other", b"o")])
    b.apply(2, [Change(b"big", b"x" * (2 << 20)), Change(b"other", b"o2")])  # > 1 MiB items
    assert b.get_many([b"big", b"other"]) == [None, b"o2"]
    b.close()


def test_memcached_native_expiry_is_later_than_raftcaches(plugins, memcached_server,
                                                           fresh_memcached):
    b = make_backend(plugins, "memcached", 1, {"address": memcached_server.address,
                                                "ttl_slack_ms": 0})
    b.apply(1, [Change(b"short", b"v", 1)])  # 1 ms + no slack: rounded up to 1 s, not 0
    assert b.get(b"short") == b"v"
    assert b._expire(40 * 24 * 3600 * 1000) == 0  # beyond 30 days: the sweeps reclaim it
    b.close()


# ================================================================================================
# Hybrid
# ================================================================================================
def test_hybrid_routes_by_glob_then_prefix_then_default(plugins, redis_server, memcached_server,
                                                        fresh_redis, fresh_memcached):
    name, options = _options("hybrid", redis_server, memcached_server)
    b = make_backend(plugins, name, 1, options)
    assert b.open(OWNER) is None  # a memory route keeps nothing: the node reloads all
    b.apply(1, [Change(b"session:1", b"s"), Change(b"config:a", b"c"), Change(b"other", b"o"),
                Change(b"session", b"no colon")])
    assert fresh_memcached.get(b"session:1") == b"s"
    assert fresh_redis.get(b"config:a") == b"c"
    assert fresh_redis.get(b"other") is None and fresh_memcached.get(b"other") is None
    assert b.instances["local"].get(b"other") == b"o"
    assert b.instances["local"].get(b"session") == b"no colon"
    assert b.get_many([b"other", b"config:a", b"session:1"]) == [b"o", b"c", b"s"]
    b.close()


@pytest.mark.parametrize("options, error", [
    ({"default": "x", "instances": {"a": {"plugin": "memory"}}}, "default: 'x' is not an instance"),
    ({"default": "a", "instances": {"a": {"plugin": "nope"}}},
     r"instances.a.plugin: unknown backend 'nope' \(known: .*memcached, memory, redis"),
    ({"default": "a", "instances": {"a": {"plugin": "redis"}}},
     "backend.options.instances.a.url: missing"),
    ({"default": "a", "instances": {"a": {"plugin": "memory"}}, "routes": [{"match": "x"}]},
     r"routes\[0\]: expected"),
    ({"default": "a", "instances": {"a": {"plugin": "memory"}},
      "routes": [{"match": "x", "to": "b"}]}, r"routes\[0\].to: 'b' is not an instance"),
    ({"default": "a", "instances": {"a": {"plugin": "memory", "max_keys": -1}}},
     "instances.a.max_keys: must be 0"),
])
def test_hybrid_config_errors_name_the_key(plugins, options, error):
    with pytest.raises(ConfigError, match=error):
        make_backend(plugins, "hybrid", 1, options)


# ================================================================================================
# Memory: bounded, evicting the same keys on every replica
# ================================================================================================
def _replica(**limits):
    return StateMachine(MemoryBackend(**limits))


def _write(sm, index, command, stamp=0):
    return sm.apply(index, encode_envelope(Envelope(command, None, None, None, stamp)))


def test_memory_evicts_oldest_writes_alike_on_every_replica_and_after_a_restore():
    a, b = _replica(max_keys=3), _replica(max_keys=3)
    history = [Put(b"a", b"1"), Put(b"b", b"2"), Put(b"c", b"3"), Put(b"a", b"4"),
               MSet(((b"d", b"5"), (b"e", b"6")))]
    for i, cmd in enumerate(history[:3], 1):
        _write(a, i, cmd)
        _write(b, i, cmd)
    c = _replica(max_keys=3)
    c.restore(a.snapshot())  # a replica that caught up from a snapshot
    for i, cmd in enumerate(history[3:], 4):
        for sm in (a, b, c):
            _write(sm, i, cmd)
    # "a" was rewritten, so "b" and "c" were the oldest writes.
    for sm in (a, b, c):
        assert [sm.read(k, 0) is not None for k in (b"a", b"b", b"c", b"d", b"e")] == [True, False, False, True, True]
        assert len(sm) == 3
    assert a.snapshot() == b.snapshot() == c.snapshot()


def test_memory_incr_of_an_evicted_key_starts_from_zero_everywhere():
    sm = _replica(max_keys=1)
    _write(sm, 1, Put(b"n", b"41"))
    _write(sm, 2, Put(b"m", b"x"))  # evicts n
    assert _write(sm, 3, Incr(b"n", 1)) == 1


def test_memory_max_bytes_counts_the_real_cost_of_a_key():
    # The fixed per-key overhead must be within 25% of what a key really costs the process:
    # the catalog entry, the backend's dict slot and the bytes objects' headers.
    sm = _replica(max_bytes=1 << 40)
    n = 20_000
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(1, n + 1):
        _write(sm, i, Put(b"key-%08d" % i, b"v" * 100))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    per_key = used / n - 12 - 100
    assert PER_KEY_OVERHEAD * 0.75 <= per_key <= PER_KEY_OVERHEAD * 1.25, per_key
    assert sm.backend.bytes == n * (12 + 100 + PER_KEY_OVERHEAD)
    full = _replica(max_bytes=10 * (12 + 100 + PER_KEY_OVERHEAD))
    for i in range(1, 21):
        _write(full, i, Put(b"key-%08d" % i, b"v" * 100))
    assert len(full) == 10 and full.read(b"key-00000011", 0) is not None


# ================================================================================================
# The state machine restarting over a backend that holds its entries
# ================================================================================================
def test_restart_over_redis_replays_into_an_overlay_and_never_regresses_it(
        plugins, redis_server, fresh_redis):
    def sm_over_redis():
        b = _redis(plugins, redis_server)
        return StateMachine(b), b.open(OWNER)

    first, _ = sm_over_redis()
    first.restore(b"")
    entries = [encode_envelope(Envelope(cmd, None, None, None, 0)) for cmd in
               [Put(b"k", b"1"), Incr(b"n", 5), Put(b"k", b"2"), Incr(b"n", 1), Put(b"k", b"3")]]
    for i, data in enumerate(entries[:2], 1):
        first.apply(i, data)
    snapshot = first.snapshot()  # at 2
    for i, data in enumerate(entries[2:], 3):
        first.apply(i, data)
    at_5 = {k: fresh_redis.get(k) for k in (b"k", b"n")}
    assert at_5 == {b"k": b"3", b"n": b"6"}

    second, held = sm_over_redis()
    assert held == 5
    second.restore(snapshot, backend_index=held)
    for i, data in enumerate(entries[2:], 3):
        second.stage(i, data)
        second.flush()
        assert {k: fresh_redis.get(k) for k in (b"k", b"n")} == at_5  # never older
        assert second.read(b"k", 0) == ({3: b"2", 4: b"2", 5: b"3"}[i], {3: 3, 4: 3, 5: 5}[i])
    assert second.read(b"n", 0) == (b"6", 4)
    second.apply(6, encode_envelope(Envelope(Put(b"k", b"4"), None, None, None, 0)))
    assert fresh_redis.get(b"k") == b"4"  # past the overlay: the backend again

    # Teeth: restoring without trusting the backend reloads it and sends it back in time.
    third, _ = sm_over_redis()
    third.restore(snapshot)
    assert fresh_redis.get(b"k") == b"1"


def test_an_entry_whose_backend_read_fails_changes_nothing_and_can_be_staged_again():
    class Flaky(MemoryBackend):
        down = False

        def get_many(self, keys):
            if self.down:
                raise BackendUnavailable("server down")
            return super().get_many(keys)

    sm = StateMachine(Flaky())
    _write(sm, 1, Put(b"n", b"41"), stamp=5)
    before = (sm.applied_index, sm.last_stamp_ms, sm.snapshot())
    sm.backend.down = True
    incr = encode_envelope(Envelope(Incr(b"n", 1), "c", 1, None, 9))
    with pytest.raises(BackendUnavailable):
        sm.stage(2, incr)
    sm.backend.down = False
    assert (sm.applied_index, sm.last_stamp_ms, sm.snapshot()) == before
    assert sm.stage(2, incr) == 42
    sm.flush()
    assert sm.read(b"n", 9) == (b"42", 2)


def test_a_snapshot_key_without_a_value_deletes_an_older_value_held_here():
    # The leader's Memcached had dropped "c" when it took the snapshot; this follower's backend
    # still holds an older "c". The snapshot's version must not be served with that value.
    leader, follower = _replica(), _replica()
    for sm in (leader, follower):
        _write(sm, 1, Put(b"c", b"old"))
    _write(leader, 2, Put(b"c", b"new"))
    leader.backend._values.pop(b"c")  # dropped by the leader's server
    follower.restore(leader.snapshot())
    assert follower.read(b"c", 0) is None and follower.backend.get(b"c") is None
    assert follower.version(b"c", 0) == 2
