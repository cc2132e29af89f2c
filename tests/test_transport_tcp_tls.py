"""The tcp-tls transport with real sockets and real certificates (generated per module).

The servers run in this process on gevent's own socket/ssl modules (no monkey-patching), so
every blocking call in these tests is a gevent one and every wait is bounded.
"""

import datetime
import logging
import random
import ssl
import time

import gevent
import gevent.event
import pluggy
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl

from raftcache import certs, pluginapi, wire
from raftcache.core import api
from raftcache.core.raft.messages import Message, MsgType
from raftcache.pluginapi import TLSConfig
from raftcache.pluginapi.manager import PluginSet
from raftcache.plugins.transport import tcp_tls
from raftcache.plugins.transport.tcp_tls import PEER, REQUEST, pack_frame

LOGGER = "raftcache.transport.tcp_tls"


@pytest.fixture(autouse=True)
def bounded():
    with gevent.Timeout(15):  # no test may hang the suite
        yield


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    paths = certs.init_certs(d, nodes=3)
    now = datetime.datetime.now(datetime.UTC)
    certs.make_cert(paths["ca"], paths["ca_key"], d, "expired", server=False,
                    not_after=now - datetime.timedelta(hours=1))
    other = d / "other"
    other_ca, other_key = certs.make_ca(other, common_name="another CA")
    certs.make_cert(other_ca, other_key, other, "client", server=False)
    certs.make_cert(other_ca, other_key, other, "node1")
    return d


def tls(pki, name, ca_dir=None):
    t = certs.tls_config(pki, name)
    if ca_dir is not None:
        other = certs.tls_config(ca_dir, name)
        return TLSConfig(ca=t.ca, cert=other.cert, key=other.key)
    return t


class EchoHandler:
    def __init__(self):
        self.ops = []
        self.certificates = []
        self.senders = []
        self.peer_calls = []
        self.peer_messages = []
        self.got = gevent.event.Event()
        self.want = 0

    def handle_request(self, request, certificate=None, source=None):
        self.ops.append(request.op)
        self.certificates.append(certificate)
        if request.op == "sleep":
            gevent.sleep(request.ttl_ms / 1000.0)
        return api.Response(reason=request.op, number=len(request.key or b""))

    def handle_peer_messages(self, messages, sender=None):
        self.senders.append(sender)
        self.peer_calls.append(len(messages))
        self.peer_messages.extend(messages)
        if len(self.peer_messages) >= self.want:
            self.got.set()


def start(pki, options=None, node="node1", node_id=1, peers=None):
    handler = EchoHandler()
    t = tcp_tls.server(node_id, "127.0.0.1:0", peers or {}, tls(pki, node), options or {})
    t.serve(handler)
    return t, handler


@pytest.fixture
def node(pki):
    t, handler = start(pki)
    yield t, handler
    t.close()


@pytest.fixture
def strict_node(pki):
    """Short timeouts, to watch the server close stalled connections."""
    t, handler = start(pki, {"handshake_timeout": 0.3, "io_timeout": 0.3, "idle_timeout": 0.6})
    yield t, handler
    t.close()


def get(key=b"k"):
    return api.Request(op="get", key=key)


def raw_tls(address, ctx):
    host, port = tcp_tls.parse_address(address)
    sock = gsocket.create_connection((host, port), timeout=2)
    return ctx.wrap_socket(sock, server_hostname=host)


def client_ctx(pki, name="client", cert=True, max_version=None):
    ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{name}.pem"), str(pki / f"{name}-key.pem"))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def closed_by_server(sock, within=2.0) -> bool:
    """True when the server closes `sock` (EOF or a reset/alert) within `within` seconds."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def assert_refused(address, client_tls):
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        conn = tcp_tls.connect(address, client_tls, 2)
        try:
            conn.call(get(), 2)
        finally:
            conn.close()
    assert not isinstance(info.value, TimeoutError), "refused by timing out, not by TLS"
    assert time.monotonic() - started < 1.5


# ---- calls ----------------------------------------------------------------------------------------
def test_a_call_names_its_client_certificate_and_only_a_node_may_name_another(node, pki):
    t, handler = node
    claims = api.Request(op="get", key=b"k", header=api.RequestHeader(certificate="admin"))
    for name, expected in (("client", "client"), ("node2", "admin")):
        conn = tcp_tls.connect(t.bound_address, tls(pki, name), 2)
        assert conn.call(claims, 2).error is None
        conn.close()
        assert handler.certificates[-1] == expected  # a client's claim is ignored
    conn = tcp_tls.connect(t.bound_address, tls(pki, "node2"), 2)
    conn.call(get(), 2)  # a node's own call (not forwarded): no client certificate
    assert handler.certificates[-1] is None


def test_a_call_round_trips(node, pki):
    t, _ = node
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    response = conn.call(get(b"abc"), 2)
    assert (response.reason, response.number, response.error) == ("get", 3, None)
    conn.close()


def test_many_concurrent_calls_share_one_connection(node, pki):
    t, _ = node
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    started = time.monotonic()
    calls = [gevent.spawn(conn.call, api.Request(op="sleep", key=b"x" * i, ttl_ms=200), 5)
             for i in range(200)]
    gevent.joinall(calls, timeout=5, raise_error=True)
    elapsed = time.monotonic() - started
    assert [c.value.number for c in calls] == list(range(200))  # ids matched answers
    assert elapsed < 1.5, f"200 x 200 ms calls took {elapsed:.2f}s: not concurrent"
    conn.close()


def test_a_timeout_raises_timeouterror_and_breaks_the_connection(node, pki):
    t, _ = node
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    other = gevent.spawn(conn.call, api.Request(op="sleep", ttl_ms=1000), 5)
    gevent.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.call(api.Request(op="sleep", ttl_ms=1000), 0.1)
    assert time.monotonic() - started < 0.5
    assert conn.closed
    with pytest.raises(OSError):
        conn.call(get(), 1)  # never reused after an error
    other.join(timeout=2)
    assert isinstance(other.exception, OSError)  # waiters fail at once, not at their timeout


def test_an_outer_gevent_timeout_is_not_swallowed(node, pki):
    t, _ = node
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    outer = gevent.Timeout(0.1)
    with pytest.raises(gevent.Timeout) as info, outer:
        conn.call(api.Request(op="sleep", ttl_ms=1000), 5)
    assert info.value is outer
    assert conn.closed


def test_calls_fail_fast_when_the_server_goes_away(pki):
    t, _ = start(pki)
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    conn.call(get(), 2)
    t.close()
    with pytest.raises(OSError):
        conn.call(get(), 2)
    with pytest.raises(OSError):
        tcp_tls.connect(t.bound_address, tls(pki, "client"), 1)


# ---- who may connect ----------------------------------------------------------------------------
def test_a_node_certificate_may_call_too(node, pki):
    t, _ = node
    conn = tcp_tls.connect(t.bound_address, tls(pki, "node2"), 2)  # a follower forwarding
    assert conn.call(get(), 2).number == 1
    conn.close()


def test_refused_without_a_client_certificate(node, pki, caplog):
    t, _ = node
    caplog.set_level(logging.WARNING, LOGGER)
    sock = raw_tls(t.bound_address, client_ctx(pki, cert=False))  # TLS 1.3: fails after
    sock.sendall(pack_frame(REQUEST, 1, wire.encode(wire.request_to_wire(get()))))
    assert closed_by_server(sock)
    sock.close()
    assert "certificate" in caplog.text.lower()


def test_refused_with_a_certificate_from_another_ca(node, pki):
    assert_refused(node[0].bound_address, tls(pki, "client", ca_dir=pki / "other"))


def test_refused_with_an_expired_certificate(node, pki):
    assert_refused(node[0].bound_address, tls(pki, "expired"))


def test_refused_below_tls_1_3(node, pki):
    with pytest.raises(ssl.SSLError):
        raw_tls(node[0].bound_address, client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2))


def test_refused_plain_tcp(node, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    host, port = tcp_tls.parse_address(node[0].bound_address)
    sock = gsocket.create_connection((host, port), timeout=2)
    sock.sendall(pack_frame(REQUEST, 1, wire.encode(wire.request_to_wire(get()))))
    assert closed_by_server(sock)
    sock.close()
    assert "TLS handshake failed" in caplog.text


def test_the_client_refuses_a_server_from_another_ca(pki):
    rogue = tcp_tls.server(1, "127.0.0.1:0", {}, tls(pki, "node1", ca_dir=pki / "other"), {})
    rogue.serve(EchoHandler())
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            tcp_tls.connect(rogue.bound_address, tls(pki, "client"), 2)
    finally:
        rogue.close()


def test_a_client_certificate_cannot_serve(pki):
    fake = tcp_tls.server(1, "127.0.0.1:0", {}, tls(pki, "client"), {})
    fake.serve(EchoHandler())
    try:
        with pytest.raises(ssl.SSLCertVerificationError):  # no serverAuth usage
            tcp_tls.connect(fake.bound_address, tls(pki, "client"), 2)
    finally:
        fake.close()


# ---- misbehaving connections --------------------------------------------------------------------
def timed_good_call(address, pki) -> float:
    started = time.monotonic()
    conn = tcp_tls.connect(address, tls(pki, "client"), 2)
    assert conn.call(get(), 2).number == 1
    conn.close()
    return time.monotonic() - started


def test_a_silent_tcp_client_does_not_block_others(node, pki):
    t, _ = node  # handshake_timeout is the default 5 s
    host, port = tcp_tls.parse_address(t.bound_address)
    silent = gsocket.create_connection((host, port), timeout=2)
    gevent.sleep(0.05)  # the server has accepted it and waits for its handshake
    elapsed = timed_good_call(t.bound_address, pki)
    assert elapsed < 0.5, f"a good call took {elapsed:.2f}s next to a silent socket"
    assert not closed_by_server(silent, within=0.05)  # still open: the call did not wait it out
    silent.close()


def test_a_flood_of_silent_connections_does_not_block_others(node, pki):
    t, _ = node
    host, port = tcp_tls.parse_address(t.bound_address)
    flood = [gsocket.create_connection((host, port), timeout=2) for _ in range(200)]
    gevent.sleep(0.05)
    assert timed_good_call(t.bound_address, pki) < 0.5
    for s in flood:
        s.close()


def test_a_flood_beyond_max_connections_only_delays_others(pki):
    t, _ = start(pki, {"max_connections": 10, "handshake_timeout": 0.3})
    try:
        host, port = tcp_tls.parse_address(t.bound_address)
        flood = [gsocket.create_connection((host, port), timeout=2) for _ in range(20)]
        assert timed_good_call(t.bound_address, pki) < 2.0
        for s in flood:
            s.close()
    finally:
        t.close()


def test_a_silent_connection_is_closed_after_the_handshake_timeout(strict_node, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    host, port = tcp_tls.parse_address(strict_node[0].bound_address)
    silent = gsocket.create_connection((host, port), timeout=2)
    started = time.monotonic()
    assert closed_by_server(silent, within=2)
    assert 0.2 < time.monotonic() - started < 1.5
    silent.close()
    assert "no TLS handshake within 0.3s" in caplog.text


def test_an_idle_connection_is_closed(strict_node, pki):
    conn = tcp_tls.connect(strict_node[0].bound_address, tls(pki, "client"), 2)
    conn.call(get(), 1)
    gevent.sleep(1.2)  # idle_timeout 0.6 s, checked every io_timeout 0.3 s
    assert conn.closed


HOSTILE = {
    "random bytes": random.Random(7).randbytes(300),
    "oversized frame": tcp_tls.HEADER.pack((16 << 20) + 1, REQUEST, 1),
    "length below the header": b"\x00\x00\x00\x03abc",
    "unknown kind": pack_frame(9, 1, wire.encode(wire.request_to_wire(get()))),
    "undecodable payload": pack_frame(REQUEST, 1, b"\x0b\x00\x01\x00\x01\x00\x00ab"),
    "undecodable raft batch": pack_frame(PEER, 0, b"\x0f\x00\x02\x0c\x7f\xff\xff\xff"),
    # a list of an unknown element type claiming 2**31 items: seconds of hub stall if decoded
    "spinning payload": pack_frame(REQUEST, 1, b"\x0f\x00\x08\x63\x7f\xff\xff\xff"),
    "trailing bytes": pack_frame(REQUEST, 1, wire.encode(wire.request_to_wire(get())) + b"\x00"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frames_close_only_their_connection(node, pki, caplog, name):
    t, _ = node
    caplog.set_level(logging.INFO, LOGGER)
    good = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    bad = raw_tls(t.bound_address, client_ctx(pki))
    bad.sendall(HOSTILE[name])
    assert closed_by_server(bad)
    host, port = bad.getsockname()[:2]
    bad.close()
    local = f"{host}:{port}"
    lines = [r for r in caplog.records if r.getMessage().startswith(local + ":")]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert good.call(get(b"still"), 2).number == 5  # everyone else keeps working
    assert timed_good_call(t.bound_address, pki) < 0.5
    good.close()


def test_a_truncated_frame_then_eof_closes_the_connection(node, pki, caplog):
    t, _ = node
    caplog.set_level(logging.WARNING, LOGGER)
    good = tcp_tls.connect(t.bound_address, tls(pki, "client"), 2)
    bad = raw_tls(t.bound_address, client_ctx(pki))
    frame = pack_frame(REQUEST, 1, wire.encode(wire.request_to_wire(get(b"x" * 100))))
    bad.sendall(frame[: len(frame) // 2])
    bad.shutdown(gsocket.SHUT_WR)
    assert closed_by_server(bad)
    bad.close()
    assert "truncated frame" in caplog.text
    assert good.call(get(), 2).number == 1


def test_a_truncated_frame_that_stalls_closes_the_connection(strict_node, pki, caplog):
    t, _ = strict_node
    caplog.set_level(logging.WARNING, LOGGER)
    bad = raw_tls(t.bound_address, client_ctx(pki))
    frame = pack_frame(REQUEST, 1, wire.encode(wire.request_to_wire(get(b"x" * 100))))
    bad.sendall(frame[:20])
    assert closed_by_server(bad, within=2)
    bad.close()
    assert "stalled mid-frame" in caplog.text
    assert timed_good_call(t.bound_address, pki) < 0.5


@pytest.mark.parametrize("hostile", [
    b"\x0b\x00\x01\x00\x01\x00\x00ab",  # a 64 KiB string in 2 bytes: would read heap
    b"\x0f\x00\x08\x63\x7f\xff\xff\xff",  # 2**31 items of type 99: would spin for seconds
    b"\x0d\x00\x09\x63\x63\x7f\xff\xff\xff",
    b"\x0f\x00\x08\x0b\x7f\xff\xff\xff",
])
def test_decode_refuses_hostile_payloads_quickly(hostile):
    started = time.monotonic()
    with pytest.raises(wire.WireError):
        tcp_tls.decode(wire.Request, hostile)
    assert time.monotonic() - started < 0.05


def test_decode_round_trips():
    request = api.Request(op="put", key=b"k", value=b"v" * 5000,
                          header=api.RequestHeader(client_id="c", seq=3))
    good = wire.encode(wire.request_to_wire(request))
    assert wire.request_from_wire(tcp_tls.decode(wire.Request, good)) == request


# ---- peers --------------------------------------------------------------------------------------
def heartbeats(n, frm=1, to=2):
    return [Message(MsgType.HEARTBEAT, to=to, frm=frm, term=i + 1) for i in range(n)]


def test_send_delivers_batches_in_order_to_the_peer(pki):
    t2, handler = start(pki, node="node2", node_id=2)
    t1 = tcp_tls.server(1, "127.0.0.1:0", {1: "127.0.0.1:1", 2: t2.bound_address},
                        tls(pki, "node1"), {})
    try:
        handler.want = 1000
        started = time.monotonic()
        t1.send(heartbeats(500))
        t1.send(heartbeats(500)[:0])
        t1.send([Message(MsgType.HEARTBEAT, to=2, frm=1, term=501 + i) for i in range(500)])
        assert time.monotonic() - started < 0.1  # send() only queues
        assert handler.got.wait(timeout=5)
        assert [m.term for m in handler.peer_messages] == list(range(1, 1001))
        assert len(handler.peer_calls) < 1000  # batched into few frames
        assert all(m.frm == 1 and m.to == 2 for m in handler.peer_messages)
    finally:
        t1.close()
        t2.close()


def send_until_delivered(sender, handler, messages, seconds=3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sender.send(messages)  # like Raft: resend until it gets through
        if handler.got.wait(timeout=0.1):
            return True
    return False


def test_raft_messages_arrive_with_the_node_their_certificate_names(pki):
    # The transport names the sender from the certificate; the node drops every message whose
    # frm disagrees (tests/test_hostile_peers.py), so node 1 cannot speak for node 3.
    t2, handler = start(pki, node="node2", node_id=2)
    t1 = tcp_tls.server(1, "127.0.0.1:0", {2: t2.bound_address}, tls(pki, "node1"), {})
    try:
        handler.want = 2
        assert send_until_delivered(t1, handler, heartbeats(1, frm=3) + heartbeats(1, frm=1))
        assert set(handler.senders) == {1}
    finally:
        t1.close()
        t2.close()


def test_a_client_certificate_cannot_send_raft_messages(pki, caplog):
    caplog.set_level(logging.WARNING, LOGGER)
    t2, handler = start(pki, node="node2", node_id=2)
    intruder = tcp_tls.server(1, "127.0.0.1:0", {2: t2.bound_address}, tls(pki, "client"), {})
    try:
        handler.want = 1
        assert not send_until_delivered(intruder, handler, heartbeats(1), seconds=0.5)
        refusals = caplog.text.count("not a node's")
        assert 1 <= refusals <= 6, f"{refusals} refused connections in 0.5 s: no backoff"
        assert caplog.text.count("down: closed right after connecting") == 1
    finally:
        intruder.close()
        t2.close()


def test_send_never_blocks_on_an_unreachable_peer(pki):
    with gsocket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    t1 = tcp_tls.server(1, "127.0.0.1:0", {2: dead}, tls(pki, "node1"), {"peer_queue": 100})
    try:
        started = time.monotonic()
        for _ in range(50):
            t1.send(heartbeats(200))
        assert time.monotonic() - started < 0.5
        assert t1.dropped()[2] == 50 * 200 - 100  # the queue holds 100, the rest is dropped
    finally:
        t1.close()


# ---- configuration ------------------------------------------------------------------------------
def test_the_server_refuses_to_start_without_tls():
    with pytest.raises(ValueError, match="requires TLS"):
        tcp_tls.server(1, "127.0.0.1:0", {}, None, {})
    with pytest.raises(ValueError, match="requires TLS"):
        tcp_tls.connect("127.0.0.1:1", None, 1)


def test_bad_options_and_files_are_named(pki, tmp_path):
    with pytest.raises(ValueError, match="transport.options.handshake_timout: unknown key"):
        tcp_tls.server(1, "127.0.0.1:0", {}, tls(pki, "node1"), {"handshake_timout": 1})
    with pytest.raises(ValueError, match="transport.options.max_frame: expected a number > 0"):
        tcp_tls.server(1, "127.0.0.1:0", {}, tls(pki, "node1"), {"max_frame": 0})
    missing = TLSConfig(str(tmp_path / "ca.pem"), str(tmp_path / "n.pem"), str(tmp_path / "k"))
    with pytest.raises(ValueError, match="cannot load TLS files"):
        tcp_tls.server(1, "127.0.0.1:0", {}, missing, {})


def test_the_plugin_provides_tcp_tls():
    pm = pluggy.PluginManager(pluginapi.PROJECT)
    pm.add_hookspecs(pluginapi.hookspecs)
    pm.register(tcp_tls, name="tcp-tls")
    provider = PluginSet(pm).get("transport", "tcp-tls")
    assert provider.server is tcp_tls.server and provider.connect is tcp_tls.connect


# ---- requests no node could take ---------------------------------------------------------------
def test_a_request_too_big_for_any_write_is_answered_unread_and_the_connection_goes_on(pki):
    options = {"max_frame": 8 << 20, "max_request_bytes": 1 << 20}
    t, handler = start(pki, options)
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 5.0, options)
    try:
        big = api.Request(op="put", key=b"k", value=b"x" * (3 << 20))
        r = conn.call(big, 5.0)
        assert r.error == "InvalidRequest" and "max_request_bytes" in r.reason
        assert conn.call(get(b"after"), 5.0).number == 5  # the same connection goes on
        assert handler.ops == ["get"] and not conn.closed  # the put never reached the node
    finally:
        conn.close()
        t.close()


def test_a_request_with_too_many_items_is_refused_before_it_is_decoded(pki):
    t, handler = start(pki, {"max_request_items": 100})
    conn = tcp_tls.connect(t.bound_address, tls(pki, "client"), 5.0)
    try:
        r = conn.call(api.Request(op="mget", keys=[b"k"] * 101), 5.0)
        assert r.error == "InvalidRequest" and "max_request_items" in r.reason
        assert conn.call(api.Request(op="mget", keys=[b"k"] * 100), 5.0).reason == "mget"
        assert handler.ops == ["mget"]
    finally:
        conn.close()
        t.close()
