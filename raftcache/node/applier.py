"""The applier: the one place that changes a replica's state machine and its backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import gevent
import gevent.event

from raftcache.core.cache.statemachine import ApplyError, StateMachine
from raftcache.core.raft.messages import ConfChange, Entry, EntryType, Snapshot
from raftcache.pluginapi import BackendLost, BackendUnavailable
from raftcache.pluginapi.throttle import Throttle


class BackendDown(Exception):
    """The backend cannot serve a read now: it is unreachable, lost its data or is being
    rebuilt. The message says which; the client should try another node."""


class Applier:
    """Applies committed entries and snapshots to the state machine, hands each batch's
    changes to the backend at once, and serves reads of what is applied.

    Contract:
    - Reads (`read_settled`) see the state machine only between apply batches: a backend
      call, and a large invalidate or sweep between its chunks (`StateMachine.pause`), yields
      to other greenlets, so `_settled` is clear while a batch is half applied and `_applies`
      counts batches; a read that overlapped one is read again.
    - A backend call that fails with BackendUnavailable is retried with backoff until it
      goes through: meanwhile `backend_down` is true, reads are refused and nothing more is
      applied (the replica keeps its log; the other replicas carry on). Nothing is skipped.
    - A backend that lost its data (BackendLost, from an apply or a read) is rebuilt from
      the newest snapshot and the log up to what was applied, before anything else.
    """

    def __init__(self, sm: StateMachine, log, stopped: gevent.event.Event,
                 wake: Callable[[], None], on_backend_down: Callable[[str], None],
                 on_members_changed: Callable[[], None]):
        self.sm = sm
        self.log = log
        self.stopped = stopped
        self.wake = wake  # the Ready loop's: it rebuilds a backend a read found lost
        self.on_backend_down = on_backend_down  # fail the reads waiting here
        self.on_members_changed = on_members_changed
        self.raw = None  # the replica's core, once it exists (a rebuild replays its log)
        self.backend_down = False
        self.backend_lost = False  # a read found the backend lost its data
        self._settled = gevent.event.Event()
        self._settled.set()
        self._applies = 0
        self.backend_log = Throttle(log)

    # -- applying --------------------------------------------------------------------------------
    def apply(self, entries: Sequence[Entry]) -> list[tuple[Entry, object]]:
        """Apply a batch of committed entries, then hand their changes to the backend at
        once; (entry, result) for each, returned only once the backend holds them."""
        self._settled.clear()
        applied = []
        members = self.sm.members.copy()
        for entry in entries:
            result = None
            if entry.type == EntryType.NORMAL and entry.data:
                result = self._retry_backend(lambda e=entry: self._stage(e))
                if self.sm.flush_due:  # a bulk deletion: on its own, in chunks
                    self._retry_backend(self.sm.flush)
            elif entry.type == EntryType.CONF_CHANGE and entry.index > self.sm.applied_index:
                self._record_members(entry)
            applied.append((entry, result))
        self._retry_backend(self.sm.flush)
        self._settle()
        if self.sm.members != members:
            self.on_members_changed()
        return applied

    def _stage(self, entry: Entry):
        """Stage one committed entry, unless a rebuild during this batch already moved the
        state machine past it: the core may hold a newer snapshot from the leader by then (a
        peer message stepped while the backend was retried), and the rebuild can only start
        from that one, which holds this entry's effect but not its result."""
        if entry.index <= self.sm.applied_index:
            return ApplyError("OutcomeUnknown", "this node rebuilt its backend from a newer "
                              "snapshot while the write applied: it applied, with a result "
                              "not known here")
        return self.sm.stage(entry.index, entry.data)

    def install(self, snapshot: Snapshot) -> None:
        """Replace the state with a snapshot received from the leader."""
        self._settled.clear()
        self._retry_backend(lambda: self.sm.restore(snapshot.data))
        self._settle()
        self.on_members_changed()

    def restore(self, data: bytes, backend_index: int | None) -> None:
        """At start: the state the storage's snapshot holds, where the backend says it is."""
        self._retry_backend(lambda: self.sm.restore(data, backend_index))

    def rebuild_if_lost(self) -> None:
        """A read found the backend lost its data: rebuild it now, not at the next write."""
        if self.backend_lost:
            self.backend_lost = False
            self._settled.clear()
            self._retry_backend(lambda: None, rebuild=True)
            self._settle()

    def snapshot(self) -> bytes:
        """An image of the whole state, between batches (the values come from the backend);
        raises BackendUnavailable or BackendLost."""
        return self.sm.snapshot()

    def _record_members(self, entry: Entry) -> None:
        """The addresses a committed membership change carries, into the state machine
        (undecodable: skipped, as the core skips it, the same on every replica)."""
        try:
            self.sm.record_members(ConfChange.decode(entry.data))
        except ValueError:
            pass

    def _settle(self) -> None:
        self._applies += 1
        self._settled.set()

    def _retry_backend(self, step: Callable, rebuild: bool = False):
        """`step()` (a state machine call that reaches the backend), retried until it goes
        through, and its result (see the class's contract)."""
        delay = 0.05
        # Fixed once: a rebuild cut short has moved the state machine back part of the way.
        target = self.sm.applied_index
        while True:
            try:
                if rebuild:
                    self._rebuild_backend(target)
                    rebuild = False
                result = step()
            except BackendUnavailable as exc:
                if self.stopped.is_set():
                    raise gevent.GreenletExit from None
                if not self.backend_down:
                    self.log.error("backend unavailable (%s): not serving reads, retrying", exc)
                    self.backend_down = True
                    self.on_backend_down("this node's backend is unavailable; try another node")
                gevent.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            except BackendLost as exc:
                self.log.warning("the backend lost its data (%s): rebuilding it from the "
                                 "snapshot and the log", exc)
                self.backend_down = rebuild = True
                target = max(target, self.sm.applied_index)
                continue
            if self.backend_down:
                self.log.info("backend available again at applied index %d",
                              self.sm.applied_index)
                self.backend_down = False
            return result

    def _rebuild_backend(self, applied: int) -> None:
        """Load the newest snapshot into the backend and apply the log since, up to `applied`
        (raises what the backend raises; the caller retries from scratch). A snapshot the
        leader sent meanwhile may lie past `applied`: the state machine then ends at it, and
        `apply` skips the rest of its batch (`_stage`)."""
        snapshot = self.raw.snapshot
        start = snapshot.meta.index if snapshot is not None else 0
        self.sm.restore(snapshot.data if snapshot is not None else b"")
        entries = (self.raw.raft_log.slice(start + 1, applied + 1, 1 << 62, 1 << 62)
                   if applied > start else [])
        for n, entry in enumerate(entries, 1):
            if entry.type == EntryType.NORMAL and entry.data:
                self.sm.stage(entry.index, entry.data)
            elif entry.type == EntryType.CONF_CHANGE:
                self._record_members(entry)
            if n % 512 == 0:
                self.sm.flush()
        self.sm.flush()
        self.log.info("backend rebuilt up to index %d (%d entries after the snapshot at %d)",
                      applied, len(entries), start)

    # -- reading ---------------------------------------------------------------------------------
    def read_settled(self, keys: Sequence[bytes], stamp_ms: Callable[[], int],
                     timeout: float) -> list:
        """The state machine's answer for `keys` ((stored value, version) or None each), taken
        between apply batches; raises BackendDown while the backend cannot serve."""
        deadline = time.monotonic() + timeout
        while not self.backend_down and time.monotonic() < deadline:
            if not self._settled.wait(timeout=0.05):
                continue  # a batch is being applied (or the backend retried: checked above)
            applies = self._applies
            try:
                found = self.sm.read_many(keys, stamp_ms())
            except BackendUnavailable as exc:
                raise BackendDown(f"this node's backend is unavailable: {exc}") from None
            except BackendLost as exc:
                self.backend_lost = True
                self.wake()
                raise BackendDown(f"this node's backend lost its data: {exc}") from None
            if applies == self._applies and self._settled.is_set():
                return found
        raise BackendDown("this node's backend is unavailable or catching up; "
                          "try another node")
