"""Backends as a third party would declare them, for tests/test_dev_servers.py; nodes load
them with ``python -m raftcache.testing.node --plugin raftcache.testing.dev_server_backends``.

- ``kv-on-redis`` declares a redis dev server under an option name of its own, ``redis_at``
  (not the built-in's ``url``), and keeps its values there under the prefix ``kv:``;
- ``kv-in-process`` declares nothing: a dict in the node, no server.
"""

from __future__ import annotations

from raftcache.pluginapi import BackendProvider, DevServer, hookimpl
from raftcache.plugins.backend.memory import make_memory_backend
from raftcache.plugins.backend.redis import make_redis_backend

PREFIX = "kv:"


def make_kv_on_redis(node_id: int, options: dict):
    unknown = set(options) - {"redis_at"}
    if unknown or "redis_at" not in options:
        raise ValueError(f"kv-on-redis takes redis_at only, got {sorted(options)}")
    return make_redis_backend(node_id, {"url": options["redis_at"], "prefix": PREFIX})


@hookimpl
def raftcache_backends():
    yield BackendProvider("kv-on-redis", make_kv_on_redis, "values in a redis-server (test)",
                          dev_servers=(DevServer("redis", "redis_at"),))
    yield BackendProvider("kv-in-process", make_memory_backend, "a dict in the node (test)")
