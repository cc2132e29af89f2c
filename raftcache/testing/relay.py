"""Fault relays: one userspace TCP relay per directed node-to-node link.

Test machines may lack netem (`tc qdisc netem` needs a kernel module), so the fault suite puts
a small gevent relay on every directed link: node ``a`` reaches node ``b`` at ``relay(a, b)``,
which forwards to ``b``'s real address. Each directed link ``a -> b`` has one :class:`LinkFault` that governs the bytes
flowing from ``a`` to ``b``: the requests ``a`` sends on its own connections to ``b`` and the
replies ``a`` sends back on connections that ``b`` opened to ``a``. So blocking ``a -> b`` and
``b -> a`` cuts the pair completely, and blocking only one of them is a one-way partition.

Faults work on byte streams, never parsing them (tcp-tls traffic is encrypted anyway):

* ``blocked``: stop forwarding without closing; bytes wait in the relay (up to a bound, then in
  the kernel) and flow again when the link heals, as TCP delivers after a partition heals;
* ``delay`` and ``jitter``: each chunk is held ``delay + uniform(0, jitter)`` seconds, in order;
* ``drop``: each chunk is lost with this probability, and the connection with it (a stream
  cannot lose bytes in the middle and stay framed), so the node reconnects;
* :meth:`RelayNet.reset` closes every connection of a link with an RST.

Relays live in the runner's process and only ever listen on and connect to 127.0.0.0/8.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Iterable

import attrs
import gevent
import gevent.queue
import gevent.server
from gevent import socket  # cooperative even where the stdlib is not patched (pytest)

Link = tuple[int, int]  # (from node, to node)

_CHUNK = 65536
_QUEUED_CHUNKS = 64  # per direction; beyond that the relay stops reading (backpressure)


@attrs.define
class LinkFault:
    blocked: bool = False
    delay: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, uniform, added to delay; order is kept
    drop: float = 0.0  # probability that a chunk (and its connection) is lost

    def healthy(self) -> bool:
        return not self.blocked and not self.delay and not self.jitter and not self.drop


def _loopback(host: str) -> str:
    if not host.startswith("127."):
        raise ValueError(f"relays stay on 127.0.0.0/8; refusing {host!r}")
    return host


def _reset(sock) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: what a dropped connection looks like."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Pipe:
    """One relayed connection: two directions, each a reader and a writer greenlet."""

    def __init__(self, relay: Relay, client, upstream):
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.closed = False
        src, dst = relay.link
        self.greenlets = []
        for a, b, link in ((client, upstream, (src, dst)), (upstream, client, (dst, src))):
            q = gevent.queue.Queue(_QUEUED_CHUNKS)
            self.greenlets += [gevent.spawn(self._read, a, q, link),
                               gevent.spawn(self._write, b, q, link)]

    def _read(self, sock, q, link: Link) -> None:
        net = self.relay.net
        last = 0.0
        try:
            while True:
                data = sock.recv(_CHUNK)
                if not data:
                    break
                fault = net.faults[link]
                if fault.drop and net.rng.random() < fault.drop:
                    net.stats[link]["dropped"] += 1
                    break
                at = time.monotonic()
                if fault.delay or fault.jitter:
                    at += fault.delay + fault.jitter * net.rng.random()
                last = max(last, at)
                q.put((last, data))
        except OSError:
            pass
        self.close()

    def _write(self, sock, q, link: Link) -> None:
        net = self.relay.net
        try:
            while True:
                at, data = q.get()
                wait = at - time.monotonic()
                if wait > 0:
                    gevent.sleep(wait)
                while net.faults[link].blocked:
                    gevent.sleep(0.01)
                sock.sendall(data)
                net.stats[link]["bytes"] += len(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.pipes.discard(self)
        _reset(self.client)
        _reset(self.upstream)
        current = gevent.getcurrent()
        for g in self.greenlets:
            if g is not current:
                g.kill(block=False)


class Relay:
    """Listens on `listen_host` (a free port) and forwards each connection to `target`."""

    def __init__(self, net: RelayNet, link: Link, listen_host: str, target: str):
        self.net = net
        self.link = link
        host, port = target.rsplit(":", 1)
        self.target = (_loopback(host), int(port))
        self.pipes: set[_Pipe] = set()
        self.server = gevent.server.StreamServer((_loopback(listen_host), 0), self._accept)
        self.server.start()

    @property
    def address(self) -> str:
        host, port = self.server.address[:2]
        return f"{host}:{port}"

    def _accept(self, client, _addr) -> None:
        self.net.stats[self.link]["connections"] += 1
        try:
            upstream = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            _reset(client)  # the target is down: the dialer sees its connection fail
            return
        upstream.settimeout(None)
        client.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _Pipe(self, client, upstream)
        self.pipes.add(pipe)
        gevent.joinall(pipe.greenlets)

    def reset(self) -> int:
        pipes = list(self.pipes)
        for p in pipes:
            p.close()
        return len(pipes)

    def close(self) -> None:
        self.server.stop(timeout=0.5)
        self.reset()


class RelayNet:
    """A relay for every directed link between `nodes` (node id -> "host:port"), and the knobs
    the nemeses turn. Call :meth:`route` for the address node ``a`` should dial to reach ``b``.
    """

    def __init__(self, nodes: dict[int, str], rng: random.Random | None = None):
        self.nodes = dict(nodes)
        self.rng = rng or random.Random(0)
        self.faults: dict[Link, LinkFault] = {}
        self.stats: dict[Link, Counter] = {}
        self.relays: dict[Link, Relay] = {}
        for a in self.nodes:
            for b in self.nodes:
                if a == b:
                    continue
                self.faults[(a, b)] = LinkFault()
                self.stats[(a, b)] = Counter()
                # The relay listens on the target's "host", so TLS names still match.
                host = self.nodes[b].rsplit(":", 1)[0]
                self.relays[(a, b)] = Relay(self, (a, b), host, self.nodes[b])

    def route(self, a: int, b: int) -> str:
        return self.relays[(a, b)].address

    def routes(self) -> dict[Link, str]:
        return {link: r.address for link, r in self.relays.items()}

    def links(self) -> list[Link]:
        return list(self.faults)

    # -- faults --------------------------------------------------------------------------------------
    def block(self, links: Iterable[Link]) -> None:
        for link in links:
            self.faults[link].blocked = True

    def slow(self, links: Iterable[Link], delay: float, jitter: float = 0.0) -> None:
        for link in links:
            self.faults[link].delay, self.faults[link].jitter = delay, jitter

    def lossy(self, links: Iterable[Link], drop: float) -> None:
        for link in links:
            self.faults[link].drop = drop

    def reset(self, links: Iterable[Link] | None = None) -> int:
        """Close every connection on `links` (default: all) with an RST; returns how many."""
        count = 0
        for link in self.links() if links is None else links:
            count += self.relays[link].reset()
            if link[::-1] in self.relays:
                count += self.relays[link[::-1]].reset()
        return count

    def heal(self) -> None:
        for fault in self.faults.values():
            fault.blocked, fault.delay, fault.jitter, fault.drop = False, 0.0, 0.0, 0.0

    def blocked(self) -> set[Link]:
        return {link for link, f in self.faults.items() if f.blocked}

    def close(self) -> None:
        for relay in self.relays.values():
            relay.close()


# -- partition shapes: the directed links to block ----------------------------------------------------
def cut(groups: Iterable[Iterable[int]], nodes: Iterable[int]) -> set[Link]:
    """Block every link between two nodes that share no group (nodes in no group are alone)."""
    member: dict[int, set[int]] = {n: set() for n in nodes}
    for g, group in enumerate(groups):
        for n in group:
            member[n].add(g)
    return {(a, b) for a in member for b in member
            if a != b and not (member[a] & member[b])}


def isolate(node: int, nodes: Iterable[int]) -> set[Link]:
    nodes = list(nodes)
    return cut([[n for n in nodes if n != node], [node]], nodes)


def halves(nodes: Iterable[int], rng: random.Random) -> set[Link]:
    """A random minority (n // 2 nodes) cut off from the majority."""
    nodes = list(nodes)
    rng.shuffle(nodes)
    k = len(nodes) // 2
    return cut([nodes[:k], nodes[k:]], nodes)


def majorities_ring(nodes: Iterable[int], rng: random.Random) -> set[Link]:
    """Each node sees a majority (its ring neighbours), but no two nodes see the same one."""
    nodes = list(nodes)
    rng.shuffle(nodes)
    n = len(nodes)
    reach = n // 2 // 2 + (n // 2) % 2  # neighbours on each side; a majority with itself
    blocked = set()
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            distance = min((i - j) % n, (j - i) % n)
            if a != b and distance > reach:
                blocked.add((a, b))
    return blocked


def bridge(nodes: Iterable[int], rng: random.Random) -> set[Link]:
    """Two halves that only one node (the bridge) belongs to both of."""
    nodes = list(nodes)
    rng.shuffle(nodes)
    mid = len(nodes) // 2
    return cut([nodes[: mid + 1], nodes[mid:]], nodes)


def one_way(node: int, nodes: Iterable[int]) -> set[Link]:
    """`node` can still send but hears nobody (an asymmetric partition)."""
    return {(b, node) for b in nodes if b != node}
