"""The server both built-in transports are: what they share once a connection is accepted,
and the Raft traffic that arrives on it.

Contract: a subclass of `ServerBase` names its `Options` and `logger` and provides
`_serve_conn(sock, addr, slot)` (for a connection already admitted), `_dial(peer_id,
address)` and `_encode_batch(messages)`; the base admits connections (`admission`, in the
accept loop), keeps the peer links (`send`, `set_peer`, `peer_links`, `dropped`) and tells the
node when a peer's last connection closes. `deliver_batch` hands a
decoded RaftBatch to the node; `encode_to_fit` splits an outgoing batch until every frame fits.
"""

from __future__ import annotations

import logging

from raftcache import wire
from raftcache.pluginapi import TLSConfig
from raftcache.pluginapi.throttle import Throttle
from raftcache.plugins.transport.admission import Admission, Listener, Slot
from raftcache.plugins.transport.framing import ProtocolError
from raftcache.plugins.transport.options import TransportOptions
from raftcache.plugins.transport.peer_links import PeerLinks
from raftcache.plugins.transport.sockets import parse_address

log = logging.getLogger("raftcache.transport")


class ServerBase:
    """What both built-in transports' servers share: the node's identity and peers, options,
    connection admission, the logging of closed connections, peer links, and a listener whose
    accept loop never stops (admission refuses at once instead). A subclass names its
    `Options` class and `logger`, and provides `_serve_conn(sock, addr, slot)`, `_dial(peer_id,
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
        self._server: Listener | None = None
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
        # Admission happens in the accept loop, a few connections per turn: a refused one
        # costs no greenlet, and a burst of thousands never holds the event loop for long.
        self._server = Listener(parse_address(self.address), self.admission, self._serve_conn,
                                self.logger)
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
