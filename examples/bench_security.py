"""What authentication and encryption at rest cost: the same load on the same cluster shape
with both off and with both on, as a ratio.

    python examples/bench_security.py [--reps 3] [--seconds 3] [--processes 2] [--clients 16]
                                      [--dir DIR] [--json FILE]

Two 3-node clusters started with LocalCluster (file-wal with fsync, thrift, memory backend):
"off" (no tokens, values stored as written) and "on" (`[auth] required`, every request
carrying a signed token the node verifies, and every value sealed with AES-256-GCM before it
reaches the log). The load is `raftcache bench`'s (raftcache.bench): `--processes` client
processes with `--clients` greenlets each in closed loops, sets then linearizable gets of
100-byte values on 1,000 keys. Repetitions alternate between the two clusters (off, on, off,
on, ...) so that drift in the machine's load falls on both; each figure is the median of
`--reps`, with the spread.
"""

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from raftcache.bench import run as bench  # noqa: E402

VARIANTS = ("off", "on")


@contextlib.contextmanager
def cluster(variant: str, base: str, options: bench.Options):
    """A running cluster as a load target (with the admin token when auth is on)."""
    from raftcache.cluster import LocalCluster, free_port_block

    secure = variant == "on"
    c = LocalCluster(os.path.join(base, variant), port=free_port_block(3), storage="file-wal",
                     transport="thrift", backend="memory", auth=secure, encryption=secure)
    c.start()
    try:
        c.wait_for_leader()
        spec = {"name": f"auth + encryption {variant}", "kind": "raftcache",
                "address": ",".join(c.endpoints())}
        if secure:
            spec["token"] = c.admin_token()
        target = bench.Target(spec, options)
        try:
            yield target
        finally:
            target.close()
    finally:
        c.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per phase and repetition")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--clients", type=int, default=16, help="greenlets per client process")
    p.add_argument("--dir", default=None, help="where the data dirs go (default: $TMPDIR)")
    p.add_argument("--json", help="also write every figure and the ratios as JSON to this file")
    args = p.parse_args()
    options = bench.Options(seconds=args.seconds, reps=args.reps, processes=args.processes,
                            clients=args.clients, read_ratio=0.0)
    print(f"set and linearizable get of {options.value_size}-byte values on {options.keys} "
          "keys, 3 nodes (file-wal with fsync, thrift, memory backend): auth and encryption off "
          "vs on", flush=True)
    with tempfile.TemporaryDirectory(prefix="raftcache-bench-security-", dir=args.dir) as base:
        with contextlib.ExitStack() as stack:
            targets = [stack.enter_context(cluster(v, base, options)) for v in VARIANTS]
            outcomes = bench.run(targets, ["custom"], options)
    bench.print_tables(outcomes, options)
    by = {(o.target.rsplit(" ", 1)[1], o.step.kind): o.summary()["ops_per_s"]["median"]
          for o in outcomes}
    ratios = {op: by[("on", op)] / by[("off", op)] for op in ("set", "get")}
    print("\nthroughput with auth and encryption on, as a share of off: "
          + ", ".join(f"{op} {r:.2f}x (a cost of {(1 - r) * 100:.0f}%)"
                      for op, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.to_json(outcomes, options, {"on_vs_off": ratios}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
