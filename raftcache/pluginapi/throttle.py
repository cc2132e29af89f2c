"""Log lines that a hostile or broken peer could otherwise repeat a thousand times a second."""

from __future__ import annotations

import logging
import re
import time


class Throttle:
    """At most one line per key every `interval` seconds; the next one says how many were
    held back. Keys are whatever identifies the source (a peer's node id, an address)."""

    def __init__(self, logger, interval: float = 60.0, max_keys: int = 4096):
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict = {}  # key -> (time of the last line, lines held back since)

    def warning(self, key, msg: str, *args) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key, msg: str, *args) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()  # many sources at once: forget them rather than grow
        held = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        if held:
            msg += " (%d more like it in the last %ds)"
            args += (held, int(self.interval))
        self.logger.log(level, msg, *args)


def problem_key(source, exc: BaseException) -> tuple:
    """A throttling key for `exc` from `source`: problems of one kind share it, whatever
    numbers their messages carry."""
    return source, type(exc).__name__, re.sub(r"[0-9]+", "#", str(exc))[:80]
