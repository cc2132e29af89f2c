"""Joining a cluster, and refusing to start a member that lost its data."""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import gevent

from raftcache.core import api
from raftcache.pluginapi import TLSConfig

from .addresses import AddressBook
from .config import Config


@attrs.define
class JoinCheck:
    """What a node with no Raft state learns from the cluster before it serves.

    Contract: a node started with `cluster.join` asks the join endpoints where the members
    are (`status().peer_addresses`), so that the leader's first messages can be answered,
    and keeps asking in the background until one answers. A founder that has just
    bootstrapped asks its fellow founders. Either way, a node the cluster counts as joined
    (`status().joined`: it acknowledged entries, so it may have voted) that comes back with
    no Raft state lost its data: it is refused (ConfigError) instead of voting twice.
    """

    config: Config
    addresses: AddressBook
    connect: Callable  # the transport's client connection
    tls: TLSConfig | None
    log: logging.LoggerAdapter
    fresh: Callable[[], bool]  # whether the replica still holds no Raft state at all
    sync_addresses: Callable[[], None]

    @property
    def id(self) -> int:
        return self.config.node.id

    def run(self, bootstrapped: bool) -> gevent.Greenlet | None:
        """At start; `bootstrapped`: the replica has just founded a cluster from static
        peers. Returns the greenlet that keeps asking, if no join endpoint answered."""
        if self.config.cluster.join and not self._ask_join_endpoints():
            return gevent.spawn(self._keep_asking)
        if bootstrapped:
            self._check_fellow_founders()
        return None

    def _member_status(self, endpoint: str) -> api.NodeStatus | None:
        """A member's `status` answer, or None when it does not answer."""
        try:
            conn = self.connect(endpoint, self.tls, 2.0)
            try:
                return conn.call(api.Request(op="status"), 2.0).status
            finally:
                conn.close()
        except (OSError, TimeoutError) as exc:
            self.log.info("member %s: %s", endpoint, exc)
            return None

    def _refuse_if_joined(self, status: api.NodeStatus, endpoint: str, key: str,
                          rejoin: str) -> None:
        if self.id in (status.joined or ()):
            raise self.config.fail(
                key, f"node {self.id} is already a member of the cluster at {endpoint}, but "
                f"its data directory {self.config.node.data_dir} holds no Raft state: it may "
                "have voted before its data was lost, and could vote twice. Remove it first "
                f"(raftcache member remove {self.id}), then {rejoin} and add it (raftcache "
                f"member add {self.id} {self.config.node.address})")

    def _ask_join_endpoints(self) -> bool:
        """Learn where the members are from the first join endpoint that answers; whether
        one did."""
        fresh = self.fresh()
        for endpoint in self.config.cluster.join:
            status = self._member_status(endpoint)
            if status is None:
                continue
            if fresh:
                self._refuse_if_joined(status, endpoint, "cluster.join", "start it again")
            self.addresses.discovered = {int(k): v for k, v in
                                         (status.peer_addresses or {}).items()
                                         if int(k) != self.id}
            self.sync_addresses()
            return True
        return False

    def _keep_asking(self) -> None:
        while not self._ask_join_endpoints():
            self.log.warning("no join endpoint answered (%s); retrying",
                             ",".join(self.config.cluster.join))
            gevent.sleep(1.0)

    def _check_fellow_founders(self) -> None:
        """None answering is a cluster's first start: nothing to check."""
        for node_id, endpoint in sorted(self.config.client_addresses().items()):
            status = None if node_id == self.id else self._member_status(endpoint)
            if status is not None:
                self._refuse_if_joined(
                    status, endpoint, "cluster.peers",
                    "start it with a join config (raftcache up writes DATA_DIR/join.toml: "
                    f"raftcache serve --config join.toml --id {self.id} --address "
                    f"{self.config.node.address} --data-dir DIR)")
