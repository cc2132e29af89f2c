"""The `memory` backend: committed values in a dict in the node's process.

Never evicts, so every committed value stays readable; a restarted node reloads its values from
its snapshot and log. Memory use grows with the data set: there is no size limit.
"""

from __future__ import annotations

from raftcache.core.hookspecs import BackendProvider, hookimpl


class MemoryBackend:
    def __init__(self) -> None:
        self._values: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self._values[key] = value

    def delete(self, key: bytes) -> None:
        self._values.pop(key, None)

    def clear(self) -> None:
        self._values.clear()

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._values)


def make_memory_backend(node_id: int = 0, options: dict | None = None) -> MemoryBackend:
    if options:
        # A typo'd option silently ignored is worse than a refusal to start.
        raise ValueError(f"the memory backend takes no options (got: {', '.join(sorted(options))})")
    return MemoryBackend()


@hookimpl
def raftcache_backends():
    yield BackendProvider(
        "memory", make_memory_backend, "values in process memory; never evicts, no size limit"
    )
