"""The longest hub stall (a 1 ms timer's lateness) during an invalidate of a small prefix and of
a 100k-key prefix, and during large mgets, on one in-process node (memory backend and storage,
the encryption codec) holding N keys (default a million).

    python examples/amplification_stalls.py [N]      # or: make bench-stalls

Wall-clock figures: on a loaded machine they include the time the process waits for a core.
A benchmark, not a test: it asserts nothing about speed."""
import gc
import os
import sys
import tempfile
import time

import gevent

from raftcache import pluginapi
from raftcache.cluster import free_port_block
from raftcache.core import api
from raftcache.node import Node, config
from raftcache.pluginapi.manager import make_manager
from raftcache.plugins.security.encryption import EncryptionCodec, Keyring

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000


class CodecPlugin:
    def __init__(self, codec):
        self.codec = codec

    @pluginapi.hookimpl
    def raftcache_value_codecs(self):
        yield self.codec


def call(node, **fields):
    r = node.handle_request(api.Request(header=api.RequestHeader(timeout_ms=60_000), **fields))
    assert r.error is None, (r.error, r.reason)
    return r


class Stalls:
    def __init__(self):
        self.worst = 0.0
        self.gc_worst = 0.0  # the longest garbage collection, a stall of its own
        self._gc_started = 0.0
        gc.callbacks.append(self._gc)
        self.g = gevent.spawn(self.run)

    def _gc(self, phase, _info):
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_worst = max(self.gc_worst, time.perf_counter() - self._gc_started)

    def run(self):
        while True:
            t = time.perf_counter()
            gevent.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t - 0.001)

    def measure(self, what, fn):
        gevent.sleep(0.05)
        self.worst = self.gc_worst = 0.0
        t = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t
        gevent.sleep(0.01)
        print(f"{what}: took {took * 1000:.0f} ms, longest hub stall {self.worst * 1000:.1f} ms "
              f"(longest garbage collection {self.gc_worst * 1000:.1f} ms)",
              flush=True)
        return out


def main():
    address = f"127.0.0.1:{free_port_block(1)}"
    cfg = config.parse({
        "node": {"id": 1, "address": address, "data_dir": tempfile.mkdtemp(prefix="amplification-stalls-"),
                 "request_timeout_ms": 60_000},
        "cluster": {"peers": {"1": address}},
        "raft": {"snapshot_entries": 1 << 40},
        "storage": {"plugin": "memory"},
    }, "measure.toml")
    codec = EncryptionCodec(Keyring(1, os.urandom(32), "measure"), lambda: {}, None)
    node = Node(cfg, pm=make_manager(extra=[CodecPlugin(codec)]))
    node.start()
    while node.replica.role[1].name != "LEADER":
        gevent.sleep(0.01)
    t = time.perf_counter()
    # 100k keys under "big/", 10 under "small/", the rest under "k/"
    names = ([b"big/%07d" % i for i in range(100_000)] + [b"small/%d" % i for i in range(10)]
             + [b"k/%07d" % i for i in range(N - 100_010)])
    for start in range(0, len(names), 1000):
        call(node, op="mset", items={k: b"v" for k in names[start:start + 1000]})
    print(f"loaded {len(node.replica.sm)} keys in {time.perf_counter() - t:.0f} s", flush=True)
    stalls = Stalls()
    r = stalls.measure("invalidate('small/') (10 keys)",
                       lambda: call(node, op="invalidate", key=b"small/"))
    print("  removed", r.number)
    r = stalls.measure("invalidate('big/') (100k keys)",
                       lambda: call(node, op="invalidate", key=b"big/"))
    print("  removed", r.number)
    big = [b"mb/%d" % i for i in range(7)]
    for k in big:
        call(node, op="put", key=k, value=os.urandom(1 << 20))
    r = stalls.measure("mget of 7 x 1 MiB encrypted values",
                       lambda: call(node, op="mget", keys=big))
    r = stalls.measure("mget of one 1 MiB value x 1000 (refused)",
                       lambda: node.handle_request(api.Request(
                           header=api.RequestHeader(), op="mget", keys=[big[0]] * 1000)))
    print("  ", r.error, r.reason)
    many = names[-1000:]
    stalls.measure("mget of 1000 small keys", lambda: call(node, op="mget", keys=many))
    node.stop()


def cpu_pieces():
    """The same invalidates on a bare state machine, in CPU time (other processes' load does not
    count): the longest piece of work between two pauses."""
    from raftcache.core.cache.commands import Envelope, Invalidate, MSet, encode_envelope
    from raftcache.core.cache.statemachine import StateMachine
    from raftcache.plugins.backend.memory import MemoryBackend

    pieces, last = [], [0.0]

    def pause():
        t = time.process_time()
        pieces.append(t - last[0])
        last[0] = t

    sm = StateMachine(MemoryBackend(), pause=pause)
    names = [b"big/%07d" % i for i in range(100_000)] + [b"k/%07d" % i for i in range(N - 100_000)]
    i = 0
    for s in range(0, len(names), 1000):
        i += 1
        items = tuple((n, b"v") for n in names[s:s + 1000])
        sm.apply(i, encode_envelope(Envelope(MSet(items), stamp_ms=1)))
    for prefix in (b"big/0000000", b"big/"):
        pieces.clear()
        last[0] = start = time.process_time()
        i += 1
        n = sm.stage(i, encode_envelope(Envelope(Invalidate(prefix), stamp_ms=1)))
        sm.flush()
        pause()
        print(f"state machine, invalidate({prefix.decode()!r}) of {n} keys: "
              f"{(time.process_time() - start) * 1000:.0f} ms of CPU, the longest piece between "
              f"pauses {max(pieces) * 1000:.1f} ms ({len(pieces)} pieces)", flush=True)


main()
cpu_pieces()
