"""A client that keeps writing in a thread while a test changes the cluster under it."""

import threading
import time

from raftcache import errors
from raftcache.client import Client


class Writer:
    """Sets key w<n> = n in a thread until stopped; remembers what was acknowledged, the
    errors, and the longest time between two acknowledgements (seconds)."""

    def __init__(self, endpoints):
        self.endpoints = endpoints
        self.acked: dict[str, bytes] = {}
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n, last = 0, time.monotonic()
        with Client(self.endpoints, timeout=10.0) as c:
            while not self._stop.is_set():
                n += 1
                try:
                    c.set(f"w{n}", str(n))
                    self.acked[f"w{n}"] = str(n).encode()
                    now = time.monotonic()
                    self.longest_gap, last = max(self.longest_gap, now - last), now
                except errors.RaftCacheError as exc:  # a change of leader: the next one goes on
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
