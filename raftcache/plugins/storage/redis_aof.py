"""The `redis-aof` storage: a node's Raft log, hard state and snapshot in a redis-server with
`appendonly yes` and `appendfsync always`, so that a write Redis acknowledged is on its disk.

Options (``[storage] options = {...}`` in the node's config):

- ``url``: ``redis://host:port/db`` or ``unix:///path/redis.sock?db=0``. Required, except
  under ``raftcache up --storage redis-aof``, which starts a redis-server per node and sets it.
- ``cluster``: key namespace (default ``"raftcache"``), so one Redis can hold several clusters.
- ``accept_weak_durability``: start even when Redis would not fsync every write (default false).
- ``socket_timeout``, ``socket_connect_timeout``: seconds (default 10 and 2).
- ``retry_timeout``: seconds to keep retrying while Redis is unreachable or loading (default
  30), after which the call raises.

Keys (one hash tag per node, so a Redis Cluster keeps them in one slot and scripts may touch
them together): ``{<cluster>:<node id>}:log`` a sorted set, score = index, member = encoded
entry; ``:hard`` the hard state; ``:snap`` a hash (index, meta, data); ``:owner`` a token.

Every save() and compact() is one Lua script, so it applies entirely or not at all, and
Redis writes it to the AOF as one MULTI/EXEC block (a torn tail block is dropped at load).
With appendfsync always, Redis replies only after the fsync: the script returning means
durable.

The owner token guards Raft's safety: a node that silently lost its log and vote could vote
twice. It lives in Redis and in ``<data_dir>/redis-aof.json``; start-up refuses when Redis
lost the data the data dir says it held, or holds another node's data, and a save refuses to
write into a Redis that lost this node's keys while it ran.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import time
import urllib.parse

import attrs
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from raftcache.core.raft.messages import (
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from raftcache.pluginapi import (
    ConfigError,
    OptionError,
    StorageProvider,
    hookimpl,
    parse_options,
    positive,
    private_dir,
    redact_url,
    write_private,
)
from raftcache.plugins.storage import records

log = logging.getLogger("raftcache.storage.redis_aof")

FORMAT = 1  # leading byte of every encoded record; bump on a layout change
_ENTRY = struct.Struct(">BQQB")  # format, index, term, type; then the data
_HARD = struct.Struct(">BQQQ")  # format, term, vote, commit
MARKER = "redis-aof.json"
# The keys' layout and record encodings, recorded in the marker: a build refuses, saying so, a
# newer one (a rolled-back upgrade must not misread them); a marker without it is version 1.
FORMAT_VERSION = 1
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class RedisAofError(ConfigError):
    """The storage refuses to start or to write: phrased for the operator (server, finding,
    fix). A ConfigError, so `raftcache serve` prints it as one line and exits."""


# ================================================================================================
# Encoding: struct, never pickle (the data comes from a server others may write to)
# ================================================================================================
def encode_entry(e: Entry) -> bytes:
    return _ENTRY.pack(FORMAT, e.index, e.term, int(e.type)) + e.data


def _damaged(what: str):
    """Decoders raise RedisAofError (only) on bytes that are not what they should be."""
    def wrap(decode):
        def checked(blob: bytes):
            try:
                return decode(blob)
            except RedisAofError:
                raise
            except (struct.error, ValueError, TypeError, IndexError) as exc:
                raise RedisAofError(f"storage redis-aof: a damaged {what} record "
                                    f"({len(blob)} bytes: {exc}); refusing to start") from None
        checked.__name__ = decode.__name__
        checked.__doc__ = decode.__doc__
        return checked
    return wrap


@_damaged("log entry")
def decode_entry(blob: bytes) -> Entry:
    fmt, index, term, kind = _ENTRY.unpack_from(blob)
    _check_format(fmt, "log entry")
    return Entry(term=term, index=index, type=EntryType(kind), data=bytes(blob[_ENTRY.size:]))


def encode_hard_state(hs: HardState) -> bytes:
    return _HARD.pack(FORMAT, hs.term, hs.vote, hs.commit)


@_damaged("hard state")
def decode_hard_state(blob: bytes) -> HardState:
    fmt, term, vote, commit = _HARD.unpack(blob)
    _check_format(fmt, "hard state")
    return HardState(term=term, vote=vote, commit=commit)


def encode_meta(meta: SnapshotMeta) -> bytes:
    return bytes((FORMAT,)) + records.encode_meta(meta, ">")


@_damaged("snapshot meta")
def decode_meta(blob: bytes) -> SnapshotMeta:
    _check_format(blob[0], "snapshot meta")
    return records.decode_meta(blob, 1, ">")[0]


def _check_format(fmt: int, what: str) -> None:
    if fmt != FORMAT:
        raise RedisAofError(f"storage redis-aof: {what} has format {fmt}; this version reads "
                            f"format {FORMAT}")


# ================================================================================================
# Connections on real sockets
# ================================================================================================
def _original(name: str):
    # The node runs under gevent's monkey patching and calls us from threadpool threads (and
    # from the hub for load/close). A patched socket belongs to the hub that created it: used
    # from another thread it fails with "Cannot switch to a different thread". Real sockets
    # simply block the calling thread, which is what a storage call may do.
    try:
        from gevent import monkey

        return monkey.get_original("socket", name)
    except ImportError:  # pragma: no cover - gevent is a dependency
        return getattr(socket, name)


_socket = _original("socket")
_getaddrinfo = _original("getaddrinfo")


class _TcpConnection(redis.Connection):
    def _connect(self):
        err = None
        for family, kind, proto, _, addr in _getaddrinfo(self.host, self.port, 0,
                                                         socket.SOCK_STREAM):
            sock = _socket(family, kind, proto)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(self.socket_connect_timeout)
                sock.connect(addr)
                sock.settimeout(self.socket_timeout)
                return sock
            except OSError as exc:
                err = exc
                sock.close()
        raise err or OSError(f"no address for {self.host}")


class _UnixConnection(redis.UnixDomainSocketConnection):
    def _connect(self):
        sock = _socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.socket_connect_timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.socket_timeout)
        return sock


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# ================================================================================================
# The atomic write
# ================================================================================================
# KEYS: log, hard, snap, owner.
# ARGV: owner token, claim ("1": take an unowned namespace), hard state ("" = none),
#       snapshot mode ("" none, "replace": drop the whole log, "compact": drop what it covers),
#       snapshot index, meta, data, first entry index ("" = none), then index/entry pairs.
# Lua scripts do not roll back, so every check comes before the first write.
_SAVE = """
local owner = redis.call('GET', KEYS[4])
if owner ~= ARGV[1] then
  if owner or ARGV[2] ~= '1' then
    return redis.error_reply('RAFTCACHE_OWNER ' .. tostring(owner))
  end
  redis.call('SET', KEYS[4], ARGV[1])
end
if ARGV[4] ~= '' then
  local cur = redis.call('HGET', KEYS[3], 'index')
  if not cur or tonumber(cur) <= tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[3], 'index', ARGV[5], 'meta', ARGV[6], 'data', ARGV[7])
  end
  if ARGV[4] == 'replace' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
  end
end
if ARGV[8] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[8], '+inf')
  for i = 9, #ARGV, 1000 do
    redis.call('ZADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3])
end
return 1
"""


@attrs.frozen
class Options:
    """``[storage] options`` of redis-aof (see the module docstring)."""

    url: str = ""
    cluster: str = "raftcache"
    accept_weak_durability: bool = False
    socket_timeout: float = attrs.field(default=10.0, validator=positive)
    socket_connect_timeout: float = attrs.field(default=2.0, validator=positive)
    retry_timeout: float = attrs.field(default=30.0, validator=positive)

    def __attrs_post_init__(self):
        if not self.url:
            raise OptionError("url", "missing: the redis-aof storage needs url = "
                              "\"redis://host:port/db\" (`raftcache up --storage redis-aof` "
                              "starts a redis-server per node and sets it)")
        if urllib.parse.urlsplit(self.url).scheme not in ("redis", "unix"):
            raise OptionError("url", f"expected redis://host:port/db or unix:///path, got "
                                     f"{redact_url(self.url)!r}")
        if not self.cluster or any(c in self.cluster for c in "{}"):
            raise OptionError("cluster", "expected a non-empty name without braces")


# ================================================================================================
# The storage
# ================================================================================================
class RedisAofStorage:
    def __init__(self, node_id: int, data_dir: str | None, options: dict | None = None):
        opts = parse_options(Options, options, "storage.options")
        self.node_id = node_id
        self.url = opts.url
        self.where = redact_url(self.url)
        self.accept_weak = opts.accept_weak_durability
        self.retry_timeout = opts.retry_timeout
        self.prefix = f"{{{opts.cluster}:{node_id}}}"
        self.keys = [f"{self.prefix}:{k}" for k in ("log", "hard", "snap", "owner")]
        self.marker = os.path.join(data_dir, MARKER) if data_dir else None
        unix = urllib.parse.urlsplit(self.url).scheme == "unix"
        # One pool, explicit timeouts, no hidden retries: our own retry loop decides.
        self.pool = redis.ConnectionPool.from_url(
            self.url, connection_class=_UnixConnection if unix else _TcpConnection,
            socket_timeout=opts.socket_timeout,
            socket_connect_timeout=opts.socket_connect_timeout, retry=Retry(NoBackoff(), 0),
        )
        self.redis = redis.Redis(connection_pool=self.pool)
        self._script = self.redis.register_script(_SAVE)
        self.token: str | None = None
        self._claim = False  # the first save takes ownership of the (empty) namespace
        self._pending_hard: HardState | None = None  # a commit-only change not written yet
        self._recheck = False
        try:
            self._call(self.check_durability)
        except BaseException:
            self.pool.disconnect()
            raise

    # -- start-up -----------------------------------------------------------------------------------
    def check_durability(self) -> None:
        """Refuse a Redis that could lose an acknowledged write, unless told to accept it."""
        try:
            found = self.redis.config_get("appendonly", "appendfsync", "maxmemory-policy")
        except redis.ResponseError as exc:
            problems = [f"CONFIG GET is refused ({exc}), so its durability cannot be checked"]
        else:
            found = {_text(k): _text(v) for k, v in found.items()}
            problems = []
            if found.get("appendonly") != "yes":
                problems.append(f"appendonly is {found.get('appendonly')!r} (needs 'yes')")
            if found.get("appendfsync") != "always":
                problems.append(f"appendfsync is {found.get('appendfsync')!r} (needs 'always':"
                                " other settings lose the writes of up to a second on a crash)")
            if found.get("maxmemory-policy", "").startswith("allkeys"):
                problems.append(f"maxmemory-policy is {found['maxmemory-policy']!r}, which "
                                "may evict the log (use 'noeviction')")
        self._recheck = False
        if not problems:
            return
        what = f"storage redis-aof: the redis-server at {self.where}: " + "; ".join(problems)
        if self.accept_weak:
            log.warning("%s; starting anyway (accept_weak_durability = true)", what)
            return
        raise RedisAofError(
            f"{what}. An acknowledged write must survive a crash. Fix: start redis-server with "
            "--appendonly yes --appendfsync always (or CONFIG SET appendonly yes, CONFIG SET "
            "appendfsync always, then CONFIG REWRITE), or set storage.options."
            "accept_weak_durability = true to accept losing acknowledged writes")

    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        log_key, hard_key, snap_key, owner_key = self.keys

        def read():
            with self.redis.pipeline(transaction=True) as p:
                p.get(owner_key).get(hard_key).hgetall(snap_key).zrange(log_key, 0, -1)
                return p.execute()

        owner, hard, snap, blobs = self._call(read)
        owner = owner.decode() if owner is not None else None
        if owner is None and (hard or snap or blobs):
            raise RedisAofError(f"storage redis-aof: keys {self.prefix}:* at {self.where} hold "
                                "data without an owner token: not written by this storage; "
                                "delete them or use another storage.options.cluster")
        self._adopt(owner)
        hard_state = decode_hard_state(hard) if hard else HardState()
        snapshot = None
        if snap:
            snapshot = Snapshot(decode_meta(snap[b"meta"]), bytes(snap[b"data"]))
        entries = [decode_entry(b) for b in blobs]
        after = snapshot.meta.index if snapshot else 0
        entries = [e for e in entries if e.index > after]
        expected = after + 1 if snapshot else (entries[0].index if entries else 0)
        for i, e in enumerate(entries):
            if e.index != expected + i:
                raise RedisAofError(f"storage redis-aof: the log {log_key} at {self.where} has "
                                    f"a gap: expected index {expected + i}, found {e.index}")
        return hard_state, snapshot, entries

    def _adopt(self, owner: str | None) -> None:
        """Decide who we are from the token in Redis and the one in the data dir."""
        mine = self._read_marker()
        hint = (f"the keys {self.prefix}:* at {self.where}")
        if self.marker is None:  # no data dir: only the in-Redis token guards us
            self.token, self._claim = owner or secrets.token_hex(16), owner is None
            return
        if mine is None:
            if owner is not None:
                raise RedisAofError(
                    f"storage redis-aof: {hint} belong to a node whose data dir is not "
                    f"{os.path.dirname(self.marker)} (no {MARKER} there): another cluster or "
                    "node shares this Redis and namespace. Set storage.options.cluster to a "
                    "name of its own, restore this node's data dir, or delete those keys")
            self.token, self._claim = secrets.token_hex(16), True
            return
        self.token = mine["token"]
        if owner is None:
            if mine.get("confirmed"):
                raise RedisAofError(
                    f"storage redis-aof: {self.marker} says this node's Raft log and vote are "
                    f"in {hint}, but Redis has none of them (lost: a server without "
                    "persistence, a FLUSHALL, or another server or namespace than before: it "
                    f"was {mine.get('keys')} at {mine.get('url')}). Restarting empty could "
                    "make this node vote twice. Restore the Redis data, or delete "
                    f"{self.marker} to start this node as new (then remove it from the cluster "
                    "and add it back)")
            self._claim = True  # the first save never landed: nothing was promised
        elif owner != self.token:
            raise RedisAofError(
                f"storage redis-aof: {hint} belong to another node (token {owner[:8]}..., "
                f"{self.marker} has {self.token[:8]}...). Set storage.options.cluster to a "
                "name of its own, or delete those keys")
        elif not mine.get("confirmed"):
            self._write_marker(confirmed=True)

    def _read_marker(self) -> dict | None:
        if self.marker is None:
            return None
        try:
            with open(self.marker) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RedisAofError(f"storage redis-aof: cannot read {self.marker}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            raise RedisAofError(f"storage redis-aof: {self.marker} has no token")
        version = data.get("format", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RedisAofError(f"storage redis-aof: {self.marker} was written by a newer "
                                f"raftcache (redis-aof format {version}; this build reads up "
                                f"to {FORMAT_VERSION}): run that version or a newer one")
        return data

    def _write_marker(self, confirmed: bool) -> None:
        # write_private: the marker is whole or absent, and its token owner-only.
        private_dir(os.path.dirname(self.marker))
        body = {"token": self.token, "url": self.where, "keys": f"{self.prefix}:*",
                "confirmed": confirmed, "format": FORMAT_VERSION}
        write_private(self.marker, json.dumps(body))

    # -- writes -------------------------------------------------------------------------------------
    def save(self, hard_state, entries, snapshot, sync: bool) -> None:
        if hard_state is not None:
            self._pending_hard = hard_state
        if not sync and not entries and snapshot is None:
            # A commit-index-only change: Raft does not need it durable at once (a restart
            # re-learns the commit), so it rides along with the next write, saving a round
            # trip and an fsync, and the node may call us on its hub for it.
            return
        self._write(entries, "replace" if snapshot is not None else "", snapshot)

    def compact(self, snapshot: Snapshot) -> None:
        self._write((), "compact", snapshot)

    def _write(self, entries, mode: str, snapshot: Snapshot | None,
               retry_timeout: float | None = None) -> None:
        if self.token is None:
            raise RuntimeError("RedisAofStorage: load() must come before save()")
        hard = self._pending_hard
        if not entries and snapshot is None and hard is None:
            return
        args = [self.token, "1" if self._claim else "",
                encode_hard_state(hard) if hard is not None else b"", mode]
        if snapshot is not None:
            args += [snapshot.meta.index, encode_meta(snapshot.meta), snapshot.data]
        else:
            args += ["", b"", b""]
        args.append(entries[0].index if entries else "")
        for e in entries:
            args += [e.index, encode_entry(e)]
        if self._claim and self.marker is not None:
            self._write_marker(confirmed=False)  # before Redis: see _adopt
        try:
            self._call(lambda: self._script(keys=self.keys, args=args), retry_timeout)
        except redis.ResponseError as exc:
            if "RAFTCACHE_OWNER" in str(exc):
                raise RedisAofError(
                    f"storage redis-aof: the keys {self.prefix}:* at {self.where} vanished or "
                    "were taken over while this node ran (Redis restarted without its data, "
                    "or a FLUSHALL): refusing to write a log with holes") from None
            raise RedisAofError(f"storage redis-aof: {self.where} refused a write: "
                                f"{exc}") from exc
        if hard is self._pending_hard:
            self._pending_hard = None
        if self._claim:
            self._claim = False
            if self.marker is not None:
                self._write_marker(confirmed=True)

    def _call(self, fn, retry_timeout: float | None = None):
        """fn(), retried while Redis is unreachable or loading its AOF, up to retry_timeout.

        A write's outcome is unknown after a lost connection; running the same script again
        is safe because it is idempotent (same entries, same hard state, same snapshot).
        """
        retry_timeout = self.retry_timeout if retry_timeout is None else retry_timeout
        deadline = time.monotonic() + retry_timeout
        delay = 0.005
        while True:
            try:
                if self._recheck:
                    self.check_durability()  # a restarted Redis may have another config
                return fn()
            except RETRYABLE as exc:
                self._recheck = True
                if time.monotonic() + delay > deadline:
                    raise RedisAofError(f"storage redis-aof: the redis-server at {self.where} "
                                        f"did not answer within {retry_timeout} s: "
                                        f"{exc}") from exc
                log.warning("redis at %s: %s; retrying", self.where, exc)
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def close(self) -> None:
        try:
            if self._pending_hard is not None and self.token is not None:
                self._write((), "", None, retry_timeout=0)  # the last commit index, best effort
        except Exception as exc:  # closing must not fail the node's shutdown
            log.warning("redis at %s: last hard state not written: %s", self.where, exc)
        finally:
            self.pool.disconnect()


@hookimpl
def raftcache_storages():
    yield StorageProvider("redis-aof", RedisAofStorage,
                          "the log in a redis-server with appendonly yes, appendfsync always")
