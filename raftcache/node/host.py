"""The gevent node: drives the pure Raft core with real time, storage, network and clients
(docs/architecture.md follows a write and a read through it).

One driver greenlet owns the Ready loop and carries out each Ready in the order the core needs:
persist (in the threadpool, so fsync never blocks the hub; everything that queued up meanwhile
goes into the next save: group commit), then send, then apply, then advance. Ticks come from a
monotonic clock: after a stall (SIGSTOP, a long GC) the node catches up on every missed tick
before it serves anything, so check-quorum and leases see the real elapsed time.

Client requests become futures: a write resolves when its entry (same index *and* term) is
applied; a read when the read index is confirmed and applied. Every wait has a deadline. A write
whose fate is unknown is reported as OutcomeUnknown, never as a failure.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import random
import time

import attrs
import gevent
import gevent.event
from gevent.hub import get_hub

from raftcache.core import api
from raftcache.core.cache import commands
from raftcache.core.cache.statemachine import (
    ApplyError,
    StateMachine,
    ValueCodecError,
    check_snapshot,
    decode_value,
    encode_value,
)
from raftcache.core.operations import OPERATIONS, BadRequest, batch, key
from raftcache.core.raft import PersistedState, RaftConfig, RawNode, ReadOnlyOption
from raftcache.core.raft.messages import (
    NONE,
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    EntryType,
    HardState,
    NotLeader,
    ProposalRefused,
    StateRole,
    address_problem,
)
from raftcache.core.raft.validate import peer_message_problem
from raftcache.node.backend import make_backend
from raftcache.node.config import Config, read_secret
from raftcache.node.metrics import NodeMetrics
from raftcache.pluginapi import (
    BackendLost,
    BackendUnavailable,
    NodeContext,
    TLSConfig,
    Unauthorized,
)
from raftcache.pluginapi.manager import PluginError, PluginSet, make_manager, notify
from raftcache.pluginapi.throttle import Throttle

log = logging.getLogger("raftcache.node")

_CHANGES = {"add-voter": ConfChangeType.ADD_VOTER, "add-learner": ConfChangeType.ADD_LEARNER,
            "remove": ConfChangeType.REMOVE_NODE, "update-address": ConfChangeType.UPDATE_ADDRESS}
# Room a peer frame needs besides the one entry an append may carry (message fields, framing).
FRAME_HEADROOM = 64 << 10
BACKUP_PART = 1 << 20  # bytes of a backup per call: well within a frame
READY_LAG = 1000  # committed entries a ready node may still have to apply
MAX_CLIENT_ID = 128  # characters; the Python client sends 32 random hex digits and a counter


class _Pending:
    """A client request waiting on the log: a write for its entry (proposed in `term`), a read
    for its read index (asked in `term`, of `leader`)."""

    __slots__ = ("term", "leader", "result")

    def __init__(self, term: int, leader: int = NONE):
        self.term = term
        self.leader = leader
        self.result = gevent.event.AsyncResult()


class Node:
    def __init__(self, config: Config, pm=None, rng: random.Random | None = None,
                 core: type[RawNode] = RawNode):
        """`pm`: the plugin manager (default: every entry-point plugin not blocked);
        `core`: the Raft core class (tests hand a deliberately broken one here)."""
        self.config = config
        self.id = config.node.id
        self.clock = time.time  # wall-clock seconds: what stamps writes (tests skew it)
        # Where this node reaches each peer, and what clients are told of each node: made
        # from cluster.peers, the members' addresses the log carries, and the local overrides
        # (`_sync_peers`).
        self.peers = {**config.peer_addresses(), **config.dial_addresses()}
        self.client_addresses = config.client_addresses()
        self._discovered: dict[int, str] = {}  # a joining node: what its join endpoints said
        self.pm = pm or make_manager(block=config.plugins.block)
        plugins = PluginSet(self.pm)
        self.log = _NodeLog(log, self)
        storage_p = self._provider(plugins, "storage", config.storage.plugin)
        transport_p = self._provider(plugins, "transport", config.transport.plugin)
        data_dir = os.path.join(config.node.data_dir)
        self.storage = storage_p.factory(self.id, data_dir, dict(config.storage.options))
        self.tls = _tls(config.transport.tls)
        secret = (read_secret(config.cluster.secret_file, config)
                  if config.cluster.secret_file else None)
        # Peers of another cluster (a mistyped address) get their connections closed; with a
        # secret, a peer proves it holds it before its Raft messages count; a client frame
        # too big for any acceptable write is answered before it is read.
        transport_options = {**config.transport.options, "cluster_id": config.cluster.id,
                             "peer_secret": secret,
                             "max_request_bytes": config.node.max_request_bytes}
        self.transport = transport_p.server(self.id, config.node.address, self.peers, self.tls,
                                            transport_options)
        self._check_request_limit(getattr(self.transport, "max_frame", None))
        self._connect = transport_p.connect
        # Where values are stored as they were written, without sealing (`encrypt_values =
        # false`: farms that applications read directly); value codecs ask the backend per key.
        self.plaintext_routes: list[str] = []
        backend = make_backend(plugins, config.backend.plugin, self.id,
                               dict(config.backend.options), plaintext=self.plaintext_routes)
        self.context = self._context()
        # Value codecs (encryption, compression) in plugin registration order: pluggy calls
        # the last registered plugin first.
        self.codecs = tuple(c for codecs in reversed(self.pm.hook.raftcache_value_codecs(node=self.context))
                            for c in (codecs or ()))
        # Every replica decides each write from the entry and the replicated settings alone.
        self.sm = StateMachine(backend, check_command=self.pm.hook.raftcache_check_command,
                               codecs=self.codecs)
        # Reads look at the state machine only between apply batches (a backend call yields
        # to other greenlets): `_settled` is clear while a batch is half applied, and
        # `_applies` counts batches so that a read that overlapped one is read again.
        self._settled = gevent.event.Event()
        self._settled.set()
        self._applies = 0
        self.backend_down = False
        self._backend_lost = False  # a read found the backend lost its data
        self._backend_log = Throttle(self.log)
        self._wakeup = gevent.event.Event()
        self._stopped = gevent.event.Event()
        self._bootstrapped = False  # it founds a cluster now: no Raft state before
        self.raw = self._start_raft(core, rng or random.Random(), self._open_backend(backend))
        self._sync_peers()  # the members' addresses its snapshot recorded
        self._writes: dict[int, _Pending] = {}  # log index -> waiting write
        self._reads: dict[bytes, _Pending] = {}  # read context -> waiting read
        self._read_ids = itertools.count(1)
        self._confirmed_reads: list = []  # (read index, pending) waiting for apply
        self._greenlets: list[gevent.Greenlet] = []
        self._last_stamp = 0
        self._last_tick = time.monotonic()
        self._sweep_index = 0  # the pending sweep's log index: one at a time
        self._role = (NONE, StateRole.FOLLOWER)
        self._proxy_conns: dict[str, object] = {}
        # (the configuration and peers it was made from, members)
        self._members = (None, None, frozenset())
        self.dropped_peer_messages = 0
        self._drop_log = Throttle(self.log)
        self.stats = NodeMetrics(self)  # Prometheus: node.metrics_address serves them
        self._backups_wanted: list = []  # AsyncResults waiting for a backup image
        self._backup: api.SnapshotPart | None = None  # the newest, with the whole image
        self._metrics_server = None

    # -- start-up ----------------------------------------------------------------------------------
    def _context(self) -> NodeContext:
        """What hooks are handed: this node as the plugin API describes it."""

        def read_settled(keys):
            found = self._read_local(keys)
            if isinstance(found, api.Response):  # the backend is down or catching up
                raise BackendUnavailable(found.reason)
            return found

        def stores_plaintext(key: bytes) -> bool:
            asks = getattr(self.sm.backend, "stores_plaintext", None)
            return bool(asks is not None and asks(key))

        return NodeContext(
            id=self.id, config=self.config, log=self.log,
            plaintext_routes=tuple(self.plaintext_routes), now_ms=self._stamp,
            settings=lambda: self.sm.settings, read_settled=read_settled,
            keys_at=lambda position, count: self.sm.keys_at(position, count),
            key_count=lambda: len(self.sm), stores_plaintext=stores_plaintext,
            codecs=lambda: self.codecs, status=self.status)

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

    def _raft_config(self) -> RaftConfig:
        r = self.config.raft
        return RaftConfig(
            id=self.id, election_tick=r.election_tick, heartbeat_tick=r.heartbeat_tick,
            pre_vote=r.pre_vote, check_quorum=r.check_quorum,
            read_only=ReadOnlyOption.LEASE if r.read_only == "lease" else ReadOnlyOption.READ_INDEX,
            lease_margin_ticks=r.lease_margin_ticks, max_inflight=r.max_inflight,
            check_snapshot=check_snapshot,
        )

    def _open_backend(self, backend, timeout: float = 30.0) -> int | None:
        """What the backend says it holds (`Backend.open`), waiting for its server a while."""
        owner = f"cluster {self.config.cluster.id} node {self.id}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                return backend.open(owner)
            except BackendUnavailable as exc:
                if time.monotonic() >= deadline:
                    raise self.config.fail("backend", f"unreachable for {timeout:.0f} s: "
                                           f"{exc}") from None
                self._backend_log.warning("open", "backend unreachable (%s); retrying", exc)
                gevent.sleep(0.5)

    def _start_raft(self, core: type[RawNode], rng: random.Random,
                    backend_index: int | None) -> RawNode:
        hard_state, snapshot, entries = self.storage.load()
        last = entries[-1].index if entries else snapshot.meta.index if snapshot else 0
        if backend_index is not None and backend_index > last:
            # It holds entries this node never persisted: not ours to trust.
            self.log.warning("the backend says it holds entries up to %d, beyond this node's "
                             "log (%d): reloading it", backend_index, last)
            backend_index = None
        self._retry_backend(lambda: self.sm.restore(snapshot.data if snapshot else b"",
                                                    backend_index))
        if hard_state == HardState() and snapshot is None and not entries:
            if self.config.cluster.join:
                self.log.info("new node: waiting to be added to the cluster at %s "
                              "(raftcache member add %d %s)", ",".join(self.config.cluster.join),
                              self.id, self.config.node.address)
                return core(self._raft_config(), rng)
            peers = self.config.peer_addresses()
            self._bootstrapped = True
            self.log.info("new node: bootstrapping cluster of %s", sorted(peers))
            return core.bootstrap(self._raft_config(), rng, peers)
        self.log.info("restarting at term %d, commit %d, %d entries", hard_state.term,
                      hard_state.commit, len(entries))
        return core(self._raft_config(), rng, PersistedState(hard_state, snapshot,
                                                             tuple(entries)))

    def start(self) -> None:
        if self.config.cluster.insecure:
            self.log.warning("cluster.insecure = true: Raft messages are accepted from anyone "
                             "who can reach %s, without proof that they come from a node of "
                             "this cluster", self.config.node.address)
        if self.config.cluster.join and not self._ask_join_endpoints():
            self._greenlets.append(gevent.spawn(self._keep_asking_join_endpoints))
        elif self._bootstrapped:
            self._check_fellow_founders()
        self.transport.serve(self)
        if self.config.node.metrics_address:
            self._metrics_server = self.stats.serve(self.config.node.metrics_address)
        self._greenlets += [gevent.spawn(self._drive), gevent.spawn(self._ticker)]
        self.log.info("serving on %s (storage %s, transport %s, backend %s)",
                      self.config.node.address, self.config.storage.plugin,
                      self.config.transport.plugin, self.config.backend.plugin)
        notify(self.pm, "raftcache_node_started", self.log, node=self.context)

    def _member_status(self, endpoint: str) -> api.NodeStatus | None:
        """A member's `status` answer, or None when it does not answer."""
        try:
            conn = self._connect(endpoint, self.tls, 2.0)
            try:
                return conn.call(api.Request(op="status"), 2.0).status
            finally:
                conn.close()
        except (OSError, TimeoutError) as exc:
            self.log.info("member %s: %s", endpoint, exc)
            return None

    def _refuse_if_joined(self, status: api.NodeStatus, endpoint: str, key: str,
                          rejoin: str) -> None:
        """A node with no Raft state that the cluster counts as joined lost its data: it
        could vote twice in a term it voted in before. Refused (ConfigError)."""
        if self.id in (status.joined or ()):
            raise self.config.fail(
                key, f"node {self.id} is already a member of the cluster at {endpoint}, but "
                f"its data directory {self.config.node.data_dir} holds no Raft state: it may "
                "have voted before its data was lost, and could vote twice. Remove it first "
                f"(raftcache member remove {self.id}), then {rejoin} and add it (raftcache "
                f"member add {self.id} {self.config.node.address})")

    def _ask_join_endpoints(self) -> bool:
        """Learn where the members are from the first join endpoint that answers, so that
        the leader's first messages can be answered; whether one did. Refuses to start a
        node with no Raft state that the cluster counts as joined."""
        st = self.raw.status()
        fresh = st.term == 0 and st.last_index == 0
        for endpoint in self.config.cluster.join:
            status = self._member_status(endpoint)
            if status is None:
                continue
            if fresh:
                self._refuse_if_joined(status, endpoint, "cluster.join", "start it again")
            self._discovered = {int(k): v for k, v in (status.peer_addresses or {}).items()
                                if int(k) != self.id}
            self._sync_peers()
            return True
        return False

    def _check_fellow_founders(self) -> None:
        """A founder that just bootstrapped asks the others whether it joined long ago (its
        disk was lost). None answering is a cluster's first start: nothing to check."""
        for node_id, endpoint in sorted(self.config.client_addresses().items()):
            status = None if node_id == self.id else self._member_status(endpoint)
            if status is not None:
                self._refuse_if_joined(
                    status, endpoint, "cluster.peers",
                    "start it with a join config (raftcache up writes DATA_DIR/join.toml: "
                    f"raftcache serve --config join.toml --id {self.id} --address "
                    f"{self.config.node.address} --data-dir DIR)")

    def _keep_asking_join_endpoints(self) -> None:
        while not self._ask_join_endpoints():
            self.log.warning("no join endpoint answered (%s); retrying",
                             ",".join(self.config.cluster.join))
            gevent.sleep(1.0)

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self.log.info("stopping")
        notify(self.pm, "raftcache_node_stopping", self.log, node=self.context)
        self._stopped.set()
        self._wakeup.set()
        if self._metrics_server is not None:
            self._metrics_server.stop(timeout=1)
        gevent.killall(self._greenlets, timeout=2)
        # A proposed write may still commit through the other nodes: its fate is unknown.
        for pending in self._writes.values():
            pending.result.set(api.error("OutcomeUnknown", "node is shutting down; "
                                         "the write may still apply"))
        for pending in self._reads.values():
            pending.result.set(api.error("Unavailable", "node is shutting down"))
        self.transport.close()
        self.storage.close()
        self.sm.backend.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # -- time ----------------------------------------------------------------------------------------
    def _ticker(self) -> None:
        tick_s = self.config.raft.tick_ms / 1000.0
        next_sweep = next_metrics = next_joined = time.monotonic()
        while not self._stopped.is_set():
            gevent.sleep(tick_s)
            self._advance_clock()
            if time.monotonic() >= next_joined:
                next_joined = time.monotonic() + 0.1
                self._mark_joined()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + 1.0
                self._maybe_sweep()
                if time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + 10.0
                    self.metrics()

    def _mark_joined(self) -> None:
        """The leader records through the log which members have joined: they acknowledged
        entries, so they hold the log and may have voted. One of them that comes back with
        no Raft state (a lost disk) is refused at start instead of voting twice."""
        st = self.raw.status()
        if st.role != StateRole.LEADER or st.conf.joint:
            return
        new = sorted(n for n, match in self.raw.matched().items()
                     if match > 0 and n not in self.sm.joined and n in st.conf.all_nodes())
        if not new:
            return
        try:
            self.raw.propose_conf_change([ConfChangeSingle(ConfChangeType.JOINED, n)
                                          for n in new])
        except (ProposalRefused, NotLeader):
            return  # another change is under way: the next check tries again
        self._wakeup.set()

    def _maybe_sweep(self) -> None:
        """The leader reclaims expired keys through the log, so every replica agrees."""
        st = self.raw.status()
        if st.role != StateRole.LEADER or self._sweep_index > st.applied:
            return
        stamp = self._stamp()
        if not self.sm.expired_keys_due(stamp):
            return
        envelope = commands.Envelope(command=commands.Sweep(stamp), stamp_ms=stamp)
        try:
            _term, self._sweep_index = self.raw.propose(commands.encode_envelope(envelope))
        except ProposalRefused:
            return
        self._wakeup.set()

    def _advance_clock(self) -> None:
        """Tick once for every tick period that passed, however late we got to run."""
        tick_s = self.config.raft.tick_ms / 1000.0
        missed = int((time.monotonic() - self._last_tick) / tick_s)
        if missed > 0:
            self._last_tick += missed * tick_s
            for _ in range(missed):
                self.raw.tick()
            self._wakeup.set()

    # -- the Ready loop -----------------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            self._drive_loop()
        except gevent.GreenletExit:
            raise
        except BaseException:
            # Storage failed (or a bug): we can no longer promise durability. Crash like a
            # kill -9, which Raft tolerates, rather than linger as a zombie that serves nothing.
            self.log.critical("driver loop failed; exiting", exc_info=True)
            logging.shutdown()
            os._exit(70)

    def _drive_loop(self) -> None:
        threadpool = get_hub().threadpool
        while not self._stopped.is_set():
            self._wakeup.wait()
            self._wakeup.clear()
            if self._backend_lost:  # a read found it: rebuild now, not at the next write
                self._backend_lost = False
                self._settled.clear()
                self._retry_backend(lambda: None, rebuild=True)
                self._settle()
            while self.raw.has_ready() and not self._stopped.is_set():
                rd = self.raw.ready()
                if rd.early_messages:  # the core says these need not wait for the disk
                    self.transport.send(rd.early_messages)
                if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                    args = (rd.hard_state, rd.entries, rd.snapshot, rd.must_sync)
                    if not rd.must_sync:
                        self.storage.save(*args)
                    else:
                        started = time.monotonic()
                        if getattr(self.storage, "blocking", True):
                            threadpool.apply(self.storage.save, args)  # fsync: off the hub
                        else:
                            if rd.early_messages:
                                gevent.sleep(0)  # the peer links send them before the hub stops
                            self.storage.save(*args)
                        self.stats.sync_seconds.observe(time.monotonic() - started)
                if rd.messages:
                    self.transport.send(rd.messages)
                if rd.snapshot is not None:
                    self._settled.clear()
                    self._retry_backend(functools.partial(self.sm.restore, rd.snapshot.data))
                    self._settle()
                    self._sync_peers()
                    self.log.info("installed the leader's snapshot at index %d",
                                  rd.snapshot.meta.index)
                    self.stats.snapshots_installed.inc()
                    self.stats.snapshot_bytes = len(rd.snapshot.data)
                    notify(self.pm, "raftcache_snapshot_installed", self.log, node=self.context,
                           index=rd.snapshot.meta.index)
                if rd.committed_entries:
                    self._apply(rd.committed_entries)
                self.raw.advance(rd)
                if rd.soft_state is not None:
                    self._role_changed()
                    self._fail_reads("leadership changed while confirming the read; retry")
                for rs in rd.read_states:
                    pending = self._reads.pop(rs.context, None)
                    if pending is not None:
                        self._confirmed_reads.append((rs.index, pending))
                self._serve_confirmed_reads()
                self._maybe_snapshot(threadpool)
            if self._backups_wanted:
                self._take_backups()

    def _apply(self, entries) -> None:
        """Apply a batch of committed entries, then hand their changes to the backend at once;
        the writers learn their results only once the backend holds them."""
        self._settled.clear()
        answers = []
        members = self.sm.members.copy()
        for entry in entries:
            result = None
            if entry.type == EntryType.NORMAL and entry.data:
                result = self._retry_backend(functools.partial(self.sm.stage, entry.index,
                                                               entry.data))
            elif entry.type == EntryType.CONF_CHANGE:
                self._record_members(entry)
            pending = self._writes.pop(entry.index, None)
            if pending is None:
                continue
            if pending.term != entry.term:
                # Another leader's entry took our index: ours was never committed, never will.
                result = api.error("Unavailable",
                                   "leadership changed before the write committed; not applied")
            answers.append((pending, result))
        self._retry_backend(self.sm.flush)
        self._settle()
        if self.sm.members != members:
            self._sync_peers()
        for pending, result in answers:
            pending.result.set(result)

    def _record_members(self, entry) -> None:
        """The addresses a committed membership change carries, into the state machine
        (undecodable: skipped, as the core skips it, the same on every replica)."""
        try:
            self.sm.record_members(ConfChange.decode(entry.data))
        except ValueError:
            pass

    def _sync_peers(self) -> None:
        """Reach each member where the newest membership change that carried its address
        put it (else where cluster.peers or the join endpoints said), unless cluster.dial
        routes it elsewhere; tell the transport what moved."""
        where = {**self._discovered, **self.config.peer_addresses(), **self.sm.members}
        peers = {**where, **self.config.dial_addresses(), self.id: self.config.node.address}
        set_peer = getattr(self.transport, "set_peer", None)
        for node_id in sorted(set(peers) | set(self.peers)):
            address = peers.get(node_id)
            if address == self.peers.get(node_id):
                continue
            self.log.info("peer %d is at %s", node_id, address or "(no address: removed)")
            if set_peer is not None and node_id != self.id:
                set_peer(node_id, address)
        self.peers = peers
        overrides = {int(k): v for k, v in self.config.cluster.client_addresses.items()}
        self.client_addresses = {**where, **overrides, self.id: self.config.node.address}

    def _settle(self) -> None:
        self._applies += 1
        self._settled.set()

    def _retry_backend(self, step, rebuild: bool = False):
        """`step()` (a state machine call that reaches the backend), retried until it goes
        through, and its result. While the backend's server is down the node serves no reads
        and applies nothing more (it keeps its log; the others carry on); when the backend
        lost its data (BackendLost) the node rebuilds it from its snapshot and log first."""
        delay = 0.05
        # Fixed once: a rebuild cut short has moved the state machine back part of the way.
        target = self.sm.applied_index
        while True:
            try:
                if rebuild:
                    self._rebuild_backend(target)
                    rebuild = False
                result = step()
            except BackendUnavailable as exc:
                if self._stopped.is_set():
                    raise gevent.GreenletExit from None
                if not self.backend_down:
                    self.log.error("backend unavailable (%s): not serving reads, retrying", exc)
                    self.backend_down = True
                    self._fail_all_reads("this node's backend is unavailable; try another node")
                gevent.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            except BackendLost as exc:
                self.log.warning("the backend lost its data (%s): rebuilding it from the "
                                 "snapshot and the log", exc)
                self.backend_down = rebuild = True
                target = max(target, self.sm.applied_index)
                continue
            if self.backend_down:
                self.log.info("backend available again at applied index %d",
                              self.sm.applied_index)
                self.backend_down = False
            return result

    def _rebuild_backend(self, applied: int) -> None:
        """Load the newest snapshot into the backend and apply the log since, up to `applied`
        (raises what the backend raises; the caller retries from scratch)."""
        snapshot = self.raw.snapshot
        start = snapshot.meta.index if snapshot is not None else 0
        self.sm.restore(snapshot.data if snapshot is not None else b"")
        entries = (self.raw.raft_log.slice(start + 1, applied + 1, 1 << 62, 1 << 62)
                   if applied > start else [])
        for n, entry in enumerate(entries, 1):
            if entry.type == EntryType.NORMAL and entry.data:
                self.sm.stage(entry.index, entry.data)
            elif entry.type == EntryType.CONF_CHANGE:
                self._record_members(entry)
            if n % 512 == 0:
                self.sm.flush()
        self.sm.flush()
        self.log.info("backend rebuilt up to index %d (%d entries after the snapshot at %d)",
                      applied, len(entries), start)

    def _fail_all_reads(self, reason: str) -> None:
        """Answer every waiting read Unavailable now: this node cannot serve them for a while,
        and the client has time left to ask another."""
        waiting = list(self._reads.values()) + [p for _, p in self._confirmed_reads]
        self._reads.clear()
        self._confirmed_reads = []
        for pending in waiting:
            pending.result.set(api.error("Unavailable", reason))

    def _fail_reads(self, reason: str) -> None:
        # Read requests issued under another leader may never be answered by the core; reads
        # are idempotent, so tell those clients to retry at once rather than time out.
        st = self.raw.status()
        for ctx, pending in list(self._reads.items()):
            if (pending.term, pending.leader) != (st.term, st.lead):
                del self._reads[ctx]
                pending.result.set(api.error("Unavailable", reason))

    def _serve_confirmed_reads(self) -> None:
        if not self._confirmed_reads:
            return
        applied = self.raw.status().applied
        still = []
        for index, pending in self._confirmed_reads:
            if index <= applied:
                pending.result.set(index)
            else:
                still.append((index, pending))
        self._confirmed_reads = still

    def _maybe_snapshot(self, threadpool) -> None:
        r = self.config.raft
        st = self.raw.status()
        if st.applied - (st.first_index - 1) < r.snapshot_entries:
            return
        started = time.monotonic()
        try:
            image = self.sm.snapshot()  # the values come from the backend
        except (BackendUnavailable, BackendLost) as exc:
            self._backend_log.warning("snapshot", "no snapshot for now: %s", exc)
            return  # the next Ready tries again
        snap = self.raw.compact(image, keep_entries=r.snapshot_keep_entries)
        threadpool.apply(self.storage.compact, (snap,))
        self.stats.snapshot_seconds.observe(time.monotonic() - started)
        self.stats.snapshot_bytes = len(image)
        notify(self.pm, "raftcache_snapshot_taken", self.log, node=self.context,
               index=snap.meta.index, size=len(snap.data))

    def _role_changed(self) -> None:
        st = self.raw.status()
        role = (st.lead, st.role)
        if role == self._role:
            return
        previous, self._role = self._role, role
        if st.role == StateRole.CANDIDATE and previous[1] != StateRole.CANDIDATE:
            self.stats.elections.inc()
        if st.lead not in (NONE, previous[0]) and previous[0] != NONE:
            self.stats.leader_changes.inc()
        # A node that cannot reach a quorum flips between pre-candidate and leaderless
        # follower every election timeout: that is worth a line only when a leader is
        # gained or lost, or someone campaigns for real.
        quiet = (st.lead == NONE and previous[0] == NONE
                 and st.role in (StateRole.PRE_CANDIDATE, StateRole.FOLLOWER))
        self.log.log(logging.DEBUG if quiet else logging.INFO, "term %d: %s, leader %s",
                     st.term, st.role.name.lower(), st.lead or "unknown")
        notify(self.pm, "raftcache_role_changed", self.log, node=self.context,
               role=st.role.name.lower(), term=st.term, leader=st.lead)

    # -- the transport's callbacks -------------------------------------------------------------------
    def handle_peer_messages(self, messages, sender: int | None = None) -> None:
        if sender is None and not self.config.cluster.insecure:
            self._drop(len(messages), "unauthenticated",
                       "from a connection that did not prove it is a peer")
            return
        members = self._peer_members()
        stepped = False
        for m in messages:
            if sender is not None and m.frm != sender:
                problem = f"claims to come from node {m.frm} on node {sender}'s connection"
            else:
                problem = peer_message_problem(m, self.id, members)
            if problem is not None:
                self._drop(1, sender, f"{m.type.name} {problem}")
                continue
            self.raw.step(m)
            stepped = True
        if stepped:
            self._wakeup.set()

    def peer_lost(self, peer: int) -> None:
        """A connection that carried Raft messages from `peer` ended: if it was our leader,
        the core campaigns within a few ticks instead of an election timeout."""
        if not self._stopped.is_set():
            self.raw.peer_lost(peer)
            self._wakeup.set()

    def _peer_members(self) -> frozenset:
        """The nodes that may send us Raft messages: known peers and every node of the
        current configuration (made again only when either changes)."""
        conf = self.raw.status().conf
        if self._members[0] is not conf or self._members[1] is not self.peers:
            self._members = (conf, self.peers, frozenset(self.peers) | conf.all_nodes())
        return self._members[2]

    def _drop(self, count: int, sender, what: str) -> None:
        self.dropped_peer_messages += count
        self._drop_log.warning(sender, "dropped a Raft message (peer %s): %s", sender, what)

    def handle_request(self, request: api.Request,
                       certificate: str | None = None) -> api.Response:
        started = time.monotonic()
        response = self._handle(request, certificate)
        self.stats.request(request.op, response.error, time.monotonic() - started)
        return response

    def _handle(self, request: api.Request, certificate: str | None) -> api.Response:
        op = OPERATIONS.get(request.op)
        try:
            if op is None:
                raise BadRequest(f"unknown operation {request.op!r}")
            op.check_sizes(request, self.config.node)
            if op.name == "status":  # open to all: it is the health check
                return self._status(request)
            caller = self._authenticate(request, certificate)
            request = _with_certificate(request, certificate)  # what a forward carries
            if op.kind == "write":
                return self._write(op, request, caller)
            if op.kind == "read":
                return self._read(request, caller)
            self._authorize(op.name, (), caller)
            return getattr(self, "_" + op.name)(request, caller)  # transfer, members, admin
        except (BadRequest, commands.CommandError) as exc:
            return api.error("InvalidRequest", str(exc))
        except Unauthorized as exc:
            return api.error("Unauthorized", str(exc))
        except Exception:
            self.log.exception("request %r failed", request.op)
            return api.error("Unavailable", "internal error; see the node's log")

    def _timeout(self, request) -> float:
        header = request.header
        if header is not None and header.timeout_ms:
            return min(max(header.timeout_ms, 1), 60_000) / 1000.0
        return self.config.node.request_timeout_ms / 1000.0

    def _not_leader(self, leader: int, request):
        forwarded = request.header is not None and request.header.forwarded
        if self.config.node.proxy and leader in self.peers and not forwarded:
            return self._forward(self.peers[leader], request)
        return api.error("NotLeader", "not the leader",
                                   self.client_addresses.get(leader, ""))

    def _forward(self, address: str, request: api.Request) -> api.Response:
        # One hop only: stale hints must not bounce it around.
        request = attrs.evolve(request, header=attrs.evolve(request.header or api.RequestHeader(),
                                                            forwarded=True))
        conn = self._proxy_conns.pop(address, None) or self._connect(address, self.tls,
                                                                     self._timeout(request))
        try:
            response = conn.call(request, self._timeout(request))
        except (OSError, TimeoutError):
            conn.close()
            if OPERATIONS[request.op].mutates:
                return api.error("OutcomeUnknown", "forwarding to the leader failed")
            return api.error("Unavailable", "forwarding to the leader failed")
        self._proxy_conns[address] = conn
        return response

    def _authenticate(self, request: api.Request, certificate: str | None):
        """The verified caller of `request` (None: anonymous); raises Unauthorized."""
        token = request.header.token if request.header is not None else None
        return self.pm.hook.raftcache_authenticate(node=self.context, token=token,
                                                   certificate=certificate)

    def _authorize(self, op: str, keys, caller) -> None:
        """Raise Unauthorized unless the access plugins allow `op` on `keys` here and now."""
        reason = self.pm.hook.raftcache_check_request(
            node=self.context, op=op, keys=keys, caller=caller, stamp_ms=self._stamp(),
            settings=self.sm.settings)
        if reason:
            raise Unauthorized(reason)

    def _stamp(self) -> int:
        # The leader's clock, never going backwards: every replica judges expiry by it.
        self._last_stamp = max(int(self.clock() * 1000), self._last_stamp, self.sm.last_stamp_ms)
        return self._last_stamp

    def _encode(self, key: bytes, value: bytes) -> bytes:
        return encode_value(self.codecs, key, value)

    def _decode(self, key: bytes, found):
        if found is None or not self.codecs:
            return found
        value, version = found
        return decode_value(self.codecs, key, value), version

    def _write(self, op, request: api.Request, caller) -> api.Response:
        command = op.command(request, self._encode, self.config.node.max_batch_keys)
        header = request.header
        client_id, seq = (header.client_id, header.seq) if header else (None, None)
        if client_id is not None and len(client_id) > MAX_CLIENT_ID:
            raise BadRequest(f"client_id is limited to {MAX_CLIENT_ID} characters")
        if seq is not None and seq < 0:
            raise BadRequest("seq must not be negative")
        result = self._propose(command, request, caller, client_id, seq)
        if isinstance(result, api.Response):
            return result
        return api.Response(**op.answer(result))

    def _propose(self, command, request: api.Request, caller, client_id=None, seq=None):
        """Commit `command` on behalf of `caller` and return its applied result, or an error
        Response (NotLeader, a refusal, a timeout)."""
        envelope = commands.Envelope(command=command, client_id=client_id, seq=seq,
                                     identity=caller.subject if caller else None,
                                     stamp_ms=self._stamp(), caller=caller)
        data = commands.encode_envelope(envelope)
        if len(data) > self.config.node.max_request_bytes:
            raise BadRequest(f"the write takes {len(data)} bytes in the log, more than "
                             f"node.max_request_bytes ({self.config.node.max_request_bytes})")
        if len(self._writes) >= self.config.node.max_pending:
            return self._overloaded(len(self._writes), "writes")
        try:
            term, index = self.raw.propose(data)
        except NotLeader as exc:
            return self._not_leader(exc.leader, request)
        except ProposalRefused as exc:
            return api.error("Unavailable", exc.reason)
        result = self._await_write(index, term, request)
        if isinstance(result, ApplyError):
            return api.error(result.kind, result.reason)
        return result

    def _overloaded(self, waiting: int, what: str) -> api.Response:
        # The hint names this node: "come back here after a backoff", not "try another".
        return api.error("Unavailable", f"overloaded: {waiting} {what} are waiting here "
                         f"(node.max_pending); retry after a backoff",
                         self.client_addresses.get(self.id, ""))

    def _await_write(self, index: int, term: int, request):
        """The applied result of our entry (index, term), or an error Response."""
        pending = self._writes[index] = _Pending(term)
        self._wakeup.set()
        try:
            return pending.result.get(timeout=self._timeout(request))
        except gevent.Timeout:
            self._writes.pop(index, None)
            return api.error("OutcomeUnknown", "timed out waiting for the write to "
                             "commit; it may still apply")

    # -- operations ----------------------------------------------------------------------------------
    def _status(self, request: api.Request) -> api.Response:
        return api.Response(status=self.status())

    def _transfer_leader(self, request: api.Request, _caller) -> api.Response:
        target = request.node_id
        if not target:
            raise BadRequest("transfer_leader needs node_id")
        deadline = time.monotonic() + 0.8 * self._timeout(request)  # before the client's
        try:
            self.raw.transfer_leadership(target)
        except NotLeader as exc:
            return self._not_leader(exc.leader, request)
        except ProposalRefused as exc:
            return api.error("InvalidRequest", exc.reason)
        self._wakeup.set()
        while self.raw.status().lead != target:
            if time.monotonic() >= deadline:
                return api.error("Unavailable", f"node {target} did not take over "
                                 "in time; retry")
            gevent.sleep(self.config.raft.tick_ms / 1000.0)
        return api.Response(status=self.status())

    def _change_member(self, request: api.Request, _caller) -> api.Response:
        change, target = request.change, request.node_id
        if change not in _CHANGES or not target or target < 1:
            raise BadRequest(f"change_member needs node_id and a change out of "
                             f"{', '.join(_CHANGES)}")
        address = request.address or ""
        problem = address_problem(address)
        if problem:
            raise BadRequest(f"the node's address: {problem}")
        if change == "update-address" and not address:
            raise BadRequest("update-address needs the node's new address")
        if change != "remove" and not address and target not in self.peers:
            raise BadRequest(f"node {target} has no known address: give the address it "
                             f"listens on (known nodes: "
                             f"{', '.join(map(str, sorted(self.peers)))})")
        # Answer before the client's own deadline, so that it can still try elsewhere.
        deadline = time.monotonic() + 0.8 * self._timeout(request)
        while True:
            st = self.raw.status()
            if st.role != StateRole.LEADER:
                # Only the leader's view counts: a removed node that never heard of its
                # removal still believes it is a voter (and may sit in a joint configuration).
                return self._not_leader(st.lead, request)
            conf = st.conf
            placed = not address or self.peers.get(target) == address
            done = {"add-voter": target in conf.voters and not conf.joint and placed,
                    "add-learner": target in conf.learners and placed,
                    "update-address": placed,
                    "remove": target not in conf.all_nodes()}[change]
            if done:  # the leader's applied configuration, hence committed
                return api.Response(status=self.status())
            kind = _CHANGES[change]
            if change != "remove" and target in (conf.learners if change == "add-learner"
                                                 else conf.voters):
                kind = ConfChangeType.UPDATE_ADDRESS  # a member already: only its address
            cc = ConfChange((ConfChangeSingle(kind, target, address),))
            try:
                if conf.joint:
                    raise ProposalRefused("a configuration change is still being applied")
                term, index = self.raw.propose_conf_change(cc)
            except NotLeader as exc:
                return self._not_leader(exc.leader, request)
            except ProposalRefused as exc:
                # One change at a time: wait for the one in progress (or the joint state) to end.
                if time.monotonic() >= deadline:
                    return api.error("Unavailable", exc.reason)
                self._wakeup.set()
                gevent.sleep(self.config.raft.tick_ms / 1000.0)
                continue
            result = self._await_write(index, term, request)
            if isinstance(result, api.Response) and result.error:
                return result
            # Applied; loop once more to report the settled (non-joint) configuration.

    def _admin(self, request: api.Request, caller) -> api.Response:
        st = self.raw.status()
        if st.role != StateRole.LEADER:  # actions read and change the newest settings
            return self._not_leader(st.lead, request)
        if not request.action:
            raise BadRequest("admin needs an action")
        try:
            outcome = self.pm.hook.raftcache_admin(node=self.context, action=request.action,
                                                   args=list(request.arguments or ()), caller=caller)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if outcome is None:
            raise BadRequest(f"unknown admin action {request.action!r} (no plugin offers it)")
        if isinstance(outcome, dict):
            return api.Response(text=json.dumps(outcome, sort_keys=True))
        command, report = outcome if isinstance(outcome, tuple) else (outcome, {})
        result = self._propose(command, request, caller)
        if isinstance(result, api.Response):
            return result
        return api.Response(text=json.dumps({**report, "result": result}, sort_keys=True))

    def _read(self, request: api.Request, caller) -> api.Response:
        consistency = request.consistency or "linearizable"
        if consistency not in ("linearizable", "lease", "stale"):
            raise BadRequest(f"unknown consistency {consistency!r} "
                             "(use linearizable, lease or stale)")
        if request.op == "get":
            keys = [key(request.key)]
        else:
            keys = [key(k) for k in batch(request.keys, self.config.node.max_batch_keys, "mget")]
        if self.backend_down:
            return api.error("Unavailable", "this node's backend is unavailable; try another node")
        if consistency != "stale":
            refused = self._read_index(request, lease=consistency == "lease")
            if refused is not None:
                return refused
        # After the read index applied: a revocation committed before the read is known here.
        self._authorize(request.op, keys, caller)
        found = self._read_local(keys)
        if isinstance(found, api.Response):
            return found
        try:
            results = [_get_result(self._decode(k, f)) for k, f in zip(keys, found, strict=True)]
        except ValueCodecError as exc:  # altered here, perhaps intact on another node
            self._backend_log.warning("codec", "a stored value cannot be opened: %s", exc)
            return api.error("Unavailable", f"this node cannot open a stored value: {exc}; "
                             "try another node")
        if request.op == "get":
            return api.Response(result=results[0])
        return api.Response(results=results)

    def _read_index(self, request: api.Request, lease: bool = False) -> api.Response | None:
        """Wait until this node, confirmed as the leader, has applied everything committed
        before now (ReadIndex; with `lease`, the leader's lease may stand in for the heartbeat
        round). None once it has; else the answer to give (a redirect, Unavailable)."""
        waiting = len(self._reads) + len(self._confirmed_reads)
        if waiting >= self.config.node.max_pending:
            return self._overloaded(waiting, "reads")
        self._advance_clock()  # after a stall, leases must see the time that passed
        ctx = b"%d:%d" % (self.id, next(self._read_ids))
        try:
            self.raw.read_index(ctx, lease=lease)
        except NotLeader as exc:
            return self._not_leader(exc.leader, request)
        st = self.raw.status()
        pending = self._reads[ctx] = _Pending(st.term, st.lead)
        self._wakeup.set()
        try:
            outcome = pending.result.get(timeout=self._timeout(request))
        except gevent.Timeout:
            self._reads.pop(ctx, None)
            return api.error("Unavailable", "could not confirm a read index in time "
                             "(no quorum?)")
        return outcome if isinstance(outcome, api.Response) else None

    def _snapshot(self, request: api.Request, _caller) -> api.Response:
        """A backup, a part at a time: offset 0 (and no index) takes a new image of the whole
        state on the leader once it has applied everything committed before the call; the
        next calls name its index and read on from an offset."""
        index, offset = request.index or 0, request.offset or 0
        if offset < 0:
            raise BadRequest("offset must not be negative")
        if not index:
            if offset:
                raise BadRequest("a snapshot read from an offset names its index")
            refused = self._read_index(request)
            if refused is not None:
                return refused
            wanted = gevent.event.AsyncResult()
            self._backups_wanted.append(wanted)
            self._wakeup.set()
            try:
                self._backup = wanted.get(timeout=self._timeout(request))
            except gevent.Timeout:
                return api.error("Unavailable", "the snapshot took too long; retry")
            except (BackendUnavailable, BackendLost) as exc:
                return api.error("Unavailable", f"no snapshot now: {exc}")
            index = self._backup.index
        backup = self._backup
        if backup is None or backup.index != index:
            raise BadRequest(f"this node no longer holds the snapshot at index {index}; "
                             "start again from offset 0")
        return api.Response(part=attrs.evolve(backup, offset=offset,
                                               data=backup.data[offset:offset + BACKUP_PART]))

    def _take_backups(self) -> None:
        """Between apply batches, in the driver: the image the waiting backups asked for."""
        wanted, self._backups_wanted = self._backups_wanted, []
        try:
            image = self.sm.snapshot()
        except (BackendUnavailable, BackendLost) as exc:
            for w in wanted:
                w.set_exception(exc)
            return
        st = self.raw.status()
        part = api.SnapshotPart(index=st.applied, term=self.raw.term_at(st.applied) or st.term,
                                size=len(image), sha256=hashlib.sha256(image).hexdigest(),
                                data=image)
        for w in wanted:
            w.set(part)

    def _read_local(self, keys):
        """The state machine's answer for `keys`, taken between apply batches, or an
        Unavailable Response while the backend is down."""
        deadline = time.monotonic() + self.config.node.request_timeout_ms / 1000.0
        while not self.backend_down and time.monotonic() < deadline:
            if not self._settled.wait(timeout=0.05):
                continue  # a batch is being applied (or the backend retried: checked above)
            applies = self._applies
            try:
                found = self.sm.read_many(keys, self._stamp())
            except BackendUnavailable as exc:
                return api.error("Unavailable", f"this node's backend is unavailable: {exc}")
            except BackendLost as exc:
                self._backend_lost = True
                self._wakeup.set()
                return api.error("Unavailable", f"this node's backend lost its data: {exc}")
            if applies == self._applies and self._settled.is_set():
                return found
        return api.error("Unavailable", "this node's backend is unavailable or catching up; "
                         "try another node")

    def peer_links(self) -> dict[int, tuple[bool, int]]:
        """Per peer the transport has a link to: (connected, messages its full queue dropped)."""
        links = getattr(self.transport, "peer_links", None)
        return links() if links is not None else {}

    def not_ready(self) -> str | None:
        """Why this node should not get client traffic now (a readiness probe), or None."""
        st = self.raw.status()
        if self._stopped.is_set():
            return "stopping"
        if st.lead == NONE:
            return "no leader known"
        if self.backend_down:
            return "the backend is unavailable or being rebuilt"
        if st.commit - st.applied > READY_LAG:
            return f"applying: {st.commit - st.applied} committed entries not yet applied"
        return None

    def metrics(self) -> dict:
        """Counters and gauges, offered to `raftcache_metrics` plugins to read or extend."""
        st = self.raw.status()
        m = {"node": self.id, "term": st.term, "role": st.role.name.lower(),
             "leader": st.lead, "commit": st.commit, "applied": st.applied,
             "log_first_index": st.first_index, "log_last_index": st.last_index,
             "pending_writes": len(self._writes), "pending_reads": len(self._reads),
             "keys": len(self.sm), "dropped_peer_messages": self.dropped_peer_messages,
             "refused_snapshots": st.refused_snapshots, "backend_down": int(self.backend_down)}
        notify(self.pm, "raftcache_metrics", self.log, node=self.context, metrics=m)
        return m

    def status(self) -> api.NodeStatus:
        st = self.raw.status()
        return api.NodeStatus(
            id=self.id, address=self.config.node.address, role=st.role.name.lower(),
            term=st.term, commit=st.commit, applied=st.applied, leader=st.lead,
            leader_address=self.client_addresses.get(st.lead, ""),
            voters=sorted(st.conf.voters), learners=sorted(st.conf.learners),
            peer_addresses={n: self.peers[n] for n in sorted(st.conf.all_nodes())
                            if n in self.peers},
            joined=sorted(self.sm.joined),
            metrics_url=(f"http://{self.config.node.metrics_address}/metrics"
                         if self.config.node.metrics_address else None),
        )


class _NodeLog(logging.LoggerAdapter):
    """Every line says which node, in which term, in which role."""

    def __init__(self, logger, node: Node):
        super().__init__(logger, {})
        self.node = node

    def process(self, msg, kwargs):
        raw = getattr(self.node, "raw", None)
        if raw is None:
            where = "starting"
        else:
            st = raw.status()
            where = f"term {st.term} {st.role.name.lower()}"
        kwargs.setdefault("extra", {})["node"] = self.node.id
        return f"[{where}] {msg}", kwargs


def _with_certificate(request: api.Request, certificate: str | None) -> api.Request:
    # The header names the caller's certificate only as the transport vouched for it.
    header = request.header
    if (header.certificate if header is not None else None) == certificate:
        return request
    return attrs.evolve(request, header=attrs.evolve(header or api.RequestHeader(),
                                                     certificate=certificate))


def _tls(section) -> TLSConfig | None:
    if section is None:
        return None
    return TLSConfig(section.ca, section.cert, section.key)


def _get_result(found) -> api.GetResult:
    if found is None:
        return api.GetResult(found=False)
    value, version = found
    return api.GetResult(found=True, value=value, version=version)
