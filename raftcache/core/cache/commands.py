"""The commands a client write becomes, and their binary encoding in the Raft log.

A write is proposed as an `Envelope`: the command plus who sent it (client id and sequence for
exactly-once, the verified identity for access checks) and the leader's clock when it was
proposed (`stamp_ms`, the only notion of time the state machine ever sees).

The codec is compact, versioned and deterministic: the same envelope always encodes to the same
bytes, and ``decode_envelope(encode_envelope(env)) == env``. It sits in the write hot path and in
the WAL, so it is hand-rolled varints rather than pickle (unsafe) or JSON (slow, no bytes).
Both directions raise only `CommandError`.

Layout (version 1)::

    envelope := 0x01 flags:u8 stamp_ms:uvarint [client_id:str] [seq:svarint] [identity:str]
                [caller] command
    flags    := bit 0 client_id present, bit 1 seq present, bit 2 identity present,
                bit 3 caller present (needs bit 2: the identity is the caller's subject)
    caller   := key_id:str issued_ms:uvarint not_before_ms:uvarint expires_ms:uvarint
                n:uvarint (prefix:bytes perms:str){n} m:uvarint role:str{m}
    command  := tag:u8 fields (see _TAG_* below)
    bytes    := len:uvarint data        str := bytes, UTF-8
    ttl      := uvarint, 0 = no expiry
    svarint  := zigzag-encoded signed 64-bit integer, as uvarint

Pure: no I/O, no clock, no randomness (it runs inside the deterministic simulator).
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import attrs

FORMAT_VERSION = 1

# Unsigned fields (stamps, ttls, versions) stay below 2**63. Expiries saturate there
# (statemachine._expiry), and nodes accept no ttl above MAX_TTL_MS from clients.
_UMAX = (1 << 63) - 1
MAX_STAMP_MS = _UMAX
MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000  # ten years
_SMIN = -(1 << 63)
_SMAX = (1 << 63) - 1


class CommandError(ValueError):
    """A command or envelope that cannot be encoded, or bytes that are not a valid envelope."""


# ================================================================================================
# Commands
# ================================================================================================
@attrs.frozen(slots=True)
class Set:
    """Store `value` under `key`; with `ttl_ms`, it expires at the entry's stamp + ttl_ms."""

    kind: ClassVar[str] = "set"
    key: bytes
    value: bytes
    ttl_ms: int | None = None


@attrs.frozen(slots=True)
class Delete:
    kind: ClassVar[str] = "delete"
    key: bytes


@attrs.frozen(slots=True)
class Cas:
    """Set `key` only if its current version is `expected_version` (0: only if it is missing)."""

    kind: ClassVar[str] = "cas"
    key: bytes
    expected_version: int
    value: bytes
    ttl_ms: int | None = None


@attrs.frozen(slots=True)
class Incr:
    """Add `delta` to the ASCII-decimal integer under `key` (a missing key counts as 0)."""

    kind: ClassVar[str] = "incr"
    key: bytes
    delta: int = 1


@attrs.frozen(slots=True)
class Invalidate:
    """Delete every key starting with `prefix` (b"": every key)."""

    kind: ClassVar[str] = "invalidate"
    prefix: bytes = b""


@attrs.frozen(slots=True)
class MSet:
    """Several sets in one entry; `items` is a tuple of (key, value) pairs, applied in order."""

    kind: ClassVar[str] = "mset"
    items: tuple[tuple[bytes, bytes], ...]
    ttl_ms: int | None = None


@attrs.frozen(slots=True)
class Append:
    """Append `value` to the value under `key` (a missing key counts as empty); the key keeps
    its ttl. `value` is encoded by the value codecs like a Set's: the state machine decodes
    both parts and encodes the result."""

    kind: ClassVar[str] = "append"
    key: bytes
    value: bytes


@attrs.frozen(slots=True)
class Sweep:
    """The leader's expiry reclaim: drop keys whose expiry is <= `up_to_stamp_ms`."""

    kind: ClassVar[str] = "sweep"
    up_to_stamp_ms: int


@attrs.frozen(slots=True)
class Configure:
    """Change cluster settings (`StateMachine.settings`): each (name, value) pair sets `name`,
    a value of None removes it. Security plugins keep their replicated state there (revoked
    subjects, roles, wrapped data keys); the state machine records each setting's entry stamp
    and index beside its value."""

    kind: ClassVar[str] = "configure"
    items: tuple[tuple[str, bytes | None], ...]


@attrs.frozen(slots=True)
class Reseal:
    """Replace stored values without changing them for the client: each (key, version, blob)
    stores `blob` under `key` if the key is live at `version`, keeping its version, expiry and
    place in write order. What a re-encryption sweep commits after a key rotation: `blob` is
    the same value sealed with the new data key."""

    kind: ClassVar[str] = "reseal"
    items: tuple[tuple[bytes, int, bytes], ...]


Command = Set | Delete | Cas | Incr | Invalidate | MSet | Sweep | Append | Configure | Reseal

PERMS = ("r", "w", "rw", "admin")


@attrs.frozen(slots=True)
class Caller:
    """Who sent a write, as the node that took it verified (a signed token): recorded in the
    entry so that every replica's access check sees the same caller. Times are ms since the
    epoch (0: unset); `grants` are (key prefix, one of PERMS) pairs, `roles` role names
    resolved against the replicated settings when the entry applies."""

    subject: str
    key_id: str = ""
    issued_ms: int = 0
    not_before_ms: int = 0
    expires_ms: int = 0
    grants: tuple[tuple[bytes, str], ...] = ()
    roles: tuple[str, ...] = ()


@attrs.frozen(slots=True)
class Envelope:
    """A command as it travels through the log.

    `stamp_ms` is the leader's clock at proposal time and never goes backwards; `client_id` and
    `seq` (both or neither) make the write exactly-once; `identity` is the caller's verified
    identity, recorded so every replica's access check sees the same caller, and `caller` what
    was verified of it (its subject is `identity`).
    """

    command: Command
    client_id: str | None = None
    seq: int | None = None
    identity: str | None = None
    stamp_ms: int = 0
    caller: Caller | None = None


# ================================================================================================
# Encoding
# ================================================================================================
_TAG_SET = 1
_TAG_DELETE = 2
_TAG_CAS = 3
_TAG_INCR = 4
_TAG_INVALIDATE = 5
_TAG_MSET = 6
_TAG_SWEEP = 7
_TAG_APPEND = 8
_TAG_CONFIGURE = 9
_TAG_RESEAL = 10

_F_CLIENT = 1
_F_SEQ = 2
_F_IDENTITY = 4
_F_CALLER = 8
_MAX_NAMES = 4096  # settings in one Configure, grants and roles of one caller


def put_uvarint(out: bytearray, n: int) -> None:
    """Append `n` (>= 0) as LEB128; the one varint writer of the log and snapshot formats."""
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _uint(out: bytearray, n, what: str) -> None:
    if type(n) is not int or not 0 <= n <= _UMAX:  # bool is not a valid field value
        raise CommandError(f"{what} must be an integer in [0, 2**63), got {n!r}")
    put_uvarint(out, n)


def put_svarint(out: bytearray, n: int) -> None:
    """Append a signed 64-bit `n`, zigzag-encoded."""
    put_uvarint(out, (n << 1) ^ (n >> 63))


def put_blob(out: bytearray, b: bytes) -> None:
    """Append `b` with its length in front."""
    put_uvarint(out, len(b))
    out += b


def _sint(out: bytearray, n, what: str) -> None:
    if type(n) is not int or not _SMIN <= n <= _SMAX:
        raise CommandError(f"{what} must be a signed 64-bit integer, got {n!r}")
    put_svarint(out, n)


def _bytes(out: bytearray, b, what: str) -> None:
    if type(b) is not bytes:
        raise CommandError(f"{what} must be bytes, got {type(b).__name__}")
    put_blob(out, b)


def _str(out: bytearray, s, what: str) -> None:
    if type(s) is not str:
        raise CommandError(f"{what} must be a str, got {type(s).__name__}")
    try:
        _bytes(out, s.encode("utf-8"), what)
    except UnicodeEncodeError as exc:  # lone surrogates
        raise CommandError(f"{what} is not encodable as UTF-8: {exc}") from None


def _ttl(out: bytearray, ttl) -> None:
    if ttl is None:
        out.append(0)
    elif type(ttl) is int and 0 < ttl <= _UMAX:
        put_uvarint(out, ttl)
    else:
        raise CommandError(f"ttl_ms must be None or a positive integer, got {ttl!r}")


def encode_command(out: bytearray, cmd: Command, values: bool = True) -> None:
    """Append `cmd`'s encoding (tag and fields) to `out`; without its values when `values` is
    false (what `fingerprint` hashes)."""
    t = type(cmd)
    if t is Set:
        out.append(_TAG_SET)
        _bytes(out, cmd.key, "key")
        if values:
            _bytes(out, cmd.value, "value")
        _ttl(out, cmd.ttl_ms)
    elif t is Delete:
        out.append(_TAG_DELETE)
        _bytes(out, cmd.key, "key")
    elif t is Cas:
        out.append(_TAG_CAS)
        _bytes(out, cmd.key, "key")
        _sint(out, cmd.expected_version, "expected_version")
        if values:
            _bytes(out, cmd.value, "value")
        _ttl(out, cmd.ttl_ms)
    elif t is Incr:
        out.append(_TAG_INCR)
        _bytes(out, cmd.key, "key")
        _sint(out, cmd.delta, "delta")
    elif t is Invalidate:
        out.append(_TAG_INVALIDATE)
        _bytes(out, cmd.prefix, "prefix")
    elif t is MSet:
        out.append(_TAG_MSET)
        items = _items(cmd.items, "MSet items", "(key, value)")
        put_uvarint(out, len(items))
        for item in items:
            _bytes(out, item[0], "key")
            if values:
                _bytes(out, item[1], "value")
        _ttl(out, cmd.ttl_ms)
    elif t is Append:
        out.append(_TAG_APPEND)
        _bytes(out, cmd.key, "key")
        if values:
            _bytes(out, cmd.value, "value")
    elif t is Sweep:
        out.append(_TAG_SWEEP)
        _uint(out, cmd.up_to_stamp_ms, "up_to_stamp_ms")
    elif t is Configure:
        out.append(_TAG_CONFIGURE)
        items = _items(cmd.items, "Configure items", "(name, value)", _MAX_NAMES)
        put_uvarint(out, len(items))
        for item in items:
            _str(out, item[0], "setting name")
            if item[1] is None:
                out.append(0)
            else:
                out.append(1)
                _bytes(out, item[1], "setting value")
    elif t is Reseal:
        out.append(_TAG_RESEAL)
        items = _items(cmd.items, "Reseal items", "(key, version, blob)", _MAX_NAMES)
        put_uvarint(out, len(items))
        for item in items:
            _bytes(out, item[0], "key")
            _uint(out, item[1], "version")
            if values:
                _bytes(out, item[2], "value")
    else:
        raise CommandError(f"not a command: {cmd!r}")


def _items(items, what: str, shape: str, limit: int | None = None) -> tuple:
    """`items` checked: a tuple (of at most `limit`) of tuples shaped like `shape`."""
    if type(items) is not tuple or (limit is not None and len(items) > limit):
        raise CommandError(f"{what} must be a tuple of {shape}"
                           + (f", at most {limit}" if limit else "") + f", got {items!r}")
    arity = shape.count(",") + 1
    for item in items:
        if type(item) is not tuple or len(item) != arity:
            raise CommandError(f"{what} must be {shape} tuples, got {item!r}")
    return items


def _tuple(items, what: str) -> tuple:
    if type(items) is not tuple or len(items) > _MAX_NAMES:
        raise CommandError(f"{what} must be a tuple of at most {_MAX_NAMES}, got {items!r}")
    return items


def _caller(out: bytearray, c: Caller) -> None:
    _str(out, c.key_id, "key_id")
    _uint(out, c.issued_ms, "issued_ms")
    _uint(out, c.not_before_ms, "not_before_ms")
    _uint(out, c.expires_ms, "expires_ms")
    grants = _tuple(c.grants, "grants")
    put_uvarint(out, len(grants))
    for grant in grants:
        if type(grant) is not tuple or len(grant) != 2 or grant[1] not in PERMS:
            raise CommandError(f"a grant must be (prefix, one of {PERMS}), got {grant!r}")
        _bytes(out, grant[0], "grant prefix")
        _str(out, grant[1], "grant perms")
    roles = _tuple(c.roles, "roles")
    put_uvarint(out, len(roles))
    for role in roles:
        _str(out, role, "role")


def fingerprint(cmd: Command) -> bytes:
    """What tells two writes under one (client id, sequence) apart: the command's kind, keys and
    arguments, but not its values, which a value codec may seal differently on each attempt
    of the same write. Deterministic, so every replica computes the same."""
    out = bytearray()
    encode_command(out, cmd, values=False)
    return hashlib.blake2b(out, digest_size=8).digest()


def encode_envelope(env: Envelope) -> bytes:
    """The log entry data for `env`. Raises CommandError if a field is out of range."""
    if type(env) is not Envelope:
        raise CommandError(f"not an Envelope: {env!r}")
    flags = 0
    if env.client_id is not None:
        flags |= _F_CLIENT
    if env.seq is not None:
        flags |= _F_SEQ
    if env.identity is not None:
        flags |= _F_IDENTITY
    if env.caller is not None:
        if type(env.caller) is not Caller or env.caller.subject != env.identity:
            raise CommandError("an envelope's caller must be a Caller whose subject is its "
                               "identity")
        flags |= _F_CALLER
    out = bytearray((FORMAT_VERSION, flags))
    _uint(out, env.stamp_ms, "stamp_ms")
    if env.client_id is not None:
        _str(out, env.client_id, "client_id")
    if env.seq is not None:
        _sint(out, env.seq, "seq")
    if env.identity is not None:
        _str(out, env.identity, "identity")
    if env.caller is not None:
        _caller(out, env.caller)
    encode_command(out, env.command)
    return bytes(out)


# ================================================================================================
# Decoding
# ================================================================================================
class Reader:
    """A cursor over encoded bytes. Every method raises CommandError on truncated or malformed
    input; shared with the state machine's snapshot format."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise CommandError("truncated: expected another byte")
        self.pos = pos + 1
        return self.data[pos]

    def _varint(self) -> int:
        """One LEB128 group sequence, canonical (no trailing zero group), at most 64 bits."""
        data, pos = self.data, self.pos
        n = shift = 0
        while True:
            if pos >= len(data):
                raise CommandError("truncated varint")
            b = data[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise CommandError("varint longer than 64 bits")
        # Reject overlong forms (a trailing zero group) so every value has exactly one encoding.
        if b == 0 and shift:
            raise CommandError("non-canonical varint")
        self.pos = pos
        return n

    def uvarint(self) -> int:
        pos = self.pos
        n = self._varint()
        if n > _UMAX:
            self.pos = pos
            raise CommandError("integer out of range")
        return n

    def svarint(self) -> int:
        pos = self.pos
        n = self._varint()
        if n >> 64:
            self.pos = pos
            raise CommandError("oversized varint")
        return (n >> 1) ^ -(n & 1)

    def bytes_(self) -> bytes:
        n = self.uvarint()
        pos = self.pos
        end = pos + n
        if end > len(self.data):
            raise CommandError(f"truncated: {n} bytes announced, {len(self.data) - pos} left")
        self.pos = end
        return self.data[pos:end]

    def str_(self) -> str:
        raw = self.bytes_()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("string is not valid UTF-8") from None

    def ttl(self) -> int | None:
        return self.uvarint() or None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise CommandError(f"{len(self.data) - self.pos} trailing bytes")


def decode_command(r: Reader) -> Command:
    tag = r.u8()
    if tag == _TAG_SET:
        return Set(r.bytes_(), r.bytes_(), r.ttl())
    if tag == _TAG_DELETE:
        return Delete(r.bytes_())
    if tag == _TAG_CAS:
        return Cas(r.bytes_(), r.svarint(), r.bytes_(), r.ttl())
    if tag == _TAG_INCR:
        return Incr(r.bytes_(), r.svarint())
    if tag == _TAG_INVALIDATE:
        return Invalidate(r.bytes_())
    if tag == _TAG_MSET:
        count = r.uvarint()
        if count > len(r.data) - r.pos:  # each pair takes at least two bytes
            raise CommandError(f"MSet announces {count} items, too many for its size")
        items = tuple((r.bytes_(), r.bytes_()) for _ in range(count))
        return MSet(items, r.ttl())
    if tag == _TAG_SWEEP:
        return Sweep(r.uvarint())
    if tag == _TAG_APPEND:
        return Append(r.bytes_(), r.bytes_())
    if tag == _TAG_CONFIGURE:
        items = tuple((r.str_(), _optional_bytes(r)) for _ in range(_count(r, "settings")))
        return Configure(items)
    if tag == _TAG_RESEAL:
        return Reseal(tuple((r.bytes_(), r.uvarint(), r.bytes_())
                            for _ in range(_count(r, "values"))))
    raise CommandError(f"unknown command tag {tag}")


def _count(r: Reader, what: str) -> int:
    count = r.uvarint()
    if count > min(_MAX_NAMES, len(r.data) - r.pos):  # each takes at least a byte
        raise CommandError(f"{count} {what} announced, too many")
    return count


def _optional_bytes(r: Reader) -> bytes | None:
    present = r.u8()
    if present not in (0, 1):
        raise CommandError("bad value marker")
    return r.bytes_() if present else None


def _decode_caller(r: Reader, subject: str) -> Caller:
    key_id, issued, not_before, expires = r.str_(), r.uvarint(), r.uvarint(), r.uvarint()
    grants = []
    for _ in range(_count(r, "grants")):
        prefix, perms = r.bytes_(), r.str_()
        if perms not in PERMS:
            raise CommandError(f"unknown grant perms {perms!r}")
        grants.append((prefix, perms))
    roles = tuple(r.str_() for _ in range(_count(r, "roles")))
    return Caller(subject, key_id, issued, not_before, expires, tuple(grants), roles)


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in a log entry's data. Raises CommandError (only) on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CommandError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CommandError("empty command")
    if data[0] != FORMAT_VERSION:
        raise CommandError(
            f"unknown command format version {data[0]} (this build reads {FORMAT_VERSION})"
        )
    r = Reader(data)
    r.pos = 1
    try:
        flags = r.u8()
        if flags & ~(_F_CLIENT | _F_SEQ | _F_IDENTITY | _F_CALLER) or (
                flags & _F_CALLER and not flags & _F_IDENTITY):
            raise CommandError(f"unknown envelope flags {flags:#x}")
        stamp = r.uvarint()
        client_id = r.str_() if flags & _F_CLIENT else None
        seq = r.svarint() if flags & _F_SEQ else None
        identity = r.str_() if flags & _F_IDENTITY else None
        caller = _decode_caller(r, identity) if flags & _F_CALLER else None
        command = decode_command(r)
        r.end()
    except CommandError:
        raise
    except Exception as exc:  # belt and braces: garbage must never escape as anything else
        raise CommandError(f"malformed command: {exc!r}") from None
    return Envelope(command, client_id, seq, identity, stamp, caller)
