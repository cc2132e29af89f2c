"""The command codec: round trips, a pinned wire format, and garbage rejected as CommandError."""

from __future__ import annotations

import random

import pytest

from raftcache.core.cache.commands import (
    COMMAND_TYPES,
    FORMAT_VERSION,
    Append,
    Caller,
    Cas,
    CommandError,
    Configure,
    Envelope,
    Incr,
    Invalidate,
    MSet,
    Put,
    Remove,
    Reseal,
    SealedIncr,
    Sweep,
    decode_envelope,
    encode_command,
    encode_envelope,
    fingerprint,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is optional
    st = None

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U63_MAX = (1 << 63) - 1

COMMANDS = [
    Put(b"k", b"v"),
    Put(b"", b"", 1),
    Put(b"key\x00\xff", b"\x00" * 300, U63_MAX),
    Remove(b"gone"),
    Cas(b"k", 0, b"v"),
    Cas(b"k", 12345, b"v", 60_000),
    Cas(b"k", -1, b"v"),
    Cas(b"k", I64_MAX, b"", None),
    Incr(b"n"),
    Incr(b"n", -5),
    Incr(b"n", I64_MIN),
    Incr(b"n", I64_MAX),
    SealedIncr(b"n", b"-5"),
    SealedIncr(b"n", b"\xe2sealed"),
    Invalidate(),
    Invalidate(b"user:"),
    MSet(()),
    MSet(((b"a", b"1"), (b"b", b"2"), (b"a", b"3")), 10),
    Sweep(0),
    Sweep(1_700_000_000_000),
    Configure(()),
    Configure((("auth.revoked.alice", b""), ("keys.2", b"\x00wrapped"), ("gone", None))),
    Reseal(()),
    Reseal(((b"k", 7, b"sealed"), (b"", 0, b""))),
    Append(b"k", b"tail"),
    Append(b"", b""),
]

ALICE = Caller("alice", "k1", 1_000, 2_000, 3_000, ((b"user:", "rw"), (b"", "r")), ("ops",))

ENVELOPE_SHAPES = [
    {},
    {"client_id": "c-1", "seq": 7},
    {"client_id": "c-1", "seq": 0, "identity": "alice"},
    {"identity": "spiffe://ünïcode/ñ"},
    {"client_id": "", "seq": -3, "identity": "", "stamp_ms": U63_MAX},
    {"seq": I64_MIN},
    {"client_id": "only-client"},
    {"client_id": "c", "seq": 1, "identity": "alice", "caller": ALICE},
    {"identity": "bob", "caller": Caller("bob")},
]


@pytest.mark.parametrize("command", COMMANDS, ids=repr)
@pytest.mark.parametrize("shape", range(len(ENVELOPE_SHAPES)))
def test_every_command_round_trips_in_every_envelope_shape(command, shape):
    env = Envelope(command, **{"stamp_ms": 1_000, **ENVELOPE_SHAPES[shape]})
    data = encode_envelope(env)
    assert isinstance(data, bytes)
    assert decode_envelope(data) == env
    assert encode_envelope(decode_envelope(data)) == data  # canonical
    assert decode_envelope(bytearray(data)) == env
    assert decode_envelope(memoryview(data)) == env


def test_encoding_is_pinned():
    # The WAL and snapshots hold these bytes: changing the format needs a new version number.
    env = Envelope(Put(b"k", b"v", 1000), client_id="c", seq=2, identity="id", stamp_ms=300)
    assert encode_envelope(env) == bytes.fromhex("0107ac02016304026964") + b"\x01\x01k\x01v\xe8\x07"
    assert encode_envelope(Envelope(Incr(b"n", -1))) == b"\x01\x00\x00\x04\x01n\x01"
    assert encode_envelope(Envelope(Sweep(5), stamp_ms=5))[0] == FORMAT_VERSION


# Every command's bytes and fingerprint, as the log, snapshots (session fingerprints) and the
# WAL of a running cluster hold them: a change here is a new format version, not a refactor.
PINNED = [
    (Put(b"k", b"v"), "01016b017600", "82fa43ce44677dad"),
    (Put(b"", b"", 1), "01000001", "13063bdf5dfc7d5f"),
    (Remove(b"gone"), "0204676f6e65", "2493ecc242543ff2"),
    (Cas(b"k", 12345, b"v", 60_000), "03016bf2c0010176e0d403", "af0a702e85b416a7"),
    (Cas(b"k", -1, b"v"), "03016b01017600", "1964b366968d6f47"),
    (Incr(b"n", -5), "04016e09", "2886967b99edbfae"),
    (Incr(b"n", I64_MIN), "04016effffffffffffffffff01", "1d716879bda5ff34"),
    (Invalidate(), "0500", "74e443d6149ef073"),
    (Invalidate(b"user:"), "0505757365723a", "5ac9db4c6d81367c"),
    (MSet(((b"a", b"1"), (b"b", b"2"), (b"a", b"3")), 10), "06030161013101620132016101330a",
     "ccbb400f1815cdc9"),
    (Sweep(1_700_000_000_000), "0780d095ffbc31", "69d916a40f455f97"),
    (Configure((("a", b""), ("b", b"\x00w"), ("c", None))), "090301610100016201020077016300",
     "9d57a41d381912e7"),
    (Reseal(((b"k", 7, b"sealed"), (b"", 0, b""))), "0a02016b07067365616c6564000000", "e9f72465824628c9"),
    (Append(b"k", b"tail"), "08016b047461696c", "572a28fc116e5656"),
]


@pytest.mark.parametrize("command, encoding, fp", PINNED, ids=lambda x: repr(x)[:40])
def test_every_command_encoding_and_fingerprint_is_pinned(command, encoding, fp):
    out = bytearray()
    encode_command(out, command)
    assert out.hex() == encoding
    assert fingerprint(command).hex() == fp
    assert decode_envelope(bytes.fromhex("010000" + encoding)).command == command


def test_encoding_is_compact():
    env = Envelope(Put(b"user:42", b"x" * 10, 60_000), "client-1", 17, None, 1_700_000_000_000)
    assert len(encode_envelope(env)) < 45


def test_commands_are_immutable_and_hashable():
    cmd = Put(b"k", b"v")
    with pytest.raises(AttributeError):
        cmd.key = b"other"
    assert hash(Envelope(cmd)) == hash(Envelope(Put(b"k", b"v")))
    # the round trips above cover every registered command
    assert {type(c) for c in COMMANDS} == set(COMMAND_TYPES.values())
    assert {c.name for c in COMMANDS} == {
        "put", "remove", "cas", "incr", "invalidate", "mset", "sweep", "configure", "reseal",
        "append", "sealed_incr",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Garbage in: CommandError, and only CommandError
# ------------------------------------------------------------------------------------------------
GOOD = encode_envelope(
    Envelope(MSet(((b"a", b"1"), (b"bb", b"22")), 5), "cli", 9, "who", 123_456_789)
)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",  # unknown format version
        b"\x02" + GOOD[1:],  # future format version
        b"\x01",  # no flags
        b"\x01\x00",  # no stamp
        b"\x01\x00\x00",  # no command
        b"\x01\x00\x00\x63",  # unknown command tag
        b"\x01\x08\x00\x02\x00",  # unknown flag bit
        b"\x01\x00\x80\x00\x02\x00",  # overlong varint (0 in two bytes)
        b"\x01\x00" + b"\xff" * 10 + b"\x01" + b"\x02\x00",  # varint beyond 64 bits
        b"\x01\x00" + b"\xff" * 9 + b"\x00" + b"\x02\x00",  # stamp >= 2**63
        b"\x01\x01\x00\x02\xc3\x28\x02\x00",  # client id is not UTF-8
        b"\x01\x00\x00\x02\x05ab",  # key longer than the data
        b"\x01\x00\x00\x06\xff\xff\xff\xff\x0f",  # MSet announcing 4 billion items
        b"\x01\x00\x00\x02\x00\x00",  # trailing byte
        GOOD + b"\x00",
        b"not a command at all",
        bytes(range(256)),
    ],
)
def test_garbage_is_rejected_with_command_error(data):
    with pytest.raises(CommandError):
        decode_envelope(data)


@pytest.mark.parametrize("cut", range(len(GOOD)))
def test_every_truncation_is_rejected(cut):
    with pytest.raises(CommandError):
        decode_envelope(GOOD[:cut])


@pytest.mark.parametrize("data", [None, "text", 42, [1, 2]])
def test_non_bytes_input_is_rejected(data):
    with pytest.raises(CommandError):
        decode_envelope(data)


def test_command_error_is_a_value_error():
    assert issubclass(CommandError, ValueError)


def test_random_bytes_never_escape_as_anything_but_command_error():
    rng = random.Random(1234)
    for _ in range(20_000):
        if rng.random() < 0.5:  # mutate a valid encoding: the interesting near misses
            data = bytearray(GOOD)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:
            data = bytes([1]) + rng.randbytes(rng.randint(0, 30))
        try:
            env = decode_envelope(data)
        except CommandError:
            continue
        assert encode_envelope(env) == data  # whatever decodes is canonical


@pytest.mark.parametrize(
    "env",
    [
        Envelope(Put("text key", b"v")),
        Envelope(Put(b"k", "text value")),
        Envelope(Put(b"k", bytearray(b"v"))),
        Envelope(Put(b"k", b"v", 0)),  # a ttl of 0 would be born expired
        Envelope(Put(b"k", b"v", -1)),
        Envelope(Put(b"k", b"v", 1 << 63)),
        Envelope(Put(b"k", b"v", 1.5)),
        Envelope(Cas(b"k", 1 << 63, b"v")),
        Envelope(Incr(b"k", I64_MIN - 1)),
        Envelope(Incr(b"k", True)),
        Envelope(MSet([(b"a", b"1")])),
        Envelope(MSet(((b"a",),))),
        Envelope(Sweep(-1)),
        Envelope(Put(b"k", b"v"), stamp_ms=-1),
        Envelope(Put(b"k", b"v"), stamp_ms=None),
        Envelope(Put(b"k", b"v"), seq=1 << 63),
        Envelope(Put(b"k", b"v"), client_id=b"bytes"),
        Envelope(Put(b"k", b"v"), identity="\ud800"),  # lone surrogate
        Envelope("not a command"),
        Put(b"k", b"v"),  # not wrapped
    ],
    ids=repr,
)
def test_encode_rejects_invalid_fields_with_command_error(env):
    with pytest.raises(CommandError):
        encode_envelope(env)


# ------------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------------
if st is not None:
    keys = st.binary(max_size=40)
    ttls = st.none() | st.integers(1, U63_MAX)
    i64 = st.integers(I64_MIN, I64_MAX)
    commands = st.one_of(
        st.builds(Put, keys, keys, ttls),
        st.builds(Remove, keys),
        st.builds(Cas, keys, i64, keys, ttls),
        st.builds(Incr, keys, i64),
        st.builds(Invalidate, keys),
        st.builds(MSet, st.lists(st.tuples(keys, keys), max_size=5).map(tuple), ttls),
        st.builds(Sweep, st.integers(0, U63_MAX)),
    )
    envelopes = st.builds(
        Envelope,
        commands,
        st.none() | st.text(max_size=12),
        st.none() | i64,
        st.none() | st.text(max_size=12),
        st.integers(0, U63_MAX),
    )

    @given(envelopes)
    @settings(max_examples=500)
    def test_property_round_trip(env):
        data = encode_envelope(env)
        assert decode_envelope(data) == env
        assert encode_envelope(decode_envelope(data)) == data

    @given(st.binary(max_size=64))
    @settings(max_examples=1000)
    def test_property_arbitrary_bytes_decode_canonically_or_raise_command_error(data):
        try:
            env = decode_envelope(data)
        except CommandError:
            return
        assert encode_envelope(env) == data


@pytest.mark.parametrize("bad", [
    Envelope(Put(b"k", b"v"), identity="alice", caller=Caller("bob")),  # subject != identity
    Envelope(Put(b"k", b"v"), caller=Caller("alice")),  # a caller needs its identity
    Envelope(Put(b"k", b"v"), identity="a", caller=Caller("a", grants=((b"", "rwx"),))),
    Envelope(Configure((("name", "not bytes"),))),
])
def test_callers_and_settings_refuse_bad_fields(bad):
    with pytest.raises(CommandError):
        encode_envelope(bad)


def test_a_caller_flag_without_an_identity_is_refused():
    data = bytearray(encode_envelope(Envelope(Put(b"k", b"v"), identity="a",
                                              caller=Caller("a"))))
    data[1] &= ~4  # drop the identity flag, keep the caller's
    with pytest.raises(CommandError):
        decode_envelope(bytes(data))


def test_one_name_per_operation_from_the_registry_to_the_command():
    from raftcache.core.api import Request
    from raftcache.core.operations import OPERATIONS

    request = dict(key=b"k", value=b"v", items={b"k": b"v"}, expected_version=0)
    writes = [op for op in OPERATIONS.values() if op.kind == "write"]
    sealed = {"incr": "sealed_incr"}  # its amount sealed like a value (docs/security.md)
    proposed = set()
    for op in writes:
        command = op.command(Request(op=op.name, **request), lambda _key, value: value, 10)
        assert command.name == sealed.get(op.name, op.name), (op.name, command)
        proposed.add(command.name)
    # the commands no client sends: the leader's sweep, admin settings, re-encryption, and
    # incr as nodes proposed it before its amount was sealed (such entries still apply)
    internal = {cls.name for cls in COMMAND_TYPES.values()} - proposed
    assert internal == {"sweep", "configure", "reseal", "incr"}
