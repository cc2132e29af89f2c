"""Carrying Raft messages to peers: one queue, greenlet and persistent connection per peer.

Contract: `PeerLinks.send` never blocks the node's driver (a full queue drops; Raft resends);
an unreachable peer is retried with jittered exponential backoff and logged once per outage;
`set_peer` moves or drops a peer's link. The transport supplies `dial` (a connection with
`opened_at`, `closed`, `error`, `send_peer(payloads)` and `close()`) and `encode`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque

import gevent
import gevent.event

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
