"""The Raft log as the core sees it: a snapshot boundary plus the entries after it, in memory.

Persistence is the driver's job: the log only tracks which suffix is not yet stable (`stable`)
so that Ready can hand it out, and which prefix has been applied.
"""

from __future__ import annotations

from .messages import Entry, Snapshot


class LogError(Exception):
    """The persisted log handed to the core is inconsistent (a gap, or indexes out of order)."""


class RaftLog:
    __slots__ = ("offset", "offset_term", "entries", "committed", "applied", "stable")

    def __init__(self, snapshot: Snapshot | None = None, entries=(), committed: int = 0):
        meta = snapshot.meta if snapshot is not None else None
        self.offset = meta.index if meta else 0  # index of the last entry covered by the snapshot
        self.offset_term = meta.term if meta else 0
        self.entries: list[Entry] = [e for e in entries if e.index > self.offset]
        for i, e in enumerate(self.entries):
            if e.index != self.offset + 1 + i:
                raise LogError(f"log gap: expected index {self.offset + 1 + i}, found {e.index}")
        self.committed = max(min(committed, self.last_index()), self.offset)
        self.applied = self.offset
        self.stable = self.last_index()  # everything handed to us at start is on disk

    # -- reading -------------------------------------------------------------------------------
    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self.entries)

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`, or None when compacted away or not yet there."""
        if index == self.offset:
            return self.offset_term
        i = index - self.offset - 1
        if 0 <= i < len(self.entries):
            return self.entries[i].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft 5.4.1: is a log ending at (last_index, last_term) at least as up to date as ours?"""
        ours = self.last_term()
        return last_term > ours or (last_term == ours and last_index >= self.last_index())

    def slice(self, lo: int, hi: int, max_entries: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi), at most `max_entries` and about `max_bytes` (always at least one)."""
        start = lo - self.offset - 1
        end = min(hi - self.offset - 1, start + max_entries)
        out = self.entries[start:end]
        size = 0
        for n, e in enumerate(out):
            size += len(e.data) + 24
            if size > max_bytes and n > 0:
                return out[:n]
        return out

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with that term.

        Terms never decrease along a log, so a binary search finds it. Used on both sides of a
        rejected append to skip a whole term's worth of entries per round trip.
        """
        index = min(index, self.last_index())
        if index <= self.offset:
            return index, (self.offset_term if index == self.offset else 0)
        lo, hi = self.offset, index  # invariant: answer in [lo, hi]; term(lo) <= term or lo=offset
        if self.offset_term > term:
            return self.offset, 0  # cannot see further back than the snapshot
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.entries[mid - self.offset - 1].term <= term:
                lo = mid
            else:
                hi = mid - 1
        return lo, self.term(lo) or 0

    def unstable_entries(self) -> list[Entry]:
        return self.entries[self.stable - self.offset :]

    def has_next_committed(self) -> bool:
        return self.committed > self.applied

    def next_committed(self, limit: int) -> list[Entry]:
        lo = self.applied - self.offset
        hi = min(self.committed - self.offset, lo + limit)
        return self.entries[lo:hi]

    # -- changing ------------------------------------------------------------------------------
    def append(self, entries) -> None:
        """Append, replacing any entries at the same indexes or later (a conflicting suffix)."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise LogError(f"refusing to overwrite committed index {first} <= {self.committed}")
        del self.entries[first - self.offset - 1 :]
        self.entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def maybe_append(self, index: int, log_term: int, committed: int, entries) -> int | None:
        """Follower side of AppendEntries; returns the last index known to match, or None."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        for i, e in enumerate(entries):  # skip the prefix we already hold (duplicates, reorders)
            t = self.term(e.index)
            if t != e.term:
                self.append(entries[i:])
                break
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise LogError(f"commit index {index} beyond last index {self.last_index()}")
            self.committed = index

    def stable_to(self, index: int, term: int) -> None:
        # A suffix replaced while the driver was persisting is not stable yet: check the term.
        if self.term(index) == term and index > self.stable:
            self.stable = index

    def applied_to(self, index: int) -> None:
        self.applied = max(self.applied, index)

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.offset = snapshot.meta.index
        self.offset_term = snapshot.meta.term
        self.entries = []
        self.committed = self.offset
        self.applied = self.offset
        self.stable = self.offset

    def compact(self, index: int) -> None:
        """Drop every entry up to and including `index` (covered by a snapshot)."""
        if index <= self.offset:
            return
        if index > self.applied:
            raise LogError(f"cannot compact {index} beyond applied {self.applied}")
        term = self.term(index)
        del self.entries[: index - self.offset]
        self.offset, self.offset_term = index, term
