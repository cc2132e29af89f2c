"""Deterministic simulation of a Raft cluster under faults, with safety and liveness checks.

Runs N real `RawNode`s over a simulated network that delays, drops, duplicates and reorders
messages and partitions nodes; crashes nodes and restarts them from exactly what they had
persisted (a Ready whose persistence had not finished is lost); changes membership and
transfers leadership meanwhile; and runs clients that write and read (ReadIndex or lease).
Every run is a pure function of its seed.

After every event it checks election safety, log matching, leader completeness and state
machine safety, and that committed entries stay on a quorum of disks across crashes; at the
end, that the clients' history is linearizable and that, once the faults stop, a leader is
elected and a new proposal commits within a bounded number of ticks.

    python -m raftcache.testing.sim --seeds 1000 --nodes 5
"""

from __future__ import annotations

import argparse
import heapq
import pickle
import random
import sys
import time
from collections import deque

import attrs

from raftcache.core.raft import PersistedState, RaftConfig, RawNode, ReadOnlyOption, quorum
from raftcache.core.raft.messages import (
    ConfChangeSingle,
    ConfChangeType,
    EntryType,
    HardState,
    Message,
    NotLeader,
    ProposalRefused,
    Snapshot,
    StateRole,
)
from raftcache.testing.history import History
from raftcache.testing.mutants import MUTANTS

UNIT = 10  # time units per tick: message delays and disk latencies are finer than a tick

# Event kinds (ints: the heap compares tuples and this loop is the hot path).
(_TICK, _DELIVER, _PERSISTED, _CLIENT, _CLIENT_TIMEOUT, _NEMESIS, _RESTART, _CRASH,
 _ISOLATE, _PEER_LOST) = range(10)


class SafetyViolation(Exception):
    pass


class LivenessViolation(Exception):
    pass


@attrs.frozen
class SimConfig:
    nodes: int = 5
    fault_ticks: int = 400  # ticks of faults and client traffic
    liveness_ticks: int = 200  # after healing, a leader and a new commit must appear within this
    election_tick: int = 10
    heartbeat_tick: int = 2
    max_delay: int = 3 * UNIT  # message delay is uniform in [1, max_delay] time units...
    slow_delay: int = 30 * UNIT  # ...except a few slow ones, which reorder badly
    drop_rate: float = 0.05
    dup_rate: float = 0.02
    nemesis_every: int = 25  # mean ticks between nemesis actions
    leader_churn: float = 0.3  # chance that a new leader is struck at once
    clients: int = 6
    keys: int = 3
    client_timeout_ticks: int = 15
    read_only: ReadOnlyOption = ReadOnlyOption.READ_INDEX
    snapshot_every: int = 40  # entries applied between snapshots (0: never)
    snapshot_chunk_bytes: int = 96
    max_inflight: int = 4
    check_history: bool = True


@attrs.define
class SimNode:
    id: int
    raw: RawNode
    alive: bool = True
    incarnation: int = 0
    busy: bool = False  # a Ready is being persisted
    checked_term: int = -1  # the last term whose leadership we checked for completeness
    checked_commit: int = 0  # the highest commit index we checked while it led
    tick_interval: int = UNIT  # clock skew: a slow clock ticks less often
    # What survives a crash.
    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list = attrs.Factory(list)
    # Volatile: the state machine and the client requests waiting on this node.
    kv: dict = attrs.Factory(dict)
    applied: int = 0
    pending_writes: dict = attrs.Factory(dict)  # index -> (term, client, op)
    pending_reads: dict = attrs.Factory(dict)  # context -> (client, op, key)
    ready_reads: list = attrs.Factory(list)  # (read index, context) waiting for apply

    def disk_term(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.meta.index:
            return self.snapshot.meta.term
        if self.entries:
            i = index - self.entries[0].index
            if 0 <= i < len(self.entries):
                return self.entries[i].term
        return None

    def disk_last(self) -> tuple[int, int]:
        """(last term, last index) of the log on disk: what a restart would come back with."""
        if self.entries:
            return self.entries[-1].term, self.entries[-1].index
        if self.snapshot is not None:
            return self.snapshot.meta.term, self.snapshot.meta.index
        return 0, 0

    def disk_covers(self, index: int, term: int) -> bool:
        if self.snapshot is not None and index <= self.snapshot.meta.index:
            return True
        return self.disk_term(index) == term


@attrs.define
class SimClient:
    id: int
    process: int
    op: int | None = None  # the history id of the outstanding operation
    kind: str = ""
    leader_guess: int = 0
    seq: int = 0


class Simulation:
    def __init__(self, seed: int, config: SimConfig = SimConfig(), node_class=RawNode):
        self.seed = seed
        self.cfg = config
        self.node_class = node_class
        self.rng = random.Random(seed)
        self.now = 0
        self._seq = 0
        self.events: list = []
        self.trace: deque = deque(maxlen=150)
        self.history = History()
        self.delivered = 0
        self.blocked: set[tuple[int, int]] = set()
        self.partition_name = ""
        self.faults: dict[str, int] = {}
        self.leaders: dict[int, int] = {}  # term -> leader id (election safety)
        self.entry_ids: dict[tuple[int, int], tuple[bytes, int | None]] = {}  # log matching
        self.applied_at: dict[int, tuple[int, bytes]] = {}  # state machine safety
        self.max_applied = 0
        self.min_quorum = config.nodes // 2 + 1
        self.removed: list[int] = []
        self.learners: list[int] = []
        self.healing = False
        # Small batches make a new leader's first appends carry old-term entries without its
        # no-op: the situation of the paper's Figure 8.
        self.max_msg_entries = self.rng.choice([1, 2, 4, 8, 64])
        ids = list(range(1, config.nodes + 1))
        self.nodes: dict[int, SimNode] = {}
        for i in ids:
            raw = self.node_class.bootstrap(self._raft_config(i), self._node_rng(i), ids)
            # Bootstrapping writes the initial membership to disk before the node starts.
            self.nodes[i] = SimNode(i, raw, hard_state=HardState(term=1, commit=1),
                                    entries=list(RawNode.bootstrap_entries(ids)))
            self._push(self.rng.randrange(UNIT), _TICK, i, 0)
        self.clients = [SimClient(c, c) for c in range(config.clients)]
        for c in self.clients:
            self._push(self.rng.randrange(5 * UNIT), _CLIENT, c.id, None)
        self._push(self._nemesis_delay(), _NEMESIS, 0, None)

    # -- plumbing --------------------------------------------------------------------------------
    def _raft_config(self, node_id: int) -> RaftConfig:
        c = self.cfg
        return RaftConfig(id=node_id, election_tick=c.election_tick,
                          heartbeat_tick=c.heartbeat_tick, read_only=c.read_only,
                          max_inflight=c.max_inflight,
                          snapshot_chunk_bytes=c.snapshot_chunk_bytes,
                          max_msg_entries=self.max_msg_entries)

    def _node_rng(self, node_id: int) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def _push(self, delay: int, kind: int, a, b) -> None:
        self._seq += 1
        heapq.heappush(self.events, (self.now + delay, self._seq, kind, a, b))

    def _note(self, *what) -> None:
        self.trace.append((self.now, what))

    def _nemesis_delay(self) -> int:
        return self.rng.randrange(1, 2 * self.cfg.nemesis_every) * UNIT

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> Simulation:
        try:
            self._run_until(self.cfg.fault_ticks * UNIT)
            self._heal_all()
            self._check_liveness()
            self._check_disks()
            if self.cfg.check_history:
                self._check_history()
        except (SafetyViolation, LivenessViolation):
            raise
        except Exception as exc:  # a crash of the core is a failure too, with the same trace
            raise SafetyViolation(f"exception in the core: {exc!r}") from exc
        return self

    def _run_until(self, end: int, stop=None) -> None:
        events = self.events
        while events and events[0][0] <= end:
            self.now, _, kind, a, b = heapq.heappop(events)
            if kind == _DELIVER:
                self._deliver(b)
            elif kind == _TICK:
                self._tick(a, b)
            elif kind == _PERSISTED:
                self._persisted(a, b)
            elif kind == _CLIENT:
                self._client_step(self.clients[a])
            elif kind == _CLIENT_TIMEOUT:
                self._client_timeout(self.clients[a], b)
            elif kind == _NEMESIS:
                if not self.healing:
                    self._nemesis()
                    self._push(self._nemesis_delay(), _NEMESIS, 0, None)
            elif kind == _RESTART:
                self._restart(a)
            elif kind == _CRASH and not self.healing:
                self._crash(a)
                self._push(self.rng.randrange(1, 4 * self.cfg.election_tick) * UNIT, _RESTART,
                           a, None)
            elif kind == _ISOLATE and not self.healing:
                self._partition("isolate_leader", a)
            elif kind == _PEER_LOST:
                self._peer_lost(a, b)
            if stop is not None and stop():
                return

    def _tick(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.alive or node.incarnation != incarnation:
            return
        self._push(node.tick_interval, _TICK, node_id, incarnation)
        node.raw.tick()
        self._after_input(node)

    def _deliver(self, m: Message) -> None:
        node = self.nodes[m.to]
        if not node.alive or (self.blocked and (m.frm, m.to) in self.blocked):
            return
        self.delivered += 1
        node.raw.step(m)
        self._after_input(node)

    def _peer_lost(self, node_id: int, peer: int) -> None:
        """`node_id` sees its connection from `peer` end, as the real transport reports a
        closed or reset connection (a crash closes them all; a flapping link, one)."""
        node = self.nodes[node_id]
        if node.alive:
            node.raw.peer_lost(peer)
            self._after_input(node)

    def _after_input(self, node: SimNode) -> None:
        raw = node.raw  # after every event: the cheap read-only properties, not status()
        if raw.role == StateRole.LEADER:
            self._check_leader(node)
            if raw.commit > node.checked_commit:
                node.checked_commit = raw.commit
                self._check_commit_is_safe(node, raw.status())
        if not node.busy and raw.has_ready():
            self._start_ready(node)

    # -- the driver: persist, then send, then apply, then advance ---------------------------------
    def _start_ready(self, node: SimNode) -> None:
        rd = node.raw.ready()
        node.busy = True
        # As the real driver does: what the core says need not wait for the disk goes out now.
        for m in rd.early_messages:
            self._send(m)
        # Most Readys persist at once; some take a while, and steps go on meanwhile (as they do
        # while the real driver's fsync runs in a thread). A crash in between loses the Ready.
        payload = (node.incarnation, rd)
        if self.rng.random() < 0.7:
            self._persisted(node.id, payload)
        else:
            self._push(1 + int(self.rng.random() * 2 * UNIT), _PERSISTED, node.id, payload)

    def _persisted(self, node_id: int, payload) -> None:
        node = self.nodes[node_id]
        incarnation, rd = payload
        if not node.alive or node.incarnation != incarnation:
            return
        if rd.snapshot is not None:
            node.snapshot = rd.snapshot
            node.entries = []
        if rd.entries:
            self._check_log_matching(node, rd.entries)
            first = rd.entries[0].index
            if node.entries:
                del node.entries[max(0, first - node.entries[0].index):]
            node.entries.extend(rd.entries)
        if rd.hard_state is not None:
            node.hard_state = rd.hard_state
        for m in rd.messages:
            self._send(m)
        if rd.snapshot is not None:
            node.kv = pickle.loads(rd.snapshot.data)
            node.applied = rd.snapshot.meta.index
        for e in rd.committed_entries:
            self._apply(node, e)
        node.raw.advance(rd)
        node.busy = False
        if rd.soft_state is not None:
            self._note("role", node.id, rd.soft_state.role.name, node.raw.status().term,
                       rd.soft_state.leader)
        node.ready_reads.extend(rd.read_states)
        self._serve_reads(node)
        self._maybe_compact(node)
        if node.raw.has_ready():
            self._start_ready(node)

    def _send(self, m: Message) -> None:
        r = self.rng.random
        cfg = self.cfg
        if r() < cfg.drop_rate:
            return
        # 2% of messages are slow: they overtake nothing but get overtaken (reordering).
        delay = 1 + int(r() * (cfg.slow_delay if r() < 0.02 else cfg.max_delay))
        self._seq += 1
        heapq.heappush(self.events, (self.now + delay, self._seq, _DELIVER, None, m))
        if r() < cfg.dup_rate:
            self._push(1 + int(r() * cfg.slow_delay), _DELIVER, None, m)

    def _apply(self, node: SimNode, e) -> None:
        seen = self.applied_at.get(e.index)
        if seen is None:
            self.applied_at[e.index] = (e.term, e.data)
            self.max_applied = max(self.max_applied, e.index)
        elif seen != (e.term, e.data):
            raise SafetyViolation(
                f"state machine safety: node {node.id} applied index {e.index} as "
                f"(term {e.term}, {e.data!r}) but another node applied (term {seen[0]}, "
                f"{seen[1]!r})"
            )
        node.applied = e.index
        if e.type == EntryType.CONF_CHANGE:
            self._note("conf", node.id, e.index, node.raw.status().conf)
        elif e.data:
            key, value = e.data.split(b"=", 1)
            if value == b"":
                node.kv.pop(key, None)
            else:
                node.kv[key] = (value, e.index)
        waiting = node.pending_writes.pop(e.index, None)
        if waiting is not None:
            term, client, op = waiting
            if term == e.term:
                self._complete(client, op, "ok", e.index)
            else:
                self._complete(client, op, "fail")  # our entry was overwritten: never applied

    def _maybe_compact(self, node: SimNode) -> None:
        every = self.cfg.snapshot_every
        raw = node.raw
        if not every or raw.applied - raw.first_index + 1 < every:
            return
        snap = raw.compact(pickle.dumps(node.kv), keep_entries=self.rng.randrange(4))
        node.snapshot = snap
        node.entries = [e for e in node.entries if e.index >= raw.first_index]
        self._note("snapshot", node.id, snap.meta.index)

    # -- safety checks ------------------------------------------------------------------------------
    def _check_leader(self, node: SimNode) -> None:
        term = node.raw.term
        other = self.leaders.setdefault(term, node.id)
        if other == node.id:
            if node.checked_term != term:  # once per term it leads
                node.checked_term = term
                self._check_leader_completeness(node, node.raw.status())
                self._maybe_churn(node)
            return
        raise SafetyViolation(f"election safety: nodes {other} and {node.id} both lead term "
                              f"{term}")

    def _check_commit_is_safe(self, node: SimNode, st) -> None:
        """When a leader commits index c, no voter lacking c may be able to win an election.

        A voter Y would vote for X if X's log is at least as up to date as Y's; we compare with
        Y's *disk* log (Y may crash and come back with only that). This is the property the
        commit rule exists for, checked at the moment of commit instead of waiting for the
        unlucky schedule that actually loses the entry (the paper's Figure 8).
        """
        c = st.commit
        term = node.raw.term_at(c)
        if term is None:
            return
        conf = st.conf
        for x in conf.voters | conf.voters_outgoing:
            xn = self.nodes[x]
            if xn.raw.term_at(c) == term:
                continue  # X holds c
            xst = xn.raw.status()
            if c < xst.first_index:
                continue  # X holds c, in its snapshot
            x_last = (xst.last_term, xst.last_index)
            supporters = {x}
            for y, yn in self.nodes.items():
                if y != x and x_last >= yn.disk_last():
                    supporters.add(y)
            if quorum.has_quorum(conf, supporters):
                raise SafetyViolation(
                    f"commit safety: leader {node.id} (term {st.term}) committed index {c} "
                    f"(term {term}), but node {x}, which lacks it, can still be elected with "
                    f"votes from {sorted(supporters)}"
                )

    def _check_leader_completeness(self, node: SimNode, st) -> None:
        c = self.max_applied
        if c == 0 or c < st.first_index:
            return
        term = node.raw.term_at(c)
        if term != self.applied_at[c][0]:
            raise SafetyViolation(
                f"leader completeness: node {node.id} leads term {st.term} but its log has "
                f"term {term} at committed index {c} (committed term {self.applied_at[c][0]})"
            )

    def _check_log_matching(self, node: SimNode, entries) -> None:
        prev_term = node.raw.term_at(entries[0].index - 1)
        for e in entries:
            key = (e.index, e.term)
            seen = self.entry_ids.get(key)
            if seen is None:
                self.entry_ids[key] = (e.data, prev_term)
            elif seen[0] != e.data or (
                seen[1] is not None and prev_term is not None and seen[1] != prev_term
            ):
                raise SafetyViolation(
                    f"log matching: node {node.id} holds ({e.index}, term {e.term}) = {e.data!r} "
                    f"after term {prev_term}; another log has {seen[0]!r} after term {seen[1]}"
                )
            prev_term = e.term

    def _check_disks(self) -> None:
        """Every applied (hence committed) entry is on a quorum of disks, crashes or not."""
        c = self.max_applied
        if c == 0:
            return
        term = self.applied_at[c][0]
        holders = sum(1 for n in self.nodes.values() if n.disk_covers(c, term))
        if holders < self.min_quorum:
            raise SafetyViolation(f"durability: committed index {c} is on {holders} disks, fewer "
                                  f"than a quorum ({self.min_quorum})")

    # -- nemesis ------------------------------------------------------------------------------------
    def _nemesis(self) -> None:
        rng = self.rng
        ids = sorted(self.nodes)
        alive = [i for i in ids if self.nodes[i].alive]
        leader = self._current_leader()
        action = rng.choice(
            ["crash", "crash", "restart", "partition", "partition", "heal", "transfer",
             "membership", "clock", "lossy", "reset"]
        )
        if action == "crash" and len(alive) > 1:
            victim = leader if (leader and rng.random() < 0.5) else rng.choice(alive)
            self._crash(victim)
            self._push(rng.randrange(1, 6 * self.cfg.election_tick) * UNIT, _RESTART, victim, None)
        elif action == "restart":
            for i in ids:
                if not self.nodes[i].alive:
                    self._restart(i)
        elif action == "partition":
            self._partition(rng.choice(["isolate", "isolate_leader", "halves", "asymmetric",
                                        "ring", "bridge"]), leader)
        elif action == "heal":
            self._heal_network()
        elif action == "transfer" and leader:
            target = rng.choice([i for i in ids if i != leader])
            try:
                self.nodes[leader].raw.transfer_leadership(target)
                self._fault("transfer")
                self._note("transfer", leader, target)
                self._after_input(self.nodes[leader])
            except ProposalRefused:
                pass
        elif action == "membership" and leader:
            self._change_membership(leader)
        elif action == "clock":
            self._skew_clock(leader if (leader and rng.random() < 0.6) else rng.choice(ids))
        elif action == "reset" and len(alive) > 1:
            # Connections between live nodes reset (a flapping link, a middlebox): one, or
            # every connection from a live leader at once, which must not let its followers
            # elect another while its lease holds.
            self._fault("connection reset")
            if leader and rng.random() < 0.5:
                for a in alive:
                    if a != leader:
                        self._note("reset", a, leader)
                        self._peer_lost(a, leader)
            else:
                a, b = rng.sample(alive, 2)
                self._note("reset", a, b)
                self._peer_lost(a, b)
        elif action == "lossy":
            self._fault("lossy links")
            self.cfg = attrs.evolve(self.cfg, drop_rate=rng.choice([0.0, 0.05, 0.2, 0.4]))
            self._note("drop rate", self.cfg.drop_rate)

    def _maybe_churn(self, node: SimNode) -> None:
        """Leader churn: now and then strike a leader moments after it wins, before its first
        appends spread. That leaves logs whose last terms disagree (the paper's Figure 8)."""
        if self.healing or self.rng.random() >= self.cfg.leader_churn:
            return
        self._fault("leader churn")
        when = self.rng.randrange(0, 3 * UNIT)
        if self.rng.random() < 0.5:
            self._push(when, _CRASH, node.id, None)
        else:
            self._push(when, _ISOLATE, node.id, None)

    def _skew_clock(self, node_id: int) -> None:
        """Slow or speed up one node's clock. ReadIndex must be safe under any clock; lease
        reads only under drift the lease margin covers, so there the skew stays at 10%."""
        if self.cfg.read_only == ReadOnlyOption.LEASE:
            interval = self.rng.choice([UNIT - UNIT // 10, UNIT, UNIT + UNIT // 10])
        else:
            interval = self.rng.choice([UNIT // 2, UNIT, 2 * UNIT, 3 * UNIT, 5 * UNIT])
        self.nodes[node_id].tick_interval = interval
        self._fault("clock skew")
        self._note("clock", node_id, f"tick every {interval / UNIT:.1f}")

    def _fault(self, name: str) -> None:
        self.faults[name] = self.faults.get(name, 0) + 1

    def _current_leader(self) -> int:
        best = None
        for n in self.nodes.values():
            st = n.raw.status() if n.alive else None
            if st is not None and st.role == StateRole.LEADER:
                if best is None or st.term > best[1]:
                    best = (n.id, st.term)
        return best[0] if best else 0

    def _crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.alive:
            return
        self._fault("crash")
        self._note("crash", node_id)
        node.alive = False
        node.incarnation += 1
        node.busy = False
        for other in self.nodes.values():  # the kernel closes a dead process's connections
            if other.id != node_id and other.alive and self.rng.random() < 0.8:
                self._push(self.rng.randrange(1, UNIT), _PEER_LOST, other.id, node_id)
        for _index, (_term, client, op) in node.pending_writes.items():
            self._complete(client, op, "info")
        for _ctx, (client, op, _key) in node.pending_reads.items():
            self._complete(client, op, "fail")
        node.pending_writes.clear()
        node.pending_reads.clear()
        node.ready_reads.clear()
        self._check_disks()

    def _restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if node.alive:
            return
        self._note("restart", node_id)
        persisted = PersistedState(node.hard_state, node.snapshot, tuple(node.entries))
        node.raw = self.node_class(self._raft_config(node_id), self._node_rng(node_id), persisted)
        node.alive = True
        node.busy = False
        node.kv = pickle.loads(node.snapshot.data) if node.snapshot else {}
        node.applied = node.snapshot.meta.index if node.snapshot else 0
        self._push(self.rng.randrange(UNIT), _TICK, node_id, node.incarnation)
        self._after_input(node)

    def _partition(self, kind: str, leader: int) -> None:
        rng = self.rng
        ids = sorted(self.nodes)
        rng.shuffle(ids)
        n = len(ids)
        blocked: set[tuple[int, int]] = set()

        def cut(a_side, b_side, both=True):
            for a in a_side:
                for b in b_side:
                    blocked.add((a, b))
                    if both:
                        blocked.add((b, a))

        if kind == "isolate" or (kind == "isolate_leader" and not leader):
            cut([ids[0]], ids[1:])
        elif kind == "isolate_leader":
            cut([leader], [i for i in ids if i != leader])
            if self.cfg.read_only == ReadOnlyOption.READ_INDEX and rng.random() < 0.5:
                # A stalled timer (a starved event loop, a paused VM) keeps the deposed leader
                # believing in itself long after the others moved on: ReadIndex must cope.
                self.nodes[leader].tick_interval = 4 * UNIT
                self._note("clock", leader, "tick every 4.0")
            if rng.random() < 0.5:  # the cut also resets its connections (a switch port flap)
                for i in ids:
                    if i != leader:
                        self._push(rng.randrange(1, UNIT), _PEER_LOST, i, leader)
        elif kind == "halves":
            cut(ids[: n // 2], ids[n // 2 :])
        elif kind == "asymmetric":  # one node can send but not receive
            cut(ids[1:], [ids[0]], both=False)
        elif kind == "ring":  # each node sees its two ring neighbours: overlapping majorities
            for i, a in enumerate(ids):
                for j, b in enumerate(ids):
                    if a != b and min((i - j) % n, (j - i) % n) > 1:
                        blocked.add((a, b))
        elif kind == "bridge":  # two halves that only one node connects
            mid = n // 2
            cut(ids[:mid], ids[mid + 1 :])
        self.blocked = blocked
        self.partition_name = kind
        self._fault(f"partition {kind}")
        self._note("partition", kind, sorted(blocked))

    def _heal_network(self) -> None:
        if self.blocked:
            self._note("heal")
        self.blocked = set()

    def _change_membership(self, leader: int) -> None:
        rng = self.rng
        raw = self.nodes[leader].raw
        voters = sorted(raw.status().conf.voters)
        try:
            if self.learners and rng.random() < 0.6:
                node = self.learners[0]
                raw.propose_conf_change([ConfChangeSingle(ConfChangeType.ADD_VOTER, node)])
                self.learners.pop(0)
                what = f"promote {node}"
            elif self.removed and rng.random() < 0.7:
                node = self.removed[0]
                raw.propose_conf_change([ConfChangeSingle(ConfChangeType.ADD_LEARNER, node)])
                self.removed.pop(0)
                self.learners.append(node)
                what = f"add learner {node}"
            elif len(voters) > max(3, self.cfg.nodes - 1):
                node = rng.choice(voters)
                raw.propose_conf_change([ConfChangeSingle(ConfChangeType.REMOVE_NODE, node)])
                self.removed.append(node)
                self.min_quorum = min(self.min_quorum, (len(voters) - 1) // 2 + 1)
                what = f"remove {node}"
            else:
                return
        except ProposalRefused:
            return
        self._fault("membership")
        self._note("membership", what)
        self._after_input(self.nodes[leader])

    def _heal_all(self) -> None:
        self.healing = True
        self._note("heal all")
        self._heal_network()
        self.cfg = attrs.evolve(self.cfg, drop_rate=0.0, dup_rate=0.0)
        for i in sorted(self.nodes):
            self.nodes[i].tick_interval = UNIT
            self._restart(i)

    # -- clients ------------------------------------------------------------------------------------
    def _client_step(self, client: SimClient) -> None:
        if self.healing or client.op is not None:
            return
        rng = self.rng
        # Mostly the leader we believe in; sometimes any node (follower reads, redirects).
        target = client.leader_guess
        r = rng.random
        if not target or r() < 0.25:
            target = 1 + int(r() * len(self.nodes))
        key = b"k%d" % int(r() * self.cfg.keys)
        client.seq += 1
        roll = rng.random()
        if roll < 0.45:
            kind, value = "write", b"c%d.%d" % (client.id, client.seq)
        elif roll < 0.5:
            kind, value = "delete", b""
        else:
            kind, value = "read", None
        op = self.history.invoke(client.process, kind, key.decode(),
                                 value=value.decode() if value else None, time=self.now)
        client.op, client.kind = op, kind
        self._push(self.cfg.client_timeout_ticks * UNIT, _CLIENT_TIMEOUT, client.id, op)
        for _hop in range(3):  # follow NotLeader redirects like a real client
            node = self.nodes[target]
            if not node.alive:
                client.leader_guess = 0
                return self._complete(client, op, "fail")  # connection refused: nothing sent
            try:
                if kind == "read":
                    ctx = b"%d.%d.%d" % (client.id, client.seq, node.incarnation)
                    node.raw.read_index(ctx, lease=client.seq % 4 != 0)  # some ReadIndex too
                    node.pending_reads[ctx] = (client, op, key)
                else:
                    term, index = node.raw.propose(key + b"=" + value)
                    node.pending_writes[index] = (term, client, op)
                self._after_input(node)
                return
            except NotLeader as e:
                client.leader_guess = e.leader
                if not e.leader:
                    break
                target = e.leader
            except ProposalRefused:
                break
        self._complete(client, op, "fail")

    def _serve_reads(self, node: SimNode) -> None:
        if not node.ready_reads:
            return
        still = []
        for rs in node.ready_reads:
            if rs.index > node.applied:
                still.append(rs)
                continue
            waiting = node.pending_reads.pop(rs.context, None)
            if waiting is not None:
                client, op, key = waiting
                found = node.kv.get(key)
                result = None if found is None else (found[0].decode(), found[1])
                self._complete(client, op, "ok", result)
        node.ready_reads = still

    def _complete(self, client: SimClient, op, status: str, result=None) -> None:
        if client.op != op:
            return  # already completed (timed out, or the node crashed)
        if status == "ok":
            if client.kind == "delete":
                result = None  # the sim does not report whether the key existed
            self.history.ok(op, result, time=self.now)
        elif status == "fail":
            self.history.fail(op, time=self.now)
        else:
            self.history.info(op, time=self.now)
            client.process += len(self.clients)  # Jepsen: a process with an open op is retired
        client.op = None
        if not self.healing:
            backoff = 3 * UNIT if status == "fail" else UNIT
            self._push(1 + int(self.rng.random() * (backoff - 1)), _CLIENT, client.id, None)

    def _client_timeout(self, client: SimClient, op) -> None:
        if client.op == op:
            self._complete(client, op, "fail" if client.kind == "read" else "info")

    # -- end of run ---------------------------------------------------------------------------------
    def _check_liveness(self) -> None:
        deadline = self.now + self.cfg.liveness_ticks * UNIT
        probe: dict = {}

        def committed() -> bool:
            leader = self._current_leader()
            if not leader:
                return False
            node = self.nodes[leader]
            if "index" not in probe or probe.get("node") != leader:
                try:
                    probe["term"], probe["index"] = node.raw.propose(b"")
                    probe["node"] = leader
                    self._after_input(node)
                except ProposalRefused:
                    return False
            return node.raw.status().applied >= probe["index"] and node.raw.term_at(
                probe["index"]) in (probe["term"], None)

        self._run_until(deadline, stop=committed)
        if not committed():
            raise LivenessViolation(
                f"no leader committed a new entry within {self.cfg.liveness_ticks} ticks after "
                f"the faults stopped (leader: {self._current_leader() or 'none'})"
            )

    def _check_history(self) -> None:
        from raftcache.testing.linearizability import check as check_linearizable
        from raftcache.testing.linearizability import format_anomaly

        result = check_linearizable(self.history)
        if not result.ok:
            detail = "\n".join(format_anomaly(a) for a in result.anomalies[:3])
            raise SafetyViolation(f"linearizability:\n{detail}")

    def format_trace(self) -> str:
        lines = []
        for t, what in self.trace:
            lines.append(f"  t={t / UNIT:8.1f}  " + " ".join(str(w) for w in what))
        return "\n".join(lines)


def run_seed(seed: int, config: SimConfig = SimConfig(), node_class=RawNode) -> Simulation:
    """Run one simulation; raises SafetyViolation/LivenessViolation with `.sim` attached."""
    sim = Simulation(seed, config, node_class)
    try:
        return sim.run()
    except (SafetyViolation, LivenessViolation) as exc:
        exc.sim = sim
        raise


def find_violation(seeds, config: SimConfig = SimConfig(), node_class=RawNode):
    """The first seed whose run violates a property, as (seed, exception), or None."""
    for seed in seeds:
        try:
            run_seed(seed, config, node_class)
        except (SafetyViolation, LivenessViolation) as exc:
            return seed, exc
    return None


def _config_for(seed: int, nodes: int, lease: bool | None) -> SimConfig:
    # Alternate read modes across seeds unless one is forced.
    use_lease = (seed % 2 == 1) if lease is None else lease
    return SimConfig(nodes=nodes,
                     read_only=ReadOnlyOption.LEASE if use_lease else ReadOnlyOption.READ_INDEX)


def _run_many(args) -> tuple[int, int, int, list]:
    start, count, nodes, lease, mutant = args
    node_class = MUTANTS[mutant] if mutant else RawNode
    delivered = ops = 0
    failures = []
    cpu0 = time.process_time()
    for seed in range(start, start + count):
        try:
            sim = run_seed(seed, _config_for(seed, nodes, lease), node_class)
            delivered += sim.delivered
            ops += len(sim.history)
        except (SafetyViolation, LivenessViolation) as exc:
            failures.append((seed, f"{type(exc).__name__}: {exc}", exc.sim.format_trace()))
    return delivered, ops, count, failures, time.process_time() - cpu0


def demo(seed: int, nodes: int) -> int:
    """Run one seed and tell its story: what a new user sees before the network layer exists."""
    sim = Simulation(seed, _config_for(seed, nodes, None))
    sim.trace = deque(maxlen=None)
    try:
        sim.run()
        verdict = "all checks passed"
    except (SafetyViolation, LivenessViolation) as exc:
        verdict = f"VIOLATION: {exc}"
    interesting = ("role", "crash", "restart", "partition", "heal", "transfer", "membership",
                   "clock", "drop rate", "snapshot", "heal all")
    print(f"simulated {nodes}-node raftcache cluster, seed {seed} "
          f"({sim.cfg.read_only.value} reads)\n")
    for t, what in sim.trace:
        if what[0] == "role" and what[2] != "LEADER":
            continue
        if what[0] == "role":
            text = f"node {what[1]} becomes leader of term {what[3]}"
        elif what[0] == "partition":
            text = f"partition ({what[1]}): " + " ".join(f"{a}-x->{b}" for a, b in what[2])
        elif what[0] in interesting:
            text = " ".join(str(w) for w in what)
        else:
            continue
        print(f"  t={t / UNIT:7.1f} ticks  {text}")
    counts: dict = {}
    for op in sim.history.operations():
        k = (str(op.kind), str(op.status))
        counts[k] = counts.get(k, 0) + 1
    print("\nclient operations:")
    for (kind, status), n in sorted(counts.items()):
        print(f"  {kind:7} {status:5} {n:5}")
    print(f"\nleaders by term: {dict(sorted(sim.leaders.items()))}")
    print(f"faults injected: {dict(sorted(sim.faults.items()))}")
    print(f"messages delivered: {sim.delivered}; entries applied: {sim.max_applied}")
    print(f"checks (election safety, log matching, leader completeness, state machine safety, "
          f"durability, linearizability, liveness): {verdict}")
    return 0 if verdict == "all checks passed" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftcache.testing.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--lease", choices=["on", "off", "mixed"], default="mixed",
                   help="read mode: lease reads, ReadIndex, or alternate per seed")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--mutant", choices=sorted(MUTANTS),
                   help="run a deliberately broken core: the run should fail")
    p.add_argument("--demo", action="store_true", help="tell the story of seed --start")
    args = p.parse_args(argv)
    if args.demo:
        return demo(args.start, args.nodes)
    lease = {"on": True, "off": False, "mixed": None}[args.lease]
    t0 = time.perf_counter()
    chunks = []
    step = max(1, min(50, args.seeds // (args.jobs * 4)))
    for s in range(args.start, args.start + args.seeds, step):
        chunks.append((s, min(step, args.start + args.seeds - s), args.nodes, lease, args.mutant))
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            delivered, ops, done, failures, cpu = _collect(pool.imap(_run_many, chunks),
                                                            args.seeds)
    else:
        delivered, ops, done, failures, cpu = _collect(map(_run_many, chunks), args.seeds)
    elapsed = time.perf_counter() - t0
    mutant = f" --mutant {args.mutant}" if args.mutant else ""
    for seed, err, trace in failures[:3]:
        print(f"\nFAILED seed {seed}: {err}\nlast steps:\n{trace}", file=sys.stderr)
        print(f"reproduce: python -m raftcache.testing.sim --start {seed} --seeds 1 "
              f"--nodes {args.nodes} --lease {args.lease}{mutant}", file=sys.stderr)
    # Per core = per CPU-second of the workers, so a busy machine does not skew the figure.
    rate = delivered / max(cpu, 1e-9)
    print(f"{done} seeds, {args.nodes} nodes: {len(failures)} failed; {delivered} messages "
          f"delivered, {ops} client operations in {elapsed:.1f} s wall, {cpu:.1f} s CPU "
          f"({rate:,.0f} simulated messages/s per core)")
    return 1 if failures else 0


def _collect(results, total):
    delivered = ops = done = 0
    cpu = 0.0
    failures = []
    for d, o, n, f, c in results:
        cpu += c
        delivered += d
        ops += o
        done += n
        failures.extend(f)
        if sys.stderr.isatty():
            print(f"\r{done}/{total} seeds, {len(failures)} failed", end="", file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return delivered, ops, done, failures, cpu


if __name__ == "__main__":
    sys.exit(main())
