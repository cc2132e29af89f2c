"""The `memory` storage: the Raft log in process memory. NOT durable: a restarted node comes
back empty and must be re-added. For tests and demos; use `file-wal` for data you keep."""

from __future__ import annotations

from raftcache.core.raft.messages import HardState
from raftcache.pluginapi import StorageProvider, hookimpl


class MemoryStorage:
    blocking = False  # nothing here waits for a disk: the node may call it on the hub

    def __init__(self, node_id: int = 0, data_dir: str = "", options: dict | None = None):
        self.hard_state = HardState()
        self.snapshot = None
        self.entries: list = []

    def load(self):
        return self.hard_state, self.snapshot, list(self.entries)

    def save(self, hard_state, entries, snapshot, sync: bool) -> None:
        if snapshot is not None:
            self._install(snapshot)
            self.entries = []
        if entries:
            first = entries[0].index
            if self.entries:
                del self.entries[max(0, first - self.entries[0].index):]
            self.entries.extend(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    def compact(self, snapshot) -> None:
        self._install(snapshot)
        self.entries = [e for e in self.entries if e.index > snapshot.meta.index]

    def _install(self, snapshot) -> None:
        if self.snapshot is None or snapshot.meta.index >= self.snapshot.meta.index:
            self.snapshot = snapshot

    def close(self) -> None:
        pass


@hookimpl
def raftcache_storages():
    yield StorageProvider("memory", MemoryStorage,
                          "the log in process memory; not durable (tests and demos)")
