"""The boundary check on Raft messages from the network, before the core sees them.

The core trusts its peers to follow the protocol (Raft is not Byzantine-tolerant), but nothing
that arrives over a socket is trusted to be *well formed*: a buggy or hostile peer, or bytes
that merely decode, must never crash a node, push a term beyond what can be incremented and
persisted, or hand the core a log it cannot store. `peer_message_problem` names what is wrong
with a message, or returns None; the node drops (and counts) every message it objects to.

Pure: no I/O, no clock, no randomness (the simulator and property tests call it directly).
"""

from __future__ import annotations

from collections.abc import Container

from .messages import (
    MAX_INDEX,
    MAX_NODE_ID,
    MAX_TERM,
    ConfChange,
    ConfState,
    EntryType,
    Message,
    MsgType,
    NodeId,
)

MAX_CONTEXT = 256  # read-index contexts ("<node>:<n>") and the transfer marker are far shorter


def peer_message_problem(m: Message, node_id: NodeId, members: Container[NodeId]) -> str | None:
    """Why node `node_id` must drop `m` (received from the network), or None when it may step it.

    `members` are the nodes that may talk to this one: the configured peers and every node the
    current configuration names (learners and nodes joining included).
    """
    if m.to != node_id:
        return f"addressed to node {m.to}, this is node {node_id}"
    if m.frm == node_id or m.frm not in members:
        return f"from node {m.frm}, which is not a member of this cluster"
    if not 0 <= m.term <= MAX_TERM:
        return f"term {m.term} out of range"
    for name in ("log_term", "index", "commit", "reject_hint", "offset", "tick",
                 "clock_ms"):
        value = getattr(m, name)
        if not 0 <= value <= MAX_INDEX:
            return f"{name} {value} out of range"
    if m.log_term > m.term and m.type in (MsgType.APP, MsgType.VOTE, MsgType.PRE_VOTE):
        return f"log term {m.log_term} after the message's term {m.term}"
    if len(m.context) > MAX_CONTEXT:
        return f"context of {len(m.context)} bytes (at most {MAX_CONTEXT})"
    if m.entries:
        if m.type != MsgType.APP:
            return f"entries in a {m.type.name} message"
        problem = _entries_problem(m)
        if problem:
            return problem
    if m.type == MsgType.SNAP:
        meta = m.snapshot_meta
        if meta is None:
            return "snapshot chunk without snapshot metadata"
        if not (0 < meta.index <= MAX_INDEX and 0 < meta.term <= m.term):
            return f"snapshot index {meta.index} / term {meta.term} out of range"
        problem = conf_state_problem(meta.conf_state)
        if problem:
            return f"snapshot configuration: {problem}"
    return None


def _entries_problem(m: Message) -> str | None:
    """Entries must follow `m.index` one by one, with terms that never decrease, start no
    earlier than `m.log_term` and end no later than the sender's term."""
    expected, floor = m.index + 1, m.log_term
    for e in m.entries:
        if e.index != expected:
            return f"entry index {e.index} where {expected} was due"
        if not floor <= e.term <= m.term or e.term < 1:
            return f"entry {e.index} has term {e.term} (expected {max(floor, 1)}..{m.term})"
        if e.type == EntryType.CONF_CHANGE:
            try:
                ConfChange.decode(e.data)
            except ValueError as exc:
                return f"entry {e.index}: {exc}"
        expected, floor = expected + 1, e.term
    if expected - 1 > MAX_INDEX:
        return f"entries up to index {expected - 1} out of range"
    return None


def conf_state_problem(conf: ConfState) -> str | None:
    if not conf.voters:
        return "no voters"
    for node in conf.all_nodes():
        if type(node) is not int or not 0 < node <= MAX_NODE_ID:
            return f"node id {node!r} out of range"
    return None
