"""The values the Raft core takes in and hands out: messages, entries, states and its Ready.

Everything here is immutable (``attrs.frozen``) so a message handed to the network, or an entry
handed to storage, can never change under anyone's feet. The core is sans-I/O: these classes are
the whole of its conversation with the outside world.
"""

from __future__ import annotations

import enum
import json
from typing import NamedTuple

import attrs

NodeId = int
NONE: NodeId = 0  # "no node": no vote cast, no leader known. Real node ids are >= 1.

# Bounds on what any node accepts from the network (validate.py) and hence ever persists: far
# enough below 2**63 that no term or index a node derives from them overflows a signed 64-bit
# field of any storage or wire format. A term of 2**62 takes ten elections a second for over a
# billion years to reach.
MAX_TERM = 1 << 62
MAX_INDEX = 1 << 62
MAX_NODE_ID = (1 << 62) - 1


class MsgType(enum.IntEnum):
    APP = 1  # AppendEntries: index/log_term name the entry before `entries`
    APP_RESP = 2  # index = last matching index on success; reject + reject_hint/log_term on failure
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5  # term is the term the candidate *would* campaign in; nobody's term changes
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7  # commit and an optional read-index context
    HEARTBEAT_RESP = 8
    SNAP = 9  # one chunk of a snapshot: snapshot meta, offset, data, done
    SNAP_RESP = 10  # index = snapshot index, offset = bytes received so far; reject = start over
    TIMEOUT_NOW = 11  # leadership transfer: campaign now, ignoring leases
    READ_INDEX = 12  # follower -> leader: please give me a read index for `context`
    READ_INDEX_RESP = 13  # leader -> follower: index is the read index (reject: no index given)


RESPONSE_TYPES = frozenset(
    {
        MsgType.APP_RESP,
        MsgType.VOTE_RESP,
        MsgType.PRE_VOTE_RESP,
        MsgType.HEARTBEAT_RESP,
        MsgType.SNAP_RESP,
        MsgType.READ_INDEX_RESP,
    }
)


class EntryType(enum.IntEnum):
    NORMAL = 0  # application data; empty data is a leader's no-op and must be skipped on apply
    CONF_CHANGE = 1  # data is an encoded ConfChange; the core applies it itself


class StateRole(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@attrs.frozen(slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@attrs.frozen(slots=True)
class HardState:
    """What must be on stable storage before any message of the same Ready is sent."""

    term: int = 0
    vote: NodeId = NONE
    commit: int = 0


@attrs.frozen(slots=True)
class ConfState:
    """Cluster membership. `voters_outgoing` is non-empty only in a joint configuration."""

    voters: frozenset[NodeId] = frozenset()
    voters_outgoing: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()

    @property
    def joint(self) -> bool:
        return bool(self.voters_outgoing)

    def all_nodes(self) -> frozenset[NodeId]:
        return self.voters | self.voters_outgoing | self.learners

    def is_voter(self, node: NodeId) -> bool:
        return node in self.voters or node in self.voters_outgoing


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0  # also promotes a learner
    REMOVE_NODE = 1
    ADD_LEARNER = 2  # also demotes a voter
    UPDATE_ADDRESS = 3  # a member's address only: the membership stays as it is
    # The member has run and holds the log (the leader saw it acknowledge entries): from now
    # on it may not come back without its Raft state (it may have voted). Membership stays.
    JOINED = 4


MAX_ADDRESS = 255  # characters of a peer address carried by a configuration change


@attrs.frozen(slots=True)
class ConfChangeSingle:
    type: ConfChangeType
    node_id: NodeId
    # Where peers reach `node_id` ("host:port"), for adds and UPDATE_ADDRESS: the log carries
    # it to every node, and snapshots keep it. The core only passes it along (the state
    # machine records it); "" keeps whatever address the nodes know already.
    address: str = ""


@attrs.frozen(slots=True)
class ConfChange:
    """A membership change. An empty `changes` tuple means "leave the joint configuration"."""

    changes: tuple[ConfChangeSingle, ...] = ()

    def encode(self) -> bytes:
        return json.dumps([[int(c.type), c.node_id, *([c.address] if c.address else [])]
                           for c in self.changes]).encode()

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """The change `data` encodes; ValueError (only) when it encodes none."""
        try:
            items = json.loads(data)
            changes = tuple(ConfChangeSingle(ConfChangeType(t), n, *address)
                            for t, n, *address in items)
        except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"not a configuration change: {exc}") from None
        for c in changes:
            if type(c.node_id) is not int or not NONE < c.node_id <= MAX_NODE_ID:
                raise ValueError(f"node id out of range in a configuration change: {c.node_id!r}")
            problem = address_problem(c.address)
            if problem:
                raise ValueError(f"node {c.node_id}'s address in a configuration change: "
                                 f"{problem}")
            if c.type == ConfChangeType.UPDATE_ADDRESS and not c.address:
                raise ValueError(f"an address update of node {c.node_id} without an address")
        return cls(changes)


def address_problem(address) -> str | None:
    """Why `address` is not "host:port" (a DNS name, an IPv4 address or a [bracketed] IPv6
    one, and a port from 1 to 65535) that a configuration change may carry; "" (no address)
    is fine."""
    if type(address) is not str:
        return f"{address!r} is not a string"
    if not address:
        return None
    if len(address) > MAX_ADDRESS:
        return f"longer than {MAX_ADDRESS} characters"
    host, sep, port = address.rpartition(":")
    if not (sep and host and address.isascii() and address.isprintable() and " " not in address
            and port.isdigit() and 0 < int(port) < 65536):
        return f"expected \"host:port\", got {address!r}"
    return None


@attrs.frozen(slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


@attrs.frozen(slots=True)
class Snapshot:
    """A state-machine image covering every entry up to and including `meta.index`."""

    meta: SnapshotMeta = SnapshotMeta()
    data: bytes = b""


@attrs.frozen(slots=True)
class Message:
    type: MsgType
    to: NodeId
    frm: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""
    # SNAP chunks only: the snapshot's meta, the chunk's byte offset and whether it is the last.
    snapshot_meta: SnapshotMeta | None = None
    offset: int = 0
    data: bytes = b""
    done: bool = False
    # Lease bookkeeping: the leader's tick count when it sent the HEARTBEAT, echoed back.
    tick: int = 0
    # The sender's time in ms, as data its driver handed in (RawNode.set_clock); 0: unknown.
    # A leader sends the cluster time its voters agree on, any other node its own clock.
    clock_ms: int = 0


@attrs.frozen(slots=True)
class ReadState:
    """A read request is safe to serve once the local applied index reaches `index`."""

    index: int
    context: bytes


@attrs.frozen(slots=True)
class SoftState:
    """Volatile state the driver may want to log or expose; never persisted."""

    leader: NodeId
    role: StateRole


class Status(NamedTuple):
    """What a RawNode is, at one moment: what drivers, tools and tests read instead of its
    attributes (like etcd's Status). A NamedTuple rather than an attrs class: the simulator
    asks for one after every event, and a tuple is made three times faster."""

    id: NodeId
    term: int
    vote: NodeId
    commit: int
    applied: int
    lead: NodeId  # the leader it knows, or NONE
    role: StateRole
    conf: ConfState
    first_index: int  # the first entry still in the log (the snapshot's index + 1)
    last_index: int
    last_term: int
    lead_transferee: NodeId  # a leadership transfer in progress, or NONE
    refused_snapshots: int  # received snapshots its state machine would not take


@attrs.frozen(slots=True)
class Ready:
    """Work the driver must carry out, in this order, then call ``advance(ready)``.

    0. send `early_messages` (they may go out before the persisting is done, like etcd's
       leader appends; sending them with `messages` instead is correct too);
    1. persist `snapshot` (if any), then `entries` (replacing any stored entries at the same
       indexes or later), then `hard_state` (if any) - durably when `must_sync`;
    2. send `messages`;
    3. apply `committed_entries` in order (skip NORMAL entries with empty data: leader no-ops),
       after installing `snapshot` into the state machine if there is one;
    4. serve `read_states` once the applied index reaches each one's index;
    5. call ``advance(ready)``.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()  # only once this Ready is persisted
    early_messages: tuple[Message, ...] = ()  # at once: nothing in them waits for the disk
    committed_entries: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False

    @property
    def all_messages(self) -> tuple[Message, ...]:
        return self.early_messages + self.messages


class ProposalRefused(Exception):
    """The core refused a proposal or read; nothing was appended. `reason` says why."""

    def __init__(self, reason: str, leader: NodeId = NONE):
        super().__init__(reason if not leader else f"{reason} (try node {leader})")
        self.reason = reason
        self.leader = leader


class NotLeader(ProposalRefused):
    """This node is not the leader; `leader` is the one it knows of, or NONE."""

    def __init__(self, leader: NodeId = NONE):
        super().__init__("not the leader" if leader else "no leader known", leader)
