"""End to end: real node processes on 127.0.0.1, over both transports."""

import time

import pytest

from raftcache import errors

TRANSPORTS = ["thrift", "tcp-tls"]


@pytest.fixture
def make_cluster(running):
    """A cluster of the test's own (these tests kill, pause and reconfigure nodes) with fast
    elections: `running` (tests/conftest.py) with these settings."""
    def make(nodes=3, transport="thrift", **extra):
        return running(nodes=nodes, transport=transport,
                       extra={"raft": {"tick_ms": 10, "election_tick": 10}, **extra})

    return make


def single(cluster, node_id, **kw):
    """A client that only knows one node (it may still follow redirects)."""
    from raftcache.client import Client

    base = cluster.client()
    kw.setdefault("timeout", 5.0)
    return Client([cluster.address(node_id)], tls=base.tls, transport=cluster.transport, **kw)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("nodes", [3, 5])
def test_elects_and_serves_reads_from_every_node(make_cluster, transport, nodes):
    cluster = make_cluster(nodes=nodes, transport=transport)
    leader = cluster.wait_for_leader()
    assert 1 <= leader <= nodes
    followers = [i for i in range(1, nodes + 1) if i != leader]
    # Writes through a follower: the client follows the NotLeader redirect by itself.
    with single(cluster, followers[0]) as c:
        v1 = c.set("greeting", "hello")
        v2 = c.set("greeting", "world")
    assert v2 > v1 > 0
    for i in range(1, nodes + 1):
        with single(cluster, i) as c:
            assert c.get("greeting") == b"world"  # linearizable: never the older value
            assert c.get_with_version("greeting") == (b"world", v2)
    with cluster.client() as c:
        assert c.delete("greeting") is True
        assert c.get("greeting") is None
        assert c.delete("greeting") is False
        assert c.incr("n", 5) == 5 and c.incr("n") == 6
        version = c.get_with_version("n")[1]
        assert c.cas("n", version, "100") is True
        assert c.cas("n", version, "200") is False
        assert c.get("n") == b"100"
        assert c.mset({"a": "1", "b": "2"})
        assert c.mget(["a", "b", "zz"]) == [b"1", b"2", None]
        assert c.append("a", "23") == 3 and c.append("log", "x") == 1
        assert c.mget(["a", "log"]) == [b"123", b"x"]
        assert c.invalidate("") >= 3
        assert c.get("a") is None


def test_proxy_mode_forwards_writes(make_cluster):
    cluster = make_cluster(node={"proxy": True})
    leader = cluster.wait_for_leader()
    follower = next(i for i in (1, 2, 3) if i != leader)
    from raftcache.core import api

    # Talk to the follower's port only; the answer must come back from it, not a redirect.
    with single(cluster, follower) as c:
        response = c._call_once(cluster.address(follower),
                                api.Request(op="put", key=b"k", value=b"v",
                                             header=api.RequestHeader()), 5.0)
        assert response.error is None and response.number > 0
        assert c.get("k") == b"v"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_kill_leader_new_leader_serves_writes(make_cluster, transport):
    cluster = make_cluster(transport=transport)
    old = cluster.wait_for_leader()
    with cluster.client() as c:
        c.set("before", "1")
    cluster.kill(old)
    new = cluster.wait_for_leader(exclude=(old,))
    assert new != old
    with cluster.client(timeout=10) as c:
        c.set("after", "2")
        assert c.get("before") == b"1"
        assert c.get("after") == b"2"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_followers_notice_a_killed_leader_by_its_closed_connections(running, transport):
    # An election timeout of 2-4 s: without the closed connections telling them, the
    # survivors could not elect anyone for 2 s after the kill.
    cluster = running(transport=transport, extra={"raft": {"tick_ms": 10, "election_tick": 200}})
    old = cluster.wait_for_leader()
    with cluster.client() as c:
        c.set("before", "1")
    cluster.kill(old)
    new = cluster.wait_for_leader(timeout=1.5, exclude=(old,))
    with cluster.client(timeout=5) as c:
        c.set("after", "2")
        assert c.get("before") == b"1"
    assert new != old


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_paused_old_leader_serves_no_stale_read(make_cluster, transport):
    cluster = make_cluster(transport=transport)
    old = cluster.wait_for_leader()
    with cluster.client() as c:
        c.set("x", "old")
    cluster.pause(old)  # SIGSTOP: a partitioned leader that does not know it yet
    try:
        new = cluster.wait_for_leader(exclude=(old,))
        assert new != old
        with single(cluster, new) as c:
            c.set("x", "new")
    finally:
        cluster.resume(old)
    # Right after SIGCONT the old leader must not answer from its stale state.
    with single(cluster, old, timeout=10) as c:
        assert c.get("x") == b"new"
        assert c.get("x", consistency="lease") == b"new"
    with single(cluster, old) as c:
        status = c.status(cluster.address(old))
        assert status.role != "leader" and status.leader == new


def test_attempt_timeout_moves_a_write_off_a_frozen_leader(make_cluster):
    import gevent

    cluster = make_cluster()
    old = cluster.wait_for_leader()
    with cluster.client() as c:
        c.set("x", "1")
    # The client knows the leader: its first attempt goes to the frozen one, whose
    # connection stays open. With one attempt allowed the whole 60 s, the write would wait
    # there; with 0.2 s per attempt it goes to the new leader once there is one.
    c = cluster.client(timeout=60, attempt_timeout=0.2)
    c.set("x", "2")
    cluster.pause(old)
    try:
        with gevent.Timeout(20):
            c.set("x", "3")
        assert c.get("x") == b"3"
    finally:
        cluster.resume(old)
        c.close()


def test_status_and_errors(make_cluster):
    cluster = make_cluster()
    cluster.wait_for_leader()
    with cluster.client() as c:
        s = c.status()
        assert s.voters == [1, 2, 3]
        with pytest.raises(errors.InvalidRequest):
            c.get("")
        with pytest.raises(errors.InvalidRequest):
            c.get("k", consistency="sometimes")


def test_unavailable_without_quorum(make_cluster):
    cluster = make_cluster()
    cluster.wait_for_leader()
    cluster.kill(1)
    cluster.kill(2)
    cluster.kill(3)
    t0 = time.monotonic()
    with cluster.client(timeout=1.0) as c, pytest.raises(errors.Unavailable):
        c.get("k")
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_leadership_transfer_and_membership_changes(make_cluster, transport):
    cluster = make_cluster(nodes=3, transport=transport)
    leader = cluster.wait_for_leader()
    target = 1 if leader != 1 else 2
    with cluster.client(timeout=10.0) as c:
        c.set("before", "x")
        assert c.transfer_leader(target).leader == target
        assert cluster.wait_for_leader() == target
        # Remove a node, bring it back as a learner, promote it: writes go on throughout.
        other = next(n for n in (1, 2, 3) if n != target)
        status = c.remove_member(other)
        assert sorted(status.voters) == sorted({1, 2, 3} - {other})
        assert c.remove_member(other).voters == status.voters  # idempotent
        c.set("while-removed", "y")
        status = c.add_member(other, learner=True)
        assert list(status.learners) == [other] and other not in status.voters
        status = c.add_member(other)
        assert sorted(status.voters) == [1, 2, 3] and not status.learners
        version = c.set("after", "z")
        with pytest.raises(errors.InvalidRequest, match="node 9 has no known address"):
            c.add_member(9)
        with pytest.raises(errors.InvalidRequest, match="not a voter"):
            c.transfer_leader(9)
    # The re-added node caught up on everything, including what was written without it.
    with single(cluster, other) as c:
        deadline = time.monotonic() + 10
        while c.status(cluster.address(other)).applied < version:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for key, value in (("before", b"x"), ("while-removed", b"y"), ("after", b"z")):
            assert c.get(key, consistency="stale") == value


def test_membership_change_is_decided_by_the_leader_not_a_removed_node(make_cluster):
    """A node removed while it was down never hears of it and still thinks it is a voter;
    asked to re-add itself, it must not answer "already done" from that stale view (found by
    the fault suite: the node held such requests until the client's deadline)."""
    from raftcache.client import Client

    cluster = make_cluster(nodes=3, storage={"plugin": "file-wal"})
    leader = cluster.wait_for_leader()
    victim = next(n for n in (1, 2, 3) if n != leader)
    with cluster.client(timeout=10.0) as c:
        c.set("k", "v")
        cluster.kill(victim)
        assert victim not in c.remove_member(victim).voters
        c.set("k", "w")
    cluster.start(victim)  # from its own disk: it never saw the removal
    with single(cluster, victim, timeout=2.0) as c:  # until it is up and thinks it a voter
        deadline = time.monotonic() + 20
        while True:
            try:
                if victim in c.status(cluster.address(victim)).voters:
                    break
            except (OSError, errors.RaftCacheError):
                pass
            assert time.monotonic() < deadline, f"node {victim} did not come back"
            time.sleep(0.05)
    # The victim first in line, as a client that tries the endpoints in order would.
    endpoints = [cluster.address(victim)] + [cluster.address(n) for n in (1, 2, 3) if n != victim]
    with Client(endpoints, timeout=10.0) as c:
        started = time.monotonic()
        status = c.add_member(victim)
        assert victim in status.voters and status.leader in {1, 2, 3} - {victim}
        assert time.monotonic() - started < 5.0  # redirected, not held until the deadline
        assert victim in c.status(cluster.address(status.leader)).voters


def test_an_overloaded_leader_refuses_at_once_and_the_client_backs_off(running):
    import gevent

    from raftcache.core import api
    from raftcache.plugins.transport import thrift

    # Followers paused: nothing commits, so writes pile up on the leader, which keeps its
    # leadership for the 2-4 s election timeout.
    cluster = running(extra={"raft": {"tick_ms": 10, "election_tick": 200},
                             "node": {"max_pending": 2}})
    leader = cluster.wait_for_leader()
    followers = [i for i in (1, 2, 3) if i != leader]
    for i in followers:
        cluster.pause(i)
    conns = [thrift.connect(cluster.address(leader), None, 5.0) for _ in range(3)]

    def put(n):
        return conns[n].call(api.Request(op="put", key=b"k%d" % n, value=b"v"), 5.0)

    waiting = [gevent.spawn(put, n) for n in range(2)]
    gevent.sleep(0.2)
    refused = put(2)  # the third: answered at once, not after a deadline
    assert refused.error == "Unavailable" and "overloaded" in refused.reason
    assert refused.leader_hint == cluster.address(leader)  # "here, after a backoff"
    assert not any(g.ready() for g in waiting)
    for i in followers:
        cluster.resume(i)
    assert [g.get(timeout=5).error for g in waiting] == [None, None]
    with cluster.client(timeout=5) as c:  # a client retries through it
        c.set("k2", "v2")
        assert c.get("k2") == b"v2"
