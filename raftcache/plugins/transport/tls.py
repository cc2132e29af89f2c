"""Mutual TLS for both transports: contexts, handshakes under a deadline, and the identities
that verified certificates carry.

Contract: `tls_context` gives a TLS 1.3 context that demands a certificate of the cluster CA
from the other end (cached, reloaded when the files change); `tls_handshake` and
`tls_accept` never leave a socket open when they fail; a certificate whose CN is "node<id>"
names node <id> (`peer_node_id`), any other verified CN is a client (`client_certificate`),
and `caller_certificate` says which client certificate a call is made under.
"""

from __future__ import annotations

import os
import socket
import ssl

import gevent
from gevent import ssl as gssl

from raftcache.pluginapi import TLSConfig
from raftcache.pluginapi.throttle import Throttle, problem_key
from raftcache.plugins.transport.sockets import close_quietly

# (server_side, TLSConfig, the files' mtimes) -> its context, so that a connection does not
# load the PEM files again.
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
