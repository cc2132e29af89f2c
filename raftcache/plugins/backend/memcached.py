"""The `memcached` backend: a node's committed values in a memcached, under the keys the
application wrote where Memcached allows them, so that applications reading it keep working.

Options (``[backend.options]``):

- ``address``: ``host:port`` of the memcached, or the absolute path of its unix socket.
  Required, except under ``raftcache up --backend memcached``, which starts one per node
  listening on a unix socket only the node's user can reach, and sets it.
- ``prefix``: put before every key (default none).
- ``ttl_slack_ms``: native expiries are set this much after raftcache's own (default 10 000);
  a ttl beyond 30 days gets no native expiry (Memcached would read it as a date): the state
  machine's sweeps delete the key when it expires.
- ``timeout``, ``connect_timeout``: seconds (default 5 and 2); ``max_pool_size`` (default 64).

Memcached forgets on its own (evictions, restarts), so this backend is "linearizable or miss":
the state machine keeps the catalog (key, version, expiry), and a value the server no longer
holds reads as a miss, never as an older value (a write the server refused deletes the key
instead of leaving the old value). Nothing marks what it holds, so a restarted node reloads it
from its snapshot. Keys Memcached cannot hold (longer than 250 bytes with the prefix, with
spaces or control bytes, or under the reserved ``__raftcache__:``) are stored as
``__raftcache__:k:<base64url of the key>``, or ``__raftcache__:h:<sha256 hex>`` when that is
still too long.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterable, Sequence

import attrs
from pymemcache.client.base import PooledClient
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
)

from raftcache.pluginapi import (
    BackendProvider,
    BackendUnavailable,
    Change,
    DevServer,
    OptionError,
    hookimpl,
    parse_options,
    positive,
)

RESERVED = b"__raftcache__:"
MAX_KEY = 250
THIRTY_DAYS_S = 30 * 24 * 3600  # beyond this, memcached reads an expiry as a Unix time
_REFUSALS = (MemcacheServerError, MemcacheClientError)  # SERVER_ERROR object too large, ...
_VALID_KEY = re.compile(rb"[\x21-\x7e\x80-\xff]{1,250}\Z")  # no spaces or control bytes


@attrs.frozen
class Options:
    address: str = ""
    prefix: str = ""
    ttl_slack_ms: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    timeout: float = attrs.field(default=5.0, validator=positive)
    connect_timeout: float = attrs.field(default=2.0, validator=positive)
    max_pool_size: int = attrs.field(default=64, validator=positive)

    def __attrs_post_init__(self):
        if not self.address:
            raise OptionError("address", 'missing: the memcached backend needs address = '
                              '"host:port" (`raftcache up --backend memcached` starts one per '
                              "node and sets it)")
        if self.address.startswith("/"):
            return  # a unix socket
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise OptionError("address", "expected host:port or /path/to/memcached.sock, got "
                                         f"{self.address!r}")


def memcached_key(prefix: bytes, key: bytes) -> bytes:
    """Where the application's `key` lives in Memcached (docs/backends.md)."""
    stored = prefix + key
    if _VALID_KEY.match(stored) and not stored.startswith(RESERVED):
        return stored
    encoded = RESERVED + b"k:" + base64.urlsafe_b64encode(key).rstrip(b"=")
    if len(prefix) + len(encoded) <= MAX_KEY:
        return prefix + encoded
    return prefix + RESERVED + b"h:" + hashlib.sha256(key).hexdigest().encode()


class MemcachedBackend:
    def __init__(self, options: Options):
        host, _, port = options.address.rpartition(":")
        server = options.address if options.address.startswith("/") else (host, int(port))
        self.where = options.address
        self.prefix = options.prefix.encode()
        self.slack_ms = options.ttl_slack_ms
        # PooledClient: the one pymemcache client that greenlets may share.
        self.client = PooledClient(server, timeout=options.timeout,
                                   connect_timeout=options.connect_timeout,
                                   max_pool_size=options.max_pool_size, no_delay=True)

    def key(self, key: bytes) -> bytes:
        return memcached_key(self.prefix, key)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemcacheUnexpectedCloseError as exc:  # a MemcacheServerError, but the link
            raise BackendUnavailable(f"memcached at {self.where}: {exc!r}") from None
        except _REFUSALS:
            raise  # about one item (too large, ...): the caller decides
        except (MemcacheError, OSError) as exc:
            raise BackendUnavailable(f"memcached at {self.where}: {exc!r}") from None

    def _expire(self, ttl_ms: int | None) -> int:
        if ttl_ms is None:
            return 0
        seconds = math.ceil((ttl_ms + self.slack_ms) / 1000)
        return seconds if seconds <= THIRTY_DAYS_S else 0

    # -- the protocol ----------------------------------------------------------------------------
    def open(self, owner: str) -> None:
        self._call(self.client.version)  # reachable, or BackendUnavailable
        return None

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        stored = [self.key(k) for k in keys]
        found = self._call(self.client.get_many, stored)
        return [found.get(k) for k in stored]

    def apply(self, index: int, changes: Iterable[Change]) -> list[bytes]:
        # Keys written in this batch, grouped by expiry (set_many takes one per call); a
        # delete or a refused set removes the key, so an older value is never left behind.
        by_expiry: dict[int, dict[bytes, bytes]] = {}
        doomed = []
        for key, value, ttl_ms in changes:
            if value is None:
                doomed.append(self.key(key))
            else:
                by_expiry.setdefault(self._expire(ttl_ms), {})[self.key(key)] = value
        for expire, values in by_expiry.items():
            try:
                doomed += self._call(self.client.set_many, values, expire=expire,
                                     noreply=False)
            except _REFUSALS:
                doomed += [k for k, v in values.items() if not self._set_one(k, v, expire)]
        for key in doomed:
            self._call(self.client.delete, key, noreply=False)
        return []

    def _set_one(self, key: bytes, value: bytes, expire: int) -> bool:
        try:
            return self._call(self.client.set, key, value, expire=expire, noreply=False)
        except _REFUSALS:
            return False

    def load(self, index: int, items: Iterable[Change], stale: Iterable[bytes]) -> list[bytes]:
        return self.apply(index, [*items, *(Change(key, None) for key in stale)])

    def close(self) -> None:
        self.client.close()


def make_memcached_backend(node_id: int, options: dict) -> MemcachedBackend:
    return MemcachedBackend(parse_options(Options, options, "backend.options"))


@hookimpl
def raftcache_backends():
    yield BackendProvider(
        "memcached", make_memcached_backend,
        "values in a memcached per node (address = ...); evicted values read as misses",
        dev_servers=(DevServer("memcached", "address"),))
