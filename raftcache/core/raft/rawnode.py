"""The Raft state machine, sans-I/O, with an interface in the spirit of etcd-raft's RawNode.

The driver owns every side effect. It calls ``tick()`` on a timer, ``step(msg)`` for each message
from a peer, ``propose()``/``read_index()``/... for clients, and whenever ``has_ready()`` it takes
``ready()``, carries it out in the order documented on `Ready` (persist, send, apply), and calls
``advance(ready)``. Randomness comes only from the injected ``random.Random``; time only from
``tick()``, and wall-clock readings only as data the driver hands in (``set_clock``). Nothing
here touches a socket, a file or a clock, so a simulator can run thousands of clusters
deterministically.

Cluster time (``clock_offset_ms``): no single node's clock decides it. Every message carries its
sender's time; a leader takes, among its voters' clocks as their responses report them, the one a
majority reaches (the median), and sends that agreed time with its appends and heartbeats; a
follower runs at the leader's agreed time from the last one it heard. So one node with its clock
a year off, leader or follower, moves no node's cluster time by more than the others disagree.

Semantics follow the Raft paper and Ongaro's dissertation, with etcd-raft's refinements:
pre-vote (9.6), check-quorum, ReadIndex and leases (6.4), leadership transfer (3.10), joint
consensus (4.3) with configurations taking effect when applied, and chunked snapshots.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Mapping

import attrs

from . import quorum
from .log import RaftLog
from .messages import (
    NONE,
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    NodeId,
    NotLeader,
    ProposalRefused,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMeta,
    SoftState,
    StateRole,
    Status,
)
from .progress import Progress, ProgressState
from .read_only import ReadOnly
from .tracker import ProgressTracker

_TRANSFER_CONTEXT = b"transfer"  # a campaign started by TimeoutNow may ignore leader leases


class ReadOnlyOption(enum.Enum):
    READ_INDEX = "read_index"  # confirm leadership with a heartbeat round per batch of reads
    LEASE = "lease"  # trust the check-quorum lease; needs check_quorum and bounded clock drift


@attrs.frozen
class RaftConfig:
    id: NodeId
    election_tick: int = 10  # followers campaign after [election_tick, 2*election_tick) ticks
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    read_only: ReadOnlyOption = ReadOnlyOption.READ_INDEX
    # Lease reads stop this many ticks before the lease nominally ends, covering clock drift.
    lease_margin_ticks: int = 2
    max_inflight: int = 64  # pipelined appends per follower
    max_msg_entries: int = 512
    max_msg_bytes: int = 1 << 20
    max_apply_entries: int = 4096  # committed entries handed out per Ready
    snapshot_chunk_bytes: int = 64 << 10
    snapshot_resend_ticks: int = 3  # resend an unacknowledged snapshot chunk after this long
    # Checks a snapshot received from the leader before it replaces the log (the state
    # machine's parser): returns why it is unusable, or None. A refused snapshot is dropped
    # and counted in RawNode.refused_snapshots, so a bad image never reaches storage.
    check_snapshot: Callable[[Snapshot], str | None] | None = None

    def __attrs_post_init__(self):
        if self.id == NONE:
            raise ValueError("node id must be >= 1")
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise ValueError("need 1 <= heartbeat_tick < election_tick")
        if self.read_only == ReadOnlyOption.LEASE and not self.check_quorum:
            raise ValueError("lease reads need check_quorum: without it a deposed leader keeps "
                             "serving reads from its own state")
        if self.lease_margin_ticks >= self.election_tick:
            raise ValueError("lease_margin_ticks must be smaller than election_tick")


@attrs.frozen
class PersistedState:
    """What the driver read back from stable storage at start: the input of a restart."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()


class RawNode:
    """One Raft peer. See the module docstring for the driving contract."""

    def __init__(self, config: RaftConfig, rng: random.Random,
                 persisted: PersistedState | None = None):
        persisted = persisted or PersistedState()
        self.config = config
        self.id = config.id
        self._rng = rng
        hs = persisted.hard_state
        self.raft_log = RaftLog(persisted.snapshot, persisted.entries, hs.commit)
        self.snapshot = persisted.snapshot  # the newest snapshot we hold (to send to followers)
        self._term = hs.term
        self._vote = hs.vote
        self._lead = NONE
        self._role = StateRole.FOLLOWER
        self.conf = persisted.snapshot.meta.conf_state if persisted.snapshot else ConfState()
        self.tracker = ProgressTracker()  # the others' progress and votes
        self.read_only = ReadOnly()  # pending ReadIndex requests and lease acknowledgements
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.ticks = 0  # monotonic count of tick() calls: the only clock
        self.clock_ms = 0  # the driver's newest wall-clock reading (set_clock); 0: none
        # Cluster time minus clock_ms, as last agreed (leader) or heard (follower); None: unknown.
        self._clock_offset: int | None = None
        self._peer_clocks: dict[NodeId, int] = {}  # leader: voter -> its clock minus ours
        self._clock_dirty = False  # a voter's clock changed since the leader last agreed one
        self._leader_tick: int | None = None  # follower: tick it last heard from a leader
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_tick
        self.lead_transferee = NONE
        self.timeout_now_sent = False  # this term: a TimeoutNow went out, so no more lease reads
        self.pending_conf_index = 0
        self._booting = True  # until one election timeout passes, act as if a leader was seen
        self._needs_broadcast = False
        self._needs_read_heartbeat = False  # reads wait for one heartbeat round, sent at ready()
        self._pending_snapshot: Snapshot | None = None  # received from the leader, not yet saved
        self._snapshot_rx: tuple[SnapshotMeta, bytearray] | None = None
        self._prev_hard_state = hs
        self._prev_soft_state = SoftState(NONE, StateRole.FOLLOWER)
        self._ready_outstanding = False
        self.refused_snapshots = 0
        self._rebuild_progress()
        self.become_follower(self._term, NONE)

    @classmethod
    def bootstrap(cls, config: RaftConfig, rng: random.Random,
                  voters: Mapping[NodeId, str] | Iterable[NodeId]) -> RawNode:
        """A brand-new member of a brand-new cluster.

        Like etcd's Bootstrap, the initial membership is the first log entry (term 1, index 1,
        committed), so nodes that join later learn it by replication like any other change. Every
        founding node must be bootstrapped with the same voters (and addresses: a mapping of
        voter -> address puts them in that entry, for the nodes that join later to find them).
        """
        node = cls(config, rng)
        node.raft_log.append(list(cls.bootstrap_entries(voters)))
        node.raft_log.commit_to(1)
        node._term = 1
        node.conf = ConfState(voters=frozenset(voters))
        node._rebuild_progress()
        return node

    @staticmethod
    def bootstrap_entries(voters) -> tuple[Entry, ...]:
        """The log a brand-new cluster of `voters` (ids, or id -> address) starts with: its
        membership, at index 1."""
        addresses = voters if isinstance(voters, Mapping) else dict.fromkeys(voters, "")
        cc = ConfChange(tuple(ConfChangeSingle(ConfChangeType.ADD_VOTER, v, addresses[v])
                              for v in sorted(addresses)))
        return (Entry(term=1, index=1, type=EntryType.CONF_CHANGE, data=cc.encode()),)

    # ==========================================================================================
    # The driver's interface
    # ==========================================================================================
    def set_clock(self, now_ms: int) -> None:
        """The driver's wall-clock reading, in ms (data: the core never reads a clock). It
        stamps the messages this node sends from now on."""
        self.clock_ms = max(0, int(now_ms))

    def clock_offset_ms(self) -> int | None:
        """Cluster time minus this node's clock (`set_clock`): for a leader, the clock that a
        quorum of voters reaches (the median of their reports, each taken relative to ours);
        for anyone else, the agreed time its leader last sent. None until known."""
        if self._clock_dirty and self._role == StateRole.LEADER:
            self._clock_dirty = False
            ours = dict(self._peer_clocks)
            ours[self.id] = 0
            base = 1 << 61  # offsets may be negative; missing voters count as 0: "not known"
            agreed = quorum.committed_index(self.conf, {n: base + o for n, o in ours.items()})
            if agreed > 0:
                self._clock_offset = agreed - base
        return self._clock_offset

    def ticks_since_leader(self) -> int | None:
        """Ticks since this node was last in touch with a leader: a leader, since a quorum of
        voters last answered its heartbeats; anyone else, since it last heard from one. None:
        not since it started."""
        if self._role == StateRole.LEADER:
            never = -(1 << 62)
            heard = self.read_only.quorum_tick(self.conf, self.id, self.ticks, never=never)
            return None if heard == never else self.ticks - heard
        return None if self._leader_tick is None else self.ticks - self._leader_tick

    def tick(self) -> None:
        self.ticks += 1
        if self._role == StateRole.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def step(self, m: Message) -> None:
        """Feed one message from a peer. Messages for another node or from nowhere are ignored."""
        if m.to != self.id:
            return
        if m.term > self._term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                forced = m.context == _TRANSFER_CONTEXT
                if not forced and self._in_lease():
                    return  # we heard from a live leader within the election timeout
            if m.type == MsgType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MsgType.PRE_VOTE_RESP and not m.reject:
                pass  # a granted pre-vote carries the term we would campaign in
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self._term:
            if m.type in (MsgType.APP, MsgType.HEARTBEAT) and (
                self.config.check_quorum or self.config.pre_vote
            ):
                # A stale leader (perhaps partitioned away) needs our term to step down; with
                # pre-vote it cannot learn it from a disruptive vote request any more.
                self._send(MsgType.APP_RESP, m.frm)
            elif m.type == MsgType.PRE_VOTE:
                self._send(MsgType.PRE_VOTE_RESP, m.frm, reject=True)
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self._role == StateRole.LEADER:
            self._step_leader(m)
        elif self._role in (StateRole.CANDIDATE, StateRole.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append `data` to the log; returns (term, index). Raises ProposalRefused/NotLeader.

        The write is committed once an entry with that index *and term* comes out in
        committed_entries; the same index with another term means it was overwritten.
        """
        self._check_can_propose()
        index = self._append(Entry(self._term, 0, EntryType.NORMAL, data))
        return self._term, index

    def propose_conf_change(self, changes) -> tuple[int, int]:
        """Propose a membership change (a ConfChange or a sequence of ConfChangeSingle).

        Changes that alter the voters go through a joint configuration, left automatically once
        the change is applied. Only one change may be pending at a time.
        """
        cc = changes if isinstance(changes, ConfChange) else ConfChange(tuple(changes))
        self._check_can_propose()
        try:
            ConfChange.decode(cc.encode())  # what followers will accept (validate.py)
        except ValueError as exc:
            raise ProposalRefused(str(exc), self._lead) from None
        if self.pending_conf_index > self.raft_log.applied:
            raise ProposalRefused("a configuration change is still being applied", self._lead)
        if self.conf.joint and cc.changes:
            raise ProposalRefused("leave the joint configuration first", self._lead)
        if cc.changes:
            new = _next_conf(self.conf, cc)
            if new is None:
                raise ProposalRefused("invalid change: demote a voter by removing it first, and "
                                      "keep at least one voter")
        elif not self.conf.joint:
            raise ProposalRefused("not in a joint configuration")
        index = self._append(Entry(self._term, 0, EntryType.CONF_CHANGE, cc.encode()))
        self.pending_conf_index = index
        return self._term, index

    def read_index(self, context: bytes, lease: bool = False) -> None:
        """Ask for a linearizable read index; a ReadState with `context` comes out in a Ready.

        `context` must be unique among outstanding reads. With `lease` the leader may answer
        from its check-quorum lease instead of a heartbeat round, if the config enables lease
        reads (read_only=LEASE) and the lease holds; otherwise it is a ReadIndex read. Raises
        NotLeader when no leader is known (there is no one to ask).
        """
        if self._role == StateRole.LEADER:
            self._handle_read_index(context, self.id, lease)
        elif self._lead != NONE:
            # A READ_INDEX request carries index=1 when the requester accepts a lease read.
            self._send(MsgType.READ_INDEX, self._lead, context=context, index=int(lease))
        else:
            raise NotLeader(NONE)

    def peer_lost(self, peer: NodeId) -> None:
        """The driver saw the connection from `peer` end (closed or reset: the kernel does
        that for a process that died). If `peer` is our leader, stop waiting out the election
        timeout for it: forget it and campaign within a few ticks, with a pre-vote.

        Safe in any case (any node may campaign at any time) and harmless when the leader is
        in fact alive: the pre-vote fails while the other followers still hear from it, and
        its next heartbeat brings us back. Not with lease reads: a follower that acknowledged
        a heartbeat promised not to vote for anyone else for an election timeout, and the
        leader serves reads on that promise, so there only the timeout counts.
        """
        if (peer == NONE or peer != self._lead or self._role != StateRole.FOLLOWER
                or not self._may_campaign_early()):
            return
        self._lead = NONE  # out of lease: we grant the others' pre-votes and votes now
        self._booting = False
        # Staggered by node id: the lowest campaigns after one tick, the next a quarter of an
        # election timeout later (at least 3 ticks), and so on. A vote split between
        # followers that all saw the leader die would cost a whole election timeout, and a
        # pre-vote and vote round takes about a tick itself; one that cannot win (its log is
        # behind) only delays the next by the gap.
        others = sorted(v for v in self.conf.voters if v != peer)
        rank = others.index(self.id) if self.id in others else len(others)
        wait = 1 + rank * max(3, self.config.election_tick // 4)
        self.election_elapsed = max(self.election_elapsed,
                                    self.randomized_election_timeout - wait)

    def _may_campaign_early(self) -> bool:
        return self.config.pre_vote and self.config.read_only != ReadOnlyOption.LEASE

    def transfer_leadership(self, target: NodeId) -> None:
        """Hand leadership to `target`: catch it up, then tell it to campaign at once."""
        if self._role != StateRole.LEADER:
            raise NotLeader(self._lead)
        if target == self.id:
            return
        if target not in self.conf.voters:
            raise ProposalRefused(f"node {target} is not a voter")
        if self.lead_transferee == target:
            return
        self.election_elapsed = 0  # the transfer gets one election timeout to finish
        self.lead_transferee = target
        pr = self.tracker.progress[target]
        if pr.match == self.raft_log.last_index():
            self._send_timeout_now(target)
        else:
            self._send_append(target)

    def campaign(self) -> None:
        """Start an election now, as a TimeoutNow from our leader would: no pre-vote, and
        voters' leases are ignored (etcd's forced campaign; tests and tools use it)."""
        self._hup(transfer=True)

    def compact(self, data: bytes, keep_entries: int = 0) -> Snapshot:
        """Take the state machine image `data`, taken at the applied index, as a snapshot.

        Call it between ``advance()`` and the next ``ready()``. Entries up to the applied index
        minus `keep_entries` are dropped; the driver must persist the returned snapshot before
        deleting them from its own storage.
        """
        index = self.raft_log.applied
        meta = SnapshotMeta(index=index, term=self.raft_log.term(index) or 0, conf_state=self.conf)
        snap = Snapshot(meta, data)
        self.snapshot = snap
        self.raft_log.compact(max(self.raft_log.offset, index - keep_entries))
        return snap

    def has_ready(self) -> bool:
        if self._ready_outstanding:
            return False
        return bool(
            self.msgs
            or self._needs_broadcast
            or self._needs_read_heartbeat
            or self.read_states
            or self._pending_snapshot is not None
            or self.raft_log.stable < self.raft_log.last_index()
            or self.raft_log.committed > self.raft_log.applied
            or self.raft_log.committed != self._prev_hard_state.commit
            or self._term != self._prev_hard_state.term
            or self._vote != self._prev_hard_state.vote
            or self._lead != self._prev_soft_state.leader
            or self._role != self._prev_soft_state.role
        )

    def ready(self) -> Ready:
        if self._ready_outstanding:
            raise RuntimeError("ready() called twice without advance()")
        self._flush_broadcast()
        prev_hard, prev_soft = self._prev_hard_state, self._prev_soft_state
        hard = soft = None
        if (self._term, self._vote, self.raft_log.committed) != (
            prev_hard.term, prev_hard.vote, prev_hard.commit
        ):
            hard = self._prev_hard_state = HardState(self._term, self._vote, self.raft_log.committed)
        if self._lead != prev_soft.leader or self._role != prev_soft.role:
            soft = self._prev_soft_state = SoftState(self._lead, self._role)
        log = self.raft_log
        entries = tuple(log.entries[log.stable - log.offset :])
        new_vote = hard is not None and (hard.term, hard.vote) != (prev_hard.term, prev_hard.vote)
        # A leader may send its appends and heartbeats while it persists the entries (etcd's
        # leader does too): it counts itself towards a quorum only for what advance() says is
        # durable. A new term or vote must be durable before anyone hears of it.
        early = self._role == StateRole.LEADER and not new_vote
        messages = tuple(self.msgs)
        rd = Ready(
            soft_state=soft,
            hard_state=hard,
            snapshot=self._pending_snapshot,
            entries=entries,
            messages=() if early else messages,
            early_messages=messages if early else (),
            committed_entries=tuple(log.next_committed(self.config.max_apply_entries))
            if log.committed > log.applied else (),
            read_states=tuple(self.read_states),
            must_sync=bool(entries) or self._pending_snapshot is not None or new_vote,
        )
        self.msgs = []
        self.read_states = []
        self._ready_outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver has persisted, sent and applied everything in `rd`."""
        self._ready_outstanding = False
        if rd.snapshot is not None and rd.snapshot is self._pending_snapshot:
            self._pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            self.raft_log.stable_to(last.index, last.term)
        for e in rd.committed_entries:
            self.raft_log.applied_to(e.index)
            # A snapshot restored since this Ready was handed out already holds this entry's
            # configuration: applying it again on top would corrupt the restored one.
            if e.type == EntryType.CONF_CHANGE and e.index > self.raft_log.offset:
                try:
                    cc = ConfChange.decode(e.data)
                except ValueError:
                    continue  # undecodable: ignored the same way on every replica
                self._apply_conf_change(cc)
        if self._role == StateRole.LEADER:
            # The leader counts itself towards a quorum only for what it has made durable.
            me = self.tracker.progress.get(self.id)
            if me is not None and me.maybe_update(self.raft_log.stable):
                self._maybe_commit()
            if (
                self.conf.joint
                and self.raft_log.applied >= self.pending_conf_index
                and self.lead_transferee == NONE
            ):
                self.propose_conf_change(ConfChange())  # auto-leave the joint configuration

    # -- introspection for drivers, tests and the simulator: read-only ---------------------------
    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId:
        return self._vote

    @property
    def lead(self) -> NodeId:
        """The leader this node knows of, or NONE."""
        return self._lead

    @property
    def role(self) -> StateRole:
        return self._role

    def status(self) -> Status:
        log = self.raft_log  # _make: half the cost of Status(...), and drivers ask often
        return Status._make((self.id, self._term, self._vote, log.committed, log.applied,
                             self._lead, self._role, self.conf, log.offset + 1,
                             log.last_index(), log.last_term(), self.lead_transferee,
                             self.refused_snapshots))

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`; None when it is compacted away or not there."""
        return self.raft_log.term(index)

    @property
    def commit(self) -> int:
        return self.raft_log.committed

    @property
    def first_index(self) -> int:
        """The first entry still in the log (the snapshot's index + 1)."""
        return self.raft_log.offset + 1

    @property
    def applied(self) -> int:
        return self.raft_log.applied

    def matched(self) -> dict[NodeId, int]:
        """The leader's view of how far each member's log matches its own (empty when not
        the leader)."""
        if self._role != StateRole.LEADER:
            return {}
        return {node: pr.match for node, pr in self.tracker.progress.items()}

    def is_promotable(self) -> bool:
        return self.conf.is_voter(self.id)

    def lease_valid(self) -> bool:
        """Whether a lease read may be served from local state right now (leader only)."""
        if self._role != StateRole.LEADER or self.config.read_only != ReadOnlyOption.LEASE:
            return False
        if self.lead_transferee != NONE or self.timeout_now_sent:
            return False
        # A voter we have not heard from this term has acknowledged nothing: not even tick 0.
        quorum_tick = self.read_only.quorum_tick(self.conf, self.id, self.ticks,
                                                 never=-self.config.election_tick)
        lease = self.config.election_tick - self.config.lease_margin_ticks
        return self.ticks < quorum_tick + lease

    # ==========================================================================================
    # Roles
    # ==========================================================================================
    def become_follower(self, term: int, lead: NodeId) -> None:
        self._reset(term)
        self._lead = lead
        self._role = StateRole.FOLLOWER

    def _become_pre_candidate(self) -> None:
        # A pre-candidate changes neither its term nor its vote: that is the point of pre-vote.
        self.tracker.reset_votes()
        self._lead = NONE
        self._role = StateRole.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        self._reset(self._term + 1)
        self._vote = self.id
        self._role = StateRole.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._lead = self.id
        self._role = StateRole.LEADER
        self._peer_clocks = {}  # reported afresh this term; until a quorum has, keep the old
        self._clock_dirty = True  # a lone voter agrees with itself at once
        me = self.tracker.progress.get(self.id)
        if me is not None:
            me.become_replicate()
        # No conf change until everything in our log is applied: we cannot know whether an
        # unapplied entry in it is a conf change that is still in flight.
        self.pending_conf_index = self.raft_log.last_index()
        self._append(Entry(self._term, 0, EntryType.NORMAL, b""))  # no-op: commits our term

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = NONE
            self.timeout_now_sent = False
        self._lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.config.election_tick + self._rng.randrange(
            self.config.election_tick
        )
        self.lead_transferee = NONE
        self.read_only.reset()
        self.tracker.restart(self.id, self.raft_log.last_index(), self.raft_log.stable)

    def _rebuild_progress(self) -> None:
        self.tracker.rebuild(self.conf, self.id, self.raft_log.last_index(), self.raft_log.stable)

    # ==========================================================================================
    # Ticks
    # ==========================================================================================
    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_tick:
            self._booting = False
        if self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_tick:
            self.election_elapsed = 0
            if self.config.check_quorum:
                if not self.tracker.quorum_active(self.conf, self.id):
                    self.become_follower(self._term, NONE)  # we lost touch with a majority
                    return
                self.tracker.start_activity_round(self.id)
            if self.lead_transferee != NONE:
                self.lead_transferee = NONE  # the transfer did not finish in time: abort it
        if self.heartbeat_elapsed >= self.config.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()
            self._resend_stalled_snapshots()

    def _in_lease(self) -> bool:
        """Whether we heard from a live leader recently enough to refuse to vote for another.

        This is what lets a leader under check-quorum trust its lease. A freshly (re)started
        node counts as having heard from one: it may have acknowledged a heartbeat just before
        it crashed.
        """
        return (
            self.config.check_quorum
            and self.election_elapsed < self.config.election_tick
            and (self._lead != NONE or self._booting)
        )

    # ==========================================================================================
    # Elections
    # ==========================================================================================
    def _hup(self, transfer: bool) -> None:
        if self._role == StateRole.LEADER or not self.is_promotable():
            return
        if self._has_unapplied_conf_changes():
            return  # our configuration may be about to change: we cannot count votes yet
        if self.config.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _has_unapplied_conf_changes(self) -> bool:
        lo = self.raft_log.applied - self.raft_log.offset
        hi = self.raft_log.committed - self.raft_log.offset
        return any(e.type == EntryType.CONF_CHANGE for e in self.raft_log.entries[lo:hi])

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            kind, term = MsgType.PRE_VOTE, self._term + 1
        else:
            self._become_candidate()
            kind, term = MsgType.VOTE, self._term
        if self._poll(self.id, True):
            return
        ctx = _TRANSFER_CONTEXT if transfer else b""
        for v in sorted(self.conf.voters | self.conf.voters_outgoing):
            if v != self.id:
                self.msgs.append(Message(type=kind, to=v, frm=self.id, term=term,
                                         log_term=self.raft_log.last_term(),
                                         index=self.raft_log.last_index(), context=ctx))

    def _poll(self, node: NodeId, granted: bool) -> bool:
        """Record a vote; returns True when the campaign is decided."""
        result = self.tracker.record_vote(self.conf, node, granted)
        if result == quorum.VoteResult.WON:
            if self._role == StateRole.PRE_CANDIDATE:
                self._campaign(pre=False, transfer=False)
            else:
                self._become_leader()
                self._needs_broadcast = True
            return True
        if result == quorum.VoteResult.LOST:
            self.become_follower(self._term, NONE)
            return True
        return False

    def _vote_log_ok(self, last_index: int, last_term: int) -> bool:
        """The election restriction (Raft 5.4.1): only vote for logs at least as up to date."""
        return self.raft_log.is_up_to_date(last_index, last_term)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self._vote == m.frm
            or (self._vote == NONE and self._lead == NONE)
            or (m.type == MsgType.PRE_VOTE and m.term > self._term)
        )
        resp = MsgType.VOTE_RESP if m.type == MsgType.VOTE else MsgType.PRE_VOTE_RESP
        if can_vote and self._vote_log_ok(m.index, m.log_term):
            # The response carries the campaign's term so the candidate counts it.
            self.msgs.append(Message(type=resp, to=m.frm, frm=self.id, term=m.term))
            if m.type == MsgType.VOTE:
                self.election_elapsed = 0
                self._vote = m.frm
        else:
            self._send(resp, m.frm, reject=True)

    # ==========================================================================================
    # Per-role message handling
    # ==========================================================================================
    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MsgType.APP:
            self._heard_from_leader(m)
            self._handle_append(m)
        elif t == MsgType.HEARTBEAT:
            self._heard_from_leader(m)
            self._handle_heartbeat(m)
        elif t == MsgType.SNAP:
            self._heard_from_leader(m)
            self._handle_snapshot_chunk(m)
        elif t == MsgType.TIMEOUT_NOW:
            if m.frm == self._lead:  # only our leader may hand over its leadership
                self._hup(transfer=True)
        elif t == MsgType.READ_INDEX_RESP:
            if not m.reject:
                self.read_states.append(ReadState(m.index, m.context))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self.become_follower(m.term, m.frm)  # someone won this term
            self._step_follower(m)
        elif (t == MsgType.VOTE_RESP and self._role == StateRole.CANDIDATE) or (
            t == MsgType.PRE_VOTE_RESP and self._role == StateRole.PRE_CANDIDATE
        ):
            self._poll(m.frm, not m.reject)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MsgType.READ_INDEX:
            self._handle_read_index(m.context, m.frm, m.index == 1)
            return
        pr = self.tracker.progress.get(m.frm)
        if pr is None:
            return  # not (or no longer) a member
        if t in (MsgType.APP_RESP, MsgType.HEARTBEAT_RESP, MsgType.SNAP_RESP):
            pr.recent_active = True
            if m.clock_ms and self.clock_ms:
                self._peer_clocks[m.frm] = m.clock_ms - self.clock_ms
                self._clock_dirty = True
        if t == MsgType.APP_RESP:
            self._handle_append_response(m, pr)
        elif t == MsgType.HEARTBEAT_RESP:
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and pr.is_paused(self.config.max_inflight):
                pr.inflights.popleft()  # appends may have been lost: let one more through
            self.read_only.record_lease_ack(m.frm, m.tick, self.ticks)
            if pr.match < self.raft_log.last_index():
                self._send_append(m.frm)
            if m.context:
                self._ack_read(m.context, m.frm)
        elif t == MsgType.SNAP_RESP:
            self._handle_snapshot_response(m, pr)

    def _heard_from_leader(self, m: Message) -> None:
        self.election_elapsed = 0
        self._lead = m.frm
        self._booting = False
        self._leader_tick = self.ticks
        if m.clock_ms and self.clock_ms:
            self._clock_offset = m.clock_ms - self.clock_ms  # run at the leader's agreed time

    # ==========================================================================================
    # Replication
    # ==========================================================================================
    def _check_can_propose(self) -> None:
        if self._role != StateRole.LEADER:
            raise NotLeader(self._lead)
        if self.lead_transferee != NONE:
            raise ProposalRefused("leadership transfer in progress", self.lead_transferee)

    def _append(self, entry: Entry) -> int:
        index = self.raft_log.last_index() + 1
        self.raft_log.append([attrs.evolve(entry, index=index)])
        self._needs_broadcast = True  # batched: one append per follower per Ready
        return index

    def _flush_broadcast(self) -> None:
        if self._needs_read_heartbeat:
            self._needs_read_heartbeat = False
            if self._role == StateRole.LEADER and self.read_only.newest_context() is not None:
                self._broadcast_heartbeat()
        if not self._needs_broadcast:
            return
        self._needs_broadcast = False
        if self._role != StateRole.LEADER:
            return
        for node, pr in self.tracker.peers(self.id):
            self._send_append(node)
            while pr.state == ProgressState.REPLICATE and self._send_append(
                node, send_if_empty=False
            ):
                pass  # pipelining: keep filling the window

    def _send_append(self, to: NodeId, send_if_empty: bool = True) -> bool:
        pr = self.tracker.progress[to]
        if pr.is_paused(self.config.max_inflight):
            return False
        prev = pr.next - 1
        prev_term = self.raft_log.term(prev)
        if prev_term is None and prev < self.raft_log.offset:
            return self._send_snapshot(to, pr)
        if prev_term is None:  # next ran past our log (a stale optimistic guess): probe again
            pr.become_probe()
            prev = pr.next - 1
            prev_term = self.raft_log.term(prev)
            if prev_term is None:
                return self._send_snapshot(to, pr)
        last = self.raft_log.last_index()
        entries = ()
        if pr.next <= last:
            entries = tuple(self.raft_log.slice(pr.next, last + 1, self.config.max_msg_entries,
                                           self.config.max_msg_bytes))
        if not entries and not send_if_empty:
            return False
        self.msgs.append(Message(type=MsgType.APP, to=to, frm=self.id, term=self._term,
                                 log_term=prev_term,
                                 index=prev, entries=entries, commit=self.raft_log.committed,
                                 clock_ms=self._sent_clock()))
        pr.sent_entries(entries[-1].index if entries else prev)
        return True

    def _handle_append(self, m: Message) -> None:
        if m.index < self.raft_log.committed:
            self._send(MsgType.APP_RESP, m.frm, index=self.raft_log.committed)
            return
        last_new = self.raft_log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(MsgType.APP_RESP, m.frm, index=last_new)
            return
        hint_index, hint_term = self.raft_log.find_conflict_by_term(
            min(m.index, self.raft_log.last_index()), m.log_term
        )
        self._send(MsgType.APP_RESP, m.frm, index=m.index, reject=True,
                   reject_hint=hint_index, log_term=hint_term)

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if not m.reject and m.index > self.raft_log.last_index():
            return  # acknowledges entries we never sent
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.raft_log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decrease_to(m.index, next_probe):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        was_paused = pr.is_paused(self.config.max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT:
            pr.become_probe()
            if pr.match >= self.raft_log.offset:  # the snapshot (or a later append) caught it up
                pr.become_replicate()
        else:
            pr.free_inflights_to(m.index)
        if self._maybe_commit():
            self._needs_broadcast = True  # tell everyone, once per Ready
        elif was_paused:
            self._send_append(m.frm)
        while pr.state == ProgressState.REPLICATE and self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.raft_log.last_index():
            self._send_timeout_now(m.frm)

    def _handle_heartbeat(self, m: Message) -> None:
        self.raft_log.commit_to(min(m.commit, self.raft_log.last_index()))
        self._send(MsgType.HEARTBEAT_RESP, m.frm, context=m.context, tick=m.tick)

    def _broadcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            context = self.read_only.newest_context()  # piggyback the newest pending read
        for node, pr in self.tracker.peers(self.id):
            self.msgs.append(Message(type=MsgType.HEARTBEAT, to=node, frm=self.id,
                                     term=self._term, commit=min(pr.match, self.raft_log.committed),
                                     context=context or b"", tick=self.ticks,
                                     clock_ms=self._sent_clock()))

    def _commit_allowed(self, index: int) -> bool:
        """Raft 5.4.2: count replicas only for entries of the leader's own term."""
        return self.raft_log.term(index) == self._term

    def _maybe_commit(self) -> bool:
        index = self.tracker.committed_index(self.conf)
        if index <= self.raft_log.committed or not self._commit_allowed(index):
            return False
        self.raft_log.commit_to(index)
        if self.read_only.waiting_for_commit and self._committed_in_current_term():
            for ctx, requester, lease in self.read_only.take_waiting():
                self._handle_read_index(ctx, requester, lease)
        return True

    # ==========================================================================================
    # Snapshots
    # ==========================================================================================
    def _send_snapshot(self, to: NodeId, pr: Progress) -> bool:
        if self.snapshot is None or not pr.recent_active:
            return False  # do not stream a snapshot at a node that may be down
        pr.become_snapshot(self.snapshot, self.ticks)
        self._send_snapshot_chunk(to, pr)
        return True

    def _send_snapshot_chunk(self, to: NodeId, pr: Progress) -> None:
        snap = pr.snapshot
        off = pr.snapshot_offset
        chunk = snap.data[off : off + self.config.snapshot_chunk_bytes]
        pr.snapshot_sent_tick = self.ticks
        self.msgs.append(Message(type=MsgType.SNAP, to=to, frm=self.id, term=self._term,
                                 snapshot_meta=snap.meta,
                                 offset=off, data=chunk, done=off + len(chunk) >= len(snap.data),
                                 clock_ms=self._sent_clock()))

    def _resend_stalled_snapshots(self) -> None:
        for node, pr in self.tracker.stalled_snapshots(self.ticks,
                                                       self.config.snapshot_resend_ticks):
            self._send_snapshot_chunk(node, pr)

    def _handle_snapshot_response(self, m: Message, pr: Progress) -> None:
        if pr.state != ProgressState.SNAPSHOT or pr.snapshot.meta.index != m.index:
            return
        if m.reject:
            pr.snapshot_offset = 0
        elif m.offset > pr.snapshot_offset:
            pr.snapshot_offset = m.offset
        else:
            return  # a duplicate acknowledgement: the resend timer covers losses
        if pr.snapshot_offset < len(pr.snapshot.data) or m.reject:
            self._send_snapshot_chunk(m.frm, pr)

    def _handle_snapshot_chunk(self, m: Message) -> None:
        meta = m.snapshot_meta
        if meta.index <= self.raft_log.committed:
            self._snapshot_rx = None
            self._send(MsgType.APP_RESP, m.frm, index=self.raft_log.committed)
            return
        if self._snapshot_rx is None or self._snapshot_rx[0] != meta:
            if m.offset != 0:
                self._send(MsgType.SNAP_RESP, m.frm, index=meta.index, reject=True)
                return
            self._snapshot_rx = (meta, bytearray())
        buf = self._snapshot_rx[1]
        if m.offset == len(buf):
            buf += m.data
        if not (m.done and m.offset + len(m.data) == len(buf)):
            self._send(MsgType.SNAP_RESP, m.frm, index=meta.index, offset=len(buf))
            return
        self._snapshot_rx = None
        snap = Snapshot(meta, bytes(buf))
        check = self.config.check_snapshot
        if check is not None and check(snap) is not None:
            self.refused_snapshots += 1
            self._send(MsgType.SNAP_RESP, m.frm, index=meta.index, reject=True)
            return
        self._restore(snap)
        # Only the snapshot's index is known to match: when we already held it (and only
        # fast-forwarded the commit), entries after it may be a stale suffix.
        self._send(MsgType.APP_RESP, m.frm, index=self.raft_log.committed)

    def _restore(self, snap: Snapshot) -> None:
        meta = snap.meta
        if meta.index <= self.raft_log.committed:
            return
        if self.raft_log.match_term(meta.index, meta.term):
            self.raft_log.commit_to(meta.index)  # we hold it already: just fast-forward the commit
            return
        self.raft_log.restore(snap)
        self.snapshot = snap
        self._pending_snapshot = snap
        self.conf = meta.conf_state
        self._rebuild_progress()

    # ==========================================================================================
    # Reads
    # ==========================================================================================
    def _committed_in_current_term(self) -> bool:
        return self.raft_log.term(self.raft_log.committed) == self._term

    def _handle_read_index(self, context: bytes, requester: NodeId, lease: bool) -> None:
        """Raft dissertation 6.4: the read index is the commit index, confirmed by a quorum.

        A new leader does not know the commit index until an entry of its own term commits,
        so reads wait for that; then a heartbeat round proves nobody deposed us meanwhile.
        """
        if not self._committed_in_current_term():
            self.read_only.wait_for_commit(context, requester, lease)
            return
        index = self.raft_log.committed
        if quorum.has_quorum(self.conf, {self.id}) or (lease and self.lease_valid()):
            self._answer_read(context, requester, index)
            return
        self.read_only.add(context, index, requester, self.id)
        # One round per Ready confirms every read queued by then: its heartbeats carry the
        # newest read's context, and an ack of a read confirms those queued before it.
        self._needs_read_heartbeat = True

    def _ack_read(self, context: bytes, frm: NodeId) -> None:
        # A quorum answering this heartbeat confirms every read queued before it too.
        for ctx, r in self.read_only.ack(context, frm, self.conf):
            self._answer_read(ctx, r.requester, r.index)

    def _answer_read(self, context: bytes, requester: NodeId, index: int) -> None:
        if requester == self.id:
            self.read_states.append(ReadState(index, context))
        else:
            self._send(MsgType.READ_INDEX_RESP, requester, index=index, context=context)

    # ==========================================================================================
    # Leadership transfer and membership
    # ==========================================================================================
    def _send_timeout_now(self, to: NodeId) -> None:
        self.timeout_now_sent = True  # the target may win at any moment: our lease is void
        self._send(MsgType.TIMEOUT_NOW, to)

    def _apply_conf_change(self, cc: ConfChange) -> None:
        new = _next_conf(self.conf, cc)
        if new is None:
            return  # invalid here (the same on every replica): ignored deterministically
        if new == self.conf:
            return  # an address or a join mark: the membership, and the progress, stand
        self.conf = new
        self._rebuild_progress()
        if self._role != StateRole.LEADER:
            return
        if not self.conf.is_voter(self.id):
            self.become_follower(self._term, NONE)  # removed: step down and let others elect
            return
        if self._maybe_commit():
            self._needs_broadcast = True
        if self.lead_transferee != NONE and self.lead_transferee not in self.conf.voters:
            self.lead_transferee = NONE

    # ==========================================================================================
    # Helpers
    # ==========================================================================================
    def _send(self, kind: MsgType, to: NodeId, **fields) -> None:
        self.msgs.append(Message(type=kind, to=to, frm=self.id, term=self._term,
                                 clock_ms=self._sent_clock(), **fields))

    def _sent_clock(self) -> int:
        """The time this node's messages carry: a leader's agreed cluster time (0 until a
        quorum reported), anyone else's own clock, so that voters' reports stay independent."""
        if self._role != StateRole.LEADER:
            return self.clock_ms
        offset = self.clock_offset_ms()
        return 0 if offset is None or not self.clock_ms else max(0, self.clock_ms + offset)


def _next_conf(conf: ConfState, cc: ConfChange) -> ConfState | None:
    """The configuration after applying `cc` to `conf`, or None if `cc` is invalid there."""
    if not cc.changes:
        if not conf.joint:
            return None
        return ConfState(voters=conf.voters, learners=conf.learners)
    if conf.joint:
        return None
    voters, learners = set(conf.voters), set(conf.learners)
    for c in cc.changes:
        if c.type == ConfChangeType.ADD_VOTER:
            voters.add(c.node_id)
            learners.discard(c.node_id)
        elif c.type == ConfChangeType.REMOVE_NODE:
            voters.discard(c.node_id)
            learners.discard(c.node_id)
        elif c.type == ConfChangeType.ADD_LEARNER:
            if c.node_id in voters:
                return None
            learners.add(c.node_id)
        elif c.type in (ConfChangeType.UPDATE_ADDRESS, ConfChangeType.JOINED):
            if c.node_id not in voters and c.node_id not in learners:
                return None  # not a member: nothing to update
    if not voters:
        return None
    voters = frozenset(voters)
    if voters == conf.voters or not conf.voters:
        return ConfState(voters=voters, learners=frozenset(learners))  # learners only: no joint
    return ConfState(voters=voters, voters_outgoing=conf.voters, learners=frozenset(learners))
