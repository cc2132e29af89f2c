"""The address book: where this node reaches each peer, and what clients are told of each node."""

from __future__ import annotations

from collections.abc import Mapping

from raftcache.node.config import Config


class AddressBook:
    """Made from `cluster.peers`, the members' addresses the log carries, what a join endpoint
    said at start, and the local overrides (`cluster.dial` for dialling, `cluster.
    client_addresses` for what clients are told). The log wins over `cluster.peers`, which
    wins over a join endpoint; `cluster.dial` overrides any of them locally (relays, proxies).

    `sync` is called with the members the state machine recorded each time they may have
    moved; it tells the transport (`Transport.set_peer`) about every address that changed.
    `placed` is where each node is, without the local `cluster.dial` routes: what `status`
    tells others (a joining node adopts it), since another host cannot use this one's relay.
    """

    def __init__(self, config: Config, log):
        self.config = config
        self.log = log
        self.id = config.node.id
        self.peers: dict[int, str] = {**config.peer_addresses(), **config.dial_addresses()}
        self.placed: dict[int, str] = {**config.peer_addresses(), self.id: config.node.address}
        self.client_addresses: dict[int, str] = config.client_addresses()
        self.discovered: dict[int, str] = {}  # a joining node: what its join endpoints said
        self.set_peer = None  # the transport's, once it exists (optional in a transport)

    def sync(self, members: Mapping[int, str]) -> None:
        """Reach each member where the newest membership change that carried its address
        put it (else where cluster.peers or the join endpoints said), unless cluster.dial
        routes it elsewhere; tell the transport what moved."""
        config = self.config
        where = {**self.discovered, **config.peer_addresses(), **members}
        peers = {**where, **config.dial_addresses(), self.id: config.node.address}
        for node_id in sorted(set(peers) | set(self.peers)):
            address = peers.get(node_id)
            if address == self.peers.get(node_id):
                continue
            self.log.info("peer %d is at %s", node_id, address or "(no address: removed)")
            if self.set_peer is not None and node_id != self.id:
                self.set_peer(node_id, address)
        self.peers = peers
        self.placed = {**where, self.id: config.node.address}
        overrides = {int(k): v for k, v in config.cluster.client_addresses.items()}
        self.client_addresses = {**where, **overrides, self.id: config.node.address}
