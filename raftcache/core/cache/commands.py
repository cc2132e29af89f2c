"""The commands a client write becomes, and their binary encoding in the Raft log.

A write is proposed as an `Envelope`: the command plus who sent it (client id and sequence for
exactly-once, the verified identity for access checks) and the leader's clock when it was
proposed (`stamp_ms`, the only notion of time the state machine ever sees).

The codec is compact, versioned and deterministic: the same envelope always encodes to the same
bytes, and ``decode_envelope(encode_envelope(env)) == env``. It sits in the write hot path and in
the WAL, so it is hand-rolled varints rather than pickle (unsafe) or JSON (slow, no bytes).
Both directions raise only `CommandError`.

Each command class describes itself (`command`): its tag, its fields and how each is encoded,
what it writes (`Writes`, which rbac decides from), whether its result comes from the
stored value, and what that result reveals of the stored state (`reveals`: rbac asks for `r`). Encoding, decoding, the state machine's apply and access control are lookups
on those declarations, so a new command is one class here and one apply method there.

Layout (version 1)::

    envelope := 0x01 flags:u8 stamp_ms:uvarint [client_id:str] [seq:svarint] [identity:str]
                [caller] command
    flags    := bit 0 client_id present, bit 1 seq present, bit 2 identity present,
                bit 3 caller present (needs bit 2: the identity is the caller's subject),
                bit 4 the caller's token id present (needs bit 3)
    caller   := key_id:str issued_ms:uvarint not_before_ms:uvarint expires_ms:uvarint
                n:uvarint (prefix:bytes perms:str){n} m:uvarint role:str{m} [jti:str]
    command  := tag:u8 fields (each command class's `tag` and `fields`)
    bytes    := len:uvarint data        str := bytes, UTF-8
    ttl      := uvarint, 0 = no expiry
    svarint  := zigzag-encoded signed 64-bit integer, as uvarint

Pure: no I/O, no clock, no randomness (it runs inside the deterministic simulator).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
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

_F_CLIENT = 1
_F_SEQ = 2
_F_IDENTITY = 4
_F_CALLER = 8
_F_JTI = 16  # entries written before token ids were recorded lack it (their callers': "")
_MAX_NAMES = 4096  # items of one Configure or Reseal, grants and roles of one caller


class CommandError(ValueError):
    """A command or envelope that cannot be encoded, or bytes that are not a valid envelope."""


# ================================================================================================
# Primitives: varints, lengths, and the cursor that reads them
# ================================================================================================
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



def _count(r: Reader, what: str, limit: int | None = _MAX_NAMES) -> int:
    count = r.uvarint()
    room = len(r.data) - r.pos  # each takes at least a byte
    if count > (room if limit is None else min(limit, room)):
        raise CommandError(f"{count} {what} announced, too many")
    return count


def _optional_bytes(r: Reader) -> bytes | None:
    present = r.u8()
    if present not in (0, 1):
        raise CommandError("bad value marker")
    return r.bytes_() if present else None



# ================================================================================================
# Declarations: what a command class says of itself
# ================================================================================================
@attrs.frozen
class Scalar:
    """How one field is written (checked: CommandError when it is not valid) and read back."""

    write: Callable[[bytearray, object, str], None]  # (out, value, what the errors call it)
    get: Callable[[Reader], object]  # reads it back
    sample: object  # a valid value (`sample_command`)
    # A client's value, as the value codecs sealed it: left out of fingerprints, because a
    # codec may seal the same write differently on each attempt.
    is_value: bool = False

    def put(self, out: bytearray, value, what: str, values: bool) -> None:
        if values or not self.is_value:
            self.write(out, value, what)


def _put_ttl(out: bytearray, ttl, _what: str) -> None:
    _ttl(out, ttl)


def _put_optional_bytes(out: bytearray, b, what: str) -> None:
    if b is None:
        out.append(0)
    else:
        out.append(1)
        _bytes(out, b, what)


BLOB = Scalar(_bytes, Reader.bytes_, b"k")
VALUE = Scalar(_bytes, Reader.bytes_, b"v", is_value=True)
AMOUNT = Scalar(_bytes, Reader.bytes_, b"1", is_value=True)  # a decimal, sealed like a value
TEXT = Scalar(_str, Reader.str_, "name")
OPTIONAL_BLOB = Scalar(_put_optional_bytes, _optional_bytes, b"x")
SIGNED = Scalar(_sint, Reader.svarint, 1)
UNSIGNED = Scalar(_uint, Reader.uvarint, 1)
TTL = Scalar(_put_ttl, Reader.ttl, 60_000)


@attrs.frozen
class Field:
    name: str  # the attribute, or the part of an item
    codec: Scalar | Items
    what: str = ""  # what errors call it; the name when empty

    @property
    def label(self) -> str:
        return self.what or self.name


@attrs.frozen
class Items:
    """A tuple of items, each a tuple of `parts`: count:uvarint then each item's parts."""

    parts: tuple[Field, ...]
    limit: int | None = _MAX_NAMES  # None: only the entry's size bounds it (MSet)

    @property
    def sample(self) -> tuple:
        return (tuple(part.codec.sample for part in self.parts),)

    def put(self, out: bytearray, items, what: str, values: bool) -> None:
        shape = "(" + ", ".join(part.label for part in self.parts) + ")"
        items = _items(items, what, shape, self.limit)
        put_uvarint(out, len(items))
        for item in items:
            for part, value in zip(self.parts, item, strict=True):
                part.codec.put(out, value, part.label, values)

    def get(self, r: Reader) -> tuple:
        return tuple(tuple(part.codec.get(r) for part in self.parts)
                     for _ in range(_count(r, "items", self.limit)))


class Writes(enum.Enum):
    """What a command writes, as access control (rbac) reads it. `written()` names the keys or
    prefixes of the first two."""

    KEYS = "keys"  # exactly the keys `written()` names
    PREFIXES = "prefixes"  # every key starting with a prefix `written()` names
    SETTINGS = "settings"  # the replicated cluster settings (StateMachine.settings)
    SEALING = "sealing"  # how stored values are sealed, not what they are, of any key
    EXPIRED = "expired"  # only keys every reader already sees as gone (the leader's sweep)


# tag -> command class: what `decode_command` reads; filled by @command, in tag order below.
COMMAND_TYPES: dict[int, type] = {}
# tag -> (class, each field's reader): the same, looked up once (decoding runs on every apply)
_DECODERS: dict[int, tuple[type, tuple]] = {}
_DECLARED = ("name", "tag", "fields", "writes", "returns_value", "reveals")


def command(cls: type) -> type:
    """Register a command class. It must declare, in its own body: `name` (its operation's, in
    `raftcache.core.operations`, for the ones clients send), `tag` (its byte in the log: never
    reused, never changed), `fields` (one `Field` per attribute, in attribute order: its
    encoding), `writes` (a `Writes`; with KEYS or PREFIXES, a `written()` method too) and
    `returns_value` (whether its result comes from the value stored under its key, which the
    state machine then reads before applying it) and `reveals` (what its result tells of what
    was stored before it, "" for nothing: rbac then asks for `r` besides `w`). A class that leaves any out is refused here,
    at import, rather than be encoded, applied or authorized by guesswork."""
    missing = [a for a in _DECLARED if a not in vars(cls)]
    if missing:
        raise TypeError(f"command {cls.__name__} does not declare {', '.join(missing)}")
    if cls.writes in (Writes.KEYS, Writes.PREFIXES) and "written" not in vars(cls):
        raise TypeError(f"command {cls.__name__} writes {cls.writes.value} but has no written()")
    attributes = [a.name for a in attrs.fields(cls)]
    if [f.name for f in cls.fields] != attributes:
        raise TypeError(f"command {cls.__name__}: fields {[f.name for f in cls.fields]} do not "
                        f"encode its attributes {attributes}")
    taken = COMMAND_TYPES.get(cls.tag)
    if taken is not None or not 0 < cls.tag < 256:
        raise TypeError(f"command {cls.__name__}: tag {cls.tag} is "
                        + (f"{taken.__name__}'s" if taken else "not a byte above 0"))
    if any(other.name == cls.name for other in COMMAND_TYPES.values()):
        raise TypeError(f"command {cls.__name__}: another command is named {cls.name!r}")
    COMMAND_TYPES[cls.tag] = cls
    _DECODERS[cls.tag] = (cls, tuple(f.codec.get for f in cls.fields))
    return cls


def sample_command(cls: type):
    """A valid instance of command class `cls`, built from its field declarations alone: what
    the fuzzer seeds with and the tests that walk every command start from."""
    return cls(*(f.codec.sample for f in cls.fields))


def _the_key(self) -> tuple[bytes, ...]:
    return (self.key,)


# ================================================================================================
# Commands
# ================================================================================================
@command
@attrs.frozen(slots=True)
class Put:
    """Store `value` under `key`; with `ttl_ms`, it expires at the entry's stamp + ttl_ms."""

    name: ClassVar[str] = "put"
    tag: ClassVar[int] = 1
    fields: ClassVar = (Field("key", BLOB), Field("value", VALUE), Field("ttl_ms", TTL))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = ""  # the new version: the entry's index, nothing that was stored
    written = _the_key
    key: bytes
    value: bytes
    ttl_ms: int | None = None


@command
@attrs.frozen(slots=True)
class Remove:
    """Delete `key`."""

    name: ClassVar[str] = "remove"
    tag: ClassVar[int] = 2
    fields: ClassVar = (Field("key", BLOB),)
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = "whether the key existed"
    written = _the_key
    key: bytes


@command
@attrs.frozen(slots=True)
class Cas:
    """Set `key` only if its current version is `expected_version` (0: only if it is missing)."""

    name: ClassVar[str] = "cas"
    tag: ClassVar[int] = 3
    fields: ClassVar = (Field("key", BLOB), Field("expected_version", SIGNED),
                        Field("value", VALUE), Field("ttl_ms", TTL))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = False  # a version, from the catalog
    reveals: ClassVar[str] = "whether the key exists, and its version"
    written = _the_key
    key: bytes
    expected_version: int
    value: bytes
    ttl_ms: int | None = None


@command
@attrs.frozen(slots=True)
class Incr:
    """Add `delta` to the ASCII-decimal integer under `key` (a missing key counts as 0)."""

    name: ClassVar[str] = "incr"
    tag: ClassVar[int] = 4
    fields: ClassVar = (Field("key", BLOB), Field("delta", SIGNED))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = True  # the new integer
    reveals: ClassVar[str] = "the value"
    written = _the_key
    key: bytes
    delta: int = 1


@command
@attrs.frozen(slots=True)
class SealedIncr:
    """An `Incr` whose amount is sealed like a value, so that the log does not hold it in
    plaintext: `delta` is the ASCII-decimal amount as the value codecs encoded it (as written
    without codecs); the state machine decodes it when the entry applies. What nodes propose
    for ``incr``; `Incr` entries still apply."""

    name: ClassVar[str] = "sealed_incr"
    tag: ClassVar[int] = 11
    fields: ClassVar = (Field("key", BLOB), Field("delta", AMOUNT, "value"))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = True  # the new integer
    reveals: ClassVar[str] = "the value"
    written = _the_key
    key: bytes
    delta: bytes


@command
@attrs.frozen(slots=True)
class Invalidate:
    """Delete every key starting with `prefix` (b"": every key)."""

    name: ClassVar[str] = "invalidate"
    tag: ClassVar[int] = 5
    fields: ClassVar = (Field("prefix", BLOB),)
    writes: ClassVar = Writes.PREFIXES
    returns_value: ClassVar[bool] = False  # a count
    reveals: ClassVar[str] = "how many live keys start with the prefix"
    prefix: bytes = b""

    def written(self) -> tuple[bytes, ...]:
        return (self.prefix,)


@command
@attrs.frozen(slots=True)
class MSet:
    """Several puts in one entry; `items` is a tuple of (key, value) pairs, applied in order."""

    name: ClassVar[str] = "mset"
    tag: ClassVar[int] = 6
    fields: ClassVar = (Field("items", Items((Field("key", BLOB), Field("value", VALUE)),
                                             limit=None), "MSet items"),
                        Field("ttl_ms", TTL))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = ""  # the new versions: the entry's index
    items: tuple[tuple[bytes, bytes], ...]
    ttl_ms: int | None = None

    def written(self) -> tuple[bytes, ...]:
        return tuple(key for key, _ in self.items)


@command
@attrs.frozen(slots=True)
class Sweep:
    """The leader's expiry reclaim: drop keys whose expiry is <= `up_to_stamp_ms`."""

    name: ClassVar[str] = "sweep"
    tag: ClassVar[int] = 7
    fields: ClassVar = (Field("up_to_stamp_ms", UNSIGNED),)
    writes: ClassVar = Writes.EXPIRED
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = ""  # the leader's own entry: no client sees its result
    up_to_stamp_ms: int


@command
@attrs.frozen(slots=True)
class Append:
    """Append `value` to the value under `key` (a missing key counts as empty); the key keeps
    its ttl. `value` is encoded by the value codecs like a Put's: the state machine decodes
    both parts and encodes the result."""

    name: ClassVar[str] = "append"
    tag: ClassVar[int] = 8
    fields: ClassVar = (Field("key", BLOB), Field("value", VALUE))
    writes: ClassVar = Writes.KEYS
    returns_value: ClassVar[bool] = True  # the new length
    reveals: ClassVar[str] = "the value's length"
    written = _the_key
    key: bytes
    value: bytes


@command
@attrs.frozen(slots=True)
class Configure:
    """Change cluster settings (`StateMachine.settings`): each (name, value) pair sets `name`,
    a value of None removes it. Security plugins keep their replicated state there (revoked
    subjects, roles, wrapped data keys); the state machine records each setting's entry stamp
    and index beside its value."""

    name: ClassVar[str] = "configure"
    tag: ClassVar[int] = 9
    # The setting values are part of the fingerprint: no value codec seals them.
    fields: ClassVar = (Field("items", Items((Field("name", TEXT, "setting name"),
                                              Field("value", OPTIONAL_BLOB, "setting value"))),
                              "Configure items"),)
    writes: ClassVar = Writes.SETTINGS
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = ""  # the entry's index
    items: tuple[tuple[str, bytes | None], ...]


@command
@attrs.frozen(slots=True)
class Reseal:
    """Replace stored values without changing them for the client: each (key, version, blob)
    stores `blob` under `key` if the key is live at `version`, keeping its version, expiry and
    place in write order. What a re-encryption sweep commits after a key rotation: `blob` is
    the same value sealed with the new data key."""

    name: ClassVar[str] = "reseal"
    tag: ClassVar[int] = 10
    fields: ClassVar = (Field("items", Items((Field("key", BLOB), Field("version", UNSIGNED),
                                              Field("blob", VALUE, "value"))),
                              "Reseal items"),)
    writes: ClassVar = Writes.SEALING
    returns_value: ClassVar[bool] = False
    reveals: ClassVar[str] = "which of its keys are live at their version (a count)"
    items: tuple[tuple[bytes, int, bytes], ...]


Command = (Put | Remove | Cas | Incr | SealedIncr | Invalidate | MSet | Sweep | Append | Configure
           | Reseal)

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
    jti: str = ""  # the token's id ("" none): what a revocation of one token names


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
# Encoding and decoding: lookups on the declarations
# ================================================================================================
def encode_command(out: bytearray, cmd: Command, values: bool = True) -> None:
    """Append `cmd`'s encoding (tag and fields) to `out`; without its values when `values` is
    false (what `fingerprint` hashes)."""
    cls = type(cmd)
    if COMMAND_TYPES.get(getattr(cls, "tag", None)) is not cls:
        raise CommandError(f"not a command: {cmd!r}")
    out.append(cls.tag)
    for f in cls.fields:
        f.codec.put(out, getattr(cmd, f.name), f.label, values)


def decode_command(r: Reader) -> Command:
    tag = r.u8()
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise CommandError(f"unknown command tag {tag}")
    cls, readers = decoder
    return cls(*[read(r) for read in readers])


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
    if c.jti:
        _str(out, c.jti, "jti")



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
        if env.caller.jti:
            flags |= _F_JTI
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



def _decode_caller(r: Reader, subject: str, has_jti: int) -> Caller:
    key_id, issued, not_before, expires = r.str_(), r.uvarint(), r.uvarint(), r.uvarint()
    grants = []
    for _ in range(_count(r, "grants")):
        prefix, perms = r.bytes_(), r.str_()
        if perms not in PERMS:
            raise CommandError(f"unknown grant perms {perms!r}")
        grants.append((prefix, perms))
    roles = tuple(r.str_() for _ in range(_count(r, "roles")))
    jti = r.str_() if has_jti else ""
    if has_jti and not jti:
        raise CommandError("an empty jti is written by leaving it out")
    return Caller(subject, key_id, issued, not_before, expires, tuple(grants), roles, jti)



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
        if flags & ~(_F_CLIENT | _F_SEQ | _F_IDENTITY | _F_CALLER | _F_JTI) or (
                flags & _F_CALLER and not flags & _F_IDENTITY) or (
                flags & _F_JTI and not flags & _F_CALLER):
            raise CommandError(f"unknown envelope flags {flags:#x}")
        stamp = r.uvarint()
        client_id = r.str_() if flags & _F_CLIENT else None
        seq = r.svarint() if flags & _F_SEQ else None
        identity = r.str_() if flags & _F_IDENTITY else None
        caller = _decode_caller(r, identity, flags & _F_JTI) if flags & _F_CALLER else None
        command = decode_command(r)
        r.end()
    except CommandError:
        raise
    except Exception as exc:  # belt and braces: garbage must never escape as anything else
        raise CommandError(f"malformed command: {exc!r}") from None
    return Envelope(command, client_id, seq, identity, stamp, caller)
