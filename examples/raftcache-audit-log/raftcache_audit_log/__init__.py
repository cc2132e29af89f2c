"""A third-party raftcache plugin: the `audit-memory` backend and a role-change hook."""

from __future__ import annotations

import logging
import time

from raftcache.pluginapi import BackendProvider, hookimpl

log = logging.getLogger("raftcache_audit_log")


class AuditMemoryBackend:
    """The values in a dict; every committed change appended to an audit file."""

    def __init__(self, node_id: int, options: dict):
        unknown = set(options) - {"path"}
        if unknown or "path" not in options:
            raise ValueError("audit-memory needs exactly one option: path")
        self.node_id = node_id
        self.values: dict[bytes, bytes] = {}
        self._audit = open(options["path"], "a", buffering=1)

    def _record(self, what: str, key: bytes) -> None:
        self._audit.write(f"{time.time():.3f} node={self.node_id} {what} {key!r}\n")

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self.values[key] = value
        self._record("set", key)

    def delete(self, key: bytes) -> None:
        self.values.pop(key, None)
        self._record("delete", key)

    def clear(self) -> None:
        self.values.clear()
        self._record("clear", b"")

    def close(self) -> None:
        self._audit.close()


@hookimpl
def raftcache_backends():
    yield BackendProvider("audit-memory", AuditMemoryBackend,
                          "memory backend that appends every change to an audit file")


@hookimpl
def raftcache_role_changed(node, role, term, leader):
    log.info("audit: node %s is %s in term %s (leader %s)", node.id, role, term, leader)
