"""Crash tests with real processes: kill -9 the leader, a follower, a majority, and every node
at random moments under a stream of writes from many clients; restart; every acknowledged
write must be there with its value, on every replica."""

import random
import threading
import time

import pytest

from raftcache import errors
from raftcache.client import Client
from raftcache.cluster import LocalCluster, free_port_block

STORAGES = ["file-wal", "redis-aof"]
ROUNDS = ["leader", "follower", "majority", "all", "leader", "follower", "majority", "all"]


def writers(cluster, acked, stop, count=8):
    def run(w):
        with cluster.client(timeout=2.0) as c:
            n = 0
            while not stop.is_set():
                key, value = f"w{w}-{n}", f"value-{w}-{n}"
                try:
                    c.set(key, value)
                    acked[key] = value
                except (errors.Unavailable, errors.OutcomeUnknown):
                    pass  # not acknowledged: it may or may not be there, both are fine
                n += 1

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(count)]
    for t in threads:
        t.start()
    return threads


def wait_converged(cluster, timeout=30.0):
    """Every node has applied everything the leader committed."""
    deadline = time.monotonic() + timeout
    with cluster.client(timeout=2.0) as c:
        while time.monotonic() < deadline:
            try:
                statuses = [c.status(a) for a in cluster.endpoints()]
            except Exception:
                time.sleep(0.1)
                continue
            commits = {s.commit for s in statuses}
            if len(commits) == 1 and all(s.applied == s.commit for s in statuses):
                return statuses
            time.sleep(0.1)
    raise TimeoutError("replicas did not converge")


def crash_and_verify(tmp_path, storage: str, seed: int = 4242) -> tuple[dict, list]:
    """Run the kill -9 rounds under writers; return (acknowledged writes, what went wrong)."""
    rng = random.Random(seed)
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3), storage=storage,
                           extra={"raft": {"snapshot_entries": 300,
                                           "snapshot_keep_entries": 50}})
    cluster.start()
    acked: dict = {}
    stop = threading.Event()
    problems: list = []
    try:
        cluster.wait_for_leader()
        threads = writers(cluster, acked, stop)
        for kind in ROUNDS:
            time.sleep(rng.uniform(0.3, 1.0))
            leader = cluster.wait_for_leader(timeout=30)
            others = [i for i in (1, 2, 3) if i != leader]
            victims = {"leader": [leader], "follower": [rng.choice(others)],
                       "majority": [leader, rng.choice(others)], "all": [1, 2, 3]}[kind]
            for v in victims:
                cluster.kill(v)
            if storage == "redis-aof" and kind in ("all", "majority"):
                for v in victims:  # the storage server dies too
                    cluster.kill_server(v, "storage")
                    cluster.restart_server(v, "storage")
            time.sleep(rng.uniform(0.05, 0.5))
            for v in victims:
                cluster.start(v)
        stop.set()
        for t in threads:
            t.join(10)
        cluster.wait_for_leader(timeout=30)
        wait_converged(cluster)
        with cluster.client(timeout=10.0) as c:  # linearizable reads, 500 keys a call
            keys = list(acked)
            for i in range(0, len(keys), 500):
                batch = keys[i:i + 500]
                for key, got in zip(batch, c.mget(batch), strict=True):
                    if got != acked[key].encode():
                        problems.append(f"acknowledged write {key} lost")
        # The replicas agree: every node's own state holds every acknowledged write.
        tls = cluster.client().tls
        for address in cluster.endpoints():
            with Client([address], tls=tls, transport=cluster.transport, timeout=10.0) as c:
                keys = list(acked)  # in batches of node.max_batch_keys at most
                values = [v for i in range(0, len(keys), 500)
                          for v in c.mget(keys[i:i + 500], consistency="stale")]
            if values != [v.encode() for v in acked.values()]:
                problems.append(f"{address} disagrees with the acknowledged writes")
    except (TimeoutError, errors.RaftCacheError) as exc:
        problems.append(f"cluster did not recover: {exc!r}")
    finally:
        stop.set()
        cluster.stop()
    return acked, problems


@pytest.mark.parametrize("storage", STORAGES)
def test_acknowledged_writes_survive_kill_9(tmp_path, storage):
    acked, problems = crash_and_verify(tmp_path, storage)
    assert len(acked) > 200, "the writers got too little through to prove anything"
    assert problems == []


def test_the_crash_test_catches_a_storage_that_forgets(tmp_path):
    """Teeth: the `memory` storage loses everything on kill -9, and the check must say so."""
    acked, problems = crash_and_verify(tmp_path, "memory")
    assert len(acked) > 200
    assert problems, "acknowledged writes vanished with the memory storage, unnoticed"
