"""Admitting connections: limits on what clients hold, so that no number of idle or slow
clients can keep a peer (or a new client) out.

Contract: every accepted connection gets a `Slot` from `Admission.admit` (or None: close it at
once, the accept loop never waits); `promote` takes a connection that proved it is a peer out
of the clients' count; `release` forgets a closed one. At a limit, the longest-idle client
connection in scope is closed to make room. Single-threaded: call from gevent greenlets only.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter

import attrs

from raftcache.pluginapi.throttle import Throttle


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
