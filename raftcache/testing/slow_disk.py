"""TEST-ONLY storage `slow-disk`: another storage whose durable saves can be made slow at will.

etcd once revoked every lease while its leader was stuck in a slow fdatasync; the fault suite's
`slow-disk` nemesis reproduces that kind of stall. A node configured with

    [storage]
    plugin = "slow-disk"
    options = { inner = "file-wal" }      # plus the inner storage's own options

stores through `inner` as usual. When the file ``<data_dir>/slow-disk`` holds a number of
seconds, every save that must be durable (an fsync) first waits that long, as a disk stuck in
fsync would; removing the file (or writing 0) ends the stall. The node runs those saves in its
threadpool (``blocking = True``), so the stall holds up the Ready loop, not the hub: ticks,
incoming messages and client calls go on, as with file-wal's ``sync_thread = true`` on a real
slow disk. (By default file-wal fsyncs on the hub, where a stall stops the whole node like a
SIGSTOP: its peers elect another leader, and it catches up on the missed ticks when it wakes.)
"""

from __future__ import annotations

import os
import time

from raftcache.pluginapi import StorageProvider, hookimpl

CONTROL_FILE = "slow-disk"
_CHECK_EVERY = 0.05  # seconds between looks at the control file


def _real_sleep():
    try:  # the threadpool's threads must sleep for real, not yield to a hub
        from gevent import monkey

        return monkey.get_original("time", "sleep")
    except ImportError:  # pragma: no cover - gevent is a dependency
        return time.sleep


class SlowDisk:
    blocking = True  # durable saves go to the threadpool, so the stall never blocks the hub

    def __init__(self, node_id: int, data_dir: str, options: dict | None = None):
        from raftcache.pluginapi.manager import PluginSet, make_manager

        options = dict(options or {})
        inner = options.pop("inner", "file-wal")
        if inner == "slow-disk":
            raise ValueError("slow-disk: options.inner must name another storage")
        self.inner = PluginSet(make_manager()).storage(inner).factory(node_id, data_dir, options)
        self.control = os.path.join(data_dir, CONTROL_FILE)
        self._sleep = _real_sleep()
        self._checked = -_CHECK_EVERY
        self._delay = 0.0

    def delay(self) -> float:
        now = time.monotonic()
        if now - self._checked >= _CHECK_EVERY:
            self._checked = now
            try:
                with open(self.control) as f:
                    self._delay = max(0.0, float(f.read().strip() or 0))
            except (OSError, ValueError):
                self._delay = 0.0
        return self._delay

    def load(self):
        return self.inner.load()

    def save(self, hard_state, entries, snapshot, sync: bool) -> None:
        stall = self.delay() if sync else 0.0
        if stall:
            self._sleep(stall)
        self.inner.save(hard_state, entries, snapshot, sync)

    def compact(self, snapshot) -> None:
        self.inner.compact(snapshot)

    def close(self) -> None:
        self.inner.close()


def set_delay(data_dir: str, seconds: float) -> None:
    """Make the node whose storage lives in `data_dir` stall each durable save `seconds`
    (0 ends it). Atomic: the node never reads half a number."""
    path = os.path.join(data_dir, CONTROL_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{seconds}\n")
    os.replace(tmp, path)


@hookimpl
def raftcache_storages():
    yield StorageProvider("slow-disk", SlowDisk,
                          "TEST-ONLY: another storage (options.inner) whose durable saves stall "
                          "on demand; the fault suite's slow disk")
