"""A client request waiting on the log, and the refusal when too many already wait."""

from __future__ import annotations

import gevent.event

from raftcache.core.raft.messages import NONE


class Waiter:
    """A client request waiting on the log: a write for its entry (proposed in `term`), a read
    for its read index (asked in `term`, of `leader`). `result` is set once, by whoever learns
    the outcome first."""

    __slots__ = ("term", "leader", "result")

    def __init__(self, term: int, leader: int = NONE):
        self.term = term
        self.leader = leader
        self.result = gevent.event.AsyncResult()


class Overloaded(Exception):
    """Too many requests of one kind wait here already (`node.max_pending`)."""

    def __init__(self, waiting: int, what: str):
        super().__init__(f"overloaded: {waiting} {what} are waiting here (node.max_pending); "
                         "retry after a backoff")
