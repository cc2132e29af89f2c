"""What both built-in transports share: option parsing, mutual-TLS contexts, addresses,
certificate identities, buffered frame reading with deadlines, connection admission and peer
links. One place, so the two cannot drift apart on security or on how they treat a bad or
silent peer."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import random
import resource
import socket
import ssl
import struct
import time
from collections import Counter, deque

import attrs
import gevent
import gevent.event
import gevent.pool
from gevent import ssl as gssl
from gevent.server import StreamServer

from raftcache import wire
from raftcache.pluginapi import OptionError, TLSConfig
from raftcache.pluginapi.throttle import Throttle, problem_key


def positive(_inst, attribute, value):
    if not value > 0:
        raise OptionError(attribute.name, f"must be positive, got {value!r}")


@attrs.frozen
class TransportOptions:
    """`[transport.options]` that both built-in transports take (each may add its own); every
    key is optional, seconds are floats."""

    handshake_timeout: float = attrs.field(default=5.0, converter=float, validator=positive)
    idle_timeout: float = attrs.field(default=60.0, converter=float, validator=positive)
    # A read stalled mid-frame or a write stalled this long closes the connection.
    io_timeout: float = attrs.field(default=10.0, converter=float, validator=positive)
    # A frame must arrive whole within this long of its first byte (slow-drip clients).
    frame_timeout: float = attrs.field(default=30.0, converter=float, validator=positive)
    max_frame: int = attrs.field(default=16 << 20, converter=int, validator=positive)
    # List, set and map elements in one client request (keys of an mget, items of an mset):
    # counted before decoding, so that no frame costs more than milliseconds to decode.
    max_request_items: int = attrs.field(default=16384, converter=int, validator=positive)
    # Connections from clients (anything that has not proved it is a peer), in all and from
    # one source address; when full, the longest-idle one is closed to make room, or the
    # newcomer is refused at once. Peers do not count: they always get in.
    max_connections: int = attrs.field(default=1024, converter=int, validator=positive)
    max_connections_per_source: int = attrs.field(default=256, converter=int,
                                                  validator=positive)
    peer_queue: int = attrs.field(default=4096, converter=int, validator=positive)
    peer_batch: int = attrs.field(default=256, converter=int, validator=positive)
    connect_timeout: float = attrs.field(default=2.0, converter=float, validator=positive)
    reconnect_min: float = attrs.field(default=0.05, converter=float, validator=positive)
    reconnect_max: float = attrs.field(default=2.0, converter=float, validator=positive)
    # Set by the node, not in [transport.options]: the cluster's id, its secret (None: peers
    # prove themselves with TLS node certificates, or not at all), and node.max_request_bytes.
    cluster_id: int = attrs.field(default=0, converter=int)
    peer_secret: bytes | None = attrs.field(default=None, repr=False)
    max_request_bytes: int = attrs.field(default=4 << 20, converter=int, validator=positive)

    @property
    def max_request_frame(self) -> int:
        """The longest frame a connection that is not a proven peer may send. Anything longer
        cannot hold an acceptable write (keys, headers and framing take far less than the
        slack), so it is answered from its first bytes and the rest is read and dropped."""
        return min(self.max_frame, self.max_request_bytes + REQUEST_SLACK)


REQUEST_SLACK = 1 << 20
# What a client hears when its request could not fit node.max_request_bytes.
TOO_LARGE = ("the request takes {} bytes, more than a write may (node.max_request_bytes is {}); "
             "nothing was applied")

# What a client hears when its request holds more than max_request_items elements.
TOO_MANY_ITEMS = ("the request holds more than {} keys, values or list items "
                  "(transport.options.max_request_items); send fewer at once")


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


def tls_handshake(ctx, raw, server_side: bool = False, server_hostname: str | None = None):
    """Wrap `raw` and handshake; on any failure (a gevent.Timeout included) close the socket.

    Wrapping detaches `raw`, and the stdlib only closes the SSL socket on OSError/ValueError,
    so a deadline firing mid-handshake would otherwise leak an open connection."""
    sock = None
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(raw, server_side=server_side, server_hostname=server_hostname,
                               do_handshake_on_connect=False)
        sock.do_handshake()
        return sock
    except BaseException:
        close_quietly(sock)
        close_quietly(raw)
        raise


def tls_accept(ctx, raw, timeout: float, peer: str, closings: Throttle):
    """The server side of a TLS handshake under a deadline, in the connection's own greenlet
    (a silent client holds up nobody else): the TLS socket, or None, logged, and closed."""
    timer = gevent.Timeout.start_new(timeout)
    try:
        return tls_handshake(ctx, raw, server_side=True)
    except gevent.Timeout as t:
        if t is not timer:
            raise
        closings.warning(peer.rpartition(":")[0], "%s: no TLS handshake within %gs; closed",
                         peer, timeout)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        closings.warning(problem_key(peer.rpartition(":")[0], exc), "%s: TLS handshake "
                         "failed: %s", peer, exc)
    finally:
        timer.close()
    return None


def send_all(sock, data: bytes) -> None:
    """`sock.sendall(data)`, but a frame that fits the socket buffer costs one send(): gevent's
    sendall asks the kernel for the buffer size (a getsockopt) on every call."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


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


def _common_name(sock) -> str | None:
    for rdn in (sock.getpeercert() or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def peer_node_id(sock) -> int | None:
    """<id> of a peer certificate whose CN is "node<id>", else None (a client certificate)."""
    cn = _common_name(sock) or ""
    return int(cn[4:]) if cn.startswith("node") and cn[4:].isdigit() else None


def client_certificate(sock) -> str | None:
    """The CN of a verified client certificate that is not a node's, else None."""
    return None if peer_node_id(sock) is not None else _common_name(sock)


def caller_certificate(node_id: int | None, certificate: str | None, request) -> str | None:
    """The client certificate a call comes with (`PeerHandler.handle_request`): the
    connection's own, or, on a node's connection (a call it forwards), the one the node
    names in the request header."""
    if node_id is None:
        return certificate
    return request.header.certificate if request.header is not None else None


# ---- proving a peer holds the cluster secret -----------------------------------------------------
NONCE_BYTES = 32
_PROOF = struct.Struct(">16sqqq32s32s")


def peer_proof(secret: bytes, role: bytes, cluster_id: int, frm: int, to: int,
               dialer_nonce: bytes, listener_nonce: bytes) -> bytes:
    """HMAC-SHA256 by which one end of a new peer connection proves it holds the cluster
    secret. Both ends contribute a fresh nonce, so a recorded handshake cannot be replayed;
    `role` (b"dialer" or b"listener") keeps one side's proof from serving as the other's."""
    msg = _PROOF.pack(b"raftcache-peer-1", cluster_id, frm, to, dialer_nonce,
                      listener_nonce) + role
    return hmac.new(secret, msg, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# ---- admitting connections ------------------------------------------------------------------------
@attrs.define(eq=False)
class Slot:
    """One accepted connection as the admission table sees it."""

    source: str
    close: object  # callable that closes the connection (replaced once TLS wraps the socket)
    last_active: float = attrs.Factory(time.monotonic)
    inflight: int = 0  # requests being answered: an idle connection has none
    peer: int | None = None  # the node it proved to be; peers are not counted as clients


_FD_RESERVE = 256  # descriptors for peers, storage files and the rest of the process


def fit_connection_limit(max_connections: int, logger) -> int:
    """Raise this process's open-file limit so that `max_connections` clients fit beside the
    peers and the node's own files, as Redis does for maxclients. Where the hard limit is
    lower, admit fewer clients (and say so): running out of descriptors would stop the accept
    loop before any limit of ours could make room for a peer."""
    want = max_connections + _FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= want:
        return max_connections
    fitted = max(16, soft - _FD_RESERVE)
    logger.warning("the open-file limit is %d (ulimit -n): admitting %d client connections "
                   "instead of max_connections = %d", soft, fitted, max_connections)
    return fitted


class Admission:
    """Limits on the connections clients hold, in all and per source address, so that no
    number of idle or slow clients can keep a peer (or a new client) out: at a limit, the
    longest-idle client connection in its scope is closed to make room, and only when none is
    idle is the newcomer refused, at once. A connection that proves it is a peer leaves the
    count."""

    def __init__(self, max_connections: int, max_per_source: int, logger):
        self.max_connections = fit_connection_limit(max_connections, logger)
        self.max_per_source = max_per_source
        self._clients: dict[Slot, None] = {}
        self._per_source: Counter = Counter()
        self._peer_conns: Counter = Counter()  # node id -> its open connections here
        self._log = Throttle(logger)

    def admit(self, source: str, close) -> Slot | None:
        """A slot for a new connection from `source`, or None (refused: close it)."""
        if self._per_source[source] >= self.max_per_source and not self._make_room(
                source, "max_connections_per_source", self.max_per_source):
            return None
        if len(self._clients) >= self.max_connections and not self._make_room(
                None, "max_connections", self.max_connections):
            return None
        slot = Slot(source, close)
        self._clients[slot] = None
        self._per_source[source] += 1
        return slot

    def promote(self, slot: Slot, node_id: int) -> None:
        """The connection proved it is node `node_id`: no longer a client."""
        if slot.peer == node_id:
            return
        if slot.peer is not None:  # proved itself again, as another node
            self._drop_peer_conn(slot.peer)
        slot.peer = node_id
        self._peer_conns[node_id] += 1
        self._forget(slot)

    def release(self, slot: Slot) -> bool:
        """Forget a closed connection; True when it was the last one of a peer."""
        self._forget(slot)
        return slot.peer is not None and self._drop_peer_conn(slot.peer)

    def _drop_peer_conn(self, node_id: int) -> bool:
        self._peer_conns[node_id] -= 1
        if self._peer_conns[node_id] > 0:
            return False
        del self._peer_conns[node_id]
        return True

    def _forget(self, slot: Slot) -> None:
        if self._clients.pop(slot, False) is None:
            self._per_source[slot.source] -= 1
            if not self._per_source[slot.source]:
                del self._per_source[slot.source]

    def _make_room(self, source: str | None, limit: str, value: int) -> bool:
        idle = [s for s in self._clients if not s.inflight and source in (None, s.source)]
        if not idle:
            self._log.warning(("refused", source), "refusing a connection%s: %s (%d) reached "
                              "and no connection is idle", f" from {source}" if source else "",
                              limit, value)
            return False
        victim = min(idle, key=lambda s: s.last_active)
        self._log.log(logging.INFO, ("evicted", source), "%s (%d) reached: closed the "
                      "longest-idle client connection (from %s) to admit a new one", limit,
                      value, victim.source)
        self._forget(victim)
        victim.close()
        return True


# ---- reading frames -----------------------------------------------------------------------------
_RECV = 65536
_YIELD_EVERY = 1 << 20  # bytes of one frame read between two turns for the other greenlets


class ProtocolError(Exception):
    """The other end broke the framing rules; the connection is closed."""


class Idle(Exception):
    """No frame started within idle_timeout."""


class Oversized(Exception):
    """A frame longer than this connection may send; `head` holds its first bytes (enough to
    answer it), the rest was never read."""

    def __init__(self, length: int, head: bytes):
        super().__init__(f"a frame of {length} bytes")
        self.length = length
        self.head = head


HEAD_BYTES = 256  # of an oversized frame, read to name the call it carries


def _pace(paced: int, n: int) -> int:
    # A big frame that arrives as fast as it is read would keep its greenlet running (gevent
    # switches only when a read would block): give the others a turn every megabyte, so the
    # node's ticks and heartbeats go on while a 16 MiB frame comes in.
    paced += n
    if paced < _YIELD_EVERY:
        return paced
    gevent.sleep(0)
    return 0


class SocketBuffer:
    """Bytes read from a socket, for a frame parser to take whole frames from. A socket timeout,
    when set, is the longest silence tolerated mid-frame and the polling period of
    `idle_timeout` (the longest silence between frames); a frame whose first byte arrived more
    than `frame_timeout` ago ends the connection however steadily its bytes drip in."""

    __slots__ = ("sock", "buf", "max_frame", "frame_timeout", "_started")

    def __init__(self, sock, max_frame: int, frame_timeout: float = math.inf):
        self.sock = sock
        self.buf = bytearray()
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self._started: float | None = None  # when the frame being read was first seen

    def fill(self, need: int, idle_timeout: float) -> bool:
        """Read until `need` bytes are buffered; False on a clean EOF between frames."""
        idle_since = time.monotonic()
        paced = 0
        while len(self.buf) < need:
            chunk = self._recv(bool(self.buf), idle_since, idle_timeout)
            if chunk is None:
                continue
            if not chunk:
                return False
            self.buf += chunk
            paced = _pace(paced, len(chunk))
        return True

    def discard(self, end: int) -> None:
        """Read and drop the frame that ends at offset `end` without keeping it: what an
        oversized request costs is a read, not its size in memory."""
        left = end - len(self.buf)
        del self.buf[:end]
        paced = 0
        while left > 0:
            chunk = self._recv(True, 0.0, math.inf, min(_RECV, left))  # never past this frame
            left -= len(chunk)
            paced = _pace(paced, len(chunk))
        self._started = time.monotonic() if self.buf else None

    def _recv(self, mid_frame: bool, idle_since: float, idle_timeout: float,
              size: int = _RECV) -> bytes | None:
        """One read: bytes, b"" at a clean EOF between frames, None when nothing came within
        the socket's timeout between frames (Idle once idle_timeout has passed). Mid-frame,
        silence, EOF and a frame older than frame_timeout are ProtocolErrors."""
        if mid_frame:
            now = time.monotonic()
            if self._started is None:
                self._started = now
            elif now - self._started > self.frame_timeout:
                raise ProtocolError(f"a frame took over {self.frame_timeout:g}s to arrive")
        try:
            chunk = self.sock.recv(size)
        except TimeoutError:
            if mid_frame:
                raise ProtocolError("stalled mid-frame") from None
            if time.monotonic() - idle_since >= idle_timeout:
                raise Idle from None
            return None
        if not chunk and mid_frame:
            raise ProtocolError("truncated frame: EOF mid-frame")
        return chunk

    def take(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of a whole frame that ends at `end`, and drop the frame."""
        with memoryview(self.buf) as view:
            data = bytes(view[start:end])  # one copy, not two
        del self.buf[:end]
        self._started = time.monotonic() if self.buf else None
        return data


# ---- the server both transports are ---------------------------------------------------------------
class ServerBase:
    """What both built-in transports' servers share: the node's identity and peers, options,
    connection admission, the logging of closed connections, peer links, and a listener whose
    accept loop never stops (admission refuses at once instead). A subclass names its
    `Options` class and `logger`, and provides `_serve_conn(sock, addr)`, `_dial(peer_id,
    address)` and `_encode_batch(messages)`."""

    Options = TransportOptions
    logger = logging.getLogger("raftcache.transport")

    def __init__(self, node_id: int, address: str, peers: dict, tls: TLSConfig | None,
                 options: dict | None = None):
        self.node_id = node_id
        self.address = address
        self.peers = {int(k): v for k, v in (peers or {}).items()}
        self.tls = tls
        self.opts = self.Options.from_dict(options)
        self.max_frame = self.opts.max_frame
        self.handler = None
        self.admission = Admission(self.opts.max_connections,
                                   self.opts.max_connections_per_source, self.logger)
        self._closings = Throttle(self.logger)
        self._server: StreamServer | None = None
        self._links = PeerLinks(node_id, self.peers, self.opts, dial=self._dial,
                                encode=self._encode_batch)
        self._closed = False

    @property
    def bound_address(self) -> str:
        """host:port actually listened on (useful with port 0)."""
        host, port = self._server.address[:2]
        return f"{host}:{port}"

    def serve(self, handler) -> None:
        self.handler = handler
        # An unbounded pool: _serve_conn admits or refuses at once; a bounded one would stop
        # the accept loop when full and keep peers out with everyone else.
        self._server = StreamServer(parse_address(self.address), self._serve_conn,
                                    spawn=gevent.pool.Pool())
        self._server.start()

    def send(self, messages) -> None:
        self._links.send(messages)

    def set_peer(self, peer: int, address: str | None) -> None:
        self._links.set_peer(peer, address)

    def peer_links(self) -> dict[int, tuple[bool, int]]:
        return self._links.states()

    def _release(self, slot: Slot) -> None:
        """`slot`'s connection is closed. If it was the last one that carried Raft messages
        from a peer, tell the node: the kernel closes a dead process's connections at once,
        so a leader that died is noticed now rather than an election timeout later. (Only
        the last: another connection of the peer's that ends, a forwarded call's or a
        stranger's holding the peer's credentials, says nothing about the peer itself.)"""
        last = self.admission.release(slot)
        lost = getattr(self.handler, "peer_lost", None)
        if last and lost is not None and not self._closed:
            try:
                lost(slot.peer)
            except Exception:  # the node's bug, not the peer's
                log.exception("node %d: peer_lost failed", self.node_id)

    def dropped(self) -> dict[int, int]:
        """Raft messages dropped so far because a peer's queue was full, by peer id."""
        return self._links.dropped()


# ---- Raft traffic in both directions ------------------------------------------------------------
def deliver_batch(transport, batch, sender: int | None, slot: Slot, warn) -> None:
    """Hand a peer's RaftBatch (decoded from a connection that proved it is node `sender`, or
    from anyone when the transport authenticates no one) to the node.

    A batch for another cluster is a ProtocolError (the connection is closed: a mistyped
    address). A message that does not convert is dropped with `warn(text)`; what the node
    must refuse besides (another recipient, another sender, values out of range) it drops and
    counts itself. The first batch of a proven peer takes its connection out of the clients'
    count.
    """
    if (batch.cluster_id or 0) != transport.opts.cluster_id:
        raise ProtocolError(f"Raft batch for cluster {batch.cluster_id}, this node is in "
                            f"cluster {transport.opts.cluster_id}")
    if sender is not None and slot.peer is None:
        transport.admission.promote(slot, sender)
    messages = []
    for w in batch.messages or ():
        try:
            messages.append(wire.message_from_wire(w))
        except wire.WireError as exc:
            warn(f"dropped a Raft message: {exc}")
    if messages:
        try:
            transport.handler.handle_peer_messages(messages, sender)
        except Exception:  # the node's bug, not the peer's: keep the link
            log.exception("node %d: handle_peer_messages failed", transport.node_id)


def encode_to_fit(batch: list, encode, fits, node_id: int) -> list[bytes]:
    """`encode(messages)` for `batch`, halved until every piece `fits(payload)`; a single
    message that cannot fit is dropped with a warning (Raft resends what matters)."""
    payload = encode(batch)
    if fits(payload):
        return [payload]
    if len(batch) == 1:
        log.warning("node %d: dropping a %s message of %d bytes to peer %d (over max_frame)",
                    node_id, batch[0].type.name, len(payload), batch[0].to)
        return []
    mid = len(batch) // 2
    return (encode_to_fit(batch[:mid], encode, fits, node_id)
            + encode_to_fit(batch[mid:], encode, fits, node_id))


# ---- carrying Raft messages to peers -------------------------------------------------------------
_HEALTHY_AFTER = 1.0  # a peer connection that lived this long was not refused outright
log = logging.getLogger("raftcache.transport")


class PeerLink:
    """The queue and greenlet that carry Raft messages to one peer: everything queued goes out
    as one batch on a persistent connection. A full queue drops (Raft resends; the node's
    driver never blocks); an unreachable peer is retried with jittered exponential backoff and
    one log line per outage.

    `dial()` opens a connection (proving to the peer that we are a node of its cluster, where
    the transport asks for that) with `opened_at`, `closed`, `error`, `send_peer(payloads)`
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
    """One PeerLink per peer, made on first use. `dial(peer_id, address)` and `encode(batch)`
    as for PeerLink."""

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
                    lambda peer=m.to, address=address: self._dial(peer, address), self._encode)
            link.put(m)

    def set_peer(self, peer: int, address: str | None) -> None:
        """Reach `peer` at `address` from now on (None: not at all); a link to its old
        address closes."""
        if address is None:
            self.peers.pop(peer, None)
        else:
            self.peers[peer] = address
        link = self._links.get(peer)
        if link is not None and link.address != address:
            del self._links[peer]
            link.close()

    def states(self) -> dict[int, tuple[bool, int]]:
        """Per peer: (connected, Raft messages dropped so far because its queue was full)."""
        return {peer: (link.conn is not None and not link.down, link.dropped)
                for peer, link in self._links.items()}

    def dropped(self) -> dict[int, int]:
        """Raft messages dropped so far because a peer's queue was full, by peer id."""
        return {peer: link.dropped for peer, link in self._links.items()}

    def close(self) -> None:
        self._closed = True
        for link in self._links.values():
            link.close()
        self._links.clear()
