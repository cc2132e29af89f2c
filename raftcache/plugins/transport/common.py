"""What both built-in transports share: option parsing, mutual-TLS contexts, addresses,
certificate identities and buffered frame reading. One place, so the two cannot drift apart on
security or on how they treat a bad or silent peer."""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from collections import deque

import attrs
import gevent
import gevent.event
from gevent import ssl as gssl

from raftcache.core.hookspecs import TLSConfig


def positive(_inst, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class TransportOptions:
    """`[transport.options]` that both built-in transports take (each may add its own); every
    key is optional, seconds are floats."""

    handshake_timeout: float = attrs.field(default=5.0, converter=float, validator=positive)
    idle_timeout: float = attrs.field(default=60.0, converter=float, validator=positive)
    # A read stalled mid-frame or a write stalled this long closes the connection.
    io_timeout: float = attrs.field(default=10.0, converter=float, validator=positive)
    max_frame: int = attrs.field(default=16 << 20, converter=int, validator=positive)
    max_connections: int = attrs.field(default=1024, converter=int, validator=positive)
    peer_queue: int = attrs.field(default=4096, converter=int, validator=positive)
    peer_batch: int = attrs.field(default=256, converter=int, validator=positive)
    connect_timeout: float = attrs.field(default=2.0, converter=float, validator=positive)
    reconnect_min: float = attrs.field(default=0.05, converter=float, validator=positive)
    reconnect_max: float = attrs.field(default=2.0, converter=float, validator=positive)
    cluster_id: int = attrs.field(default=0, converter=int)
    # With TLS, "node-cn" accepts Raft messages only from a certificate with CN "node<id>" and
    # only with frm == <id>; "ca" accepts any certificate of the cluster CA.
    peer_auth: str = attrs.field(default="node-cn",
                                 validator=attrs.validators.in_(("node-cn", "ca")))


def options_from_dict(cls, transport: str, options: dict | None):
    """`cls(**options)` with errors that name the transport and the accepted keys."""
    options = dict(options or {})
    known = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{transport}: unknown option(s) {', '.join(unknown)} "
                         f"(accepted: {', '.join(sorted(known))})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{transport}: bad option: {exc}") from None


_contexts: dict = {}


def tls_context(tls: TLSConfig, server_side: bool, transport: str) -> gssl.SSLContext:
    """Mutual TLS 1.3 (both ends present a certificate of the cluster CA), cached per file set.

    The files' mtimes are part of the cache key: rotated certificates are picked up by the
    next connection.
    """
    try:
        key = (server_side, tls, tuple(os.stat(p).st_mtime_ns for p in (tls.ca, tls.cert,
                                                                          tls.key)))
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side
                                  else ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server demands a client cert
            ctx.load_verify_locations(cafile=tls.ca)
            ctx.load_cert_chain(tls.cert, tls.key)
            if server_side:
                ctx.options |= ssl.OP_NO_TICKET  # connections are long-lived; no resumption
            _contexts[key] = ctx
        return ctx
    except (OSError, ValueError) as exc:
        raise ValueError(f"{transport}: cannot load TLS files (ca={tls.ca}, cert={tls.cert}, "
                         f"key={tls.key}): {exc}") from None


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def close_quietly(sock) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def peer_node_id(sock) -> int | None:
    """<id> of a peer certificate whose CN is "node<id>", else None (a client certificate)."""
    for rdn in (sock.getpeercert() or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName" and v.startswith("node") and v[4:].isdigit():
                return int(v[4:])
    return None


# ---- reading frames -----------------------------------------------------------------------------
_RECV = 65536


class ProtocolError(Exception):
    """The other end broke the framing rules; the connection is closed."""


class Idle(Exception):
    """No frame started within idle_timeout."""


class SocketBuffer:
    """Bytes read from a socket, for a frame parser to take whole frames from. A socket timeout,
    when set, is the longest silence tolerated mid-frame and the polling period of
    `idle_timeout` (the longest silence between frames)."""

    __slots__ = ("sock", "buf", "max_frame")

    def __init__(self, sock, max_frame: int):
        self.sock = sock
        self.buf = bytearray()
        self.max_frame = max_frame

    def fill(self, need: int, idle_timeout: float) -> bool:
        """Read until `need` bytes are buffered; False on a clean EOF between frames."""
        idle_since = time.monotonic()
        while len(self.buf) < need:
            try:
                chunk = self.sock.recv(_RECV)
            except TimeoutError:
                if self.buf:
                    raise ProtocolError(f"stalled mid-frame ({len(self.buf)} of {need} bytes)"
                                        ) from None
                if time.monotonic() - idle_since >= idle_timeout:
                    raise Idle from None
                continue
            if not chunk:
                if self.buf:
                    raise ProtocolError(f"truncated frame: EOF after {len(self.buf)} of "
                                        f"{need} bytes")
                return False
            self.buf += chunk
        return True


# ---- carrying Raft messages to peers -------------------------------------------------------------
_HEALTHY_AFTER = 1.0  # a peer connection that lived this long was not refused outright
log = logging.getLogger("raftcache.transport")


class PeerLink:
    """The queue and greenlet that carry Raft messages to one peer: everything queued goes out
    as one batch on a persistent connection. A full queue drops (Raft resends; the node's
    driver never blocks); an unreachable peer is retried with jittered exponential backoff and
    one log line per outage.

    `dial()` opens a connection with `opened_at`, `closed`, `error`, `send_peer(payloads)`
    (OSError on failure, after which it is closed) and `close()`; `encode(batch)` turns Raft
    messages into the payloads that `send_peer` takes.
    """

    def __init__(self, node_id: int, peer_id: int, address: str, opts, dial, encode):
        self.node_id = node_id
        self.peer_id = peer_id
        self.address = address
        self.opts = opts
        self._dial = dial
        self._encode = encode
        self.queue: deque = deque()
        self.wake = gevent.event.Event()
        self.conn = None
        self.dropped = 0
        self.down = False
        self.delay = opts.reconnect_min
        self.greenlet = gevent.spawn(self._run)

    def put(self, message) -> None:
        if len(self.queue) >= self.opts.peer_queue:
            self.dropped += 1
            return
        self.queue.append(message)
        self.wake.set()

    def close(self) -> None:
        self.greenlet.kill(block=False)
        if self.conn is not None:
            self.conn.close()

    def _run(self) -> None:
        while True:
            while not self.queue:
                self.wake.clear()
                self.wake.wait()
            try:
                self._step()
            except Exception:  # a bug must not silence this peer for good
                log.exception("node %d: link to peer %d failed", self.node_id, self.peer_id)
                self._failed("internal error")

    def _step(self) -> None:
        opts = self.opts
        conn = self.conn
        if conn is not None and conn.closed:
            # The peer closed it (restart, idle timeout, our certificate refused): writing
            # would "succeed" into a dead socket and lose the batch.
            self.conn = None
            if time.monotonic() - conn.opened_at < _HEALTHY_AFTER:
                # Died at once: count it as a failed connect and back off, instead of
                # reconnecting for every message.
                self._failed(f"closed right after connecting: {conn.error}")
                return
            self.delay = opts.reconnect_min
        if self.conn is None:
            try:
                self.conn = self._dial()
            except (OSError, ValueError) as exc:
                self._failed(f"unreachable: {exc}")
                return
        batch = [self.queue.popleft() for _ in range(min(len(self.queue), opts.peer_batch))]
        try:
            payloads = self._encode(batch)
        except Exception:  # a bad message must not end this link for good
            log.exception("node %d: cannot encode Raft messages for peer %d; dropped",
                          self.node_id, self.peer_id)
            return
        try:
            self.conn.send_peer(payloads)  # bounded by the socket's io_timeout
        except OSError as exc:
            log.info("node %d: link to peer %d (%s) broke: %s", self.node_id, self.peer_id,
                     self.address, exc)
            return
        if self.down and time.monotonic() - self.conn.opened_at >= _HEALTHY_AFTER:
            log.info("node %d: link to peer %d (%s) is back", self.node_id, self.peer_id,
                     self.address)
            self.down = False
            self.delay = opts.reconnect_min

    def _failed(self, why: str) -> None:
        if not self.down:  # one line per outage, not one per retry
            log.warning("node %d: link to peer %d (%s) down: %s; retrying with backoff",
                        self.node_id, self.peer_id, self.address, why)
            self.down = True
        self.queue.clear()  # stale by the time the peer is back; Raft resends
        gevent.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.delay * 2, self.opts.reconnect_max)


class PeerLinks:
    """One PeerLink per peer, made on first use. `dial(address)` and `encode(batch)` as for
    PeerLink."""

    def __init__(self, node_id: int, peers: dict, opts, dial, encode):
        self.node_id = node_id
        self.peers = peers
        self.opts = opts
        self._dial = dial
        self._encode = encode
        self._links: dict[int, PeerLink] = {}
        self._closed = False

    def send(self, messages) -> None:
        if self._closed:
            return
        for m in messages:
            link = self._links.get(m.to)
            if link is None:
                address = self.peers.get(m.to)
                if address is None or m.to == self.node_id:
                    log.debug("node %d: no address for peer %d; message dropped", self.node_id,
                              m.to)
                    continue
                link = self._links[m.to] = PeerLink(
                    self.node_id, m.to, address, self.opts,
                    lambda address=address: self._dial(address), self._encode)
            link.put(m)

    def dropped(self) -> dict[int, int]:
        """Raft messages dropped so far because a peer's queue was full, by peer id."""
        return {peer: link.dropped for peer, link in self._links.items()}

    def close(self) -> None:
        self._closed = True
        for link in self._links.values():
            link.close()
        self._links.clear()
