"""The node: the host of this process's replicas, and what is per process.

The host wires what a process has once: the plugin manager, the storage, the transport (one
port for clients and peers), the address book, the metrics endpoint, and the `NodeContext`
plugins are handed. It holds the replica of the one Raft group this cluster runs today
(`replica`), passes it the peers' messages, and hands client calls to `requests`.
docs/architecture.md follows a write and a read through the parts.
"""

from __future__ import annotations

import gc
import logging
import random
import time

import gevent
import gevent.event

from raftcache.core import api
from raftcache.core.raft import RawNode
from raftcache.core.raft.messages import NONE
from raftcache.pluginapi import BackendUnavailable, NodeContext, TLSConfig
from raftcache.pluginapi.manager import PluginError, PluginSet, make_manager, notify

from .addresses import AddressBook
from .applier import BackendDown
from .backend import make_backend
from .config import Config, read_secret
from .membership import JoinCheck
from .metrics import NodeMetrics
from .metrics_server import MetricsServer
from .replica import Replica
from .requests import Requests

log = logging.getLogger("raftcache.node")

# Room a peer frame needs besides the one entry an append may carry (message fields, framing).
FRAME_HEADROOM = 64 << 10
READY_LAG = 1000  # committed entries a ready node may still have to apply
FULL_COLLECTION_EVERY = 100  # middle-generation collections per full one (Python's default: 10)


class Node:
    """One raftcache node process (the host): `start`, then it serves until `stop`.

    It is the transport's `PeerHandler`: `handle_request` (client calls), and
    `handle_peer_messages` / `peer_lost` (Raft traffic, for the replica).
    """

    def __init__(self, config: Config, pm=None, rng: random.Random | None = None,
                 core: type[RawNode] = RawNode):
        """`pm`: the plugin manager (default: every entry-point plugin not blocked);
        `core`: the Raft core class (tests hand a deliberately broken one here)."""
        self.config = config
        self.id = config.node.id
        self.clock = time.time  # wall-clock seconds: what stamps writes (tests skew it)
        self.pm = pm or make_manager(block=config.plugins.block)
        plugins = PluginSet(self.pm)
        self.log = _NodeLog(log, self)
        self.addresses = AddressBook(config, self.log)
        storage_p = self._provider(plugins, "storage", config.storage.plugin)
        transport_p = self._provider(plugins, "transport", config.transport.plugin)
        self.storage = storage_p.factory(self.id, config.node.data_dir,
                                         dict(config.storage.options))
        self.tls = _tls(config.transport.tls)
        secret = (read_secret(config.cluster.secret_file, config)
                  if config.cluster.secret_file else None)
        # Peers of another cluster (a mistyped address) get their connections closed; with a
        # secret, a peer proves it holds it before its Raft messages count; a client frame
        # too big for any acceptable write is answered before it is read.
        transport_options = {**config.transport.options, "cluster_id": config.cluster.id,
                             "peer_secret": secret,
                             "max_request_bytes": config.node.max_request_bytes}
        self.transport = transport_p.server(self.id, config.node.address,
                                            self.addresses.peers, self.tls, transport_options)
        self.addresses.set_peer = getattr(self.transport, "set_peer", None)
        self._check_request_limit(getattr(self.transport, "max_frame", None))
        self.connect = transport_p.connect
        # Where values are stored as they were written, without sealing (`encrypt_values =
        # false`: farms that applications read directly); value codecs ask the backend per key.
        plaintext_routes: list[str] = []
        backend = make_backend(plugins, config.backend.plugin, self.id,
                               dict(config.backend.options), plaintext=plaintext_routes)
        self.context = self._context(tuple(plaintext_routes))
        # Value codecs (encryption, compression) in plugin registration order: pluggy calls
        # the last registered plugin first.
        self.codecs = tuple(c for codecs in
                            reversed(self.pm.hook.raftcache_value_codecs(node=self.context))
                            for c in (codecs or ()))
        self.stats = NodeMetrics(self)  # Prometheus: node.metrics_address serves them
        self.replica = Replica(config, self.storage, self.transport, backend, self.codecs,
                               self.pm.hook.raftcache_check_command, self.addresses, self.log,
                               self.stats, self._notify, lambda: self.clock(), core, rng)
        self.requests = Requests(config, self.replica, self.addresses, self.pm, self.context,
                                 self.codecs, self.connect, self.tls, self.stats, self.log,
                                 self.status)
        self._stopped = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._metrics_server = None

    # -- wiring ------------------------------------------------------------------------------------
    def _provider(self, plugins: PluginSet, kind: str, name: str):
        try:
            return plugins.get(kind, name)
        except PluginError as exc:
            raise self.config.fail(f"{kind}.plugin", str(exc)) from None

    def _check_request_limit(self, max_frame: int | None) -> None:
        # An accepted write must always fit one append to a peer, or it could never commit.
        limit = self.config.node.max_request_bytes
        if max_frame is not None and limit > max_frame - FRAME_HEADROOM:
            raise self.config.fail(
                "node.max_request_bytes",
                f"{limit} does not fit one peer frame of {max_frame} bytes (the transport's "
                f"max_frame) with {FRAME_HEADROOM} bytes to spare: lower it or raise "
                "transport.options.max_frame")

    def _context(self, plaintext_routes: tuple[str, ...]) -> NodeContext:
        """What hooks are handed: this node as the plugin API describes it."""

        def read_settled(keys):
            try:
                return self.requests.read_settled(keys)
            except BackendDown as exc:  # the backend is down or catching up
                raise BackendUnavailable(str(exc)) from None

        def stores_plaintext(key: bytes) -> bool:
            asks = getattr(self.replica.sm.backend, "stores_plaintext", None)
            return bool(asks is not None and asks(key))

        return NodeContext(
            id=self.id, config=self.config, log=self.log, plaintext_routes=plaintext_routes,
            now_ms=lambda: self.replica.stamp(), settings=lambda: self.replica.sm.settings,
            read_settled=read_settled,
            keys_at=lambda position, count: self.replica.sm.keys_at(position, count),
            key_count=lambda: len(self.replica.sm), stores_plaintext=stores_plaintext,
            codecs=lambda: self.codecs, status=self.status)

    def _notify(self, hook: str, **kwargs) -> None:
        """Tell the observer plugins (each on its own: one failing does not stop the rest)."""
        notify(self.pm, hook, self.log, node=self.context, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        config = self.config
        if config.cluster.insecure:
            self.log.warning("cluster.insecure = true: Raft messages are accepted from anyone "
                             "who can reach %s, without proof that they come from a node of "
                             "this cluster", config.node.address)
        raw = self.replica.raw
        join = JoinCheck(config, self.addresses, self.connect, self.tls, self.log,
                         fresh=lambda: _holds_nothing(raw.status()),
                         sync_addresses=lambda: self.addresses.sync(self.replica.sm.members))
        asking = join.run(self.replica.bootstrapped)
        if asking is not None:
            self._greenlets.append(asking)
        self.transport.serve(self)
        if config.node.metrics_address:
            # The transport's admission keeps this door too: one cap on what clients hold,
            # derived from the descriptor limit with a reserve for the node's own files.
            self._metrics_server = MetricsServer(
                config.node.metrics_address, self.stats.wsgi,
                getattr(self.transport, "admission", None), config.metrics,
                logging.getLogger("raftcache.metrics"))
            self._metrics_server.start()
        self.replica.start()
        self._greenlets.append(gevent.spawn(self._report_metrics))
        self.log.info("serving on %s (storage %s, transport %s, backend %s)",
                      config.node.address, config.storage.plugin, config.transport.plugin,
                      config.backend.plugin)
        self._notify("raftcache_node_started")

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self.log.info("stopping")
        self._notify("raftcache_node_stopping")
        self._stopped.set()
        if self._metrics_server is not None:
            self._metrics_server.stop(timeout=1)
        gevent.killall(self._greenlets, timeout=2)
        self.replica.stop()
        self.transport.close()
        self.storage.close()
        self.replica.sm.backend.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _report_metrics(self) -> None:
        """At start and every ten seconds, the metrics observers are told
        (`raftcache_metrics`)."""
        while True:
            self.metrics()
            if self._stopped.wait(10.0):
                return

    # -- the transport's callbacks -----------------------------------------------------------------
    def handle_request(self, request: api.Request, certificate: str | None = None,
                       source: str | None = None) -> api.Response:
        return self.requests.handle(request, certificate, source)

    def handle_peer_messages(self, messages, sender: int | None = None) -> None:
        self.replica.step(messages, sender)

    def peer_lost(self, peer: int) -> None:
        self.replica.peer_lost(peer)

    # -- health and status -------------------------------------------------------------------------
    def peer_links(self) -> dict[int, tuple[bool, int]]:
        """Per peer the transport has a link to: (connected, messages its full queue dropped)."""
        links = getattr(self.transport, "peer_links", None)
        return links() if links is not None else {}

    def not_ready(self) -> str | None:
        """Why this node should not get client traffic now (a readiness probe), or None."""
        st = self.replica.raw.status()
        if self._stopped.is_set():
            return "stopping"
        if st.lead == NONE:
            return "no leader known"
        if self.replica.applier.backend_down:
            return "the backend is unavailable or being rebuilt"
        if st.commit - st.applied > READY_LAG:
            return f"applying: {st.commit - st.applied} committed entries not yet applied"
        return None

    def metrics(self) -> dict:
        """Counters and gauges, offered to `raftcache_metrics` plugins to read or extend."""
        replica = self.replica
        st = replica.raw.status()
        m = {"node": self.id, "term": st.term, "role": st.role.name.lower(),
             "leader": st.lead, "commit": st.commit, "applied": st.applied,
             "log_first_index": st.first_index, "log_last_index": st.last_index,
             "pending_writes": len(replica.writes), "pending_reads": len(replica.reads.waiting),
             "keys": len(replica.sm), "dropped_peer_messages": replica.dropped_peer_messages,
             "refused_snapshots": st.refused_snapshots,
             "backend_down": int(replica.applier.backend_down)}
        self._notify("raftcache_metrics", metrics=m)
        return m

    def status(self) -> api.NodeStatus:
        st = self.replica.raw.status()
        placed, config = self.addresses.placed, self.config
        return api.NodeStatus(
            id=self.id, address=config.node.address, role=st.role.name.lower(),
            term=st.term, commit=st.commit, applied=st.applied, leader=st.lead,
            leader_address=self.addresses.client_addresses.get(st.lead, ""),
            voters=sorted(st.conf.voters), learners=sorted(st.conf.learners),
            peer_addresses={n: placed[n] for n in sorted(st.conf.all_nodes()) if n in placed},
            joined=sorted(self.replica.sm.joined),
            metrics_url=(f"{'https' if config.metrics.tls_server_config else 'http'}://"
                         f"{config.node.metrics_address}/metrics"
                         if config.node.metrics_address else None),
            cluster_time_ms=self.replica.stamp() if self.replica.knows_cluster_time() else None,
        )


class _NodeLog(logging.LoggerAdapter):
    """Every line says which node, in which term, in which role."""

    def __init__(self, logger, node: Node):
        super().__init__(logger, {})
        self.node = node

    def process(self, msg, kwargs):
        replica = getattr(self.node, "replica", None)
        raw = getattr(replica, "raw", None)
        if raw is None:
            where = "starting"
        else:
            st = raw.status()
            where = f"term {st.term} {st.role.name.lower()}"
        kwargs.setdefault("extra", {})["node"] = self.node.id
        return f"[{where}] {msg}", kwargs


def collect_less() -> None:
    """Tune the garbage collector of a process that hosts one node, once it has started
    (`raftcache serve`; not a process that starts many, such as a test run: what it freezes
    is never collected).

    What start-up made (modules, the plugins, the loaded log) lives as long as the process:
    frozen out of the collector's sight, a full collection no longer walks it. A flood of
    connections made garbage enough for several full collections, and each walked all of it:
    tens of milliseconds of stalled event loop, hundreds under load. Full collections also
    run a tenth as often (young cycles are still collected at Python's pace): one during a
    flood still cost a leader its leadership under load.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def _holds_nothing(st) -> bool:
    """Whether a replica's status says it holds no Raft state at all (a new node)."""
    return st.term == 0 and st.last_index == 0


def _tls(section) -> TLSConfig | None:
    if section is None:
        return None
    return TLSConfig(section.ca, section.cert, section.key)
