"""Reads waiting for their read index: ReadIndex rounds and the reads they release."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import attrs
import gevent

from raftcache.core import api
from raftcache.core.raft import RawNode

from .waiting import Overloaded, Waiter


@attrs.define
class Reads:
    """The reads of one replica waiting to be confirmed.

    Contract: `wait_for_index` returns once this node, confirmed as the leader (or told by
    it), has applied everything committed before the call (ReadIndex; with `lease`, the
    leader's lease may stand in for the heartbeat round), or with the error to answer. The
    Ready loop hands over the core's read states (`confirmed`) and releases the reads whose
    index is applied (`serve_applied`); it fails the reads a leadership change orphaned
    (`fail_orphaned`), and every read when the backend cannot serve (`fail_all`).
    """

    node_id: int
    raw: RawNode
    max_pending: int
    wake: Callable[[], None]  # the Ready loop's
    advance_clock: Callable[[], None]  # the replica's ticks, caught up
    waiting: dict[bytes, Waiter] = attrs.Factory(dict)  # read context -> not yet confirmed
    confirmed: list[tuple[int, Waiter]] = attrs.Factory(list)  # (read index, read) to apply
    _ids: itertools.count = attrs.Factory(lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self.waiting) + len(self.confirmed)

    def wait_for_index(self, timeout: float, lease: bool = False) -> api.Response | None:
        """None once the read may be served here; else the error to answer. Raises NotLeader
        (the caller redirects or forwards) and Overloaded."""
        if len(self) >= self.max_pending:
            raise Overloaded(len(self), "reads")
        self.advance_clock()  # after a stall, leases must see the time that passed
        ctx = b"%d:%d" % (self.node_id, next(self._ids))
        self.raw.read_index(ctx, lease=lease)
        st = self.raw.status()
        waiter = self.waiting[ctx] = Waiter(st.term, st.lead)
        self.wake()
        try:
            outcome = waiter.result.get(timeout=timeout)
        except gevent.Timeout:
            self.waiting.pop(ctx, None)
            return api.error("Unavailable", "could not confirm a read index in time "
                             "(no quorum?)")
        return outcome if isinstance(outcome, api.Response) else None

    def confirmed_by(self, read_states) -> None:
        """The core confirmed these read indexes (`Ready.read_states`)."""
        for rs in read_states:
            waiter = self.waiting.pop(rs.context, None)
            if waiter is not None:
                self.confirmed.append((rs.index, waiter))

    def serve_applied(self) -> None:
        """Release every confirmed read whose index is applied."""
        if not self.confirmed:
            return
        applied = self.raw.status().applied
        still = []
        for index, waiter in self.confirmed:
            if index <= applied:
                waiter.result.set(index)
            else:
                still.append((index, waiter))
        self.confirmed = still

    def fail_orphaned(self, reason: str) -> None:
        """Read requests issued under another leader may never be answered by the core;
        reads are idempotent, so tell those clients to retry at once rather than time out."""
        st = self.raw.status()
        for ctx, waiter in list(self.waiting.items()):
            if (waiter.term, waiter.leader) != (st.term, st.lead):
                del self.waiting[ctx]
                waiter.result.set(api.error("Unavailable", reason))

    def fail_all(self, reason: str) -> None:
        """Answer every waiting read Unavailable now: this node cannot serve them for a
        while, and the client has time left to ask another."""
        waiting = list(self.waiting.values()) + [w for _, w in self.confirmed]
        self.waiting.clear()
        self.confirmed = []
        for waiter in waiting:
            waiter.result.set(api.error("Unavailable", reason))
