"""What was sent, and what must not happen: one test per row of the hardening issue, against real
node processes started the way `raftcache up` starts them (thrift, file-wal, a cluster secret).

Each row was reproduced on the code before the hardening with nothing but the project's IDL and
no credentials: a forged term bricked the cluster, a forged append wrote a value, a vote from
node -1 killed a node, a huge ttl kept every node from restarting, a big value or batch caused
elections, idle connections kept peers out, a slow drip kept a connection forever, and a reused
client id failed another client's writes.
"""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest
from thriftpy2.thrift import TMessageType

from raftcache import errors, wire
from raftcache.client import _Session
from raftcache.core import api
from raftcache.core.cache.commands import MAX_TTL_MS, Envelope, Put, encode_envelope
from raftcache.core.raft.messages import Entry, Message, MsgType
from raftcache.node.config import read_secret
from raftcache.plugins.transport import thrift

I64_MAX = 2**63 - 1
WAIT = 5.0


# The module's shared `cluster` (tests/conftest.py).
CLUSTER = {"storage": "file-wal",
           "extra": {"transport": {"options": {"frame_timeout": 1.5, "io_timeout": 1.0}}}}


def forged_batch(messages, cluster_id: int = 1) -> bytes:
    """A framed one-way raft() call, as anyone holding raftcache.thrift can write one."""
    args = wire.RaftCacheService.raft_args(batch=wire.batch_to_wire(messages, cluster_id))
    return thrift._encode("raft", TMessageType.ONEWAY, 0, args)


def send_raw(address: str, data: bytes, source: str = "127.0.0.1") -> bool:
    """Send `data` on a new plain connection; True when the server then closes it."""
    host, port = thrift.parse_address(address)
    with socket.create_connection((host, port), timeout=WAIT, source_address=(source, 0)) as s:
        s.sendall(data)
        try:
            return s.recv(1024) == b""
        except TimeoutError:
            return False


def statuses(cluster):
    with cluster.client(timeout=WAIT) as c:
        return {i: c.status(cluster.address(i)) for i in range(1, cluster.nodes + 1)}


def assert_serving(cluster, terms_before=None, key="probe"):
    """Every node is up, no term moved (when given), and a write and a read go through."""
    for i, p in cluster.processes.items():
        assert p.poll() is None, f"node {i} exited with {p.returncode}"
    with cluster.client(timeout=WAIT) as c:
        value = f"v{time.monotonic_ns()}"
        c.set(key, value)
        assert c.get(key) == value.encode()
    if terms_before is not None:
        assert {i: s.term for i, s in statuses(cluster).items()} == terms_before


def log_text(cluster, node: int) -> str:
    with open(cluster.log_path(node), errors="replace") as f:
        return f.read()


def authenticated_peer(cluster, as_node: int, to_node: int):
    """A connection to `to_node` that proved, with the cluster secret, that it is `as_node`:
    what a buggy peer (or one whose host was taken over) can send on."""
    secret = read_secret(os.path.join(cluster.data_dir, "cluster.secret"))
    t = thrift.ThriftTransport(as_node, "127.0.0.1:0", {}, None,
                               {"cluster_id": 1, "peer_secret": secret})
    return t._dial(to_node, cluster.address(to_node)).sock


# ---- rows 1-4: forged Raft traffic -------------------------------------------------------------
def test_row1_a_forged_term_near_i64_max_moves_no_term(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    for i in range(1, cluster.nodes + 1):
        for _ in range(20):  # and is logged once, not twenty times
            leader = statuses(cluster)[i].leader or 1
            beat = Message(MsgType.HEARTBEAT, i, leader, term=I64_MAX, commit=0)
            assert send_raw(cluster.address(i), forged_batch([beat]))
    assert_serving(cluster, before)
    for i in range(1, cluster.nodes + 1):
        assert log_text(cluster, i).count("has not proved it is a peer") == 1


def test_row2_a_forged_append_writes_nothing(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    leader = next(iter(statuses(cluster).values())).leader
    status = statuses(cluster)[leader]
    entry = Entry(status.term + 1, status.commit + 1,
                  data=encode_envelope(Envelope(Put(b"forged", b"forged"), stamp_ms=1)))
    append = [Message(MsgType.APP, i, 99, term=status.term + 1, log_term=status.term,
                      index=status.commit, entries=(entry,), commit=status.commit + 1)
              for i in range(1, cluster.nodes + 1)]
    for i in range(1, cluster.nodes + 1):
        send_raw(cluster.address(i), forged_batch([append[i - 1]]))
    # A real peer's connection cannot speak for node 99 either.
    for i in range(1, cluster.nodes + 1):
        peer = 2 if i != 2 else 3
        sock = authenticated_peer(cluster, peer, i)
        sock.sendall(forged_batch([append[i - 1]]))
        sock.close()
    time.sleep(0.3)
    with cluster.client(timeout=WAIT) as c:
        assert c.get("forged") is None
    assert_serving(cluster, before)
    for i in range(1, cluster.nodes + 1):
        assert "claims to come from node 99" in log_text(cluster, i)


def test_row3_a_vote_request_from_node_minus_one_crashes_nothing(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    for i in range(1, cluster.nodes + 1):
        # The transfer marker makes a node ignore its leader lease, as TimeoutNow does.
        vote = Message(MsgType.VOTE, i, -1, term=before[i] + 1, log_term=I64_MAX,
                       index=I64_MAX, context=b"transfer")
        send_raw(cluster.address(i), forged_batch([vote]))
        sock = authenticated_peer(cluster, 2 if i != 2 else 3, i)
        sock.sendall(forged_batch([vote]))
        sock.close()
    time.sleep(0.3)
    assert_serving(cluster, before)


def test_row4_a_storm_of_higher_terms_deposes_no_leader(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    leader = next(iter(statuses(cluster).values())).leader
    deadline = time.monotonic() + 2.0
    writes = 0
    with cluster.client(timeout=WAIT) as c:
        while time.monotonic() < deadline:
            for i in range(1, cluster.nodes + 1):
                term = max(before.values()) + 1 + writes
                storm = [Message(MsgType.HEARTBEAT, i, leader, term=term),
                         Message(MsgType.VOTE, i, leader, term=term, log_term=term,
                                 index=10**9, context=b"transfer"),
                         Message(MsgType.TIMEOUT_NOW, i, leader, term=term)]
                send_raw(cluster.address(i), forged_batch(storm))
            c.set("storm", str(writes))  # writes keep going meanwhile
            writes += 1
            time.sleep(0.05)
    assert writes >= 10
    assert_serving(cluster, before)


# ---- rows 5-7: client requests out of range ----------------------------------------------------
def test_row6_a_value_too_big_for_a_peer_frame_is_refused_before_it_is_proposed(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    with cluster.client(timeout=10.0) as c:
        with pytest.raises(errors.InvalidRequest, match="max_request_bytes"):
            c.set("big", b"x" * ((16 << 20) - 200))
        assert c.get("big") is None
    assert_serving(cluster, before)


def test_row7_an_mset_of_100000_items_is_refused(cluster):
    before = {i: s.term for i, s in statuses(cluster).items()}
    with cluster.client(timeout=10.0) as c:
        # Counted before it is decoded (transport.options.max_request_items)...
        with pytest.raises(errors.InvalidRequest, match="max_request_items"):
            c.mset({f"k{i}": "v" for i in range(100_000)})
        with pytest.raises(errors.InvalidRequest, match="max_request_items"):
            c.mget([f"k{i}" for i in range(100_000)])
        # ...and below that, by the node before anything is proposed (node.max_batch_keys).
        with pytest.raises(errors.InvalidRequest, match="max_batch_keys"):
            c.mset({f"k{i}": "v" for i in range(5_000)})
        assert c.mget(["k7", "k4999"]) == [None, None]
    assert_serving(cluster, before)


def test_row5_a_huge_ttl_is_refused_and_no_ttl_keeps_a_node_from_restarting(running):
    c = running(storage="file-wal",
                extra={"raft": {"snapshot_entries": 50, "snapshot_keep_entries": 5}})
    with c.client(timeout=WAIT) as client:
        with pytest.raises(errors.InvalidRequest, match="ttl_ms"):  # as any client can
            client._call("set", key=b"forever", value=b"x", ttl_ms=I64_MAX)
        client.set("decade", "y", ttl=MAX_TTL_MS / 1000)  # the longest accepted
        for i in range(120):  # past two snapshots
            client.set(f"fill{i % 7}", str(i))
    for i in range(1, 4):
        c.kill(i)
    for i in range(1, 4):
        c.start(i)
    c.wait_for_leader()
    with c.client(timeout=WAIT) as client:
        assert client.get("decade") == b"y"
        assert client.get("forever") is None
    for i, p in c.processes.items():
        assert p.poll() is None, f"node {i} did not restart: {log_text(c, i)[-500:]}"


# ---- rows 8-9: connections ---------------------------------------------------------------------
def test_row8_two_thousand_idle_connections_keep_out_neither_clients_nor_peers(cluster):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    leader = next(iter(statuses(cluster).values())).leader
    host, port = thrift.parse_address(cluster.address(leader))
    idle = []
    try:
        for n in range(2000):  # eight "hosts", 250 connections each
            s = socket.socket()
            s.bind((f"127.0.0.{10 + n % 8}", 0))
            s.setblocking(False)
            s.connect_ex((host, port))
            idle.append(s)
        time.sleep(0.5)
        before = time.monotonic()
        assert_serving(cluster)  # a new client gets in
        # And so does a peer: a restarted follower catches up through new peer connections.
        follower = next(i for i in range(1, cluster.nodes + 1) if i != leader)
        cluster.kill(follower)
        with cluster.client(timeout=WAIT) as c:
            version = c.set("after-restart", "yes")
        cluster.start(follower)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if statuses(cluster)[follower].applied >= version:
                    break
            except (OSError, errors.RaftCacheError):
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"node {follower} did not catch up with idle connections open")
        assert time.monotonic() - before < 20
    finally:
        for s in idle:
            s.close()


def test_row9_a_connection_dripping_a_byte_at_a_time_is_closed(cluster):
    # frame_timeout is 1.5 s in this cluster (30 s by default): one byte every 0.3 s never
    # stalls (io_timeout is 1 s) but never finishes a frame either.
    host, port = thrift.parse_address(cluster.address(1))
    frame = forged_batch([])
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=WAIT) as s:
        closed_at = None
        for byte in frame * 10:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.3)
            if time.monotonic() - started > 8:
                break
        if closed_at is None:
            s.settimeout(2.0)
            try:
                assert s.recv(10) == b""
            except OSError:
                pass
            closed_at = time.monotonic()
    assert closed_at - started < 5.0
    assert "a frame took over 1.5s" in log_text(cluster, 1)


# ---- row 10: client sessions -------------------------------------------------------------------
def test_row10_a_reused_client_id_neither_fails_the_owner_nor_answers_for_it(cluster):
    with cluster.client(timeout=WAIT) as owner:
        assert owner.set("mine", "1") > 0
        session = owner._sessions[0].id  # the id the owner's next write will use
    header = api.RequestHeader(client_id=session, seq=10**9)
    with cluster.client(timeout=WAIT) as stranger:
        # A higher sequence number under the owner's id...
        assert stranger._call_until_deadline(api.Request(op="put", key=b"theirs", value=b"x",
                                                          header=header)).number > 0
        # ...and the same (id, seq) on another operation.
        retry = api.Request(op="incr", key=b"theirs", delta=1,
                             header=api.RequestHeader(client_id=session, seq=10**9))
        with pytest.raises(errors.InvalidRequest, match="already used for a different write"):
            stranger._call_until_deadline(retry)
    with cluster.client(timeout=WAIT) as owner:
        owner._sessions.append(_Session(session, 1))  # the owner carries on with its session
        assert owner.set("mine", "2") > 0
        assert owner.get("mine") == b"2"


def test_client_ids_are_long_and_random():
    from raftcache.client import Client

    ids = {Client(["127.0.0.1:1"])._take_session().id for _ in range(50)}
    assert len(ids) == 50 and all(len(i.split("-")[0]) == 32 for i in ids)
