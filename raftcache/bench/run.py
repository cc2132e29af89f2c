"""The driver of `raftcache bench`: the command's arguments, its targets, and the run.

Contract: `add_arguments` and `main` are the CLI's (`raftcache bench`); `run` runs scenarios on
targets and returns an `Outcome` per (scenario, step, target). Everything else lives in the
package: `scenarios` (what load), `targets` (where it goes, and the client processes),
`results` (the figures and --json), `report` (the tables, progress and --plot).

A *target* is what the load goes to: a raftcache cluster (started here, or running, with
`--endpoints`), and with `--compare` one redis-server with appendfsync always, one memcached and
a 3-node PySyncObj cluster, all on 127.0.0.1. A *scenario* is a list of *steps*; a step is one
load shape (client processes x greenlets, the share of gets, the read level) run for `seconds`,
`reps` times. Repetitions alternate between the targets (raftcache, redis, memcached, ...,
raftcache, redis, ...) so that drift in the machine's load falls on all of them alike.

The load comes from client processes (`worker`), each with greenlets in closed loops; they stay
up for the whole run, so a step costs its `seconds` plus about a second to line the clocks up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile

import attrs

from raftcache.bench.report import (
    PLOT_HINT,
    Display,
    plot,
    plotting_available,
    print_tables,
    rep_line,
)
from raftcache.bench.results import Outcome, merge_rep, security_cost, to_json
from raftcache.bench.scenarios import CONSISTENCY, DEFAULT_SCENARIOS, SCENARIOS, Options, Shape
from raftcache.bench.targets import PySyncObjCluster, Target, describe, key_names, route_prefixes


def run(targets: list[Target], scenarios: list[str], options: Options,
        display: Display | None = None) -> list[Outcome]:
    """Every scenario's steps on every target that runs them, repetitions alternating between
    the targets; an Outcome per (scenario, step, target)."""
    display = display or Display()
    outcomes: list[Outcome] = []
    for scenario in scenarios:
        for step in SCENARIOS[scenario].steps(options):
            for target in targets:
                mine = step.for_target(target.kind)
                if mine is None:
                    continue
                if any(o.scenario == scenario and o.target == target.name and o.step == mine
                       for o in outcomes):
                    continue  # e.g. redis runs "get" once for the three read levels
                outcomes.append(Outcome(scenario, mine, target.name, target.kind))
            current = [o for o in outcomes if o.scenario == scenario and not o.reps]
            for rep in range(options.reps):
                for o in current:
                    target = next(t for t in targets if t.name == o.target)
                    label = f"{scenario} {o.step.name} · {o.target} · {rep + 1}/{options.reps}"
                    update, finish = display.step(label, options.seconds)
                    results = target.run(o.step, seed=rep, on_progress=update)
                    o.reps.append(merge_rep(results, o.step, options.seconds))
                    finish(rep_line(o.reps[-1]))
    return outcomes


# -- the command -----------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """`raftcache bench`'s options (the CLI builds the parser)."""
    # argparse formats help with %: a scenario's "90%" must reach it as "90%%"
    names = ", ".join(f"{n} ({s.doc})" for n, s in SCENARIOS.items()).replace("%", "%%")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                   help=f"repeatable; default: {', '.join(DEFAULT_SCENARIOS)} (or custom "
                        f"with --read-ratio). Scenarios: {names}")
    p.add_argument("--compare", action="store_true",
                   help="the same load, in the same run, against one redis-server with "
                        "appendfsync always, one memcached and (with the bench extra) a 3-node "
                        "PySyncObj cluster; prints ratios raftcache / each")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--storage", default="file-wal", help="file-wal (default, fsync on), "
                                                         "redis-aof or memory")
    p.add_argument("--transport", default="thrift")
    p.add_argument("--backend", default="memory")
    p.add_argument("--config", help="a TOML file whose settings every node shares (as for up; "
                                    "a hybrid backend's routes also spread the keys)")
    p.add_argument("--auth", action="store_true", help="require signed tokens (clients carry "
                                                       "the admin token)")
    p.add_argument("--no-encryption", action="store_true", help="store values in plaintext")
    p.add_argument("--endpoints", help="measure a running cluster instead (host:port,...)")
    p.add_argument("--token", default=os.environ.get("RAFTCACHE_TOKEN"),
                   help="with --endpoints: a token (default: $RAFTCACHE_TOKEN)")
    p.add_argument("--processes", type=int, default=2,
                   help="client processes (default 2: one Python process is the bottleneck)")
    p.add_argument("--clients", type=int, default=None,
                   help="greenlets per client process (default: 50 in all, spread over the "
                        "processes; the latency scenario always runs one)")
    p.add_argument("--value-size", type=int, default=100, help="bytes (default 100)")
    p.add_argument("--keys", type=int, default=1000, help="the key space (default 1000)")
    p.add_argument("--read-ratio", type=float, default=None,
                   help="the custom scenario: 0 runs a set phase then a get phase; between 0 "
                        "and 1 each request is a get with this probability, else a set")
    p.add_argument("--consistency", default="linearizable", choices=CONSISTENCY,
                   help="the read level of the throughput, read-heavy and custom scenarios")
    p.add_argument("--seconds", type=float, default=3.0, help="per step and repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median and min-max)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="latency histograms and throughput over time (needs matplotlib: "
                        f"{PLOT_HINT})")
    p.add_argument("--dir", help="where data dirs go (default: a temporary dir)")


def _fail(message: str) -> int:
    print(f"raftcache: {message}", file=sys.stderr)
    return 2


def _options(args, key_prefixes: tuple) -> Options:
    return Options(seconds=args.seconds, reps=args.reps, processes=args.processes,
                   clients=args.clients, value_size=args.value_size, keys=args.keys,
                   read_ratio=args.read_ratio, consistency=args.consistency,
                   key_prefixes=key_prefixes)


def _check(args) -> str | None:
    if args.plot and not plotting_available():
        return f"--plot needs matplotlib, which is not installed: {PLOT_HINT}"
    for name in ("nodes", "backends", "security"):
        if args.endpoints and name in (args.scenario or ()):
            return (f"the {name} scenario starts clusters of its own; it cannot run with "
                    "--endpoints")
    if args.endpoints and "leader-kill" in (args.scenario or ()):
        return "the leader-kill scenario kills a node of a cluster the bench started; it " \
               "cannot run with --endpoints"
    if args.read_ratio is not None and not 0 <= args.read_ratio <= 1:
        return "--read-ratio is between 0 and 1"
    if min(args.processes, args.clients or 1, args.reps, args.keys, args.value_size) < 1:
        return "--processes, --clients, --reps, --keys and --value-size are at least 1"
    if args.seconds <= 0:
        return "--seconds is above 0"
    return None


def main(args) -> int:
    problem = _check(args)
    if problem:
        return _fail(problem)
    extra = {}
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:
            extra = {k: v for k, v in tomllib.load(f).items() if k not in ("node", "cluster")}
    options = _options(args, route_prefixes(extra))
    scenarios = args.scenario or (["custom"] if args.read_ratio is not None
                                  else list(DEFAULT_SCENARIOS))
    console = None
    if sys.stdout.isatty():
        from rich.console import Console

        console = Console()
    display = Display(console)
    meta: dict = {"scenarios": scenarios, "skipped": {}, "notes": []}
    try:
        return _main(args, options, extra, scenarios, display, console, meta)
    except Unreachable as exc:
        display.close()
        return _fail(f"cannot reach the cluster: {exc}")
    except (RuntimeError, TimeoutError) as exc:  # a server or node that would not start, ...
        display.close()
        return _fail(f"bench: {type(exc).__name__}: {exc}")


def _main(args, options: Options, extra: dict, scenarios: list, display: Display, console,
          meta: dict) -> int:
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(tempfile.TemporaryDirectory(prefix="raftcache-bench-",
                                                               dir=args.dir))
        targets = []
        try:
            targets.append(_raftcache_target(stack, args, options, base, extra, meta))
            if args.compare:
                targets += _compare_targets(stack, options, base, meta, display)
            for t in targets:
                stack.callback(t.close)
            display.note("targets: " + "; ".join(t.name for t in targets))
            outcomes = run(targets, scenarios, options, display)
            for t in targets:
                if t.pysyncobj is not None:
                    meta["notes"].append(
                        f"{t.name}: appendEntriesUseBatch=False, log in memory, no fsync; its "
                        f"nodes logged {t.pysyncobj.divergence_warnings()} 'state machine may "
                        "have diverged' warnings")
        finally:
            display.close()
    security = security_cost(outcomes)
    if security:
        meta["security_on_vs_off"] = security
        meta["notes"].append("auth and encryption on, throughput as a share of off: " + ", ".join(
            f"{op} {r:.2f}x" for op, r in security.items()))
    print_tables(outcomes, options, console)
    for name, why in meta["skipped"].items():
        print(f"{name}: skipped ({why})")
    for note in meta["notes"]:
        print(note)
    print(f"\n{os.cpu_count()} CPUs; {options.value_size}-byte values on {options.keys} keys; "
          f"{meta['raftcache']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(outcomes, options, meta), f, indent=1)
    if args.plot:
        plot(outcomes, args.plot)
        print(f"plot: {args.plot}")
    return 0


class Unreachable(Exception):
    """The cluster --endpoints names does not answer (or refuses the token)."""


def _probe(spec: dict) -> None:
    """One read, before any client process starts: an unreachable cluster or a refused token
    is a one-line error rather than minutes of timeouts."""
    from raftcache.client import Client

    try:
        with Client(spec["address"], token=spec.get("token"), timeout=5.0,
                    transport=spec["transport"]) as c:
            c.get(key_names(1)[0])
    except Exception as exc:
        raise Unreachable(f"{spec['address']}: {type(exc).__name__}: {exc}") from exc


def _raftcache_target(stack, args, options: Options, base: str, extra: dict,
                      meta: dict) -> Target:
    if args.endpoints:
        spec = {"name": "raftcache", "kind": "raftcache", "address": args.endpoints,
                "transport": args.transport}
        if args.token:
            spec["token"] = args.token
        meta["raftcache"] = f"raftcache at {args.endpoints} (running)"
        _probe(spec)
        return Target(spec, options)
    from raftcache.cluster import LocalCluster, dev_backend, free_port_block
    from raftcache.pluginapi.manager import PluginSet, make_manager

    # Reads at the `lease` level use the leader's lease only with raft.read_only = "lease"
    # (linearizable ones keep their ReadIndex round): the bench measures each level as such.
    extra = {**extra, "raft": {"read_only": "lease", **extra.get("raft", {})}}
    started: list = []  # the clusters, in order (each its own data dir)
    plugins = PluginSet(make_manager())

    def start_cluster(shape: Shape) -> Target:
        mine = dict(extra)
        if shape.backend != args.backend:  # a scenario's backend: not the one --config sets up
            mine.pop("backend", None)
        # no options of the user's (hybrid: routes): the provider's dev options
        mine["backend"] = dev_backend(shape.backend, plugins, mine.get("backend"))
        auth = args.auth if shape.secure is None else shape.secure
        encryption = (not args.no_encryption) if shape.secure is None else shape.secure
        cluster = LocalCluster(os.path.join(base, f"raftcache-{len(started)}"),
                               nodes=shape.nodes, port=free_port_block(shape.nodes),
                               storage=args.storage, transport=args.transport,
                               backend=shape.backend, extra=mine, auth=auth,
                               encryption=encryption)
        started.append(cluster)
        stack.callback(cluster.stop)
        cluster.start()
        cluster.wait_for_leader(timeout=30)
        spec = {"name": "raftcache", "kind": "raftcache",
                "address": ",".join(cluster.endpoints()), "transport": args.transport}
        if cluster.tls_files():
            spec["tls"] = cluster.tls_files()
        if auth:
            spec["token"] = cluster.admin_token()
        return Target(spec, attrs.evolve(options, key_prefixes=route_prefixes(mine)),
                      shape=shape, cluster=cluster, owns_cluster=True)

    both = args.auth == (not args.no_encryption)  # the run's own flags as one shape, if alike
    shape = Shape(args.nodes, args.backend, args.auth if both else None)
    target = start_cluster(shape)
    target.start_cluster, target.owns_cluster = start_cluster, False  # the stack stops it
    meta["raftcache"] = f"raftcache: {describe(target.cluster)}"
    return target


def _compare_targets(stack, options: Options, base: str, meta: dict,
                     display: Display) -> list[Target]:
    from raftcache.servers import MemcachedServer, RedisServer

    # RedisServer's defaults: appendonly yes, appendfsync always (a set is durable when
    # acknowledged, as a raftcache write is).
    redis = stack.enter_context(RedisServer(os.path.join(base, "redis")))
    memcached = stack.enter_context(MemcachedServer(os.path.join(base, "memcached")))
    targets = [Target({"name": "redis (AOF always)", "kind": "redis",
                       "address": redis.address}, options),
               Target({"name": "memcached", "kind": "memcached",
                       "address": memcached.address}, options)]
    if importlib.util.find_spec("pysyncobj") is None:
        meta["skipped"]["pysyncobj"] = ("not installed: pip install 'raftcache[bench]' adds "
                                        "it")
        display.note("pysyncobj: skipped (not installed: pip install 'raftcache[bench]')")
    else:
        t = Target({"name": "pysyncobj (3 nodes)", "kind": "pysyncobj", "address": ""}, options)
        t.pysyncobj = PySyncObjCluster(os.path.join(base, "pysyncobj"), 3)
        t.spec["address"] = t.pysyncobj.address
        targets.append(t)
    return targets
