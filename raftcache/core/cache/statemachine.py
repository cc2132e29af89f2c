"""The cache's replicated state machine: what a committed write does, identically everywhere
(what users may rely on of it: docs/semantics.md).

Every replica applies the same entries in the same order and must reach the same state and the
same result, so nothing here reads a clock, draws randomness or does I/O besides the backend:

- **Versions**: a key's version is the log index of the entry that last wrote it.
- **Time** is the entry's `stamp_ms` (the leader's cluster time, which no single clock
  moves). The state machine's own "now" is the largest stamp applied so far, so a stamp that
  goes backwards (a new leader a little behind) cannot make time go backwards. A key written with a ttl expires at now + ttl_ms; a
  write treats a key as gone once now >= its expiry, a read once the reader's `now_stamp_ms`
  is. Expired keys are reclaimed by `Sweep` entries the leader proposes (`expired_keys_due`).
- **Exactly once** (Raft dissertation 6.3): a table of client sessions keeps the results of
  each client's newest `SESSION_RESULTS` writes, by sequence number; a retried write gets its
  first result back instead of applying twice. The same sequence number on a different write
  (another kind or key) is refused. A sequence number the session no longer holds is refused
  when it is below every number it still holds (its result is gone), and applied otherwise
  (it never applied), so a write tagged with another client's id and a higher number does not
  make that client's next write fail. Sessions idle for `session_idle_ms` (by stamps) are
  dropped. The table is capped (`max_sessions_per_identity` for each authenticated caller,
  `max_sessions` in all): a write that opens a session beyond a cap takes the place of the
  least recently used one (the caller's, then anyone's) if that one has been idle for
  `session_evictable_ms`, and is refused Unavailable otherwise, so a flood of new client ids
  never pushes out a session that is still being retried. For `session_idle_ms` after the
  caps evicted a session of a caller, a write of that caller on a session the table lacks is
  refused OutcomeUnknown unless it is a session's first (seq 1): it may retry a write the
  evicted session applied. A result that comes from a stored value (incr, append) is kept
  sealed by the value codecs (`SealedResult`), like the value itself.
- **Errors** that are the client's fault are *results* (`ApplyError`), never exceptions.
- **Settings** (`Configure`): a small replicated map of cluster settings (name -> value, with
  the stamp and index of the entry that set it) where security plugins keep revocations,
  roles and wrapped data keys. `check_command` sees it, so access decisions come from
  replicated state only.
- **Members**: the peer address each membership change carried (`record_members`), so that
  every node, and one restored from a snapshot, reaches the members where the log says,
  whatever its config file lists; and which members have joined (ran and hold the log), so
  that one that lost its data is refused instead of voting twice.

The catalog (key -> version, expiry) lives here, in write order (the order a bounded backend
evicts in), with two indexes derived from it and never snapshotted: its keys in byte order (an
invalidate visits only the keys under its prefix) and a heap by expiry (a sweep visits only
expired keys); values live in the backend. Changes to the backend are staged while a batch of
entries applies and reach it in one `Backend.apply` call per batch (`flush`); an incr or append
later in the batch reads the staged value. A large invalidate or sweep calls `pause` between
chunks of `PAUSE_KEYS` keys, and its deletions reach the backend in such chunks, on their own.
Values are stored exactly as the entry holds them - already encoded by the proposer's value
codecs (encryption), bound to their version by the codecs that do so (`bind_value`) - and
`read()` returns them as stored: decoding them for the client is the node's job. The
exceptions are the commands whose
result comes from the stored value (`returns_value`: `Incr` and `Append`), which must look
inside it: they decode it with `codecs` (in reverse order) and encode the new value (in order),
like the node does for other writes; Append decodes its own argument too.

Each command class is applied by the method named `_apply_<its name>`, found through `_APPLY`;
a registered command without one stops this module from importing.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import attrs
from sortedcontainers import SortedList

from ..raft.messages import MAX_NODE_ID, ConfChange, ConfChangeType, address_problem
from .commands import (
    COMMAND_TYPES,
    MAX_STAMP_MS,
    Append,
    Cas,
    CommandError,
    Configure,
    Incr,
    Invalidate,
    MSet,
    Put,
    Reader,
    Remove,
    Reseal,
    SealedIncr,
    Sweep,
    Writes,
    decode_envelope,
    fingerprint,
    put_blob,
    put_svarint,
    put_uvarint,
)

_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_MAX_INT_DIGITS = 20  # "-9223372036854775808"

SNAPSHOT_MAGIC = b"RCSM"
# 2: sessions hold several results with fingerprints; 3: settings; 4: members' addresses;
# 5: sealed session results (`SealedResult`), and which callers the session caps evicted
# from, when. Older ones are still read; a newer one is refused with a message naming both.
SNAPSHOT_VERSION = 5

DEFAULT_SESSION_IDLE_MS = 10 * 60 * 1000
_SNAPSHOT_CHUNK = 1000  # keys per backend read while taking a snapshot
SESSION_RESULTS = 8  # results kept per client session (a well-behaved client needs one)
# Keys an invalidate or sweep removes, and deletions handed to the backend in one call, between
# calls of `pause` (a few ms of work each).
PAUSE_KEYS = 1024
# The session caps. The Python client holds one session per write in flight, so a caller
# needs about as many as it has concurrent writers; anonymous sessions (no authentication:
# every client is the same caller) count only towards the total.
MAX_SESSIONS_PER_IDENTITY = 1024
MAX_SESSIONS = 100_000
# Only a session idle this long may make room for a new one: longer than a client keeps
# retrying a write (a node bounds a call's deadline to 60 s).
SESSION_EVICTABLE_MS = 60_000
MAX_APPENDED_BYTES = 4 << 20  # what append may grow a value to (node.max_request_bytes' default)


class SnapshotError(ValueError):
    """`restore()` was given bytes that are not a state machine snapshot."""


class ValueCodecError(Exception):
    """A value codec cannot turn a stored value back into the client's (a sealed value that
    fails to open: altered, moved to another key, or sealed with a key this node lacks). The
    node answers such a read Unavailable with the codec's message; an incr or append that meets
    one treats the value as lost on this replica, like an evicted one."""


@attrs.frozen(slots=True)
class ApplyError:
    """A write that applied as a refusal, the same way on every replica.

    kind is the client error to report: "InvalidRequest" (e.g. incr on a non-integer),
    "Unauthorized" (vetoed by check_command), or "OutcomeUnknown" (the state machine cannot tell
    the result: a retry of a sequence number older than the client's latest, or an incr whose
    stored value this replica's backend has evicted).
    """

    kind: str
    reason: str


class Change(NamedTuple):
    """One key's change in a `Backend.apply` batch (raftcache.pluginapi)."""

    key: bytes
    value: bytes | None  # None: delete the key
    # How long the value must live from now, in ms (None: no expiry). The state machine
    # reclaims expired keys itself (deterministically, through the log); a backend that can
    # expire keys natively (Redis, Memcached) should set a little more than this, so that it
    # frees the memory but never drops a key before every replica considers it expired.
    ttl_ms: int | None = None


class Setting(NamedTuple):
    """A cluster setting (`commands.Configure`) and the entry that set it."""

    value: bytes
    stamp_ms: int  # the entry's stamp (e.g. when a subject was revoked)
    index: int


class KeyMeta(NamedTuple):
    """What the catalog keeps of a key (a tuple: a million keys cost no more than tuples)."""

    version: int  # the log index of the entry that last wrote it
    expiry: int | None  # the stamp at which it expires, or None

    def live_at(self, now: int) -> bool:
        return self.expiry is None or now < self.expiry


@attrs.define(slots=True)
class _Session:
    last_stamp_ms: int
    # seq -> (fingerprint of the write, its result), the newest SESSION_RESULTS writes
    results: dict = attrs.Factory(dict)
    floor: int = -(1 << 63)  # the highest sequence number whose result was dropped

    def remember(self, seq: int, fp: bytes, result) -> None:
        self.results[seq] = (fp, result)
        if len(self.results) > SESSION_RESULTS:
            oldest = min(self.results)
            del self.results[oldest]
            self.floor = max(self.floor, oldest)


@attrs.frozen(slots=True)
class SealedResult:
    """What a session keeps of a result that comes from a stored value (incr's new integer,
    append's new length) when there are value codecs: the decimal result as they encode a
    value of `key`, so that sessions, snapshots and backups do not hold it in plaintext."""

    key: bytes
    blob: bytes


Result = object  # int | bool | tuple[bool, int | None] | list[int] | ApplyError | None


@attrs.define
class StateMachine:
    backend: object
    # check_command(command=, identity=, stamp_ms=, caller=, settings=) -> veto reason or
    # None; the node wires it to the raftcache_check_command hook. Exceptions propagate.
    check_command: Callable[..., str | None] | None = None
    codecs: Sequence = attrs.field(default=(), converter=tuple)
    session_idle_ms: int = DEFAULT_SESSION_IDLE_MS
    # Called between chunks of a large invalidate or sweep and of its backend deletions: the
    # node yields to its other work there (its reads wait until the whole batch is applied).
    # It must not touch the state machine.
    pause: Callable[[], None] | None = None
    max_sessions_per_identity: int = MAX_SESSIONS_PER_IDENTITY
    max_sessions: int = MAX_SESSIONS
    session_evictable_ms: int = SESSION_EVICTABLE_MS

    applied_index: int = attrs.field(init=False, default=0)
    last_stamp_ms: int = attrs.field(init=False, default=0)  # the state machine's "now"
    _catalog: dict = attrs.field(init=False, factory=dict)  # key -> KeyMeta, in write order
    # The catalog's keys in byte order, so that an invalidate visits only the keys under its
    # prefix. Derived: rebuilt on restore, never in a snapshot.
    _ordered: SortedList = attrs.field(init=False, factory=SortedList)
    # key -> (value or None for a delete, expiry): changes not yet handed to the backend
    _staged: dict = attrs.field(init=False, factory=dict)
    _staged_first: int = attrs.field(init=False, default=0)  # the entry that staged first
    # After a restart over a backend that already holds entries up to `_overlay_until`, the
    # entries up to there are replayed into this dict (seeded with the snapshot's values)
    # instead of the backend, so the backend never goes back to an older state.
    _overlay: dict | None = attrs.field(init=False, default=None)
    _overlay_until: int = attrs.field(init=False, default=0)
    backend_index: int = attrs.field(init=False, default=0)  # what the backend last recorded
    _expiries: list = attrs.field(init=False, factory=list)  # heap of (expiry, key), lazy
    _ttl_keys: int = attrs.field(init=False, default=0)  # catalog keys with an expiry
    # (client_id, identity) -> _Session, least recently used first
    _sessions: OrderedDict = attrs.field(init=False, factory=OrderedDict)
    # identity -> its client ids (OrderedDict, least recently used first); not anonymous ones
    _identity_sessions: dict = attrs.field(init=False, factory=dict)
    # identity -> stamp of the latest cap eviction of one of its sessions, oldest first
    _evicted: OrderedDict = attrs.field(init=False, factory=OrderedDict)
    settings: dict = attrs.field(init=False, factory=dict)  # name -> Setting; read, never write
    members: dict = attrs.field(init=False, factory=dict)  # node id -> peer address (the log's)
    joined: set = attrs.field(init=False, factory=set)  # members that ran and hold the log

    # ==========================================================================================
    # Apply
    # ==========================================================================================
    def apply(self, index: int, data: bytes) -> Result:
        """`stage` then `flush`: one entry, applied through to the backend."""
        result = self.stage(index, data)
        self.flush()
        return result

    def record_members(self, changes: ConfChange) -> None:
        """Record the addresses a committed membership change carries: an add or an address
        update with an address sets it, a removal forgets the node. The core decides the
        membership itself; this only keeps where the members are."""
        for c in changes.changes:
            if c.type == ConfChangeType.REMOVE_NODE:
                self.members.pop(c.node_id, None)
                self.joined.discard(c.node_id)
                continue
            if c.type == ConfChangeType.JOINED:
                self.joined.add(c.node_id)
            if c.address:
                self.members[c.node_id] = c.address

    def stage(self, index: int, data: bytes) -> Result:
        """Apply the committed NORMAL entry at `index` and return its result; its backend
        changes wait for `flush`.

        Empty data (a leader's no-op) returns None. Undecodable data returns an ApplyError
        rather than raising: it is committed, so every replica must get past it the same way.
        """
        if index <= self.applied_index:
            raise ValueError(f"entry {index} is not after the applied index {self.applied_index}")
        if self._overlay is not None and index > self._overlay_until:
            self._overlay = None  # the backend holds everything up to here: back to it
        if not data:  # a leader's no-op
            self.applied_index = index
            return None
        try:
            env = decode_envelope(data)
        except CommandError as exc:
            self.applied_index = index
            return ApplyError("InvalidRequest", f"undecodable command: {exc}")
        now = max(self.last_stamp_ms, env.stamp_ms)
        if env.command.writes in (Writes.PREFIXES, Writes.EXPIRED):
            # What came before goes to the backend first, so that the deletions this may stage
            # in bulk are one entry's alone, which `flush` may hand over in chunks.
            self.flush()
        # The one backend read a write may need comes before anything changes: if the backend
        # fails (raises), the entry can simply be staged again.
        stored = self._read_before_write(env.command, now)
        self.applied_index = index
        self.last_stamp_ms = now
        self._expire_sessions(now)

        cmd = env.command
        session = None
        if env.client_id is not None and env.seq is not None:
            session_key = (env.client_id, env.identity)
            session = self._sessions.get(session_key)
            fp = fingerprint(cmd)
            if session is not None:
                seen = session.results.get(env.seq)
                if seen is not None:
                    if seen[0] and seen[0] != fp:
                        return ApplyError(
                            "InvalidRequest",
                            f"sequence number {env.seq} of client {env.client_id!r} was "
                            "already used for a different write; nothing was applied")
                    self._touch(session_key, session, now)
                    return self._unseal_result(seen[1])
                if env.seq <= session.floor:
                    return ApplyError(
                        "OutcomeUnknown",
                        f"sequence number {env.seq} is older than every write of this client "
                        "whose result is still kept; it may have applied before")
            elif env.seq > 1 and env.identity in self._evicted:
                return ApplyError(
                    "OutcomeUnknown",
                    f"client {env.client_id!r} has no session here, and the session caps "
                    "evicted sessions of this caller lately: this write may be the retry of "
                    "one that applied. Nothing was applied now; start a new client id (seq 1)")

        # The leader's sweep is not checked: it drops only what every reader sees as gone.
        if self.check_command is not None and cmd.writes is not Writes.EXPIRED:
            reason = self.check_command(command=cmd, identity=env.identity, stamp_ms=now,
                                        caller=env.caller, settings=self.settings)
            if reason:
                # A veto leaves no trace, not even in the session: it surely did not apply.
                return ApplyError("Unauthorized", str(reason))

        if session is None and env.client_id is not None and env.seq is not None:
            refused = self._make_room(env.identity, now)
            if refused is not None:
                return refused
        result = self._execute(cmd, index, now, stored)
        if env.client_id is not None and env.seq is not None:
            if session is None:
                session = self._open_session(session_key, now)
            session.remember(env.seq, fp, self._seal_result(cmd, result))
            self._touch(session_key, session, now)
        return result

    def _seal_result(self, cmd, result) -> Result:
        if self.codecs and cmd.returns_value and type(result) is int:
            return SealedResult(cmd.key, encode_value(self.codecs, cmd.key, b"%d" % result))
        return result

    def _unseal_result(self, kept) -> Result:
        if type(kept) is not SealedResult:
            return kept
        try:
            result = _parse_int(decode_value(self.codecs, kept.key, kept.blob))
        except ValueCodecError as exc:
            result, problem = None, str(exc)
        else:
            problem = "not a number"
        if result is None:  # a snapshot this node's codecs cannot open: the result is lost
            return ApplyError("OutcomeUnknown", f"the result of this write applied before "
                                                f"cannot be read on this node ({problem})")
        return result

    def _read_before_write(self, cmd, now: int) -> bytes | None:
        """The stored value a command whose result comes from it (`returns_value`: incr,
        append) reads; None for other commands, and when the key is missing, expired, or
        staged by this batch."""
        if not cmd.returns_value or cmd.key in self._staged:
            return None
        if self._live(cmd.key, now) is None:
            return None
        return self._get_many([cmd.key])[0]

    def _execute(self, cmd, index: int, now: int, stored: bytes | None) -> Result:
        return _APPLY[type(cmd)](self, cmd, index, now, stored)

    # -- one method per command (`_APPLY`): (command, index, now, stored) -> its result ---------
    def _apply_put(self, cmd: Put, index: int, now: int, _stored) -> Result:
        self._write(cmd.key, cmd.value, index, _expiry(now, cmd.ttl_ms))
        return index

    def _apply_remove(self, cmd: Remove, _index: int, now: int, _stored) -> Result:
        existed = self._live(cmd.key, now) is not None
        if cmd.key in self._catalog:  # also reclaims an expired one
            self._remove(cmd.key)
        return existed

    def _apply_cas(self, cmd: Cas, index: int, now: int, _stored) -> Result:
        meta = self._live(cmd.key, now)
        current = meta.version if meta is not None else 0  # a missing key has version 0
        if current != cmd.expected_version:
            return (False, None if meta is None else current)
        self._write(cmd.key, cmd.value, index, _expiry(now, cmd.ttl_ms))
        return (True, index)

    def _apply_invalidate(self, cmd: Invalidate, _index: int, now: int, _stored) -> Result:
        # The keys under the prefix are a run of the ordered index: found by bisection, taken a
        # chunk at a time (each chunk's search starts over: the run's head was removed).
        prefix, count = cmd.prefix, 0
        while True:
            under = itertools.takewhile(lambda k: k.startswith(prefix),
                                        self._ordered.irange(minimum=prefix))
            chunk = list(itertools.islice(under, PAUSE_KEYS))
            for key in chunk:
                if self._live(key, now) is not None:
                    count += 1
                self._remove(key)
            if len(chunk) < PAUSE_KEYS:
                return count
            self._pause()

    def _apply_mset(self, cmd: MSet, index: int, now: int, _stored) -> Result:
        expiry = _expiry(now, cmd.ttl_ms)
        for key, value in cmd.items:
            self._write(key, value, index, expiry)
        return [index] * len(cmd.items)

    def _apply_configure(self, cmd: Configure, index: int, now: int, _stored) -> Result:
        for name, value in cmd.items:
            if value is None:
                self.settings.pop(name, None)
            else:
                self.settings[name] = Setting(value, now, index)
        return index

    def _apply_reseal(self, cmd: Reseal, _index: int, now: int, _stored) -> Result:
        count = 0
        for key, version, blob in cmd.items:
            meta = self._live(key, now)
            if meta is not None and meta.version == version:
                # The catalog stays as it is, so the version the value is bound to too.
                self._change(key, bind_value(self.codecs, key, version, blob), meta.expiry)
                count += 1
        return count

    def _apply_sweep(self, cmd: Sweep, _index: int, now: int, _stored) -> Result:
        # Never reclaim a key the entry's own clock does not consider expired yet.
        return self._sweep(min(cmd.up_to_stamp_ms, now))

    def _apply_incr(self, cmd: Incr, index: int, now: int, stored: bytes | None) -> Result:
        return self._increment(cmd.key, cmd.delta, index, now, stored)

    def _apply_sealed_incr(self, cmd: SealedIncr, index: int, now: int,
                           stored: bytes | None) -> Result:
        delta = _parse_int(decode_value(self.codecs, cmd.key, cmd.delta))  # like append's
        if delta is None:
            return ApplyError("InvalidRequest", "the amount of an incr must be a 64-bit integer")
        return self._increment(cmd.key, delta, index, now, stored)

    def _increment(self, key: bytes, delta: int, index: int, now: int,
                   stored: bytes | None) -> Result:
        current = self._current(key, index, now, "increment", stored)
        if isinstance(current, ApplyError):
            return current
        blob, expiry = current
        base = 0 if blob is None else _parse_int(blob)  # missing or expired: from 0, no ttl
        if base is None:
            return ApplyError("InvalidRequest", f"the value of {key!r} is not an integer")
        new = base + delta
        if not _I64_MIN <= new <= _I64_MAX:
            return ApplyError("InvalidRequest", f"incrementing {key!r} overflows 64 bits")
        self._write(key, encode_value(self.codecs, key, b"%d" % new), index, expiry)
        return new

    def _apply_append(self, cmd: Append, index: int, now: int,
                      stored: bytes | None) -> Result:
        current = self._current(cmd.key, index, now, "append", stored)
        if isinstance(current, ApplyError):
            return current
        blob, expiry = current
        new = (blob or b"") + decode_value(self.codecs, cmd.key, cmd.value)
        if len(new) > MAX_APPENDED_BYTES:
            return ApplyError("InvalidRequest", f"appending to {cmd.key!r} would make it "
                                                f"{len(new)} bytes (at most {MAX_APPENDED_BYTES})")
        self._write(cmd.key, encode_value(self.codecs, cmd.key, new), index, expiry)
        return len(new)

    def _current(self, key: bytes, index: int, now: int, what: str, stored: bytes | None):
        """(decoded value, expiry) of `key` for a write that reads it first ((None, None) when
        missing or expired), or an ApplyError when this replica's backend lost the value. Such
        writes keep the key's ttl, like Redis. `stored`: what `_read_before_write` found."""
        meta = self._live(key, now)
        if meta is None:
            return None, None
        staged = self._staged.get(key)
        blob = staged[0] if staged is not None else stored
        if blob is not None:
            try:
                return decode_value(self.codecs, key, blob, meta.version), meta.expiry
            except ValueCodecError as exc:
                # Altered in this node's backend (the others may hold it intact): drop it
                # here, so that it reads as missing, and carry on as after an eviction.
                problem = f"cannot be opened on this node ({exc})"
                self._change(key, None, None)
        else:
            problem = "was evicted from this node's backend"
        # Other replicas may still hold it, so bump the version like they do and keep the
        # value unknown here: a miss.
        self._catalog[key] = KeyMeta(index, meta.expiry)
        return ApplyError("OutcomeUnknown", f"the value of {key!r} {problem}; the {what} "
                                            "applied but its result is unknown")

    # -- the catalog --------------------------------------------------------------------------
    def _live(self, key: bytes, now: int) -> KeyMeta | None:
        """The key's catalog entry, unless it is missing or expired at `now`."""
        meta = self._catalog.get(key)
        return meta if meta is not None and meta.live_at(now) else None

    def _write(self, key: bytes, value: bytes, version: int, expiry: int | None) -> None:
        old = self._catalog.pop(key, None)  # re-inserted last: the catalog is in write order
        if old is None:
            self._ordered.add(key)
        elif old.expiry is not None:
            self._ttl_keys -= 1
        self._catalog[key] = KeyMeta(version, expiry)
        self._change(key, bind_value(self.codecs, key, version, value), expiry)
        if expiry is not None:
            self._ttl_keys += 1
            heapq.heappush(self._expiries, (expiry, key))
            self._maybe_rebuild_expiries()

    def _remove(self, key: bytes) -> None:
        self._forget(key)
        self._change(key, None, None)

    def _forget(self, key: bytes) -> None:
        self._ordered.remove(key)
        if self._catalog.pop(key).expiry is not None:
            self._ttl_keys -= 1

    def _change(self, key: bytes, value: bytes | None, expiry: int | None) -> None:
        if self._overlay is not None:
            if value is None:
                self._overlay.pop(key, None)
            else:
                self._overlay[key] = value
            return
        if not self._staged:
            self._staged_first = self.applied_index
        self._staged.pop(key, None)  # re-inserted last: changes go out in write order
        self._staged[key] = (value, expiry)

    # -- the backend ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand the staged changes to the backend in one call. On BackendUnavailable or
        BackendLost nothing is lost: the changes stay staged and `flush` may be called again."""
        if not self._staged:
            return
        staged, now = self._staged, self.last_stamp_ms
        if (self.pause is not None and len(staged) > PAUSE_KEYS
                and self._staged_first == self.applied_index
                and all(value is None for value, _ in staged.values())):
            # One entry's deletions (an invalidate, a sweep: `stage` flushed what came before)
            # go in chunks with pauses between. All but the last are handed over at the index
            # the backend already reflects: cut short, it is behind that entry, whose replay
            # deletes them all again (such entries never read the backend). Deletions evict
            # nothing, so the chunks leave the backend as one call would.
            while len(staged) > PAUSE_KEYS:
                chunk = list(itertools.islice(staged, PAUSE_KEYS))
                self.backend.apply(self.backend_index, [Change(key, None) for key in chunk])
                for key in chunk:
                    del staged[key]
                self._pause()
        changes = [Change(key, value, None if expiry is None else max(0, expiry - now))
                   for key, (value, expiry) in staged.items()]
        evicted = self.backend.apply(self.applied_index, changes)
        staged.clear()
        self.backend_index = self.applied_index
        self._drop_evicted(evicted)

    @property
    def flush_due(self) -> bool:
        """Whether enough is staged that the applier should `flush` before the next entry
        (so that one entry's bulk deletions are its own, handed over in chunks)."""
        return len(self._staged) > PAUSE_KEYS

    def _pause(self) -> None:
        if self.pause is not None:
            self.pause()

    def _drop_evicted(self, keys) -> None:
        # The backend evicted them to stay within its limits, the same way on every replica.
        for key in keys:
            if key in self._catalog:
                self._forget(key)

    def _get_many(self, keys: Sequence[bytes]) -> list:
        if self._overlay is not None:
            return [self._overlay.get(k) for k in keys]
        return self.backend.get_many(keys)

    def _sweep(self, up_to: int) -> int:
        # The expiry heap is ordered by (expiry, key): only expired keys (and stale entries of
        # rewritten ones) are visited, with a pause every PAUSE_KEYS of them.
        heap, catalog = self._expiries, self._catalog
        count = visited = 0
        while heap and heap[0][0] <= up_to:
            expiry, key = heapq.heappop(heap)
            meta = catalog.get(key)
            if meta is not None and meta.expiry == expiry:
                self._remove(key)
                count += 1
            visited += 1
            if visited % PAUSE_KEYS == 0:
                self._pause()
        return count

    def _drop_stale_expiries(self) -> None:
        # Heap entries are never removed on overwrite; skip the ones that no longer match.
        heap, catalog = self._expiries, self._catalog
        while heap:
            expiry, key = heap[0]
            meta = catalog.get(key)
            if meta is not None and meta.expiry == expiry:
                return
            heapq.heappop(heap)

    def _maybe_rebuild_expiries(self) -> None:
        # Keys rewritten with a ttl leave stale heap entries behind; keep the heap O(live keys).
        if len(self._expiries) > 2 * self._ttl_keys + 1024:
            self._rebuild_expiries()

    def _rebuild_expiries(self) -> None:
        self._expiries = [(m.expiry, k) for k, m in self._catalog.items() if m.expiry is not None]
        heapq.heapify(self._expiries)
        self._ttl_keys = len(self._expiries)

    # -- client sessions -----------------------------------------------------------------------
    def _expire_sessions(self, now: int) -> None:
        sessions, idle = self._sessions, self.session_idle_ms
        while sessions:
            key, session = next(iter(sessions.items()))
            if now - session.last_stamp_ms < idle:
                break
            self._drop_session(key)
        evicted = self._evicted
        while evicted:
            identity, stamp = next(iter(evicted.items()))
            if now - stamp < idle:
                break
            del evicted[identity]

    def _make_room(self, identity: str | None, now: int) -> ApplyError | None:
        """Before a write opens a session for `identity`: evict what the caps require (the
        caller's least recently used session, then anyone's), or the refusal when that one
        is too recent to go. Decided from applied state only: the same on every replica.

        At most two sessions go per cap and write: a table that is over a cap already (one
        an older release kept) shrinks by one per new session instead of in a single apply."""
        if identity is not None:
            for _ in range(2):
                mine = self._identity_sessions.get(identity, ())
                if len(mine) < self.max_sessions_per_identity:
                    break
                if not self._evict((next(iter(mine)), identity), now):
                    return self._no_room(f"{identity!r} has {len(mine)} client sessions (at "
                                         f"most {self.max_sessions_per_identity} per caller)")
        for _ in range(2):
            if len(self._sessions) < self.max_sessions:
                break
            if not self._evict(next(iter(self._sessions)), now):
                return self._no_room(f"the cluster holds {len(self._sessions)} client sessions "
                                     f"(at most {self.max_sessions})")
        return None

    def _evict(self, key: tuple, now: int) -> bool:
        """Evict the session `key` unless it is too recent to go; whether it went."""
        if now - self._sessions[key].last_stamp_ms < self.session_evictable_ms:
            return False
        self._drop_session(key)
        self._evicted.pop(key[1], None)  # re-inserted last: the records stay in stamp order
        self._evicted[key[1]] = now
        return True

    def _no_room(self, why: str) -> ApplyError:
        return ApplyError("Unavailable", f"{why}, each used in the last "
                                         f"{self.session_evictable_ms} ms; nothing was applied: "
                                         "retry later, or use fewer client ids")

    def _open_session(self, key: tuple, now: int) -> _Session:
        session = self._sessions[key] = _Session(now)
        client_id, identity = key
        if identity is not None:
            self._identity_sessions.setdefault(identity, OrderedDict())[client_id] = None
        return session

    def _touch(self, key: tuple, session: _Session, now: int) -> None:
        session.last_stamp_ms = now
        self._sessions.move_to_end(key)
        client_id, identity = key
        if identity is not None:
            self._identity_sessions[identity].move_to_end(client_id)

    def _drop_session(self, key: tuple) -> None:
        del self._sessions[key]
        client_id, identity = key
        if identity is not None:
            mine = self._identity_sessions[identity]
            del mine[client_id]
            if not mine:
                del self._identity_sessions[identity]

    # ==========================================================================================
    # Queries (local: the node decides which consistency level makes them safe)
    # ==========================================================================================
    def read(self, key: bytes, now_stamp_ms: int) -> tuple[bytes, int] | None:
        """(value as stored, version), or None when missing, expired at `now_stamp_ms`, or
        evicted by the backend. Raises what the backend raises (BackendUnavailable)."""
        return self.read_many([key], now_stamp_ms)[0]

    def read_many(self, keys: Sequence[bytes], now_stamp_ms: int) -> list:
        """`read` of each key, asking the backend once."""
        metas = [self._live(key, now_stamp_ms) for key in keys]
        wanted = [key for key, meta in zip(keys, metas, strict=True) if meta is not None]
        values = iter(self._get_many(wanted) if wanted else ())
        out = []
        for meta in metas:
            value = None if meta is None else next(values)
            out.append(None if value is None else (value, meta.version))
        return out

    def version(self, key: bytes, now_stamp_ms: int) -> int | None:
        """The key's version from the catalog alone (no backend call)."""
        meta = self._live(key, now_stamp_ms)
        return None if meta is None else meta.version

    def expired_keys_due(self, stamp_ms: int) -> bool:
        """Whether a Sweep(stamp_ms) would reclaim anything: the leader's cue to propose one."""
        self._drop_stale_expiries()
        return bool(self._expiries) and self._expiries[0][0] <= stamp_ms

    def next_expiry(self) -> int | None:
        """The earliest expiry stamp of any key, or None."""
        self._drop_stale_expiries()
        return self._expiries[0][0] if self._expiries else None

    def keys_at(self, start: int, limit: int) -> list[bytes]:
        """Up to `limit` catalog keys from position `start` in write order (a sweep's page)."""
        return list(itertools.islice(self._catalog, start, start + limit))

    def __len__(self) -> int:
        """Keys in the catalog, including expired ones not yet swept."""
        return len(self._catalog)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ==========================================================================================
    # Snapshots
    # ==========================================================================================
    def snapshot(self) -> bytes:
        """The whole state (catalog, values, sessions) as deterministic bytes: replicas that
        applied the same entries, over backends that evicted nothing, give identical images.

        A cataloged key whose value the backend no longer has is recorded as missing.
        """
        if self._staged:
            raise RuntimeError("snapshot() with staged changes: flush() first")
        out = bytearray(SNAPSHOT_MAGIC)
        out.append(SNAPSHOT_VERSION)
        put_uvarint(out, self.applied_index)
        put_uvarint(out, self.last_stamp_ms)
        put_uvarint(out, len(self._catalog))
        keys = list(self._catalog)  # write order: a restored bounded backend evicts the same
        for start in range(0, len(keys), _SNAPSHOT_CHUNK):
            chunk = keys[start:start + _SNAPSHOT_CHUNK]
            for key, value in zip(chunk, self._get_many(chunk), strict=True):
                self._put_key(out, key, value)
        put_uvarint(out, len(self._sessions))
        for (client_id, identity), session in self._sessions.items():  # LRU order matters
            put_blob(out, client_id.encode())
            _put_identity(out, identity)
            put_uvarint(out, session.last_stamp_ms)
            put_svarint(out, session.floor)
            put_uvarint(out, len(session.results))
            for seq, (fp, result) in session.results.items():
                put_svarint(out, seq)
                put_blob(out, fp)
                _encode_result(out, result)
        put_uvarint(out, len(self.settings))
        for name in sorted(self.settings):
            setting = self.settings[name]
            put_blob(out, name.encode())
            put_blob(out, setting.value)
            put_uvarint(out, setting.stamp_ms)
            put_uvarint(out, setting.index)
        nodes = sorted(set(self.members) | self.joined)
        put_uvarint(out, len(nodes))
        for node_id in nodes:
            put_uvarint(out, node_id)
            put_blob(out, self.members.get(node_id, "").encode())
            out.append(1 if node_id in self.joined else 0)
        put_uvarint(out, len(self._evicted))
        for identity, stamp in self._evicted.items():  # stamp order
            _put_identity(out, identity)
            put_uvarint(out, stamp)
        return bytes(out)

    def _put_key(self, out: bytearray, key: bytes, value: bytes | None) -> None:
        version, expiry = self._catalog[key]
        put_blob(out, key)
        put_uvarint(out, version)
        put_uvarint(out, 0 if expiry is None else expiry)  # expiries are always > 0
        if value is None:
            out.append(0)
        else:
            out.append(1)
            put_blob(out, value)

    def restore(self, data: bytes, backend_index: int | None = None) -> None:
        """Replace the whole state with a snapshot's and load its values into the backend
        (keys the old state held and the snapshot does not, or holds without a value, are
        deleted from it).

        `backend_index`: the index the backend says its data reflects (`Backend.open`), when
        the node trusts it (at most its last log index). When it is at or after the
        snapshot's, the backend is left alone: the entries up to it replay into an overlay
        seeded with the snapshot's values, and the backend takes over after them.

        The snapshot is parsed completely before anything changes, so garbage raises
        SnapshotError and leaves the state machine as it was. Empty data is the empty state.
        """
        applied, stamp, catalog, values, (sessions, cap_evictions), settings, \
            (members, joined) = _parse_snapshot(data)
        if backend_index is not None and backend_index >= applied:
            overlay, evicted = dict(values), ()
        else:
            # Into the backend first: if it fails, the state machine is as it was.
            overlay = None
            items = [Change(key, value, None if catalog[key].expiry is None
                            else max(0, catalog[key].expiry - stamp)) for key, value in values]
            # Deleted: keys the old state held and the snapshot does not, and keys the snapshot
            # holds without a value (its backend had dropped it): an older value of ours
            # must not stand in for it.
            present = {key for key, _ in values}
            stale = [key for key in self._catalog if key not in catalog]
            stale += [key for key in catalog if key not in present]
            evicted = self.backend.load(applied, items, stale)
            backend_index = applied
        self._staged.clear()
        self._overlay, self._overlay_until = overlay, backend_index
        self.backend_index = backend_index
        self._catalog = catalog
        self._ordered = SortedList(catalog)
        self.applied_index = applied
        self.last_stamp_ms = stamp
        self._sessions = sessions
        self._identity_sessions = {}
        for client_id, identity in sessions:  # in LRU order, like the table
            if identity is not None:
                self._identity_sessions.setdefault(identity, OrderedDict())[client_id] = None
        self._evicted = cap_evictions
        self.settings = settings
        self.members, self.joined = members, joined
        self._rebuild_expiries()
        self._drop_evicted(evicted)



def _appliers() -> dict[type, Callable]:
    missing = [cls.__name__ for cls in COMMAND_TYPES.values()
               if not hasattr(StateMachine, f"_apply_{cls.name}")]
    if missing:
        raise TypeError(f"StateMachine has no _apply_<name> method for {', '.join(missing)}")
    return {cls: getattr(StateMachine, f"_apply_{cls.name}") for cls in COMMAND_TYPES.values()}


# command class -> the StateMachine method that applies it
_APPLY = _appliers()

def check_snapshot(snapshot) -> str | None:
    """Why a Raft snapshot (`raftcache.core.raft.messages.Snapshot`) does not hold an image that
    `restore()` would take at its index, or None. The Raft core asks before a snapshot
    received from the leader replaces its log."""
    try:
        applied = _parse_snapshot(snapshot.data)[0]
    except SnapshotError as exc:
        return str(exc)
    if applied > snapshot.meta.index:
        return (f"the image has applied entry {applied}, after the snapshot's index "
                f"{snapshot.meta.index}")
    return None


def _parse_snapshot(data: bytes):
    """(applied index, stamp, catalog, values, (sessions, evicted), settings, (members,
    joined)) of a snapshot; SnapshotError (only) when `data` is not one."""
    catalog: dict = {}
    settings: dict = {}
    members: dict = {}
    joined: set = set()
    values: list = []
    sessions: OrderedDict = OrderedDict()
    evicted: OrderedDict = OrderedDict()
    applied = stamp = 0
    if not data:
        return applied, stamp, catalog, values, (sessions, evicted), settings, (members, joined)
    r = Reader(bytes(data))
    try:
        if bytes(data[:4]) != SNAPSHOT_MAGIC:
            raise CommandError("not a raftcache state machine snapshot")
        r.pos = 4
        version = r.u8()
        if not 1 <= version <= SNAPSHOT_VERSION:
            raise CommandError(f"unknown snapshot version {version} (this build reads 1 to "
                               f"{SNAPSHOT_VERSION})")
        applied = r.uvarint()
        stamp = r.uvarint()
        for _ in range(r.uvarint()):
            key = r.bytes_()
            version_ = r.uvarint()
            expiry = r.uvarint() or None
            catalog[key] = KeyMeta(version_, expiry)
            present = r.u8()
            if present == 1:
                values.append((key, r.bytes_()))
            elif present != 0:
                raise CommandError("bad value marker")
        for _ in range(r.uvarint()):
            client_id = r.str_()
            identity = _get_identity(r)
            if version == 1:  # the latest result only: older numbers were refused
                seq = r.svarint()
                session = _Session(r.uvarint(), floor=seq - 1)
                session.results[seq] = (b"", _decode_result(r))
            else:
                session = _Session(r.uvarint(), floor=r.svarint())
                count = r.uvarint()
                if count > SESSION_RESULTS:
                    raise CommandError(f"a session with {count} results")
                for _ in range(count):
                    seq = r.svarint()
                    session.results[seq] = (r.bytes_(), _decode_result(r))
            sessions[(client_id, identity)] = session
        if version >= 3:
            for _ in range(r.uvarint()):
                name = r.str_()
                settings[name] = Setting(r.bytes_(), r.uvarint(), r.uvarint())
        if version >= 4:
            for _ in range(r.uvarint()):
                node_id, address, flag = r.uvarint(), r.str_(), r.u8()
                problem = address_problem(address)
                if not 0 < node_id <= MAX_NODE_ID or problem or flag not in (0, 1):
                    raise CommandError(f"member {node_id}: {problem or 'bad record'}")
                if address:
                    members[node_id] = address
                if flag:
                    joined.add(node_id)
        if version >= 5:
            for _ in range(r.uvarint()):
                identity = _get_identity(r)
                evicted[identity] = r.uvarint()
        r.end()
    except CommandError as exc:
        raise SnapshotError(f"corrupt state machine snapshot: {exc}") from None
    return applied, stamp, catalog, values, (sessions, evicted), settings, (members, joined)


def _put_identity(out: bytearray, identity: str | None) -> None:
    if identity is None:
        out.append(0)
    else:
        out.append(1)
        put_blob(out, identity.encode())


def _get_identity(r: Reader) -> str | None:
    has_identity = r.u8()
    if has_identity not in (0, 1):
        raise CommandError("bad identity marker")
    return r.str_() if has_identity else None


# ================================================================================================
# Helpers
# ================================================================================================
def encode_value(codecs: Sequence, key: bytes, value: bytes) -> bytes:
    """`value` as it is stored: through every value codec, in order."""
    for codec in codecs:
        value = codec.encode(key, value)
    return value


def decode_value(codecs: Sequence, key: bytes, blob: bytes, version: int | None = None) -> bytes:
    """A value as the client wrote it: through the codecs in reverse order. `version`: `blob`
    is a stored value (`bind_value`) the catalog holds at that version, checked first."""
    if version is not None:
        for codec in reversed(codecs):
            unbind = getattr(codec, "unbind", None)
            if unbind is not None:
                blob = unbind(key, version, blob)
    for codec in reversed(codecs):
        blob = codec.decode(key, blob)
    return blob


def bind_value(codecs: Sequence, key: bytes, version: int, blob: bytes) -> bytes:
    """An encoded value as the backend stores it at `version`: codecs with a `bind` method
    (encryption) tie it to the key and the version, which is only known once its entry
    applies, so that an older value put back in the backend is refused."""
    for codec in codecs:
        bind = getattr(codec, "bind", None)
        if bind is not None:
            blob = bind(key, version, blob)
    return blob


def _expiry(now: int, ttl_ms: int | None) -> int | None:
    # Saturating: an entry written before ttls were bounded must still snapshot.
    return None if ttl_ms is None else min(now + ttl_ms, MAX_STAMP_MS)


def _parse_int(blob: bytes) -> int | None:
    # Strict ASCII decimal: int() would also take whitespace, "+", "_" and non-ASCII digits.
    if not 0 < len(blob) <= _MAX_INT_DIGITS:
        return None
    digits = blob[1:] if blob[:1] == b"-" else blob
    if not digits or not digits.isdigit():  # bytes.isdigit is ASCII-only
        return None
    n = int(blob)
    return n if _I64_MIN <= n <= _I64_MAX else None


# Session results in snapshots: a tagged, recursive encoding of the few shapes apply returns.
_R_NONE, _R_FALSE, _R_TRUE, _R_INT, _R_TUPLE, _R_LIST, _R_ERROR, _R_SEALED = range(8)


def _encode_result(out: bytearray, result) -> None:
    if result is None:
        out.append(_R_NONE)
    elif result is False:
        out.append(_R_FALSE)
    elif result is True:
        out.append(_R_TRUE)
    elif type(result) is int:
        out.append(_R_INT)
        put_svarint(out, result)
    elif type(result) in (tuple, list):
        out.append(_R_TUPLE if type(result) is tuple else _R_LIST)
        put_uvarint(out, len(result))
        for item in result:
            _encode_result(out, item)
    elif type(result) is ApplyError:
        out.append(_R_ERROR)
        put_blob(out, result.kind.encode())
        put_blob(out, result.reason.encode("utf-8", "backslashreplace"))
    elif type(result) is SealedResult:
        out.append(_R_SEALED)
        put_blob(out, result.key)
        put_blob(out, result.blob)
    else:
        raise TypeError(f"cannot snapshot result {result!r}")


def _decode_result(r: Reader, depth: int = 0):
    if depth > 4:
        raise CommandError("result nested too deeply")
    tag = r.u8()
    if tag == _R_NONE:
        return None
    if tag == _R_FALSE:
        return False
    if tag == _R_TRUE:
        return True
    if tag == _R_INT:
        return r.svarint()
    if tag in (_R_TUPLE, _R_LIST):
        n = r.uvarint()
        if n > len(r.data) - r.pos:
            raise CommandError("result list longer than the snapshot")
        items = [_decode_result(r, depth + 1) for _ in range(n)]
        return tuple(items) if tag == _R_TUPLE else items
    if tag == _R_ERROR:
        return ApplyError(r.str_(), r.str_())
    if tag == _R_SEALED:
        return SealedResult(r.bytes_(), r.bytes_())
    raise CommandError(f"unknown result tag {tag}")
