"""Three-node clusters (real processes) over real redis-server and memcached processes, one of
each per node: every command agreed by every replica and readable in the servers, expiry agreed
by replicas whose clocks differ, incr exactly once across a leader change, a lagging follower
caught up by snapshot, node restarts, and backend servers killed with -9 and restarted empty
while a reader checks that no wrong value is ever served."""

from __future__ import annotations

import os
import signal
import threading
import time
import tomllib

import pymemcache
import pytest
import redis

from raftcache import errors
from raftcache.client import Client
from raftcache.cluster import LocalCluster
from raftcache.plugins.security.encryption import EncryptionCodec, read_keyring

# Routes for the tests: a memcached route, a redis route, memory for the rest; keys of all three
# share the prefix "inv/" so that one invalidate spans them.
HYBRID = {
    "default": "local",
    "routes": [{"match": "*.mc", "to": "mc"}, {"match": "*.rd", "to": "rd"}],
    "instances": {"mc": {"plugin": "memcached"}, "rd": {"plugin": "redis"},
                  "local": {"plugin": "memory"}},
}
KEY = {"redis": "k", "memcached": "k", "hybrid": "k.rd"}


def shape(backend: str, **kwargs) -> dict:
    """A cluster on `backend` (file-wal, small snapshots): `new_cluster`'s keyword arguments."""
    extra = {"raft": {"snapshot_entries": 40, "snapshot_keep_entries": 5}}
    if backend == "hybrid":
        extra["backend"] = {"options": HYBRID}
    for section, body in kwargs.pop("extra", {}).items():
        extra.setdefault(section, {}).update(body)
    return {"storage": "file-wal", "backend": backend, "extra": extra, **kwargs}


# The module's shared clusters (tests/conftest.py), one per backend, for the tests that only
# write their own keys; tests that kill nodes or servers start their own with `running`.
CLUSTERS = {backend: shape(backend) for backend in ("redis", "memcached", "hybrid")}


def on(cluster: LocalCluster, node: int, **kwargs) -> Client:
    return Client([cluster.address(node)], timeout=kwargs.pop("timeout", 3.0), **kwargs)


def stale(cluster: LocalCluster, node: int, key):
    with on(cluster, node) as c:
        return c.get_with_version(key, consistency="stale")


def eventually(check, timeout: float = 15.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (errors.RaftCacheError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or check}")
        time.sleep(0.05)


def backend_options(cluster: LocalCluster, node: int, route: str | None = None) -> dict:
    with open(cluster.config_path(node), "rb") as f:
        options = tomllib.load(f)["backend"]["options"]
    return options["instances"][route] if route else options


def direct_get(cluster: LocalCluster, node: int, key: bytes, route: str | None = None,
               version: int | None = None):
    """What an application reading the node's own server directly sees, opened with the
    cluster's keyring when it is sealed (encryption at rest is on by default): a sealed value
    is bound to the `version` it was stored at."""
    options = backend_options(cluster, node, route)
    if "url" in options:
        with redis.Redis.from_url(options["url"]) as r:
            raw = r.get(key)
    else:
        c = pymemcache.Client(options["address"])  # up's /path/memcached.sock
        try:
            raw = c.get(key)
        finally:
            c.close()
    if raw is None or not cluster.encryption:
        return raw
    keyring = read_keyring(cluster.keyring_path())
    codec = EncryptionCodec(keyring, dict)
    return codec.open(key, codec.unbind(key, version, raw))  # data key 0: nothing rotated here


def replicas_agree(cluster: LocalCluster, keys) -> dict:
    """Each key's (value, version) once every node serves the same (stale reads: its own
    state); fails if they do not converge."""
    def same():
        seen = [[stale(cluster, n, k) for k in keys] for n in (1, 2, 3)]
        return seen[0] if seen[0] == seen[1] == seen[2] else None

    return dict(zip(keys, eventually(same, what="replicas agree"), strict=True))


# ================================================================================================
@pytest.mark.parametrize("cluster", ["redis", "memcached", "hybrid"], indirect=True,
                         scope="module")
def test_every_command_is_agreed_by_every_replica_and_readable_in_the_servers(cluster):
    backend = cluster.backend
    k = KEY[backend]
    with cluster.client() as c:
        v1 = c.set(k, "one")
        assert c.get_with_version(k) == (b"one", v1)
        assert c.cas(k, v1 + 1000, "nope") is False
        assert c.cas(k, v1, "two") is True
        assert c.incr("n.rd", 5) == 5 and c.incr("n.rd", -2) == 3
        assert c.append(k, "+") == 4
        assert c.mset({"inv/a.mc": "A", "inv/b.rd": "B", "inv/c": "C", "keep.mc": "K"})
        assert c.mget(["inv/a.mc", "inv/b.rd", "inv/c", "keep.mc", "none"]) == [
            b"A", b"B", b"C", b"K", None]
        assert c.invalidate("inv/") == 3  # across every route it touches
        assert c.mget(["inv/a.mc", "inv/b.rd", "inv/c"]) == [None, None, None]
        assert c.delete("keep.mc") is True and c.delete("keep.mc") is False
        with pytest.raises(errors.InvalidRequest):
            c.incr(k)  # "two+" is not a number: refused, nothing applied
    final = replicas_agree(cluster, [k, "n.rd", "inv/a.mc", "keep.mc"])
    assert final[k][0] == b"two+" and final["n.rd"][0] == b"3"
    assert final["inv/a.mc"] is None and final["keep.mc"] is None
    # Applications reading each node's own server find the value under the key they know.
    route = "rd" if backend == "hybrid" else None
    for node in (1, 2, 3):
        assert direct_get(cluster, node, k.encode(), route, final[k][1]) == b"two+"
        assert direct_get(cluster, node, b"inv/b.rd", route) is None


def test_expiry_is_agreed_by_replicas_whose_clocks_differ(running):
    # Node 1 runs 4 s ahead of real time and leads; node 2 is 4 s behind.
    offsets = {1: 4000, 2: -4000, 3: 0}
    cluster = running(**shape(
        "redis", launcher=["-m", "raftcache.testing.node"],
        node_args={n: ["--clock-offset-ms", str(o)] for n, o in offsets.items()}))
    with cluster.client() as c:
        c.transfer_leader(1)
        started = time.time()
        version = c.set("t", "short-lived", ttl=2.0)
        replicas_agree(cluster, ["t"])
        # Each node's Redis keeps the value at least until that node's own clock passes the
        # expiry (its stamp is at most node 1's clock now + 2 s): the slack covers the skew.
        expiry = time.time() + 4.0 + 2.0
        for node, offset in offsets.items():
            with redis.Redis.from_url(backend_options(cluster, node)["url"]) as r:
                left_ms = r.pttl(b"t")
            assert left_ms > (expiry - (time.time() + offset / 1000)) * 1000, (node, left_ms)
        # The leader's sweep, stamped by its clock, removes it everywhere at the same index.
        eventually(lambda: c.get("t") is None, timeout=10, what="the key expires")
        assert time.time() - started < 3.5  # by node 1's clock, not by real time
    assert replicas_agree(cluster, ["t"]) == {"t": None}
    assert version > 0


@pytest.mark.parametrize("cluster", ["redis", "hybrid"], indirect=True, scope="module")
def test_incr_is_applied_once_across_leader_changes(cluster):
    # Leadership moves (to 2, 3, 1), the membership and the nodes stay: a shared cluster.
    done = {"ok": 0, "unknown": 0}
    stop = threading.Event()

    def incr_loop():
        with cluster.client(timeout=5.0) as c:
            while not stop.is_set():
                try:
                    c.incr("count.rd")
                    done["ok"] += 1
                except errors.OutcomeUnknown:
                    done["unknown"] += 1

    worker = threading.Thread(target=incr_loop)
    worker.start()
    try:
        with cluster.client() as admin:
            for target in (2, 3, 1):
                time.sleep(0.5)
                eventually(lambda t=target: admin.transfer_leader(t), what="transfer")
            time.sleep(0.5)
    finally:
        stop.set()
        worker.join(30)
    value = int(replicas_agree(cluster, ["count.rd"])["count.rd"][0])
    assert done["ok"] > 10
    assert done["ok"] <= value <= done["ok"] + done["unknown"], done


@pytest.mark.parametrize("backend", ["redis", "memcached", "hybrid"])
def test_a_lagging_follower_catches_up_by_snapshot_and_nodes_restart(running, backend):
    cluster = running(**shape(backend))
    leader = cluster.wait_for_leader()
    lagging = next(n for n in (1, 2, 3) if n != leader)
    cluster.kill(lagging)
    with cluster.client() as c:
        versions = {f"s{i}.rd": c.set(f"s{i}.rd", f"v{i}") for i in range(120)}  # 3 snapshots
    cluster.start(lagging)
    agreed = replicas_agree(cluster, list(versions))
    assert agreed == {k: (f"v{k[1:-3]}".encode(), v) for k, v in versions.items()}
    with open(cluster.log_path(lagging), errors="replace") as f:
        assert "installed the leader's snapshot" in f.read()
    # Every node restarts over the values its backend already holds.
    for node in (1, 2, 3):
        cluster.kill(node)
        cluster.start(node)
        cluster.wait_for_leader(timeout=30)
    assert replicas_agree(cluster, list(versions)) == agreed


@pytest.mark.parametrize("backend,route", [("redis", None), ("memcached", None),
                                           ("hybrid", "rd"), ("hybrid", "mc")])
def test_backend_servers_killed_and_restarted_empty_never_serve_a_wrong_value(
        running, backend, route):
    cluster = running(**shape(backend))
    key = {None: "w", "rd": "w.rd", "mc": "w.mc"}[route]
    misses_allowed = backend == "memcached" or route == "mc"
    written = {}  # version -> value, every acknowledged write
    wrong = []
    stop = threading.Event()
    writing = threading.Event()  # cleared while a server restarts: only reads can notice

    def writer():
        with cluster.client(timeout=5.0) as c:
            n = 0
            while not stop.is_set():
                if not writing.wait(0.05):
                    continue
                n += 1
                try:
                    written[c.set(key, f"v{n}")] = f"v{n}".encode()
                except (errors.OutcomeUnknown, errors.Unavailable):
                    pass

    def reader(node):
        # Linearizable reads served by this node (a follower asks the leader for the index):
        # once a write was acknowledged, a miss is wrong unless the route allows misses.
        with on(cluster, node, timeout=2.0) as c:
            while not stop.is_set():
                acknowledged = bool(written)
                try:
                    found = c.get_with_version(key)
                except (errors.RaftCacheError, OSError):
                    continue
                if found is None:
                    if acknowledged and not misses_allowed:
                        wrong.append((node, "miss"))
                    continue
                value, version = found
                # A version that no acknowledged write had is fine only if that write's answer
                # was lost; a value not the one written at that version never is.
                if version in written and written[version] != value:
                    wrong.append((node, found))
                time.sleep(0.002)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(n,)) for n in (1, 2, 3)]
    for t in threads:
        t.start()
    try:
        writing.set()
        eventually(lambda: len(written) > 5, what="writes")
        for node in (1, 2, 3):
            writing.clear()
            cluster.kill_backend(node, route)
            time.sleep(0.5)
            cluster.restart_backend(node, route)
            time.sleep(0.7)
            writing.set()
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not wrong, wrong[:5]
    with cluster.client() as c:
        final = c.set(key, "final")
    agreed = replicas_agree(cluster, [key])
    if misses_allowed:
        assert agreed[key] in ((b"final", final), None)
    else:  # every node rebuilt its Redis from its snapshot and log
        assert agreed[key] == (b"final", final)
        for node in (1, 2, 3):
            assert direct_get(cluster, node, key.encode(), route, final) == b"final"
    for node in (1, 2, 3):
        assert cluster.processes[node].poll() is None, f"node {node} exited"


def test_a_node_whose_redis_hangs_answers_unavailable_then_catches_up(running):
    cluster = running(**shape("redis", extra={"backend": {"options": {"socket_timeout": 0.5}}}))
    node = next(n for n in (1, 2, 3) if n != cluster.wait_for_leader())
    with cluster.client() as c:
        before = c.set("h", "before")
    eventually(lambda: stale(cluster, node, "h") == (b"before", before))
    server = cluster.servers[node]["backend"]
    os.kill(server.pid, signal.SIGSTOP)  # hangs: no answer, no error
    try:
        with cluster.client() as c:
            during = c.set("h", "during")  # the other two commit it
        with on(cluster, node) as c, pytest.raises(errors.Unavailable):
            c.get("h", consistency="stale")  # never the older value
        with cluster.client() as c:
            assert c.get("h") == b"during"  # the client goes to another node
    finally:
        os.kill(server.pid, signal.SIGCONT)
    eventually(lambda: stale(cluster, node, "h") == (b"during", during), what="catch up")
