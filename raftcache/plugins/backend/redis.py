"""The `redis` backend: a node's committed values in a redis-server, under the keys the
application wrote, so that applications reading that Redis directly keep working.

Options (``[backend.options]``):

- ``url``: ``redis://host:port/db`` or ``unix:///path/redis.sock?db=0``. Required, except under
  ``raftcache up --backend redis``, which starts a redis-server per node and sets it.
- ``prefix``: put before every key (default none).
- ``ttl_slack_ms``: a key written with a ttl gets a native Redis expiry this much later than
  raftcache's own (default 10 000), so Redis frees the memory but never drops a key that a
  replica whose clock is behind still considers live. Keep it above your clocks' skew.
- ``socket_timeout``, ``socket_connect_timeout``: seconds (default 5 and 2); a call that takes
  longer makes the node answer reads Unavailable and retry the apply.
- ``max_connections``: the pool's size (default 64).

Each apply batch is one Lua script: it checks the bookkeeping key
``__raftcache__:<prefix>applied`` (``<owner>|<log index>``) still says what this node last
wrote, makes every change and records the new index, all at once; so after a restart the node
skips the entries the server already holds, and a server that restarted empty (or was
overwritten) is noticed at the next apply or read and rebuilt by the node. Reads fetch the same
key with the values (one MGET). Keys that would fall under ``__raftcache__:`` are stored as
``__raftcache__:key:<key>``.

Every node needs its own Redis (or db, or prefix): a Redis holding another node's data is
refused at start. With a ``maxmemory-policy`` other than ``noeviction`` Redis may drop values
on its own: they read as misses (never as an older value), an incr of one is OutcomeUnknown,
and losing the bookkeeping key costs a rebuild; the node says so in its log at start.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Iterable, Sequence

import attrs
import redis

from raftcache.pluginapi import (
    BackendLost,
    BackendProvider,
    BackendUnavailable,
    Change,
    ConfigError,
    DevServer,
    OptionError,
    hookimpl,
    parse_options,
    positive,
    redact_url,
)

log = logging.getLogger("raftcache.backend.redis")

RESERVED = b"__raftcache__:"  # raftcache's own keys; documented in docs/backends.md
_LOAD_CHUNK = 1000  # keys per pipeline while loading a snapshot

# KEYS[1]: the bookkeeping key; KEYS[2..]: the changed keys. ARGV[1]: what it must hold ('' for
# nothing), ARGV[2]: what it holds after; then for each changed key: its expiry in ms ('d':
# delete, '0': none) and its value.
_APPLY = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur == ARGV[2] then
  return 0
end
if cur ~= ARGV[1] then
  return redis.error_reply('RAFTCACHE_LOST ' .. cur)
end
for i = 2, #KEYS do
  local px = ARGV[2 * i - 1]
  if px == 'd' then
    redis.call('DEL', KEYS[i])
  elseif px == '0' then
    redis.call('SET', KEYS[i], ARGV[2 * i])
  else
    redis.call('SET', KEYS[i], ARGV[2 * i], 'PX', px)
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


@attrs.frozen
class Options:
    url: str = ""
    prefix: str = ""
    ttl_slack_ms: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    socket_timeout: float = attrs.field(default=5.0, validator=positive)
    socket_connect_timeout: float = attrs.field(default=2.0, validator=positive)
    max_connections: int = attrs.field(default=64, validator=positive)

    def __attrs_post_init__(self):
        if not self.url:
            raise OptionError("url", 'missing: the redis backend needs url = '
                              '"redis://host:port/db" (`raftcache up --backend redis` starts a '
                              "redis-server per node and sets it)")
        if urllib.parse.urlsplit(self.url).scheme not in ("redis", "unix"):
            raise OptionError("url", f"expected redis://host:port/db or unix:///path, got "
                                     f"{redact_url(self.url)!r}")


class RedisBackend:
    def __init__(self, options: Options):
        self.where = redact_url(options.url)
        self.prefix = options.prefix.encode()
        self.slack_ms = options.ttl_slack_ms
        self.marker = RESERVED + self.prefix + b"applied"
        # No hidden retries: the node decides when to try again.
        self.pool = redis.ConnectionPool.from_url(
            options.url, socket_timeout=options.socket_timeout,
            socket_connect_timeout=options.socket_connect_timeout,
            max_connections=options.max_connections, retry=None)
        self.redis = redis.Redis(connection_pool=self.pool)
        self._apply_script = self.redis.register_script(_APPLY)
        self.owner = ""
        self.recorded = b""  # what the bookkeeping key holds, as far as we know

    def key(self, key: bytes) -> bytes:
        """Where the application's `key` lives in Redis."""
        stored = self.prefix + key
        return RESERVED + b"key:" + stored if stored.startswith(RESERVED) else stored

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"redis at {self.where}: {exc}") from None
        except redis.ResponseError as exc:
            if str(exc).startswith("RAFTCACHE_LOST"):
                raise BackendLost(f"redis at {self.where} holds {str(exc)[15:] or 'nothing'!r} "
                                  f"where this node recorded {self.recorded.decode()!r}") from None
            if str(exc).startswith(("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
                raise BackendUnavailable(f"redis at {self.where}: {exc}") from None
            raise

    # -- the protocol ----------------------------------------------------------------------------
    def open(self, owner: str) -> int | None:
        self.owner = owner
        self._check_policy()
        found = self._call(self.redis.get, self.marker)
        if found is None:
            return None
        who, _, index = found.decode(errors="replace").rpartition("|")
        if who != owner:
            raise ConfigError(
                f"backend redis: {self.where} holds the data of {who or 'something else'} (key "
                f"{self.marker.decode()!r}), not of {owner}: give each node its own Redis, "
                "db or prefix")
        self.recorded = found
        return int(index) if index.isdigit() else None

    def _check_policy(self) -> None:
        try:
            policy = self._call(self.redis.config_get, "maxmemory-policy")
        except redis.ResponseError as exc:
            log.warning("backend redis: cannot check %s's maxmemory-policy (%s)", self.where, exc)
            return
        policy = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
                  else v for k, v in policy.items()}.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            log.warning("backend redis: %s has maxmemory-policy %s, so it may evict values: "
                        "they read as misses on this node (linearizable or miss); use "
                        "noeviction to keep every value", self.where, policy)

    def _stamp(self, index: int) -> bytes:
        return f"{self.owner}|{index}".encode()

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        found = self._call(self.redis.mget, [self.marker, *map(self.key, keys)])
        if (found[0] or b"") != self.recorded:
            raise BackendLost(f"redis at {self.where} holds {found[0]!r} where this node "
                              f"recorded {self.recorded.decode()!r}")
        return found[1:]

    def apply(self, index: int, changes: Iterable[Change]) -> list[bytes]:
        keys, args = [self.marker], [self.recorded, self._stamp(index)]
        for key, value, ttl_ms in changes:
            keys.append(self.key(key))
            if value is None:
                args += (b"d", b"")
            else:
                args += (b"0" if ttl_ms is None else b"%d" % (ttl_ms + self.slack_ms), value)
        self._call(self._apply_script, keys, args)
        self.recorded = args[1]
        return []

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> list[bytes]:
        # Without the bookkeeping key until the end: a load cut short is redone at restart.
        self._call(self.redis.delete, self.marker)
        self.recorded = b""
        batch = []
        for key, value, ttl_ms in items:
            batch.append((key, value, ttl_ms))
            if len(batch) >= _LOAD_CHUNK:
                self._call(self._write, batch)
                batch = []
        batch += [(key, None, None) for key in stale]
        self._call(self._write, batch)
        self._call(self.redis.set, self.marker, self._stamp(index))
        self.recorded = self._stamp(index)
        return []

    def _write(self, batch) -> None:
        with self.redis.pipeline(transaction=False) as p:
            for key, value, ttl_ms in batch:
                if value is None:
                    p.delete(self.key(key))
                else:
                    p.set(self.key(key), value,
                          px=None if ttl_ms is None else ttl_ms + self.slack_ms)
            p.execute()

    def close(self) -> None:
        self.pool.disconnect()


def make_redis_backend(node_id: int, options: dict) -> RedisBackend:
    return RedisBackend(parse_options(Options, options, "backend.options"))


@hookimpl
def raftcache_backends():
    yield BackendProvider(
        "redis", make_redis_backend,
        "values in a redis-server per node, under the application's keys (url = ...)",
        dev_servers=(DevServer("redis", "url"),))
