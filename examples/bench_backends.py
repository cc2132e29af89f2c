"""Set and get throughput and latency per cache backend, beside Redis and Memcached direct.

    python examples/bench_backends.py [--reps 3] [--seconds 3] [--processes 2] [--clients 16]
                                      [--backend memory ...] [--dir DIR] [--json FILE]

Each backend (memory, redis, memcached, hybrid routed as the fault suite routes it) runs in a
3-node cluster started with LocalCluster: file-wal storage with fsync, thrift transport. The
same load then goes straight to one redis-server with appendfsync always (so a set is durable
when acknowledged, as a raftcache write is; redis-py) and to one memcached (pymemcache), both
started here. All on 127.0.0.1, one target at a time.

The load is `raftcache bench`'s (raftcache.bench): `--processes` client processes with
`--clients` greenlets each in closed loops, on 1,000 keys of 100-byte values written
beforehand (spread over the hybrid routes): `--seconds` s of sets, then as long of gets
(linearizable ones for raftcache). Each figure is the median of `--reps` repetitions, with the
spread; the ratios divide raftcache's figures by direct Redis' and direct Memcached's.
"""

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from raftcache.bench import run as bench  # noqa: E402
from raftcache.testing.jepsen import HYBRID  # noqa: E402

BACKENDS = ("memory", "redis", "memcached", "hybrid")


def bench_cluster(backend: str, options: bench.Options, base: str) -> list:
    from raftcache.cluster import LocalCluster, free_port_block

    extra = {"backend": HYBRID} if backend == "hybrid" else {}
    cluster = LocalCluster(os.path.join(base, backend), port=free_port_block(3),
                           storage="file-wal", transport="thrift", backend=backend, extra=extra)
    cluster.start()
    try:
        cluster.wait_for_leader()
        target = bench.Target({"name": f"raftcache {backend}", "kind": "raftcache",
                               "address": ",".join(cluster.endpoints())}, options)
        try:
            return bench.run([target], ["custom"], options)
        finally:
            target.close()
    finally:
        cluster.stop()


def bench_direct(kind: str, options: bench.Options, base: str) -> list:
    from raftcache.servers import MemcachedServer, RedisServer

    directory = os.path.join(base, f"direct-{kind}")
    # RedisServer's defaults: appendonly yes, appendfsync always.
    server = RedisServer(directory) if kind == "redis" else MemcachedServer(directory)
    with server:
        name = "redis direct (appendfsync always)" if kind == "redis" else "memcached direct"
        target = bench.Target({"name": name, "kind": kind, "address": server.address}, options)
        try:
            return bench.run([target], ["custom"], options)
        finally:
            target.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per phase and repetition")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--clients", type=int, default=16, help="greenlets per client process")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="benchmark only these raftcache backends (repeatable; default: all)")
    p.add_argument("--dir", default=None, help="where the data dirs go (default: $TMPDIR)")
    p.add_argument("--json", help="also write every figure as JSON to this file")
    args = p.parse_args()
    options = bench.Options(seconds=args.seconds, reps=args.reps, processes=args.processes,
                            clients=args.clients, read_ratio=0.0,
                            key_prefixes=bench.route_prefixes({"backend": HYBRID}))
    print(f"set and get of {options.value_size}-byte values on {options.keys} keys: raftcache "
          "(3 nodes, file-wal with fsync, thrift) per backend, and Redis and Memcached direct",
          flush=True)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="raftcache-bench-backends-", dir=args.dir) as base:
        for backend in args.backend or BACKENDS:
            outcomes += bench_cluster(backend, options, base)
        for kind in ("redis", "memcached"):
            outcomes += bench_direct(kind, options, base)
    bench.print_tables(outcomes, options)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.to_json(outcomes, options, {}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
