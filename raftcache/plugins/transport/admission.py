"""Admitting connections: limits on what clients hold, so that no number of idle or slow
clients can keep a peer (or a new client) out.

Contract: every accepted connection gets a `Slot` from `Admission.admit` (or None: close it at
once, the accept loop never waits); `begin` and `end` bracket each request it carries;
`promote` takes a connection that proved it is a peer out of the clients' count; `release`
forgets a closed one. At a limit, the longest-idle client connection in scope is closed to make
room, found in constant time. `Listener` is the accept loop both doors of a node use (the
client port and /metrics): it admits in the accept path itself, a few connections per turn of
the event loop, and backs off when the process is out of descriptors. Single-threaded: call
from gevent greenlets only.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections import Counter

import attrs
import gevent.pool
from gevent.server import StreamServer

from raftcache.pluginapi.throttle import Throttle

from .sockets import close_quietly


@attrs.define(eq=False)
class Slot:
    """One accepted connection as the admission table sees it."""

    source: str
    close: object  # callable that closes the connection (replaced once TLS wraps the socket)
    inflight: int = 0  # requests being answered: an idle connection has none
    peer: int | None = None  # the node it proved to be; peers are not counted as clients


_FD_RESERVE = 256  # descriptors for peers, storage files and the rest of the process
# Connections accepted (and admitted or shed) per turn of the event loop: a burst of thousands
# is spread over many turns, with the peer links and the Ready loop served in between.
ACCEPTS_PER_TURN = 8
# accept() failing for want of descriptors or memory: not ours to crash on, wait and retry.
_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


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
        # Client slots, the least recently active first (a dict keeps insertion order, and
        # `end` moves a slot to the back): the one to evict is at the front, found at once
        # however many connections a burst opened.
        self._clients: dict[Slot, None] = {}
        self._by_source: dict[str, dict[Slot, None]] = {}
        self._peer_conns: Counter = Counter()  # node id -> its open connections here
        self._log = Throttle(logger)

    def admit(self, source: str, close) -> Slot | None:
        """A slot for a new connection from `source`, or None (refused: close it)."""
        mine = self._by_source.get(source, {})
        if len(mine) >= self.max_per_source and not self._make_room(
                mine, source, "max_connections_per_source", self.max_per_source):
            return None
        if len(self._clients) >= self.max_connections and not self._make_room(
                self._clients, None, "max_connections", self.max_connections):
            return None
        slot = Slot(source, close)
        self._clients[slot] = None
        self._by_source.setdefault(source, {})[slot] = None
        return slot

    def begin(self, slot: Slot) -> None:
        """A request arrived on `slot`'s connection: it is not idle until `end`."""
        slot.inflight += 1

    def end(self, slot: Slot) -> None:
        """A request on `slot`'s connection was answered: it is the most recently active."""
        slot.inflight -= 1
        if slot in self._clients:  # to the back of both orders
            del self._clients[slot]
            self._clients[slot] = None
            mine = self._by_source[slot.source]
            del mine[slot]
            mine[slot] = None

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
            mine = self._by_source[slot.source]
            del mine[slot]
            if not mine:
                del self._by_source[slot.source]

    def _make_room(self, scope: dict, source: str | None, limit: str, value: int) -> bool:
        # The first idle slot in least-recently-active order; only connections busy with a
        # request (at most one per pending request) are passed over.
        victim = next((s for s in scope if not s.inflight), None)
        if victim is None:
            self._log.warning(("refused", source), "refusing a connection%s: %s (%d) reached "
                              "and no connection is idle", f" from {source}" if source else "",
                              limit, value)
            return False
        self._log.log(logging.INFO, ("evicted", source), "%s (%d) reached: closed the "
                      "longest-idle client connection (from %s) to admit a new one", limit,
                      value, victim.source)
        self._forget(victim)
        victim.close()
        return True


class Listener(StreamServer):
    """A listening socket whose accept loop sheds cheaply and never stops for good.

    `admission` admits or refuses each connection in the accept path, before any greenlet is
    spawned: an admitted one is handed to `handle(sock, addr, slot)`, a refused one closed.
    At most `ACCEPTS_PER_TURN` connections are taken per turn of
    the event loop. When accept() fails for want of descriptors (EMFILE, ENFILE) or memory,
    the listener says so (once a minute) and pauses, doubling the pause up to half a second,
    instead of printing a traceback per attempt: the connections already open, peers among
    them, keep being served meanwhile.
    """

    max_accept = ACCEPTS_PER_TURN
    PAUSES = (0.02, 0.5)  # the first pause when out of descriptors, and the longest

    def __init__(self, address, admission: Admission, handle, logger):
        # An unbounded pool, so that stop() can wait for and end the connections; a bounded
        # one would stop the accept loop when full and keep peers out with everyone else.
        super().__init__(address, handle, spawn=gevent.pool.Pool())
        self._admission = admission
        self._log = Throttle(logger)
        self._pause = self.PAUSES[0]

    def do_read(self):
        try:
            args = super().do_read()
        except OSError as exc:
            if exc.errno not in _OUT_OF:
                raise
            self._log.warning("accept", "cannot accept connections on %s:%s: %s; pausing "
                              "%gs (raise `ulimit -n`, or lower max_connections)",
                              *self.address[:2], exc.strerror, self._pause)
            self.stop_accepting()
            self._timer = self.loop.timer(self._pause)
            self._timer.start(self._start_accepting_if_started)
            self._pause = min(self.PAUSES[1], self._pause * 2)
            return None
        self._pause = self.PAUSES[0]
        return args

    def do_handle(self, sock, addr):
        slot = self._admission.admit(addr[0], lambda: close_quietly(sock))
        if slot is None:
            close_quietly(sock)
        else:
            super().do_handle(sock, addr, slot)
