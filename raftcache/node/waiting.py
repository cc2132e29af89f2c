"""A client request waiting on the log, the refusal when too many already wait, and long work
giving the hub a turn (`give_way`)."""

from __future__ import annotations

import gevent
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


def give_way() -> None:
    """Let the hub run its due timers and poll its sockets (ticks, heartbeats, other requests)
    in the middle of a long piece of work. `gevent.sleep(0)` would not: it runs only greenlets
    already ready, never the event loop, so work paced by it starves every timer (measured: a
    1 ms timer held 0.6 s by 10 ms pieces). A positive sleep costs a loop iteration."""
    gevent.sleep(0.0001)
