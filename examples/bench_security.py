"""What authentication and encryption at rest cost: the same load on the same cluster shape
with both off and with both on, as a ratio.

    python examples/bench_security.py [--reps 3] [--seconds 3] [--processes 2] [--clients 16]
                                      [--dir DIR]

Two 3-node clusters started with LocalCluster (file-wal with fsync, thrift, memory backend):
"off" (no tokens, values stored as written) and "on" (`[auth] required`, every request
carrying a signed token the node verifies, and every value sealed with AES-256-GCM before it
reaches the log). The load is examples/bench_backends.py's: `--processes` client processes with
`--clients` greenlets each in closed loops, sets then linearizable gets of 100-byte values on
1,000 keys. Repetitions alternate between the two clusters (off, on, off, on, ...) so that
drift in the machine's load falls on both; each figure is the median of `--reps`.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_backends as bb  # noqa: E402

VARIANTS = ("off", "on")


@contextlib.contextmanager
def cluster(variant: str, base: str):
    """A running cluster and its load target (with the admin token when auth is on)."""
    from raftcache.cluster import LocalCluster, free_port_block

    secure = variant == "on"
    c = LocalCluster(os.path.join(base, variant), port=free_port_block(3), storage="file-wal",
                     transport="thrift", backend="memory", auth=secure, encryption=secure)
    c.start()
    try:
        c.wait_for_leader()
        target = {"name": f"auth + encryption {variant}", "kind": "raftcache",
                  "address": ",".join(c.endpoints())}
        if secure:
            target["token"] = c.admin_token()
        yield target
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
    p.add_argument("--json", help="also write the medians as JSON to this file")
    args = p.parse_args()
    print(f"set and linearizable get of {len(bb.VALUE)}-byte values on {bb.KEYS} keys, 3 nodes "
          "(file-wal with fsync, thrift, memory backend): auth and encryption off vs on",
          flush=True)
    phases: dict = {v: {"sets": [], "gets": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="raftcache-bench-security-", dir=args.dir) as base:
        with contextlib.ExitStack() as stack:
            targets = {v: stack.enter_context(cluster(v, base)) for v in VARIANTS}
            for target in targets.values():  # every key written once, so that gets find them
                set_, _ = bb.connect(target, 1)
                for key in bb.key_names():
                    set_(key)
            for rep in range(args.reps):
                for v in VARIANTS:
                    phases[v]["sets"].append(bb.run_phase(targets[v], "set", args, rep))
                    phases[v]["gets"].append(bb.run_phase(targets[v], "get", args, rep))
                print(f"  repetition {rep + 1} of {args.reps}: done", flush=True)
    results = [bb.Result(targets[v]["name"], phases[v]["sets"], phases[v]["gets"])
               for v in VARIANTS]
    bb.print_table(results, args)
    off, on = results
    ratios = {op: on.median(op, "ops_per_s") / off.median(op, "ops_per_s")
              for op in ("sets", "gets")}
    print("\nthroughput with auth and encryption on, as a share of off: "
          + ", ".join(f"{op} {r:.2f}x (a cost of {(1 - r) * 100:.0f}%)"
                      for op, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r.name: {op: {"ops_per_s": r.median(op, "ops_per_s"),
                                     "p50_ms": r.median(op, "p50_ms"),
                                     "p99_ms": r.median(op, "p99_ms")}
                                for op in ("sets", "gets")} for r in results}
                      | {"ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
