"""The fault relays: each fault does what the nemeses rely on, on real loopback sockets."""

import random
import time

import gevent
import gevent.server
import pytest
from gevent import socket

from raftcache.testing import relay
from raftcache.testing.relay import RelayNet


@pytest.fixture
def net():
    """Two echo "nodes" on distinct loopback hosts, and the relays between them."""
    servers = []

    def echo(sock, _addr):
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass

    nodes = {}
    for n, host in ((1, "127.0.0.2"), (2, "127.0.0.3")):
        s = gevent.server.StreamServer((host, 0), echo)
        s.start()
        servers.append(s)
        nodes[n] = f"{host}:{s.address[1]}"
    rn = RelayNet(nodes, random.Random(1))
    yield rn
    rn.close()
    for s in servers:
        s.stop()


def dial(rn, a, b):
    host, port = rn.route(a, b).rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=2)
    return s


def recv_exactly(s, n, timeout):
    """What arrives within `timeout` (less when the connection closes or resets)."""
    out = b""
    with gevent.Timeout(timeout, False):
        try:
            while len(out) < n:
                chunk = s.recv(n - len(out))
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
    return out


def test_passes_traffic_both_ways_and_listens_on_the_target_host(net):
    assert net.route(1, 2).startswith("127.0.0.3:")  # TLS names of node 2 still match
    s = dial(net, 1, 2)
    s.sendall(b"hello")
    assert recv_exactly(s, 5, 2) == b"hello"
    assert net.stats[(1, 2)]["bytes"] == 5 and net.stats[(2, 1)]["bytes"] == 5


def test_blackhole_holds_bytes_without_closing_and_heal_delivers_them(net):
    s = dial(net, 1, 2)
    net.block([(1, 2)])
    s.sendall(b"ping")
    assert recv_exactly(s, 4, 0.3) == b""  # nothing through, and the connection stays open
    net.heal()
    assert recv_exactly(s, 4, 2) == b"ping"


def test_one_way_block_stops_only_the_replies(net):
    s = dial(net, 1, 2)
    net.block([(2, 1)])  # node 2's bytes towards node 1: the echo on 1's connection
    s.sendall(b"abc")
    assert recv_exactly(s, 3, 0.3) == b""
    assert net.stats[(1, 2)]["bytes"] == 3  # the request did reach node 2
    net.heal()
    assert recv_exactly(s, 3, 2) == b"abc"


def test_delay_holds_each_chunk_and_keeps_order(net):
    s = dial(net, 1, 2)
    net.slow([(1, 2)], delay=0.15, jitter=0.05)
    start = time.monotonic()
    for i in range(5):
        s.sendall(b"%d" % i)
        gevent.sleep(0.01)
    assert recv_exactly(s, 5, 3) == b"01234"
    assert time.monotonic() - start >= 0.15  # a fault's lower bound, not a speed target


def test_drop_loses_the_chunk_and_resets_the_connection(net):
    s = dial(net, 1, 2)
    net.lossy([(1, 2)], 1.0)
    s.sendall(b"lost")
    assert recv_exactly(s, 4, 1) == b""
    assert net.stats[(1, 2)]["dropped"] == 1 and net.stats[(1, 2)]["bytes"] == 0


def test_reset_closes_open_connections(net):
    s = dial(net, 1, 2)
    s.sendall(b"x")
    assert recv_exactly(s, 1, 2) == b"x"
    assert net.reset([(1, 2)]) == 1
    with pytest.raises(OSError):
        with gevent.Timeout(2):
            s.sendall(b"y")
            if not s.recv(1):
                raise ConnectionResetError("closed")


def test_target_down_refuses_the_dialer(net):
    net.relays[(1, 2)].target = ("127.0.0.3", 1)  # nothing listens there
    s = dial(net, 1, 2)
    assert recv_exactly(s, 1, 2) == b""


def test_relays_refuse_addresses_outside_loopback():
    with pytest.raises(ValueError, match="127.0.0.0/8"):
        RelayNet({1: "127.0.0.2:9", 2: "10.0.0.1:9"})


def _sees(blocked, nodes):
    return {a: {b for b in nodes if a == b or (a, b) not in blocked} for a in nodes}


def test_partition_shapes():
    nodes = [1, 2, 3, 4, 5]
    rng = random.Random(3)
    assert relay.isolate(3, nodes) == {(3, n) for n in nodes if n != 3} | {
        (n, 3) for n in nodes if n != 3}
    sees = _sees(relay.halves(nodes, rng), nodes)
    assert sorted({len(v) for v in sees.values()}) == [2, 3]
    ring = _sees(relay.majorities_ring(nodes, rng), nodes)
    assert all(len(v) == 3 for v in ring.values())  # everyone sees a majority...
    assert len({frozenset(v) for v in ring.values()}) == 5  # ...but no two the same one
    sees = _sees(relay.bridge(nodes, rng), nodes)
    assert sorted(len(v) for v in sees.values()) == [3, 3, 3, 3, 5]  # the bridge sees all
    assert relay.one_way(2, nodes) == {(n, 2) for n in nodes if n != 2}
