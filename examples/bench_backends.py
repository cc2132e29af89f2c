"""Set and get throughput and latency per cache backend, beside Redis and Memcached direct.

    python examples/bench_backends.py [--reps 3] [--seconds 3] [--processes 2] [--clients 16]
                                      [--backend memory ...] [--dir DIR]

Each backend (memory, redis, memcached, hybrid routed as the fault suite routes it) runs in a
3-node cluster started with LocalCluster: file-wal storage with fsync, thrift transport. The
same load then goes straight to one redis-server with appendfsync always (so a set is durable
when acknowledged, as a raftcache write is; redis-py) and to one memcached (pymemcache), both
started here. All on 127.0.0.1.

The load: `--processes` client processes (one Python process saturates before the servers
do) with `--clients` greenlets each, every greenlet in a closed loop (the next request once
the answer is in), on 1,000 keys of 100-byte values written beforehand: `--seconds` s of
sets, then as long of gets (linearizable ones for raftcache). Each figure is the median of
`--reps` repetitions; the ratios divide a target's throughput by direct Redis' and direct
Memcached's. Other processes' CPU use makes the figures noisy.
"""

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import attrs  # noqa: E402

from raftcache.testing.jepsen import HYBRID, KEY_ROUTES, percentiles  # noqa: E402

KEYS = 1000
VALUE = b"v" * 100
BACKENDS = ("memory", "redis", "memcached", "hybrid")
DIRECT = ("redis", "memcached")
START_DELAY = 3.0  # s: the workers import, connect and warm up before the clock starts


def key_names() -> list[str]:
    # Spread over the hybrid routes (memcached, redis, memory); the same keys for every target.
    prefixes = [prefix for prefix, _ in KEY_ROUTES["hybrid"]]
    return [f"{prefixes[i % len(prefixes)]}bench{i}" for i in range(KEYS)]


# -- the client side (a worker process) ---------------------------------------------------------------


def connect(target: dict, clients: int) -> tuple[Callable, Callable]:
    """(set(key), get(key)) for a target: {"kind": raftcache|redis|memcached, "address": ...,
    and for raftcache perhaps "token"}; safe to share between greenlets."""
    kind, address = target["kind"], target["address"]
    if kind == "raftcache":
        from raftcache.client import Client

        c = Client(address, token=target.get("token"), timeout=10.0, transport="thrift")
        return (lambda key: c.set(key, VALUE)), c.get
    host, port = address.rsplit(":", 1)
    if kind == "redis":
        import redis

        r = redis.Redis(connection_pool=redis.BlockingConnectionPool(
            host=host, port=int(port), max_connections=clients))
        return (lambda key: r.set(key, VALUE)), r.get
    from pymemcache.client.base import PooledClient

    m = PooledClient((host, int(port)), max_pool_size=clients, no_delay=True)
    return (lambda key: m.set(key, VALUE, noreply=False)), m.get


def worker(spec: dict) -> dict:
    """Run one phase in this process: `clients` greenlets, from `start_at` (wall clock) for
    `seconds`; the latencies in µs, and what went wrong."""
    import gevent

    set_, get = connect(spec["target"], spec["clients"])
    call = set_ if spec["op"] == "set" else get
    keys = key_names()
    latencies: list[int] = []
    problems = {"errors": 0, "misses": 0, "last_error": ""}

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        call(keys[seed % KEYS])  # a connection of its own, before the clock starts
        gevent.sleep(max(0.0, spec["start_at"] - time.time()))
        end = spec["start_at"] + spec["seconds"]
        while time.time() < end:
            key = rng.choice(keys)
            t0 = time.perf_counter()
            try:
                found = call(key)
            except Exception as exc:
                problems["errors"] += 1
                problems["last_error"] = repr(exc)
                continue
            latencies.append(round((time.perf_counter() - t0) * 1e6))
            if spec["op"] == "get" and found is None:
                problems["misses"] += 1

    late = time.time() > spec["start_at"]
    gevent.joinall([gevent.spawn(loop, spec["seed"] * 1000 + i) for i in range(spec["clients"])])
    return {"latencies_us": latencies, "late": late, **problems}


# -- the driver -----------------------------------------------------------------------------------------


@attrs.frozen
class Phase:
    """One phase of one repetition, all worker processes together."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    misses: int


def run_phase(target: dict, op: str, args, seed: int) -> Phase:
    spec = {"target": target, "op": op, "clients": args.clients, "seconds": args.seconds,
            "start_at": time.time() + START_DELAY}
    workers = [subprocess.Popen([sys.executable, __file__, "--worker",
                                 json.dumps(spec | {"seed": seed * 100 + p})],
                                stdout=subprocess.PIPE, text=True)
               for p in range(args.processes)]
    results = []
    for w in workers:
        out, _ = w.communicate(timeout=START_DELAY + args.seconds + 60)
        if w.returncode:
            raise RuntimeError(f"a worker for {target} {op} exited with {w.returncode}")
        results.append(json.loads(out))
    if any(r["late"] for r in results):
        print(f"  (a worker started late on {target['name']} {op}: raise START_DELAY)")
    for r in results:
        if r["errors"]:
            print(f"  ({target['name']} {op}: {r['errors']} errors, e.g. {r['last_error']})")
    latencies = [us / 1e6 for r in results for us in r["latencies_us"]]
    p = percentiles(latencies)
    return Phase(len(latencies) / args.seconds, p["p50"], p["p99"],
                 sum(r["errors"] for r in results), sum(r["misses"] for r in results))


@attrs.frozen
class Result:
    name: str
    sets: list  # Phase per repetition
    gets: list

    def median(self, phases: str, field: str) -> float:
        return statistics.median(getattr(p, field) for p in getattr(self, phases))


def measure(target: dict, args) -> Result:
    """Write every key once (so that gets find them), then the repetitions."""
    set_, _ = connect(target, 1)
    for key in key_names():
        set_(key)
    sets, gets = [], []
    for rep in range(args.reps):
        sets.append(run_phase(target, "set", args, rep))
        gets.append(run_phase(target, "get", args, rep))
    return Result(target["name"], sets, gets)


def bench_cluster(backend: str, args, base: str) -> Result:
    from raftcache.cluster import LocalCluster, free_port_block

    extra = {"backend": HYBRID} if backend == "hybrid" else {}
    cluster = LocalCluster(os.path.join(base, backend), port=free_port_block(3),
                           storage="file-wal", transport="thrift", backend=backend, extra=extra)
    cluster.start()
    try:
        cluster.wait_for_leader()
        target = {"name": f"raftcache {backend}", "kind": "raftcache",
                  "address": ",".join(cluster.endpoints())}
        return measure(target, args)
    finally:
        cluster.stop()


def bench_direct(kind: str, args, base: str) -> Result:
    from raftcache.servers import MemcachedServer, RedisServer

    directory = os.path.join(base, f"direct-{kind}")
    # RedisServer's defaults: appendonly yes, appendfsync always.
    server = RedisServer(directory) if kind == "redis" else MemcachedServer(directory)
    with server:
        name = "redis direct (appendfsync always)" if kind == "redis" else "memcached direct"
        return measure({"name": name, "kind": kind, "address": server.address}, args)


def print_table(results: list[Result], args) -> None:
    direct = {r.name.split()[0]: r for r in results if "direct" in r.name}
    print(f"\nmedians of {args.reps} repetitions of {args.seconds:g} s; {args.processes} client "
          f"processes x {args.clients} greenlets; {os.cpu_count()} CPUs\n")
    ratio_heads = "".join(f"{f'{op} / {d}':>17}" for d in direct for op in ("set", "get"))
    print(f"{'target':36}{'set/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'get/s':>9}{'p50 ms':>8}{'p99 ms':>8}{ratio_heads}")
    for r in results:
        cells = ""
        for phases in ("sets", "gets"):
            cells += (f"{r.median(phases, 'ops_per_s'):9,.0f}{r.median(phases, 'p50_ms'):8.2f}"
                      f"{r.median(phases, 'p99_ms'):8.2f}")
        for d in direct.values():
            for phases in ("sets", "gets"):
                ratio = r.median(phases, "ops_per_s") / d.median(phases, "ops_per_s")
                cells += f"{ratio:16.2f}x"
        print(f"{r.name:36}{cells}")
        misses = sum(p.misses for p in r.gets)
        errors = sum(p.errors for p in r.sets + r.gets)
        if misses or errors:
            print(f"{'':36}({misses} gets missed, {errors} errors)")


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
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(f"set and get of {len(VALUE)}-byte values on {KEYS} keys: raftcache (3 nodes, "
          f"file-wal with fsync, thrift) per backend, and Redis and Memcached direct", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="raftcache-bench-backends-", dir=args.dir) as base:
        for backend in args.backend or BACKENDS:
            results.append(bench_cluster(backend, args, base))
            print(f"  {results[-1].name}: done", flush=True)
        for kind in DIRECT:
            results.append(bench_direct(kind, args, base))
            print(f"  {results[-1].name}: done", flush=True)
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
