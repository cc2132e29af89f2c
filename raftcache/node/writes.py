"""Writes waiting for their entry to apply."""

from __future__ import annotations

from collections.abc import Callable

import gevent

from raftcache.core import api
from raftcache.core.raft import RawNode

from .waiting import Overloaded, Waiter


class Writes:
    """The writes of one replica waiting for their entries.

    Contract: `propose` appends an entry and waits for it; it resolves with the entry's
    applied result once the entry at that index *and* term has applied (`resolve`, called by
    the Ready loop after each apply batch), with Unavailable when another leader's entry took
    the index (never committed, never will be), and with OutcomeUnknown when the wait ends
    first (it may still apply). Raises NotLeader and ProposalRefused from the core, and
    Overloaded past `node.max_pending` waiting writes.
    """

    def __init__(self, raw: RawNode, max_pending: int, wake: Callable[[], None]):
        self.raw = raw
        self.max_pending = max_pending
        self.wake = wake
        self.waiting: dict[int, Waiter] = {}  # log index -> waiting write

    def __len__(self) -> int:
        return len(self.waiting)

    def propose(self, data: bytes, timeout: float):
        """Commit `data` (an encoded envelope); its applied result, or an error Response."""
        if len(self.waiting) >= self.max_pending:
            raise Overloaded(len(self.waiting), "writes")
        term, index = self.raw.propose(data)
        return self.wait(index, term, timeout)

    def wait(self, index: int, term: int, timeout: float):
        """The applied result of the entry (index, term), or an error Response."""
        waiter = self.waiting[index] = Waiter(term)
        self.wake()
        try:
            return waiter.result.get(timeout=timeout)
        except gevent.Timeout:
            self.waiting.pop(index, None)
            return api.error("OutcomeUnknown", "timed out waiting for the write to "
                             "commit; it may still apply")

    def resolve(self, applied) -> None:
        """Tell the writers of these applied entries ((entry, result) pairs, in log order)."""
        for entry, result in applied:
            waiter = self.waiting.pop(entry.index, None)
            if waiter is None:
                continue
            if waiter.term != entry.term:
                # Another leader's entry took our index: ours was never committed, never will.
                result = api.error("Unavailable",
                                   "leadership changed before the write committed; not applied")
            waiter.result.set(result)

    def fail_all(self) -> None:
        """The node stops: a proposed write may still commit through the other nodes."""
        for waiter in self.waiting.values():
            waiter.result.set(api.error("OutcomeUnknown", "node is shutting down; "
                                        "the write may still apply"))
