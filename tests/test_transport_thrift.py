"""The thrift transport over real sockets on 127.0.0.1.

No monkey-patching: the transport uses gevent sockets itself, so servers and clients share this
process's hub. A client that must block like a foreign program (thriftpy2's own client) runs in
gevent's native threadpool.
"""

from __future__ import annotations

import logging
import socket
import struct
import time

import gevent
import gevent.event
import pytest
import thriftpy2.rpc
from gevent import socket as gsocket
from thriftpy2.transport import TCyFramedTransportFactory

from raftcache import certs, wire
from raftcache.core import api
from raftcache.core.raft.messages import ConfState, Entry, Message, MsgType, SnapshotMeta
from raftcache.pluginapi.manager import PluginSet, make_manager
from raftcache.plugins.transport import thrift

WAIT = 5.0  # generous, bounded: every wait in this file ends by then
LOGGER = "raftcache.transport.thrift"
FAST = {"idle_timeout": 0.3, "io_timeout": 0.3, "handshake_timeout": 0.3,
        "max_frame": 1 << 20, "reconnect_min": 0.02, "reconnect_max": 0.1}


class EchoHandler:
    """Answers each op from the request itself, so a round trip shows every field arrived."""

    def __init__(self):
        self.requests = []
        self.messages = []
        self.got_messages = gevent.event.Event()

    def handle_request(self, r, certificate=None, source=None):
        self.requests.append(r)
        key = r.key or b""
        if key.startswith(b"err:"):
            name = key[4:].decode()
            return api.error(name, f"because {name}",
                                       "127.0.0.1:7401" if name == "NotLeader" else "")
        if key == b"slow":
            gevent.sleep(0.5)
        if r.op == "put":
            return api.Response(number=len(r.value) + (r.ttl_ms or 0))
        if r.op == "get":
            return api.Response(result=api.GetResult(True, key + (r.consistency or "").encode(),
                                                       7))
        if r.op == "remove":
            return api.Response(ok=key == b"present")
        if r.op == "cas":
            return api.Response(ok=r.expected_version == 3 and r.value == b"new", number=9)
        if r.op == "incr":
            return api.Response(number=r.delta)
        if r.op == "invalidate":
            return api.Response(number=len(key))
        if r.op == "mget":
            return api.Response(results=[api.GetResult(True, k, i) for i, k in enumerate(r.keys)])
        if r.op == "mset":
            return api.Response(versions=sorted(len(v) for v in r.items.values()))
        if r.op == "status":
            return api.Response(status=api.NodeStatus(
                id=1, address="127.0.0.1:1", role="leader", term=4, commit=10, applied=9,
                leader=1, leader_address="127.0.0.1:1", voters=[1, 2, 3], learners=[]))
        raise AssertionError(r.op)

    def handle_peer_messages(self, messages, sender=None):
        self.messages.extend(messages)
        self.got_messages.set()


@pytest.fixture
def transports():
    made = []

    def make(node_id=1, address="127.0.0.1:0", peers=None, tls=None, handler=None, **options):
        t = thrift.server(node_id, address, peers or {}, tls, {**FAST, **options})
        t.handler_for_test = handler or EchoHandler()
        t.serve(t.handler_for_test)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def node(transports):
    return transports()


def call(conn, op, **fields):
    return conn.call(api.Request(op=op, **fields), WAIT)


def wait_for(predicate, what: str):
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.01)


class GoodClient:
    """Calls status in a loop next to a misbehaving connection; every call must succeed."""

    def __init__(self, address):
        self.conn = thrift.connect(address, None, WAIT)
        self.ok = 0
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            assert call(self.conn, "status").status.term == 4
            self.ok += 1
            gevent.sleep(0.005)

    def stop(self) -> int:
        assert not self.greenlet.dead, self.greenlet.exception
        self.greenlet.kill()
        self.conn.close()
        return self.ok


# ---- client calls -------------------------------------------------------------------------------
def test_every_method_round_trips(node):
    conn = thrift.connect(node.bound_address, None, WAIT)
    header = api.RequestHeader(token="tok", client_id="c1", seq=5, timeout_ms=900)
    assert call(conn, "put", key=b"k", value=b"abc", ttl_ms=10, header=header).number == 13
    got = call(conn, "get", key=b"k", consistency="lease").result
    assert (got.found, got.value, got.version) == (True, b"klease", 7)
    assert call(conn, "remove", key=b"present").ok is True
    assert call(conn, "remove", key=b"absent").ok is False
    assert call(conn, "cas", key=b"k", expected_version=3, value=b"new").ok is True
    assert call(conn, "incr", key=b"n", delta=-4).number == -4
    assert call(conn, "invalidate", key=b"user:").number == 5
    results = call(conn, "mget", keys=[b"a", b"b"], consistency="stale").results
    assert [(r.value, r.version) for r in results] == [(b"a", 0), (b"b", 1)]
    assert call(conn, "mset", items={b"a": b"1", b"b": b"22"}, ttl_ms=5).versions == [1, 2]
    status = call(conn, "status").status
    assert (status.id, status.role, status.voters) == (1, "leader", [1, 2, 3])

    seen = node.handler_for_test.requests
    assert [r.op for r in seen] == ["put", "get", "remove", "remove", "cas", "incr",
                                    "invalidate", "mget", "mset", "status"]
    assert seen[0].header == header and seen[0].ttl_ms == 10
    assert seen[6].key == b"user:"  # invalidate's prefix travels as the Request's key
    assert seen[8].items == {b"a": b"1", b"b": b"22"} and seen[8].ttl_ms == 5
    conn.close()


@pytest.mark.parametrize("error", api.ERRORS)
def test_idl_exceptions_round_trip(node, error):
    conn = thrift.connect(node.bound_address, None, WAIT)
    response = call(conn, "put", key=b"err:" + error.encode(), value=b"v")
    assert response.error == error
    if error == "NotLeader":
        assert response.leader_hint == "127.0.0.1:7401"
    else:
        assert response.reason == f"because {error}"
    assert call(conn, "incr", key=b"n", delta=1).number == 1  # still usable afterwards
    conn.close()


def test_unknown_op_is_an_invalid_request(node):
    conn = thrift.connect(node.bound_address, None, WAIT)
    assert call(conn, "frobnicate", key=b"k").error == "InvalidRequest"
    assert call(conn, "status").status.id == 1


def test_a_thriftpy2_framed_client_works(node):
    # A stock framed binary client, blocking in a native thread like a foreign program.
    host, port = thrift.parse_address(node.bound_address)

    def run():
        client = thriftpy2.rpc.make_client(wire.RaftCacheService, host, port,
                                           trans_factory=TCyFramedTransportFactory(),
                                           timeout=WAIT * 1000)
        try:
            version = client.put(b"k", b"vv", 0, None)
            try:
                client.get(b"err:NotLeader", None, None)
            except wire.idl.NotLeader as exc:
                hint = exc.leader_hint
            return version, hint, client.status().term
        finally:
            client.close()

    assert gevent.get_hub().threadpool.spawn(run).get(timeout=WAIT) == (2, "127.0.0.1:7401", 4)


def test_timeout_raises_and_breaks_the_connection(node):
    conn = thrift.connect(node.bound_address, None, WAIT)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.call(api.Request(op="get", key=b"slow"), 0.1)
    assert time.monotonic() - started < 0.4
    assert conn.closed
    with pytest.raises(OSError):
        call(conn, "status")
    # A new connection is fine; it never sees the late answer to the timed-out call.
    fresh = thrift.connect(node.bound_address, None, WAIT)
    assert call(fresh, "incr", key=b"n", delta=3).number == 3


def test_connect_to_nothing_raises_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    with pytest.raises(ConnectionRefusedError):
        thrift.connect(f"127.0.0.1:{port}", None, WAIT)


def test_connection_closed_while_idle_is_replaced_transparently(node, caplog):
    conn = thrift.connect(node.bound_address, None, WAIT)
    assert call(conn, "status").status.id == 1
    gevent.sleep(FAST["idle_timeout"] + 0.3)  # the server closes it
    assert call(conn, "status").status.id == 1  # nothing had been sent: reconnected


# ---- misbehaving clients ------------------------------------------------------------------------
def _raw(address):
    host, port = thrift.parse_address(address)
    return gsocket.create_connection((host, port), timeout=WAIT)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _call_header(name: bytes) -> bytes:
    return struct.pack(">iI", -2147418112 | 1, len(name)) + name + struct.pack(">i", 1)


BAD_INPUTS = {
    "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "garbage in a frame": _frame(b"\x80\x01\x00\x01 definitely not thrift"),
    "truncated frame": struct.pack(">i", 100) + b"0123456789",
    "oversized frame": struct.pack(">i", (1 << 20) + 1) + b"x" * 64,
    "negative frame": struct.pack(">i", -5),
    # A list of an unknown element type claiming 2**31-1 elements: thriftpy2's decoder would
    # spin on it for seconds with the hub stopped.
    "skip bomb": _frame(_call_header(b"put") + b"\x0f\x00\x09\x55" + struct.pack(">i", 2**31 - 1)
                        + b"\x00"),
    "silent": b"",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_connection_is_closed_while_others_keep_working(node, kind, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    good = GoodClient(node.bound_address)
    bad = _raw(node.bound_address)
    port = bad.getsockname()[1]
    started = time.monotonic()
    bad.sendall(BAD_INPUTS[kind])
    if kind == "truncated frame":
        bad.shutdown(socket.SHUT_WR)
    assert bad.recv(100) == b""  # closed by the server (recv would time out after WAIT)
    assert time.monotonic() - started < 2.0
    gevent.sleep(0.05)
    assert good.stop() > 5
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and f":{port}" in
             r.getMessage()]
    assert len(lines) == 1, lines
    bad.close()


def test_many_silent_connections_do_not_stall_the_server(node):
    silent = [_raw(node.bound_address) for _ in range(20)]
    conn = thrift.connect(node.bound_address, None, WAIT)
    assert call(conn, "status").status.id == 1
    for s in silent:
        s.close()


# ---- peer links ---------------------------------------------------------------------------------
def _messages(to: int, frm: int, n: int) -> list[Message]:
    return [Message(MsgType.APP, to, frm, term=2, log_term=1, index=10 + i,
                    entries=(Entry(2, 11 + i, data=b"x" * i),), commit=9)
            for i in range(n)]


def test_send_delivers_batches_to_the_peer(transports):
    b = transports(node_id=2)
    a = transports(node_id=1, peers={1: "127.0.0.1:1", 2: b.bound_address})
    snap = Message(MsgType.SNAP, 2, 1, term=3, offset=5, data=b"chunk", done=True,
                   snapshot_meta=SnapshotMeta(40, 3, ConfState(frozenset({1, 2}))))
    sent = _messages(2, 1, 50) + [snap]
    a.send(sent)
    a.send([Message(MsgType.HEARTBEAT, 7, 1, term=3)])  # unknown peer: dropped, no error
    received = b.handler_for_test.messages
    wait_for(lambda: len(received) >= len(sent), "the messages")
    assert received == sent  # in order, every field intact


def test_send_reconnects_after_the_peer_restarts(transports):
    b = transports(node_id=2)
    address = b.bound_address
    a = transports(node_id=1, peers={2: address})
    a.send(_messages(2, 1, 1))
    wait_for(lambda: b.handler_for_test.messages, "the first message")

    b.close()
    a.send(_messages(2, 1, 1))  # into the void: dropped, never raised
    gevent.sleep(0.1)
    b2 = transports(node_id=2, address=address)
    received = b2.handler_for_test.messages

    def delivered():
        a.send([Message(MsgType.HEARTBEAT, 2, 1, term=5)])
        return bool(received)

    wait_for(delivered, "a message after the restart")
    assert received[0].type == MsgType.HEARTBEAT


def test_send_never_blocks_and_drops_when_the_queue_is_full(transports):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    a = transports(node_id=1, peers={2: dead}, peer_queue=10)
    started = time.monotonic()
    for _ in range(100):
        a.send(_messages(2, 1, 5))
    assert time.monotonic() - started < 0.5
    assert sum(a.dropped().values()) > 0


def test_bad_raft_messages_are_dropped_and_the_rest_delivered(transports, caplog):
    b = transports(node_id=2)
    conn = _raw(b.bound_address)
    good = wire.message_to_wire(Message(MsgType.HEARTBEAT, 2, 1, term=3))
    bad = wire.message_to_wire(Message(MsgType.HEARTBEAT, 2, 1, term=3))
    bad.type = 99  # no such MsgType
    elsewhere = wire.message_to_wire(Message(MsgType.HEARTBEAT, 5, 1, term=3))
    args = wire.RaftCacheService.raft_args(batch=wire.RaftBatch(0, [bad, elsewhere, good]))
    conn.sendall(thrift._encode("raft", 4, 0, args))  # 4: ONEWAY
    b.handler_for_test.got_messages.wait(WAIT)
    # The undecodable one is dropped here; the node itself drops (and counts) the one for
    # another node, as it does whichever transport brought it.
    assert b.handler_for_test.messages == [Message(MsgType.HEARTBEAT, 5, 1, term=3),
                                           Message(MsgType.HEARTBEAT, 2, 1, term=3)]
    assert sum("dropped" in r.getMessage() for r in caplog.records) == 1
    conn.close()


def test_raft_batch_of_another_cluster_closes_the_connection(transports):
    b = transports(node_id=2, cluster_id=7)
    a = transports(node_id=1, peers={2: b.bound_address}, cluster_id=8)
    a.send(_messages(2, 1, 3))
    gevent.sleep(0.3)
    assert b.handler_for_test.messages == []


# ---- TLS ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    certs.init_certs(d, nodes=2)
    return d


def test_tls_calls_peers_and_handshake_timeout(transports, cert_dir, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    b = transports(node_id=2, tls=certs.tls_config(cert_dir, "node2"))
    a = transports(node_id=1, peers={2: b.bound_address}, tls=certs.tls_config(cert_dir, "node1"))
    silent = _raw(b.bound_address)  # never says hello: must not hold anyone up

    client_tls = certs.tls_config(cert_dir, "client")
    conn = thrift.connect(b.bound_address, client_tls, WAIT)
    assert call(conn, "status").status.term == 4
    assert call(conn, "get", key=b"err:NotLeader").leader_hint == "127.0.0.1:7401"

    a.send(_messages(2, 1, 3))
    wait_for(lambda: len(b.handler_for_test.messages) == 3, "messages over TLS")

    with pytest.raises(OSError):  # plaintext client against a TLS server
        call(thrift.connect(b.bound_address, None, WAIT), "status")

    # A client certificate may call, but not inject Raft messages.
    spoof = thrift._open(b.bound_address, client_tls, WAIT)
    args = wire.RaftCacheService.raft_args(batch=wire.batch_to_wire(_messages(2, 1, 1)))
    spoof.sendall(thrift._encode("raft", 4, 0, args))
    assert spoof.recv(100) == b""
    assert len(b.handler_for_test.messages) == 3

    assert silent.recv(100) == b""  # handshake_timeout
    assert any("no TLS handshake" in r.getMessage() for r in caplog.records)


# ---- plugin registration ------------------------------------------------------------------------
def test_registered_as_the_thrift_transport():
    provider = PluginSet(make_manager()).transport("thrift")  # through the entry point
    assert provider.server is thrift.server and provider.connect is thrift.connect


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="idle_timeout"):
        thrift.server(1, "127.0.0.1:0", {}, None, {"idle_timout": 3})


# ---- wire.check_struct: what keeps thriftpy2's decoder away from hostile bytes --------------------
def test_check_struct_accepts_what_wire_encodes():
    batch = wire.batch_to_wire(_messages(2, 1, 5), cluster_id=3)
    data = wire.encode(batch)
    assert wire.check_struct(data) == len(data)
    request = api.Request(op="mset", items={b"a": b"1"}, keys=[b"x"],
                           header=api.RequestHeader(token="t", seq=1))
    data = wire.encode(wire.request_to_wire(request))
    assert wire.check_struct(data) == len(data)


@pytest.mark.parametrize("data", [
    b"\x0b\x00\x01" + struct.pack(">i", 1000) + b"abc",  # string longer than the bytes
    b"\x0b\x00\x01" + struct.pack(">i", -1),  # negative length
    b"\x0b\x00\x01" + struct.pack(">i", 3) + b"abc",  # no STOP
    b"\x0f\x00\x01\x0a" + struct.pack(">i", 2**31 - 1) + b"\x00",  # more elements than bytes
    b"\x0f\x00\x01\x55" + struct.pack(">i", 3) + b"\x00",  # unknown element type
    b"\x55\x00\x01\x00",  # unknown field type
    b"\x0c\x00\x01" * 100 + b"\x00" * 101,  # nested deeper than 64
], ids=["long-string", "negative", "no-stop", "count", "elem-type", "field-type", "depth"])
def test_check_struct_refuses_hostile_bytes(data):
    with pytest.raises(wire.WireError):
        wire.check_struct(data)


def test_a_peer_that_hangs_up_at_once_gets_backoff_not_a_storm(transports):
    """A peer that closes every connection right away (say, it refuses our certificate) must
    not be redialled for every message: the shared PeerLink backs off exponentially."""
    from gevent.server import StreamServer

    accepted = []

    def hang_up(sock, _addr):
        accepted.append(time.monotonic())
        sock.close()

    server = StreamServer(("127.0.0.1", 0), hang_up)
    server.start()
    try:
        a = transports(node_id=1, peers={2: f"127.0.0.1:{server.address[1]}"},
                       reconnect_min=0.02, reconnect_max=0.5)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            a.send(_messages(2, 1, 1))
            gevent.sleep(0.005)  # ~300 sends
        # Without backoff: a dial per send (hundreds). With it: 0.02, 0.04, ... 0.5 s apart.
        assert 2 <= len(accepted) <= 15, len(accepted)
    finally:
        server.stop()


# ---- requests no node could take ---------------------------------------------------------------
def test_a_request_too_big_for_any_write_is_answered_unread_and_the_connection_goes_on(
        transports):
    options = {"max_frame": 8 << 20, "max_request_bytes": 1 << 20}
    node = transports(**options)
    conn = thrift.connect(node.bound_address, None, WAIT, options)
    r = call(conn, "put", key=b"k", value=b"x" * (3 << 20))
    assert r.error == "InvalidRequest" and "max_request_bytes" in r.reason
    assert call(conn, "status").status.term == 4  # the same connection goes on
    assert [r.op for r in node.handler_for_test.requests] == ["status"]


def test_a_request_with_too_many_items_is_refused_before_it_is_decoded(transports):
    node = transports(max_request_items=100)
    conn = thrift.connect(node.bound_address, None, WAIT)
    r = call(conn, "mget", keys=[b"k"] * 101)
    assert r.error == "InvalidRequest" and "max_request_items" in r.reason
    assert len(call(conn, "mget", keys=[b"k"] * 100).results) == 100
    assert [r.op for r in node.handler_for_test.requests] == ["mget"]
