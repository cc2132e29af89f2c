"""A tiny deterministic in-memory network of RawNodes for unit tests of the Raft core.

Nothing happens on its own: a test ticks nodes and delivers, drops, holds or isolates messages
explicitly. Each node's Readys are carried out in the documented order (persist -> send ->
apply -> advance), and what a node persisted is kept so that it can be restarted from exactly
that. Every entry any node applies is checked against what every other node applied at the
same index (state machine safety), so a test that merely drives a cluster also checks it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable

from raftcache.core.raft import PersistedState, RaftConfig, RawNode
from raftcache.core.raft.messages import (
    NONE,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    NodeId,
    ReadState,
    Ready,
    Snapshot,
    StateRole,
)

Pred = Callable[[Message], bool]


def entry(index: int, term: int, data: bytes | None = None) -> Entry:
    """A NORMAL entry with recognisable data (the default names its index and term)."""
    return Entry(
        term, index, EntryType.NORMAL, data if data is not None else b"%d@%d" % (index, term)
    )


def log_of(terms: Iterable[int], voters: Iterable[NodeId]) -> tuple[Entry, ...]:
    """A log like a bootstrapped node's: index 1 is the initial membership (term 1), then one
    NORMAL entry per term in `terms` from index 2 on."""
    first = RawNode.bootstrap(RaftConfig(id=1), random.Random(0), list(voters)).raft_log.entries[0]
    return (first,) + tuple(entry(i, t) for i, t in enumerate(terms, start=2))


class MemStorage:
    """What one node has made durable: exactly the input of its next restart."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot  # a snapshot from the leader replaces the whole log
            self.entries = []
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def save_compaction(self, snap: Snapshot, offset: int) -> None:
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > offset]

    def persisted(self) -> PersistedState:
        return PersistedState(self.hard_state, self.snapshot, tuple(self.entries))


class StateMachine:
    """The application: the data of every applied NORMAL entry, in order."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.index = 0

    def image(self) -> bytes:
        return json.dumps([d.hex() for d in self.data]).encode()

    def restore(self, snap: Snapshot) -> None:
        self.data = [bytes.fromhex(h) for h in json.loads(snap.data or b"[]")]
        self.index = snap.meta.index


class Network:
    def __init__(self, seed: int = 0, **config) -> None:
        self.seed = seed
        self.config = config  # RaftConfig overrides for every node
        self.nodes: dict[NodeId, RawNode] = {}  # running nodes only
        self.storage: dict[NodeId, MemStorage] = {}
        self.sm: dict[NodeId, StateMachine] = {}
        self.read_states: dict[NodeId, list[ReadState]] = {}
        self.readys: dict[NodeId, list[Ready]] = {}  # every Ready each node handed out
        self.confs: dict[NodeId, list[ConfState]] = {}  # each node's configurations, in order
        self.queue: list[Message] = []  # sent, not yet delivered
        self.sent: list[Message] = []  # everything ever sent, delivered or not
        self.dropped: list[Message] = []
        self.isolated: set[NodeId] = set()
        self.cuts: set[frozenset[NodeId]] = set()
        self.rules: list[list] = []  # [predicate, remaining drops or None for "forever"]
        self.applied: dict[int, Entry] = {}  # index -> the entry applied there, on any node
        self._generation: dict[NodeId, int] = {}

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def bootstrap(cls, ids: Iterable[NodeId], seed: int = 0, **config) -> Network:
        net = cls(seed, **config)
        ids = list(ids)
        for nid in ids:
            net._start(nid, RawNode.bootstrap(net.make_config(nid), net._rng(nid), ids))
        net.process_all()
        return net

    @classmethod
    def from_logs(
        cls, logs: dict[NodeId, tuple[Entry, ...]], term: int, seed: int = 0, **config
    ) -> Network:
        """Nodes restarted from the given persisted logs at `term`, with only index 1 (the
        bootstrap membership) known committed."""
        net = cls(seed, **config)
        for nid, entries in logs.items():
            net.storage[nid] = MemStorage()
            net.storage[nid].entries = list(entries)
            net.storage[nid].hard_state = HardState(term=term, commit=1)
            net.restart(nid)
        return net

    def make_config(self, nid: NodeId, **overrides) -> RaftConfig:
        return RaftConfig(id=nid, **{**self.config, **overrides})

    def _rng(self, nid: NodeId) -> random.Random:
        gen = self._generation.get(nid, 0)
        self._generation[nid] = gen + 1
        return random.Random(self.seed * 1_000_003 + nid * 1009 + gen)

    def _start(self, nid: NodeId, node: RawNode) -> None:
        self.nodes[nid] = node
        self.storage.setdefault(nid, MemStorage())
        self.sm[nid] = StateMachine()
        self.read_states.setdefault(nid, [])
        self.readys.setdefault(nid, [])
        self.confs.setdefault(nid, [])
        self._note_conf(nid)

    def add_node(self, nid: NodeId, **overrides) -> RawNode:
        """A brand-new, empty node that will join a running cluster (not bootstrapped)."""
        self._start(nid, RawNode(self.make_config(nid, **overrides), self._rng(nid)))
        return self.nodes[nid]

    def crash(self, nid: NodeId) -> None:
        """Stop a node; it keeps only what it persisted. Messages to it are lost."""
        del self.nodes[nid]

    def restart(self, nid: NodeId, **overrides) -> RawNode:
        """(Re)start a node from exactly what it persisted, replaying its state machine."""
        if nid in self.nodes:
            self.crash(nid)
        storage = self.storage[nid]
        node = RawNode(self.make_config(nid, **overrides), self._rng(nid), storage.persisted())
        self._start(nid, node)
        if storage.snapshot is not None:
            self.sm[nid].restore(storage.snapshot)
        self.process(nid)
        return node

    # -- faults --------------------------------------------------------------------------------
    def isolate(self, *nids: NodeId) -> None:
        self.isolated.update(nids)

    def cut(self, a: NodeId, b: NodeId) -> None:
        self.cuts.add(frozenset((a, b)))

    def heal(self) -> None:
        self.isolated.clear()
        self.cuts.clear()
        self.rules.clear()

    def drop(self, pred: Pred, times: int | None = None) -> None:
        """Drop messages matching `pred` when sent (`times` of them, or all)."""
        self.rules.append([pred, times])

    def _link_down(self, m: Message) -> bool:
        return (
            m.frm in self.isolated or m.to in self.isolated or frozenset((m.frm, m.to)) in self.cuts
        )

    def _ruled_out(self, m: Message) -> bool:
        for rule in self.rules:
            pred, left = rule
            if (left is None or left > 0) and pred(m):
                if left is not None:
                    rule[1] = left - 1
                return True
        return False

    # -- driving ---------------------------------------------------------------------------------
    def process(self, nid: NodeId) -> None:
        """Carry out every Ready of `nid`: persist, send, apply, then advance."""
        node = self.nodes[nid]
        while node.has_ready():
            rd = node.ready()
            self.readys[nid].append(rd)
            self.storage[nid].save(rd)
            for m in rd.early_messages + rd.messages:
                self._send(m)
            self._apply(nid, rd)
            self.read_states[nid].extend(rd.read_states)
            node.advance(rd)
            self._note_conf(nid)

    def process_all(self) -> None:
        for nid in sorted(self.nodes):
            self.process(nid)

    def _send(self, m: Message) -> None:
        self.sent.append(m)
        if self._link_down(m) or self._ruled_out(m):
            self.dropped.append(m)
        else:
            self.queue.append(m)

    def _apply(self, nid: NodeId, rd: Ready) -> None:
        sm = self.sm[nid]
        if rd.snapshot is not None:
            sm.restore(rd.snapshot)
        for e in rd.committed_entries:
            assert e.index == sm.index + 1, f"node {nid} applied {e.index} after {sm.index}"
            seen = self.applied.setdefault(e.index, e)
            assert seen == e, f"state machine safety: node {nid} applied {e}, another {seen}"
            sm.index = e.index
            if e.type == EntryType.NORMAL and e.data:
                sm.data.append(e.data)

    def _note_conf(self, nid: NodeId) -> None:
        conf = self.nodes[nid].conf
        if conf.voters and (not self.confs[nid] or self.confs[nid][-1] != conf):
            self.confs[nid].append(conf)

    def step(self, m: Message) -> None:
        """Hand one message to its destination now (if it runs) and process its Readys."""
        if m.to in self.nodes:
            self.nodes[m.to].step(m)
            self.process(m.to)

    def deliver(self, pred: Pred | None = None) -> int:
        """Deliver the queued messages matching `pred` (all by default), in the order sent;
        the others stay queued. Returns how many were delivered."""
        batch = [m for m in self.queue if pred is None or pred(m)]
        self.queue = [m for m in self.queue if not (pred is None or pred(m))]
        for m in batch:
            if self._link_down(m) or m.to not in self.nodes:
                self.dropped.append(m)
            else:
                self.nodes[m.to].step(m)
        self.process_all()
        return len(batch)

    def take(self, pred: Pred | None = None) -> list[Message]:
        """Remove the queued messages matching `pred` from the network and return them."""
        taken = [m for m in self.queue if pred is None or pred(m)]
        self.queue = [m for m in self.queue if not (pred is None or pred(m))]
        return taken

    def stabilize(self, pred: Pred | None = None, max_rounds: int = 1000) -> None:
        """Deliver (matching) messages until none are left queued."""
        for _ in range(max_rounds):
            self.process_all()
            if not any(pred is None or pred(m) for m in self.queue):
                return
            self.deliver(pred)
        raise AssertionError("the network did not quiesce")

    def tick(self, nid: NodeId, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[nid].tick()
            self.process(nid)

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for nid in sorted(self.nodes):
                self.nodes[nid].tick()
            self.process_all()

    def run(self, ticks: int) -> None:
        """Let time pass: tick every node, then let the network quiesce, `ticks` times."""
        for _ in range(ticks):
            self.tick_all()
            self.stabilize()

    def campaign(self, nid: NodeId) -> None:
        """Make `nid` campaign now, without waiting out a randomized timeout."""
        self.nodes[nid].campaign()
        self.process(nid)

    def elect(self, nid: NodeId) -> RawNode:
        self.campaign(nid)
        self.stabilize()
        assert self.nodes[nid].role == StateRole.LEADER, f"node {nid} did not win"
        return self.nodes[nid]

    def propose(self, nid: NodeId, data: bytes) -> tuple[int, int]:
        term, index = self.nodes[nid].propose(data)
        self.process(nid)
        return term, index

    def compact(self, nid: NodeId, keep_entries: int = 0) -> Snapshot:
        """Snapshot `nid`'s state machine and compact its log, persisting both."""
        node = self.nodes[nid]
        snap = node.compact(self.sm[nid].image(), keep_entries)
        self.storage[nid].save_compaction(snap, node.raft_log.offset)
        return snap

    # -- looking -------------------------------------------------------------------------------
    def leaders(self) -> list[NodeId]:
        return sorted(n for n, node in self.nodes.items() if node.role == StateRole.LEADER)

    def leader(self) -> NodeId:
        """The one leader of the highest term among running nodes, or NONE."""
        top = max(node.term for node in self.nodes.values())
        found = [
            n
            for n, node in self.nodes.items()
            if node.role == StateRole.LEADER and node.term == top
        ]
        assert len(found) <= 1, f"two leaders in term {top}: {found}"
        return found[0] if found else NONE

    def messages(
        self,
        type: MsgType | None = None,
        frm: NodeId | None = None,
        to: NodeId | None = None,
        source: list[Message] | None = None,
    ) -> list[Message]:
        """Sent messages (or those in `source`) filtered by type, sender and destination."""
        return [
            m
            for m in (self.sent if source is None else source)
            if (type is None or m.type == type)
            and (frm is None or m.frm == frm)
            and (to is None or m.to == to)
        ]

    def log(self, nid: NodeId) -> list[tuple[int, int]]:
        """(index, term) of every entry in `nid`'s in-memory log."""
        return [(e.index, e.term) for e in self.nodes[nid].raft_log.entries]
