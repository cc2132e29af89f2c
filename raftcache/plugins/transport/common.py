"""What both built-in transports share: option parsing, mutual-TLS contexts, addresses,
certificate identities and buffered frame reading. One place, so the two cannot drift apart on
security or on how they treat a bad or silent peer."""

from __future__ import annotations

import os
import ssl
import time

import attrs
from gevent import ssl as gssl

from raftcache.core.hookspecs import TLSConfig


def positive(_inst, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


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
