"""A leader's bookkeeping for linearizable reads (etcd's read_only.go): ReadIndex requests
waiting for a quorum's heartbeat acknowledgements (Raft dissertation 6.4), requests waiting for
the leader's first commit of its term, and the heartbeat ticks peers echoed, which bound a
check-quorum lease.

Pure: no I/O, no clock, no randomness. Cleared at every change of term or role.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

from . import quorum
from .messages import ConfState, NodeId


@attrs.define(slots=True)
class ReadRequest:
    index: int  # the commit index when the read was asked: serve at or after it
    requester: NodeId
    acks: set  # who acknowledged the heartbeat round that carries it


class ReadOnly:
    def __init__(self) -> None:
        self.pending: OrderedDict[bytes, ReadRequest] = OrderedDict()  # oldest first
        self.waiting_for_commit: list[tuple[bytes, NodeId, bool]] = []  # (ctx, requester, lease)
        self.lease_acks: dict[NodeId, int] = {}  # peer -> newest heartbeat tick it echoed

    def reset(self) -> None:
        self.pending.clear()
        self.waiting_for_commit.clear()
        self.lease_acks.clear()

    # -- ReadIndex ------------------------------------------------------------------------------
    def add(self, context: bytes, index: int, requester: NodeId, self_id: NodeId) -> None:
        self.pending[context] = ReadRequest(index, requester, {self_id})

    def newest_context(self) -> bytes | None:
        """The context a heartbeat should carry: acknowledging it confirms every older read."""
        return next(reversed(self.pending)) if self.pending else None

    def ack(self, context: bytes, frm: NodeId, conf: ConfState) -> list[tuple[bytes, ReadRequest]]:
        """Record `frm`'s acknowledgement of the heartbeat round that carried `context`; the
        reads it confirms (every one queued up to it, once a quorum has acknowledged)."""
        req = self.pending.get(context)
        if req is None:
            return []
        req.acks.add(frm)
        if not quorum.has_quorum(conf, req.acks):
            return []
        released = []
        while self.pending:
            ctx, r = self.pending.popitem(last=False)
            released.append((ctx, r))
            if ctx == context:
                break
        return released

    def wait_for_commit(self, context: bytes, requester: NodeId, lease: bool) -> None:
        self.waiting_for_commit.append((context, requester, lease))

    def take_waiting(self) -> list[tuple[bytes, NodeId, bool]]:
        waiting, self.waiting_for_commit = self.waiting_for_commit, []
        return waiting

    # -- leases ---------------------------------------------------------------------------------
    def record_lease_ack(self, frm: NodeId, tick: int, now_tick: int) -> None:
        # An echo of a tick we never sent would extend the lease: ignore it.
        if self.lease_acks.get(frm, -1) < tick <= now_tick:
            self.lease_acks[frm] = tick

    def quorum_tick(self, conf: ConfState, self_id: NodeId, now_tick: int, never: int) -> int:
        """The newest tick that a quorum of voters has echoed (we echo `now_tick`); a voter we
        have not heard from this term counts as having echoed `never`."""
        acks = dict.fromkeys(conf.voters | conf.voters_outgoing, never)
        acks.update(self.lease_acks)
        acks[self_id] = now_tick
        return quorum.committed_index(conf, acks)
