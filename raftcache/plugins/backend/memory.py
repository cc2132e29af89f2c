"""The `memory` backend: committed values in a dict in the node's process, optionally bounded.

Options (``[backend.options]``):

- ``max_keys``: keep at most this many keys (0, the default: no limit).
- ``max_bytes``: keep the keys' accounted size at most this (0: no limit). A key costs
  ``len(key) + len(value) + PER_KEY_OVERHEAD``: the overhead is what one more key costs this
  process beyond its key and value (the dict slots and object headers here and the catalog's
  entry in the state machine), measured on CPython 3.11 and fixed, so that every replica counts
  exactly the same.

Over a limit, the backend evicts the keys written longest ago (write order, the same on every
replica; never read recency, which is not replicated) and the state machine forgets them: they
read as missing, everywhere alike. Limits must be the same on every node of a cluster.

A restarted node starts empty and reloads its values from its snapshot and log.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

from raftcache.pluginapi import BackendProvider, Change, OptionError, hookimpl, parse_options

# Measured (tests/test_backend_memory.py checks it against tracemalloc): the OrderedDict entry
# and the key's and value's bytes headers here, plus the catalog's dict entry and KeyMeta.
PER_KEY_OVERHEAD = 264


@attrs.frozen
class Options:
    max_keys: int = attrs.field(default=0)
    max_bytes: int = attrs.field(default=0)

    @max_keys.validator
    @max_bytes.validator
    def _not_negative(self, attribute, value):
        if value < 0:
            raise OptionError(attribute.name, "must be 0 (no limit) or more")


def key_cost(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + PER_KEY_OVERHEAD


class MemoryBackend:
    def __init__(self, max_keys: int = 0, max_bytes: int = 0) -> None:
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._values: OrderedDict[bytes, bytes] = OrderedDict()  # oldest write first
        self.bytes = 0  # accounted size of what it holds

    def open(self, owner: str) -> None:
        return None  # nothing survives a restart

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        get = self._values.get
        return [get(k) for k in keys]

    def apply(self, index: int, changes: Iterable[Change]) -> list[bytes]:
        values = self._values
        for key, value, _ttl in changes:
            old = values.pop(key, None)
            if old is not None:
                self.bytes -= key_cost(key, old)
            if value is not None:
                values[key] = value
                self.bytes += key_cost(key, value)
        return self._evict() if self.max_keys or self.max_bytes else []

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> list[bytes]:
        # It is the only holder of its values: start over rather than delete one by one.
        self._values.clear()
        self.bytes = 0
        return self.apply(index, items)

    def _evict(self) -> list[bytes]:
        values, evicted = self._values, []
        while values and ((self.max_keys and len(values) > self.max_keys)
                          or (self.max_bytes and self.bytes > self.max_bytes)):
            key, value = values.popitem(last=False)
            self.bytes -= key_cost(key, value)
            evicted.append(key)
        return evicted

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._values)


def make_memory_backend(node_id: int = 0, options: dict | None = None) -> MemoryBackend:
    opts = parse_options(Options, options, "backend.options")
    return MemoryBackend(max_keys=opts.max_keys, max_bytes=opts.max_bytes)


@hookimpl
def raftcache_backends():
    yield BackendProvider(
        "memory", make_memory_backend,
        "values in process memory; optional max_keys / max_bytes, oldest writes evicted first",
    )
