"""Fuzz targets for every parser that takes bytes a node did not write itself, and two engines.

    python -m raftcache.testing.fuzz --list
    python -m raftcache.testing.fuzz TARGET [--seconds 30] [--engine atheris|mutate] [--seed N]

Each target feeds one input to one parser and checks that it either accepts it or refuses it
with the error it documents (WireError, CommandError, SnapshotError, WALCorruption,
RedisAofError, ConfigError, ProtocolError): anything else, a hang or a crash is a finding.
Where an input is accepted, the target also checks what must hold of it (an envelope encodes
back to the same bytes, a state machine image survives another snapshot and restore).

The `atheris` engine (coverage-guided libFuzzer, used when the package is installed) instruments
raftcache as it imports it; the `mutate` engine, always available, flips, inserts, deletes and
splices bytes of each target's seeds with a seeded generator. Both stop after `--seconds` and
exit 1 on the first finding, printing the input (hex) that caused it.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
import traceback

TARGETS: dict = {}


def target(name: str, seeds):
    def register(fn):
        TARGETS[name] = (fn, seeds)
        return fn
    return register


# ---- seeds: valid inputs the mutations start from ------------------------------------------------
def _request_seeds():
    from raftcache import wire

    header = wire.RequestHeader(client_id="c" * 32, seq=3, timeout_ms=500)
    return [wire.encode(r) for r in (
        wire.Request(op="put", key=b"k", value=b"v", ttl_ms=1000, header=header),
        wire.Request(op="get", key=b"k", consistency="lease"),
        wire.Request(op="cas", key=b"k", expected_version=4, value=b"w", header=header),
        wire.Request(op="mget", keys=[b"a", b"b", b"c"]),
        wire.Request(op="mset", items={b"a": b"1", b"b": b"2"}, header=header),
        wire.Request(op="change_member", change="add-learner", node_id=4),
    )]


def _messages():
    from raftcache.core.raft.messages import ConfState, Entry, Message, MsgType, SnapshotMeta

    meta = SnapshotMeta(9, 2, ConfState(frozenset({1, 2, 3}), learners=frozenset({4})))
    return [
        Message(MsgType.APP, 1, 2, 3, log_term=2, index=5, commit=5,
                entries=(Entry(3, 6, data=b"x"), Entry(3, 7))),
        Message(MsgType.HEARTBEAT, 1, 2, 3, commit=4, context=b"2:7", tick=40),
        Message(MsgType.VOTE, 1, 3, 4, log_term=3, index=7),
        Message(MsgType.SNAP, 1, 2, 3, snapshot_meta=meta, offset=0, data=b"img", done=True),
        Message(MsgType.APP_RESP, 1, 2, 3, index=6, reject=True, reject_hint=4, log_term=2),
    ]


def _batch_seeds():
    from raftcache import wire

    return [wire.encode(wire.batch_to_wire(_messages(), 1)),
            wire.encode(wire.batch_to_wire(_messages()[:1], 1))]


def _thrift_seeds():
    from thriftpy2.thrift import TMessageType

    from raftcache import wire
    from raftcache.plugins.transport import thrift

    frames = [thrift._encode("put", TMessageType.CALL, 1, wire.RaftCacheService.put_args(
        b"k", b"v", 5, wire.RequestHeader(client_id="c", seq=1))),
        thrift._encode("mget", TMessageType.CALL, 2, wire.RaftCacheService.mget_args(
            [b"a", b"b"], "stale", None)),
        thrift._encode("raft", TMessageType.ONEWAY, 0, wire.RaftCacheService.raft_args(
            wire.batch_to_wire(_messages(), 1))),
        thrift._encode("peer_hello", TMessageType.CALL, 1, wire.RaftCacheService.peer_hello_args(
            wire.idl.PeerHello(1, 2, 1, b"n" * 32)))]
    return [f[4:] for f in frames]  # the message inside the frame


def _tcp_tls_seeds():
    from raftcache.plugins.transport import tcp_tls

    return [tcp_tls.pack_frame(tcp_tls.REQUEST, 7, s) for s in _request_seeds()[:3]] + [
        tcp_tls.pack_frame(tcp_tls.PEER, 0, s) for s in _batch_seeds()]


def _envelope_seeds():
    from raftcache.core.cache import commands as c

    return [c.encode_envelope(e) for e in (
        c.Envelope(c.Put(b"k", b"v", 100), "client", 4, None, 1000),
        c.Envelope(c.Cas(b"k", 3, b"w"), stamp_ms=7),
        c.Envelope(c.Incr(b"n", -5), "c", 9, "alice", 8),
        c.Envelope(c.MSet(((b"a", b"1"), (b"b", b""))), stamp_ms=9),
        c.Envelope(c.Invalidate(b"user:"), stamp_ms=10),
        c.Envelope(c.Sweep(11), stamp_ms=11),
        c.Envelope(c.Append(b"k", b"more"), "c", 10, None, 12),
    )] + [c.encode_envelope(c.Envelope(c.sample_command(cls), stamp_ms=13))  # every command
          for cls in c.COMMAND_TYPES.values()]


def _sm_snapshot_seeds():
    from raftcache.core.cache.statemachine import StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    sm = StateMachine(MemoryBackend())
    for i, data in enumerate(_envelope_seeds(), start=1):
        sm.apply(i, data)
    return [sm.snapshot(), StateMachine(MemoryBackend()).snapshot()]


def _wal_snapshot_seeds():
    from raftcache.core.raft.messages import ConfState, Snapshot, SnapshotMeta
    from raftcache.plugins.storage import file_wal

    meta = SnapshotMeta(9, 2, ConfState(frozenset({1, 2, 3}), learners=frozenset({4})))
    return [file_wal._encode_snapshot(Snapshot(meta, _sm_snapshot_seeds()[0]))]


def _wal_segment_seeds():
    from raftcache.core.raft.messages import Entry, HardState
    from raftcache.plugins.storage.file_wal import FileWALStorage

    with tempfile.TemporaryDirectory() as d:
        store = FileWALStorage(1, d, {"fsync": False})
        store.load()
        store.save(HardState(2, 1, 3), [Entry(1, i, data=b"e%d" % i) for i in range(1, 6)],
                   None, True)
        store.save(HardState(2, 1, 5), [Entry(2, 5, data=b"r")], None, True)
        (seg,) = store.segment_paths()
        with open(seg, "rb") as f:
            blob = f.read()
        store.close()
    return [blob]


def _config_seeds():
    return [b'[node]\nid = 1\naddress = "127.0.0.1:7400"\n[cluster]\n'
            b'peers = { 1 = "127.0.0.1:7400", 2 = "127.0.0.1:7401" }\nsecret_file = "s"\n'
            b'[raft]\ntick_ms = 10\nelection_tick = 6\n[transport]\nplugin = "thrift"\n'
            b'[transport.options]\nmax_frame = 1048576\n',
            b'[node]\nid = 2\naddress = "h:1"\n[cluster]\npeers = { 2 = "h:1" }\n']


def _aof_seeds():
    from raftcache.core.raft.messages import ConfState, Entry, HardState, SnapshotMeta
    from raftcache.plugins.storage import redis_aof

    return [redis_aof.encode_entry(Entry(3, 9, data=b"x")),
            redis_aof.encode_hard_state(HardState(3, 2, 9)),
            redis_aof.encode_meta(SnapshotMeta(9, 3, ConfState(frozenset({1, 2}))))]


# ---- targets ---------------------------------------------------------------------------------------
@target("client-request", _request_seeds)
def client_request(data: bytes) -> None:
    from raftcache import wire

    try:
        wire.decode(wire.Request, data, max_items=16384)
    except wire.WireError:
        pass


@target("raft-batch", _batch_seeds)
def raft_batch(data: bytes) -> None:
    from raftcache import wire
    from raftcache.core.raft.validate import peer_message_problem

    try:
        messages = wire.batch_from_wire(wire.decode(wire.RaftBatch, data))
    except wire.WireError:
        return
    for m in messages:
        peer_message_problem(m, 1, frozenset({1, 2, 3}))


@target("thrift-call", _thrift_seeds)
def thrift_call(data: bytes) -> None:
    from thriftpy2.thrift import TProcessor

    from raftcache import wire
    from raftcache.plugins.transport import thrift

    try:
        name, _seqid, pos = thrift._header(data)
        iprot = thrift._input(data, 16384, pos)
    except wire.WireError:
        return
    try:  # what the server does next; it turns any exception here into a closed connection
        TProcessor(wire.RaftCacheService, object()).process_in(iprot)
    except Exception:
        pass


class _Feed:
    """A socket that hands out `data` a few bytes at a time, then EOF."""

    def __init__(self, data: bytes, step: int):
        self.data, self.pos, self.step = data, 0, step

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + min(n, self.step)]
        self.pos += len(chunk)
        return chunk


@target("tcp-tls-frames", _tcp_tls_seeds)
def tcp_tls_frames(data: bytes) -> None:
    from raftcache import wire
    from raftcache.plugins.transport import tcp_tls
    from raftcache.plugins.transport.framing import Oversized, ProtocolError

    reader = tcp_tls._FrameReader(_Feed(data, 1 + len(data) % 7), 1 << 16)
    try:
        while (frame := reader.read(limit=lambda kind: 4096)) is not None:
            kind, _rid, payload = frame
            cls = wire.Request if kind == tcp_tls.REQUEST else wire.RaftBatch
            try:
                wire.decode(cls, payload, 16384)
            except wire.WireError:
                pass
    except (ProtocolError, Oversized):
        pass


@target("envelope", _envelope_seeds)
def envelope(data: bytes) -> None:
    from raftcache.core.cache import commands
    from raftcache.core.cache.statemachine import StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    try:
        env = commands.decode_envelope(data)
    except commands.CommandError:
        return
    assert commands.encode_envelope(env) == data, "an envelope encodes back differently"
    sm = StateMachine(MemoryBackend())
    sm.apply(1, data)
    _restores_unchanged(sm)


@target("state-machine-snapshot", _sm_snapshot_seeds)
def state_machine_snapshot(data: bytes) -> None:
    from raftcache.core.cache.statemachine import SnapshotError, StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    sm = StateMachine(MemoryBackend())
    try:
        sm.restore(data)
    except SnapshotError:
        return
    _restores_unchanged(sm)


def _restores_unchanged(sm) -> None:
    from raftcache.core.cache.statemachine import StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    image = sm.snapshot()
    again = StateMachine(MemoryBackend())
    again.restore(image)
    assert again.snapshot() == image, "a state machine image changed across restore"


@target("wal-snapshot-file", _wal_snapshot_seeds)
def wal_snapshot_file(data: bytes) -> None:
    from raftcache.plugins.storage import file_wal

    try:
        file_wal._decode_snapshot(data, "snapshot")
    except file_wal.WALCorruption:
        pass


_WAL_DIR = None


@target("wal-segment", _wal_segment_seeds)
def wal_segment(data: bytes) -> None:
    from raftcache.plugins.storage.file_wal import FileWALStorage, WALCorruption

    global _WAL_DIR
    if _WAL_DIR is None:
        _WAL_DIR = tempfile.mkdtemp(prefix="raftcache-fuzz-")
    wal = os.path.join(_WAL_DIR, "wal")
    for name in os.listdir(wal) if os.path.isdir(wal) else ():
        os.unlink(os.path.join(wal, name))
    os.makedirs(wal, exist_ok=True)
    with open(os.path.join(wal, "00000000000000000001.seg"), "wb") as f:
        f.write(data)
    for repair in (False, True):
        store = FileWALStorage(1, _WAL_DIR, {"fsync": False, "repair": repair})
        try:
            store.load()
        except WALCorruption:
            pass
        finally:
            store.close()


@target("config", _config_seeds)
def config_file(data: bytes) -> None:
    import tomllib

    from raftcache.node import config

    try:
        parsed = tomllib.loads(data.decode("utf-8", "replace"))
    except tomllib.TOMLDecodeError:
        return
    try:
        config.parse(parsed, "fuzz.toml")
    except config.ConfigError:
        pass


@target("redis-aof-records", _aof_seeds)
def redis_aof_records(data: bytes) -> None:
    from raftcache.plugins.storage import redis_aof

    for decode in (redis_aof.decode_entry, redis_aof.decode_hard_state, redis_aof.decode_meta):
        try:
            decode(data)
        except redis_aof.RedisAofError:
            pass


# ---- engines ---------------------------------------------------------------------------------------
def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four random edits: flip bits, set interesting bytes, insert, delete, duplicate a
    range, splice with another seed, or truncate."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:
            del b[i:i + rng.randint(1, 8)]
        elif op == 4 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 32)]
        elif op == 5:
            other = rng.choice(pool)
            b = b[:i] + other[rng.randrange(len(other) + 1):]
        elif op == 6:
            del b[i:]
        else:  # a 4-byte length or count somewhere: the classic
            b[i:i + 4] = rng.choice((b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                     b"\x00\x01\x00\x00"))
    return bytes(b)


def run_mutate(name: str, seconds: float, seed: int) -> int:
    fn, seeds = TARGETS[name]
    pool = seeds()
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < deadline:
        data = mutate(rng, rng.choice(pool), pool)
        if not _one(fn, data):
            return 1
        runs += 1
        if runs % 64 == 0 and len(pool) < 256:
            pool.append(data)  # inputs that passed become seeds too
    print(f"fuzz {name}: {runs} inputs in {seconds:g}s, no finding (mutate engine, seed {seed})")
    return 0


def _one(fn, data: bytes) -> bool:
    try:
        fn(data)
        return True
    except Exception:
        print(f"FINDING in {fn.__name__}: input {data.hex()}", file=sys.stderr)
        traceback.print_exc()
        return False


def run_atheris(name: str, seconds: float, seed: int) -> int:
    import atheris

    with atheris.instrument_imports(include=["raftcache"]):
        fn, seeds = TARGETS[name]
        pool = seeds()
    corpus = tempfile.mkdtemp(prefix=f"raftcache-fuzz-{name}-")
    for i, data in enumerate(pool):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(data)
    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", f"-seed={seed}",
                   "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1", corpus], fn)
    atheris.Fuzz()  # exits the process: 0 when time ran out, non-zero on a finding
    return 0


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftcache.testing.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--engine", choices=("atheris", "mutate", "auto"), default="auto")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    logging.disable(logging.CRITICAL)  # findings are exceptions; refusals are expected
    if args.list or not args.target:
        print("\n".join(TARGETS))
        return 0
    if args.target not in TARGETS:
        p.error(f"unknown target {args.target!r} (known: {', '.join(TARGETS)})")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if atheris_available() else "mutate"
    if engine == "atheris":
        return run_atheris(args.target, args.seconds, args.seed)
    return run_mutate(args.target, args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
