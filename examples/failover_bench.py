"""Failover time: from kill -9 (or SIGSTOP) of the leader to the first successful write
through the client.

    python examples/failover_bench.py [--rounds 20] [--transport thrift] [--stop]

Each round starts a fresh 3-node cluster (the `memory` storage must not restart a node: it
would come back with an empty log), writes until it is warm, kills the leader with SIGKILL and
times how long the client takes to get a write acknowledged by the new leader. A killed
process's connections close at once, which the followers take as the leader's death; with
--stop the leader is frozen instead (SIGSTOP), its connections stay open, and the followers
wait out the election timeout. Prints the median, p90, p99 and max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from raftcache.cluster import LocalCluster, free_port_block


def one_round(i: int, transport: str, tick_ms: int, election_tick: int, base_dir: str,
              stop: bool = False) -> float:
    cluster = LocalCluster(os.path.join(base_dir, f"round{i}"), port=free_port_block(3),
                           transport=transport,
                           extra={"raft": {"tick_ms": tick_ms, "election_tick": election_tick}})
    cluster.start()
    try:
        leader = cluster.wait_for_leader()
        # A frozen leader never answers: give each node 50 ms before trying another.
        with cluster.client(timeout=10.0, attempt_timeout=0.05 if stop else None) as c:
            for n in range(50):
                c.set(f"warm{n}", "x")
            (cluster.pause if stop else cluster.kill)(leader)
            t0 = time.perf_counter()
            c.set("after-failover", str(i))
            elapsed = time.perf_counter() - t0
            assert c.get("after-failover") == str(i).encode()
        return elapsed
    finally:
        cluster.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--transport", default="thrift")
    p.add_argument("--tick-ms", type=int, default=10)
    p.add_argument("--election-tick", type=int, default=6)
    p.add_argument("--stop", action="store_true", help="SIGSTOP the leader instead of SIGKILL")
    args = p.parse_args()
    times = []
    with tempfile.TemporaryDirectory(prefix="raftcache-failover-") as base:
        for i in range(args.rounds):
            t = one_round(i, args.transport, args.tick_ms, args.election_tick, base, args.stop)
            times.append(t)
            print(f"round {i + 1:2}: {t * 1000:7.1f} ms", flush=True)
    times.sort()
    p90, p99 = (times[min(len(times) - 1, int(len(times) * q))] for q in (0.9, 0.99))
    print(f"\nfailover, {'SIGSTOP' if args.stop else 'kill -9'} of the leader -> first "
          f"acknowledged write ({args.transport}, tick {args.tick_ms} ms, election timeout "
          f"{args.election_tick}-{2 * args.election_tick} ticks)")
    print(f"{'rounds':>8} {'median':>10} {'p90':>10} {'p99':>10} {'max':>10}")
    print(f"{len(times):>8} {statistics.median(times) * 1000:>8.1f}ms {p90 * 1000:>8.1f}ms "
          f"{p99 * 1000:>8.1f}ms {times[-1] * 1000:>8.1f}ms")
    print("reference: 150 ms per election (a Rust raft-rs cache)")
    return 0


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    sys.exit(main())
