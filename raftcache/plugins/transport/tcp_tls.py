"""The `tcp-tls` transport: length-prefixed frames over mutually authenticated TLS 1.3.

One port carries client requests and Raft traffic. Every frame is::

    u32 length (big-endian, of what follows) | u8 kind | u64 request id | payload

REQUEST (payload: wire.Request) is answered by a RESPONSE (wire.Response) with the same id, so
one connection carries many concurrent requests. PEER (wire.RaftBatch, id 0) is one-way.

Both ends present a certificate signed by the cluster CA (`raftcache.certs`). Raft messages are
accepted only from a certificate whose CN is "node<id>", and the node keeps only those with
`frm == <id>`, so a client certificate cannot inject Raft traffic.

Everything is plain gevent (gevent.socket, gevent.ssl): it works with or without
monkey-patching. The TLS handshake happens inside the per-connection greenlet under a deadline
(thriftpy2's TSSLServerSocket handshakes inside its accept loop, with no deadline: one silent
client would freeze every new connection). Connections are admitted under the limits of
`admission.Admission`, and every frame must arrive whole within `frame_timeout`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import struct
import time

import attrs
import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import socket as gsocket
from gevent import ssl as gssl
from thriftpy2.protocol import TCyBinaryProtocolFactory

from raftcache import wire
from raftcache.core import api
from raftcache.pluginapi import TLSConfig, TransportProvider, hookimpl, parse_options, positive
from raftcache.pluginapi.throttle import problem_key
from raftcache.plugins.transport.framing import Idle, Oversized, ProtocolError, SocketBuffer
from raftcache.plugins.transport.options import TOO_LARGE, TOO_MANY_ITEMS, TransportOptions
from raftcache.plugins.transport.server import ServerBase, deliver_batch, encode_to_fit
from raftcache.plugins.transport.sockets import close_quietly, parse_address, send_all
from raftcache.plugins.transport.tls import (
    caller_certificate,
    client_certificate,
    peer_node_id,
    tls_accept,
    tls_context,
    tls_handshake,
)

log = logging.getLogger("raftcache.transport.tcp_tls")

REQUEST, RESPONSE, PEER = 1, 2, 3
KINDS = {REQUEST: "REQUEST", RESPONSE: "RESPONSE", PEER: "PEER"}
HEADER = struct.Struct(">IBQ")  # length, kind, request id
_LENGTH = struct.Struct(">I")
_AFTER_LENGTH = HEADER.size - _LENGTH.size  # kind + id: the smallest valid length


def pack_frame(kind: int, request_id: int, payload: bytes) -> bytes:
    return HEADER.pack(_AFTER_LENGTH + len(payload), kind, request_id) + payload


_PROTOCOL = TCyBinaryProtocolFactory()


decode = wire.decode  # bounds-checked: safe on hostile bytes


# ---- options ------------------------------------------------------------------------------------
@attrs.frozen
class Options(TransportOptions):
    """`[transport.options]` of a node's config: options.TransportOptions, and how many calls
    one client connection may have in flight at once."""

    idle_timeout: float = attrs.field(default=120.0, converter=float, validator=positive)
    max_inflight: int = attrs.field(default=256, converter=int, validator=positive)

    @classmethod
    def from_dict(cls, options: dict | None) -> Options:
        return parse_options(cls, options, "transport.options")


# ---- TLS ----------------------------------------------------------------------------------------
def _context(tls: TLSConfig | None, server_side: bool) -> gssl.SSLContext:
    if tls is None:
        raise ValueError("the tcp-tls transport requires TLS: set [transport.tls] ca, cert and "
                         "key (`raftcache certs init --dir DIR` makes them)")
    return tls_context(tls, server_side, "tcp-tls")


# ---- frames -------------------------------------------------------------------------------------
class _FrameReader(SocketBuffer):
    """Reads frames from a socket whose timeout is io_timeout."""

    __slots__ = ()

    def read(self, idle_timeout: float = math.inf, limit=None):
        """(kind, request id, payload), or None on a clean EOF between frames. With
        `limit(kind)`, a longer frame of that kind raises Oversized (its header as `head`)
        before its payload is read."""
        if not self.fill(_LENGTH.size, idle_timeout):
            return None
        (length,) = _LENGTH.unpack_from(self.buf)
        if length < _AFTER_LENGTH:
            raise ProtocolError(f"frame length {length} is below the minimum {_AFTER_LENGTH}")
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds max_frame {self.max_frame}")
        self.fill(HEADER.size, idle_timeout)
        _, kind, request_id = HEADER.unpack_from(self.buf)
        if limit is not None and length > limit(kind):
            raise Oversized(length, bytes(self.buf[:HEADER.size]))
        end = _LENGTH.size + length
        self.fill(end, idle_timeout)
        return kind, request_id, self.take(HEADER.size, end)


# ---- client side: one connection, many concurrent calls ------------------------------------------
class TcpTlsConnection:
    """A mutual-TLS connection to a node. `call` may be used from many greenlets at once;
    after any failure the connection is closed for good (every later call raises OSError)."""

    def __init__(self, sock, address: str, options: Options):
        self._sock = sock
        self.address = address
        self._max_frame = options.max_frame
        self._wlock = gevent.lock.Semaphore()
        self._waiters: dict[int, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        self._error: OSError | None = None
        self.opened_at = time.monotonic()
        self._reader = gevent.spawn(self._read_loop)

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> OSError | None:
        """Why the connection closed (None while open)."""
        return self._error

    def call(self, request, timeout: float):
        if self._error is not None:
            raise ConnectionError(f"{self.address}: connection is closed ({self._error}); "
                                  "nothing was sent")
        payload = wire.encode(wire.request_to_wire(request))
        request_id = next(self._ids)
        frame = pack_frame(REQUEST, request_id, payload)
        if len(frame) - _LENGTH.size > self._max_frame:
            raise ValueError(f"request of {len(payload)} bytes exceeds max_frame")
        result = gevent.event.AsyncResult()
        self._waiters[request_id] = result
        timer = gevent.Timeout.start_new(timeout)
        try:
            with self._wlock:
                send_all(self._sock, frame)
            data = result.get()
        except gevent.Timeout as t:
            if t is not timer:  # someone else's deadline: not ours to convert
                self._break(ConnectionError("call interrupted"))
                raise
            self._break(TimeoutError("a call timed out"))
            raise TimeoutError(f"{self.address}: no answer within {timeout:g}s") from None
        except OSError as exc:
            self._break(exc)
            raise
        except BaseException:
            self._break(ConnectionError("call interrupted"))
            raise
        finally:
            timer.close()
            self._waiters.pop(request_id, None)
        try:
            return wire.response_from_wire(decode(wire.Response, data))
        except wire.WireError as exc:
            self._break(ConnectionError(str(exc)))
            raise ConnectionError(f"{self.address}: bad response: {exc}") from None

    def send_peer(self, payloads: list[bytes]) -> None:
        """Write PEER frames (one-way). OSError, and the connection is closed, on failure."""
        if self._error is not None:
            raise ConnectionError(f"{self.address}: connection is closed ({self._error})")
        data = b"".join(pack_frame(PEER, 0, p) for p in payloads)
        try:
            with self._wlock:
                send_all(self._sock, data)  # bounded by the socket's io_timeout
        except OSError as exc:
            self._break(exc)
            raise
        except BaseException:
            self._break(ConnectionError("send interrupted"))
            raise

    def close(self) -> None:
        self._break(ConnectionError("closed by this side"))

    def _break(self, error: OSError) -> None:
        if self._error is not None:
            return
        self._error = error
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w.set_exception(ConnectionError(f"{self.address}: connection lost: {error}"))
        try:
            self._sock.close()  # wakes the reader with an error
        except OSError:
            pass

    def _read_loop(self) -> None:
        reader = _FrameReader(self._sock, self._max_frame)
        try:
            while True:
                frame = reader.read()
                if frame is None:
                    raise ConnectionError("closed by the server")
                kind, request_id, payload = frame
                if kind != RESPONSE:
                    raise ProtocolError(f"unexpected {KINDS.get(kind, kind)} frame from server")
                waiter = self._waiters.pop(request_id, None)
                if waiter is None:
                    raise ProtocolError(f"response to unknown request {request_id}")
                waiter.set(payload)
        except ProtocolError as exc:
            if self._error is None:
                log.warning("%s: %s; closing the connection", self.address, exc)
            self._break(ConnectionError(str(exc)))
        except OSError as exc:
            self._break(exc)


def connect(address: str, tls: TLSConfig | None, timeout: float,
            options: dict | None = None) -> TcpTlsConnection:
    """Open a mutual-TLS connection to `address` ("host:port"); the server's certificate must
    chain to tls.ca and name the host. OSError/TimeoutError when that fails in `timeout`."""
    opts = Options.from_dict(options)
    ctx = _context(tls, server_side=False)
    host, port = parse_address(address)
    timer = gevent.Timeout.start_new(timeout)
    try:
        # its own timeout too: it closes its socket on socket errors, not on gevent.Timeout
        raw = gsocket.create_connection((host, port), timeout=timeout)
        sock = tls_handshake(ctx, raw, server_hostname=host)
    except gevent.Timeout as t:
        if t is not timer:
            raise
        raise TimeoutError(f"{address}: TLS connection not established within "
                           f"{timeout:g}s") from None
    finally:
        timer.close()
    sock.settimeout(opts.io_timeout)
    return TcpTlsConnection(sock, address, opts)


# ---- server side --------------------------------------------------------------------------------
class _ServerConn:
    __slots__ = ("sock", "peer", "node_id", "certificate", "wlock", "slot")

    def __init__(self, sock, peer: str, node_id: int | None, slot):
        self.sock = sock
        self.peer = peer
        self.node_id = node_id  # from a certificate whose CN is "node<id>"
        self.certificate = client_certificate(sock)  # a client certificate's CN
        self.wlock = gevent.lock.Semaphore()
        self.slot = slot

    def write(self, frame: bytes) -> None:
        try:
            with self.wlock:
                send_all(self.sock, frame)
        except OSError:
            self.close()  # a partial frame may be out: the stream is unusable; reader notices

    def close(self) -> None:
        close_quietly(self.sock)


class TcpTlsTransport(ServerBase):
    """One node's listener and its links to peers (see the module docstring)."""

    Options = Options
    logger = log

    def __init__(self, node_id: int, address: str, peers: dict, tls: TLSConfig | None,
                 options: dict | None = None):
        super().__init__(node_id, address, peers, tls, options)
        self._server_ctx = _context(tls, server_side=True)  # fails now, not at first connect
        _context(tls, server_side=False)
        self._conns: dict[_ServerConn, gevent.pool.Pool] = {}  # open connections

    def _dial(self, _peer: int, address: str) -> TcpTlsConnection:
        return connect(address, self.tls, self.opts.connect_timeout, attrs.asdict(self.opts))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._links.close()
        if self._server is None:
            return
        self._server.close()  # stop accepting first
        for conn, pool in list(self._conns.items()):
            pool.kill(block=False)
            conn.close()  # wakes its reader at once
        self._server.stop(timeout=1)

    # -- peers ---------------------------------------------------------------------------------
    def _encode_batch(self, batch: list) -> list[bytes]:
        """PEER payloads carrying `batch`, split to fit max_frame."""
        return encode_to_fit(
            batch, lambda messages: wire.encode(wire.batch_to_wire(messages, self.opts.cluster_id)),
            lambda payload: len(payload) + _AFTER_LENGTH <= self.max_frame, self.node_id)

    # -- server --------------------------------------------------------------------------------
    def _serve_conn(self, raw, addr, slot) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        try:
            sock = tls_accept(self._server_ctx, raw, self.opts.handshake_timeout, peer,
                              self._closings)
            if sock is None:
                return
            conn = _ServerConn(sock, peer, peer_node_id(sock), slot)
            slot.close = conn.close
            pool = gevent.pool.Pool(self.opts.max_inflight)
            self._conns[conn] = pool
            try:
                sock.settimeout(self.opts.io_timeout)
                self._read_frames(conn, pool)
            finally:
                self._conns.pop(conn, None)
                conn.close()  # in-flight requests finish; their answers have nowhere to go
        finally:
            self._release(slot)

    def _frame_limit(self, conn: _ServerConn, kind: int) -> int:
        # Only a node's certificate may send Raft traffic, and only Raft traffic may be
        # bigger than any acceptable request.
        if kind == PEER:
            return self.opts.max_frame if conn.node_id is not None else 0
        return self.opts.max_request_frame

    def _read_frames(self, conn: _ServerConn, pool: gevent.pool.Pool) -> None:
        reader = _FrameReader(conn.sock, self.opts.max_frame, self.opts.frame_timeout)
        source = conn.peer.rpartition(":")[0]
        limit = functools.partial(self._frame_limit, conn)
        try:
            while True:
                try:
                    frame = reader.read(self.opts.idle_timeout, limit)
                except Oversized as exc:
                    _, kind, request_id = HEADER.unpack(exc.head)
                    if kind == PEER:
                        raise ProtocolError("Raft messages from a certificate that is not a "
                                            "node's (CN must be node<id>)") from None
                    if kind != REQUEST:
                        raise ProtocolError(f"unexpected frame kind {KINDS.get(kind, kind)}"
                                            ) from None
                    reader.discard(_LENGTH.size + exc.length)  # answered without keeping it
                    _refuse(conn, request_id, TOO_LARGE.format(exc.length,
                                                               self.opts.max_request_bytes))
                    continue
                if frame is None:
                    return
                kind, request_id, payload = frame
                if kind == REQUEST:
                    try:
                        request = wire.request_from_wire(
                            decode(wire.Request, payload, self.opts.max_request_items))
                    except wire.TooManyItems:
                        _refuse(conn, request_id, TOO_MANY_ITEMS.format(
                            self.opts.max_request_items))
                        continue
                    self.admission.begin(conn.slot)
                    pool.spawn(self._answer, conn, request_id, request)  # waits when full
                elif kind == PEER:  # from a node's certificate: _frame_limit saw to that
                    deliver_batch(self, decode(wire.RaftBatch, payload), conn.node_id,
                                  conn.slot, lambda text: self._closings.warning(
                                      ("bad", source), "%s: %s", conn.peer, text))
                else:
                    raise ProtocolError(f"unexpected frame kind {KINDS.get(kind, kind)}")
        except (ProtocolError, wire.WireError) as exc:
            self._closings.warning(problem_key(source, exc), "%s: %s; closing the connection",
                                   conn.peer, exc)
        except Idle:
            self._closings.log(logging.INFO, source, "%s: idle for %gs; closing the "
                               "connection", conn.peer, self.opts.idle_timeout)
        except OSError as exc:
            if not self._closed:
                self._closings.log(logging.INFO, problem_key(source, exc), "%s: connection "
                                   "lost: %s", conn.peer, exc)

    def _answer(self, conn: _ServerConn, request_id: int, request) -> None:
        try:
            response = self.handler.handle_request(request, caller_certificate(
                conn.node_id, conn.certificate, request), source=conn.slot.source)
            payload = wire.encode(wire.response_to_wire(response))
        except Exception:  # the handler promises not to raise; keep the connection anyway
            log.exception("%s: request %r failed", conn.peer, getattr(request, "op", None))
            payload = _response_payload(api.error("Unavailable", "internal error"))
        finally:
            self.admission.end(conn.slot)
        if len(payload) + _AFTER_LENGTH > self.opts.max_frame:
            payload = _response_payload(api.error(
                "InvalidRequest", f"response of {len(payload)} bytes exceeds max_frame"))
        conn.write(pack_frame(RESPONSE, request_id, payload))


def _refuse(conn: _ServerConn, request_id: int, reason: str) -> None:
    """Answer a request that cannot be taken (the connection goes on)."""
    conn.write(pack_frame(RESPONSE, request_id, _response_payload(api.error("InvalidRequest",
                                                                            reason))))


def _response_payload(response: api.Response) -> bytes:
    return wire.encode(wire.response_to_wire(response))


def server(node_id: int, address: str, peers: dict, tls: TLSConfig | None,
           options: dict | None = None) -> TcpTlsTransport:
    return TcpTlsTransport(node_id, address, peers, tls, options)


@hookimpl
def raftcache_transports():
    yield TransportProvider(
        "tcp-tls", server, connect,
        "length-prefixed frames over mutual TLS 1.3; client and Raft traffic on one port",
    )
