"""The leader's view of each follower's log: probe, replicate (pipelined) or snapshot."""

from __future__ import annotations

import enum
from collections import deque

import attrs

from .messages import Snapshot


class ProgressState(enum.IntEnum):
    PROBE = 0  # one append per heartbeat until we find where the logs match
    REPLICATE = 1  # optimistic: stream appends, at most `max_inflight` unacknowledged
    SNAPSHOT = 2  # the entries it needs are compacted: stream a snapshot in chunks


@attrs.define(slots=True)
class Progress:
    match: int = 0
    next: int = 1
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False  # PROBE: an append is in flight; wait for a reply or a heartbeat
    recent_active: bool = False  # heard from since the last check-quorum round
    inflights: deque = attrs.Factory(deque)  # REPLICATE: last index of each unacked append
    # SNAPSHOT state: what we are sending, how far the follower has confirmed, when we last sent.
    snapshot: Snapshot | None = None
    snapshot_offset: int = 0
    snapshot_sent_tick: int = 0

    def restart(self, match: int, next: int, active: bool) -> None:
        """Fresh bookkeeping at the start of a term."""
        self._reset(ProgressState.PROBE)
        self.match, self.next, self.recent_active = match, next, active

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT and self.snapshot is not None:
            self.next = max(self.match + 1, self.snapshot.meta.index + 1)
        else:
            self.next = self.match + 1
        self._reset(ProgressState.PROBE)

    def become_replicate(self) -> None:
        self.next = self.match + 1
        self._reset(ProgressState.REPLICATE)

    def become_snapshot(self, snapshot: Snapshot, tick: int) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.snapshot = snapshot
        self.snapshot_sent_tick = tick

    def _reset(self, state: ProgressState) -> None:
        self.state = state
        self.probe_sent = False
        self.inflights.clear()
        self.snapshot = None
        self.snapshot_offset = 0

    def maybe_update(self, index: int) -> bool:
        """An append up to `index` was acknowledged; returns whether `match` moved."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """An append at `rejected` was refused; returns False for a stale rejection."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return len(self.inflights) >= max_inflight
        return True

    def sent_entries(self, last_index: int) -> None:
        if self.state == ProgressState.REPLICATE:
            # An empty append (commit index only) takes no window slot: its ack would not move
            # `match`, so nothing would ever free the slot.
            if last_index >= self.next:
                self.next = last_index + 1
                self.inflights.append(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def free_inflights_to(self, index: int) -> None:
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()
