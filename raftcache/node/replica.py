"""A replica: one Raft group on this node, driven by its Ready loop."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable

import gevent
import gevent.event
from gevent.hub import get_hub

from raftcache.core.cache import commands
from raftcache.core.cache.statemachine import StateMachine, check_snapshot
from raftcache.core.raft import PersistedState, RaftConfig, RawNode, ReadOnlyOption
from raftcache.core.raft.messages import (
    NONE,
    ConfChangeSingle,
    ConfChangeType,
    HardState,
    NotLeader,
    ProposalRefused,
    StateRole,
)
from raftcache.core.raft.validate import peer_message_problem
from raftcache.pluginapi import BackendLost, BackendUnavailable
from raftcache.pluginapi.throttle import Throttle

from .addresses import AddressBook
from .applier import Applier
from .backups import Backups
from .config import Config
from .reads import Reads
from .waiting import give_way
from .writes import Writes

# The most that any one node's clock, however wrong, moves cluster time from the time a
# majority of voters' clocks agree on (docs/security.md). A node's own clock counts only
# within CLOCK_TRUST_MS of the agreed time (beyond, the agreed time does); the rest is for the
# agreement's age (a heartbeat, a network delay, a disk sync). A node whose clock is further
# off says so in its log.
MAX_CLOCK_SKEW_MS = 500
CLOCK_TRUST_MS = 250


class Replica:
    """One Raft group: its core (`raw`), its cache state machine (`sm`) and the greenlets
    that drive them. It holds no module- or process-level state, so a host may hold many.

    The Ready loop (`_drive_loop`) is the only greenlet that touches storage, the core's
    Ready and the state machine, and carries out each Ready in the order the core needs:
    early messages, persist (everything that queued up meanwhile goes into the next save:
    group commit), send, install a snapshot, apply, advance; then it releases confirmed
    reads, compacts the log and takes wanted backups. Ticks come from a monotonic clock:
    after a stall (SIGSTOP, a long GC) the replica catches up on every missed tick before it
    serves anything, so check-quorum and leases see the real elapsed time.

    Its parts, each the one owner of its state: `applier` (the state machine and backend,
    the read/apply interlock), `reads` (ReadIndex waiters), `writes` (proposal waiters),
    `backups` (images for `snapshot save`).
    """

    def __init__(self, config: Config, storage, transport, backend, codecs: tuple,
                 check_command, addresses: AddressBook, log, stats,
                 events: Callable[..., None], clock: Callable[[], float],
                 core: type[RawNode] = RawNode, rng: random.Random | None = None):
        self.config = config
        self.id = config.node.id
        self.storage = storage
        self.transport = transport
        self.addresses = addresses
        self.log = log
        self.stats = stats
        self.events = events  # notify observer plugins: events(hook name, **arguments)
        self.clock = clock  # wall-clock seconds: what stamps writes (tests skew it)
        self.wakeup = gevent.event.Event()
        self.stopped = gevent.event.Event()
        self.bootstrapped = False  # it founds a cluster now: no Raft state before
        # Every replica decides each write from the entry and the replicated settings alone.
        # A large invalidate or sweep gives the hub a turn between chunks (reads wait).
        self.sm = StateMachine(backend, check_command=check_command, codecs=codecs,
                               pause=give_way)
        self.applier = Applier(self.sm, log, self.stopped, self.wakeup.set,
                               on_backend_down=lambda why: self.reads.fail_all(why),
                               on_members_changed=lambda: addresses.sync(self.sm.members))
        self.raw = self._start_raft(core, rng or random.Random(), self._open_backend(backend))
        self.applier.raw = self.raw
        addresses.sync(self.sm.members)  # the members' addresses its snapshot recorded
        self.reads = Reads(self.id, self.raw, config.node.max_pending, self.wakeup.set,
                           self.advance_clock)
        self.writes = Writes(self.raw, config.node.max_pending, self.wakeup.set)
        self.backups = Backups(self.applier, self.raw, self.wakeup.set)
        self.dropped_peer_messages = 0
        self._drop_log = Throttle(log)
        self._greenlets: list[gevent.Greenlet] = []
        self._last_stamp = 0
        self._last_tick = time.monotonic()
        self._sweep_index = 0  # the pending sweep's log index: one at a time
        self._rotate_index = 0  # the pending key rotation's (`_maybe_rotate`)
        self._role = (NONE, StateRole.FOLLOWER)
        self._members = (None, None, frozenset())  # (conf, peers it was made from, members)

    # -- start-up ----------------------------------------------------------------------------------
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
                self.applier.backend_log.warning("open", "backend unreachable (%s); "
                                                 "retrying", exc)
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
        self.applier.restore(snapshot.data if snapshot else b"", backend_index)
        if hard_state == HardState() and snapshot is None and not entries:
            if self.config.cluster.join:
                self.log.info("new node: waiting to be added to the cluster at %s "
                              "(raftcache member add %d %s)", ",".join(self.config.cluster.join),
                              self.id, self.config.node.address)
                return core(self._raft_config(), rng)
            peers = self.config.peer_addresses()
            self.bootstrapped = True
            self.log.info("new node: bootstrapping cluster of %s", sorted(peers))
            return core.bootstrap(self._raft_config(), rng, peers)
        self.log.info("restarting at term %d, commit %d, %d entries", hard_state.term,
                      hard_state.commit, len(entries))
        return core(self._raft_config(), rng, PersistedState(hard_state, snapshot,
                                                             tuple(entries)))

    def start(self) -> None:
        self._greenlets += [gevent.spawn(self._drive), gevent.spawn(self._ticker)]

    def stop(self) -> None:
        self.stopped.set()
        self.wakeup.set()
        gevent.killall(self._greenlets, timeout=2)
        self.writes.fail_all()
        self.reads.fail_all("node is shutting down")

    # -- time --------------------------------------------------------------------------------------
    def _ticker(self) -> None:
        tick_s = self.config.raft.tick_ms / 1000.0
        next_sweep = next_joined = time.monotonic()
        while not self.stopped.is_set():
            gevent.sleep(tick_s)
            self.advance_clock()
            if time.monotonic() >= next_joined:
                next_joined = time.monotonic() + 0.1
                self._mark_joined()
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + 1.0
                self._maybe_sweep()
                self._maybe_rotate()
                self._check_skew()

    def advance_clock(self) -> None:
        """Tick once for every tick period that passed, however late we got to run; hand
        the core the wall clock, which it only carries in messages and compares."""
        self.raw.set_clock(int(self.clock() * 1000))
        tick_s = self.config.raft.tick_ms / 1000.0
        missed = int((time.monotonic() - self._last_tick) / tick_s)
        if missed > 0:
            self._last_tick += missed * tick_s
            for _ in range(missed):
                self.raw.tick()
            self.wakeup.set()

    def stamp(self) -> int:
        """The replica's cluster time in ms, by which it stamps writes and judges expiry:
        its own clock while that is within CLOCK_TRUST_MS of the agreed time (the median of
        the voters' clocks on a leader, the leader's agreed time on a follower: the core's
        offset), else the agreed time; never before the newest applied stamp, never going
        backwards. Until an offset is known it stands still: this node's clock alone decides
        nothing (`knows_cluster_time`)."""
        now = int(self.clock() * 1000)
        self.raw.set_clock(now)
        offset = self.raw.clock_offset_ms()
        own = 0
        if offset is not None:
            agreed = now + offset
            own = now if abs(now - agreed) <= CLOCK_TRUST_MS else agreed
        self._last_stamp = max(own, self._last_stamp, self.sm.last_stamp_ms)
        return self._last_stamp

    def knows_cluster_time(self) -> bool:
        """Whether this node has an agreed time (from a quorum, or from a leader) to judge
        by; a node that just started has none until it hears from a leader."""
        return self.raw.clock_offset_ms() is not None

    def clock_skew_ms(self) -> int | None:
        """How far this node's clock is behind (negative: ahead of) cluster time; None
        until an offset is agreed."""
        return self.raw.clock_offset_ms()

    def stale_read_refusal(self) -> str | None:
        """Why this replica may not serve a `stale` read now, or None: it must be a member
        and have been in touch with a leader within `node.max_stale_ms` (a leader: with a
        quorum), so a partitioned or removed replica stops judging by old settings."""
        st = self.raw.status()
        if self.id not in st.conf.all_nodes():
            return "this node is not a member of the cluster; ask another node"
        ticks = self.raw.ticks_since_leader()
        limit = self.config.stale_ms()
        if ticks is None or ticks * self.config.raft.tick_ms > limit:
            return (f"this node has not heard from a leader within node.max_stale_ms "
                    f"({limit} ms); ask another node or read linearizable")
        return None

    def _check_skew(self) -> None:
        skew = self.clock_skew_ms()
        if skew is not None and abs(skew) > MAX_CLOCK_SKEW_MS:
            self._drop_log.warning("clock", "this node's clock is %d ms %s the cluster's agreed "
                                   "time (tolerated: %d ms); cluster time follows the majority",
                                   abs(skew), "behind" if skew > 0 else "ahead of",
                                   MAX_CLOCK_SKEW_MS)

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
        self.wakeup.set()

    def _maybe_sweep(self) -> None:
        """The leader reclaims expired keys through the log, so every replica agrees."""
        st = self.raw.status()
        if st.role != StateRole.LEADER or self._sweep_index > st.applied:
            return
        if not self.knows_cluster_time():
            return  # no agreed time yet: nothing is judged expired by this clock alone
        stamp = self.stamp()
        if not self.sm.expired_keys_due(stamp):
            return
        envelope = commands.Envelope(command=commands.Sweep(stamp), stamp_ms=stamp)
        try:
            _term, self._sweep_index = self.raw.propose(commands.encode_envelope(envelope))
        except ProposalRefused:
            return
        self.wakeup.set()

    def _maybe_rotate(self) -> None:
        """The leader commits the new key a value codec asks for (`rotation`: encryption's
        data key has sealed its budget of random nonces here), one at a time."""
        st = self.raw.status()
        if st.role != StateRole.LEADER or self._rotate_index > st.applied:
            return
        for codec in self.sm.codecs:
            rotation = getattr(codec, "rotation", None)
            command = rotation() if rotation is not None else None
            if command is None:
                continue
            stamp = self.stamp()
            envelope = commands.Envelope(command=command, stamp_ms=stamp)
            try:
                _term, self._rotate_index = self.raw.propose(commands.encode_envelope(envelope))
            except ProposalRefused:
                return
            self.log.info("a value codec's key reached its budget: proposed %s at index %d",
                          command, self._rotate_index)
            self.wakeup.set()
            return

    # -- the Ready loop ----------------------------------------------------------------------------
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
        while not self.stopped.is_set():
            self.wakeup.wait()
            self.wakeup.clear()
            self.applier.rebuild_if_lost()
            while self.raw.has_ready() and not self.stopped.is_set():
                rd = self.raw.ready()
                if rd.early_messages:  # the core says these need not wait for the disk
                    self.transport.send(rd.early_messages)
                if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                    self._persist(rd, threadpool)
                if rd.messages:
                    self.transport.send(rd.messages)
                if rd.snapshot is not None:
                    self._install(rd.snapshot)
                if rd.committed_entries:
                    self.writes.resolve(self.applier.apply(rd.committed_entries))
                self.raw.advance(rd)
                if rd.soft_state is not None:
                    self._role_changed()
                    self.reads.fail_orphaned("leadership changed while confirming the read; "
                                             "retry")
                self.reads.confirmed_by(rd.read_states)
                self.reads.serve_applied()
                self._maybe_compact(threadpool)
            if self.backups.wanted:
                self.backups.take_wanted()

    def _persist(self, rd, threadpool) -> None:
        """The Ready's snapshot, entries and hard state into storage: durably (fsync) when
        the core says it must be, off the hub unless the storage says it never blocks."""
        args = (rd.hard_state, rd.entries, rd.snapshot, rd.must_sync)
        if not rd.must_sync:
            self.storage.save(*args)
            return
        started = time.monotonic()
        if getattr(self.storage, "blocking", True):
            threadpool.apply(self.storage.save, args)  # fsync: off the hub
        else:
            if rd.early_messages:
                gevent.sleep(0)  # the peer links send them before the hub stops
            self.storage.save(*args)
        self.stats.sync_seconds.observe(time.monotonic() - started)

    def _install(self, snapshot) -> None:
        self.applier.install(snapshot)
        self.log.info("installed the leader's snapshot at index %d", snapshot.meta.index)
        self.stats.snapshots_installed.inc()
        self.stats.snapshot_bytes = len(snapshot.data)
        self.events("raftcache_snapshot_installed", index=snapshot.meta.index)

    def _maybe_compact(self, threadpool) -> None:
        """Past `raft.snapshot_entries` applied entries in the log: snapshot and compact."""
        r = self.config.raft
        st = self.raw.status()
        if st.applied - (st.first_index - 1) < r.snapshot_entries:
            return
        started = time.monotonic()
        try:
            image = self.applier.snapshot()
        except (BackendUnavailable, BackendLost) as exc:
            self.applier.backend_log.warning("snapshot", "no snapshot for now: %s", exc)
            return  # the next Ready tries again
        snap = self.raw.compact(image, keep_entries=r.snapshot_keep_entries)
        threadpool.apply(self.storage.compact, (snap,))
        self.stats.snapshot_seconds.observe(time.monotonic() - started)
        self.stats.snapshot_bytes = len(image)
        self.events("raftcache_snapshot_taken", index=snap.meta.index, size=len(snap.data))

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
        self.events("raftcache_role_changed", role=st.role.name.lower(), term=st.term,
                    leader=st.lead)

    @property
    def role(self) -> tuple[int, StateRole]:
        """(leader, role) as the Ready loop last saw them (the hooks were told of it)."""
        return self._role

    # -- messages from peers -----------------------------------------------------------------------
    def step(self, messages, sender: int | None) -> None:
        """Raft messages from a connection proven to be node `sender`'s (None: unproven,
        accepted only with cluster.insecure): drop what claims another sender, comes from a
        non-member or is out of range; step the rest into the core."""
        if sender is None and not self.config.cluster.insecure:
            self._drop(len(messages), "unauthenticated",
                       "from a connection that did not prove it is a peer")
            return
        members = self._peer_members()
        stepped = False
        self.raw.set_clock(int(self.clock() * 1000))  # responses carry our clock as of now
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
            self.wakeup.set()

    def peer_lost(self, peer: int) -> None:
        """A connection that carried Raft messages from `peer` ended: if it was our leader,
        the core campaigns within a few ticks instead of an election timeout."""
        if not self.stopped.is_set():
            self.raw.peer_lost(peer)
            self.wakeup.set()

    def _peer_members(self) -> frozenset:
        """The nodes that may send us Raft messages: known peers and every node of the
        current configuration (made again only when either changes)."""
        conf = self.raw.status().conf
        peers = self.addresses.peers
        if self._members[0] is not conf or self._members[1] is not peers:
            self._members = (conf, peers, frozenset(peers) | conf.all_nodes())
        return self._members[2]

    def _drop(self, count: int, sender, what: str) -> None:
        self.dropped_peer_messages += count
        self._drop_log.warning(sender, "dropped a Raft message (peer %s): %s", sender, what)
