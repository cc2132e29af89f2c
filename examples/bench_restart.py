"""Restart after a long history: N writes to K keys through a file-wal node, then restart it.

    python examples/bench_restart.py [--writes 1000000] [--keys 10000] [--concurrency 64]

A single-node cluster in this process (no network: the point is the log, snapshots and
recovery). Prints the write rate, the data dir's size against the bytes written, and the time
from a fresh `Node` to its first served read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
    import gevent

    from raftcache.cluster import free_port_block
    from raftcache.core import api
    from raftcache.node import Node, config

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writes", type=int, default=1_000_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="raftcache-restart-") as base:
        address = f"127.0.0.1:{free_port_block(1)}"
        cfg = config.parse({
            "node": {"id": 1, "address": address, "data_dir": os.path.join(base, "node1")},
            "cluster": {"peers": {"1": address}},
            "raft": {"snapshot_entries": 10_000, "snapshot_keep_entries": 1_000},
            "storage": {"plugin": "file-wal"},
        }, "bench")

        def start() -> Node:
            node = Node(cfg)
            node.start()
            while node.replica.raw.role.name != "LEADER":
                gevent.sleep(0.005)
            return node

        node = start()
        value = b"v" * 100
        counter = iter(range(args.writes))

        def writer():
            for i in counter:
                r = node.handle_request(api.Request(
                    op="put", key=b"key%d" % (i % args.keys), value=value,
                    header=api.RequestHeader()))
                assert r.error is None, r

        t0 = time.perf_counter()
        gevent.joinall([gevent.spawn(writer) for _ in range(args.concurrency)])
        elapsed = time.perf_counter() - t0
        node.stop()
        size = dir_size(os.path.join(base, "node1"))
        written = args.writes * (len(value) + 16)
        t1 = time.perf_counter()
        node = start()
        while True:  # as a client would: retry until the restarted node answers
            r = node.handle_request(api.Request(op="get", key=b"key0",
                                                 header=api.RequestHeader()))
            if r.error is None:
                break
            print(f"  (retrying: {r.error}: {r.reason})")
            gevent.sleep(0.001)
        ready = time.perf_counter() - t1
        assert r.result.found and r.result.value == value
        node.stop()
    print(f"{args.writes:,} writes to {args.keys:,} keys, {args.concurrency} concurrent, "
          f"fsync on: {args.writes / elapsed:,.0f} writes/s ({elapsed:.1f} s)")
    print(f"data dir after: {size / 2**20:.2f} MiB (values written: {written / 2**20:.0f} MiB)")
    print(f"restart to first served read: {ready * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    sys.exit(main())
