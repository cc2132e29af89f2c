"""The driver of `raftcache bench`: targets, scenarios, repetitions, the table, --json, --plot.

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
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import attrs

from raftcache.bench.stats import latency_summary, spread

KEY_SPACE_BYTES = 64 << 20  # keys x value size at most (at least 16 keys)
START_DELAY = 1.0  # s: every process of a step gets its command and warms up before the clock
CONSISTENCY = ("linearizable", "lease", "stale")
SCHEMA = "raftcache-bench/1"
PLOT_HINT = "pip install 'raftcache[plot]'"


# -- steps and scenarios ----------------------------------------------------------------------------


@attrs.frozen
class Step:
    """One load shape: `processes` x `clients` greenlets in closed loops; each request a get
    with probability `read_ratio` (0: sets only, 1: gets only) at `consistency`."""

    read_ratio: float
    consistency: str | None
    processes: int
    clients: int
    value_size: int | None = None  # bytes; None: the run's --value-size
    # The raftcache cluster it runs on (None: the run's): its size, its backend, and auth
    # with encryption at rest both on (True) or both off (False).
    nodes: int | None = None
    backend: str | None = None
    secure: bool | None = None
    fault: str | None = None  # "leader-kill": kill -9 of the leader halfway (raftcache only)
    # An open loop offering `load` times the rate the target's last closed-loop step of sets
    # reached (its peak), at most `clients` requests in flight per process; None: closed.
    load: float | None = None

    @property
    def kind(self) -> str:
        """The shape without the read level: what targets without levels run once."""
        if self.read_ratio <= 0:
            shape = "set"
        elif self.read_ratio >= 1:
            shape = "get"
        else:
            shape = f"mix {round(self.read_ratio * 100)}/{round((1 - self.read_ratio) * 100)}"
        if self.value_size is not None:
            shape = f"{shape} {_size(self.value_size)}"
        if self.nodes is not None:
            shape = f"{shape} {self.nodes} nodes"
        if self.backend is not None:
            shape = f"{shape} {self.backend} backend"
        if self.secure is not None:
            shape = f"{shape} auth+encryption {'on' if self.secure else 'off'}"
        if self.load is not None:
            shape = f"{shape} at {self.load:g}x peak"
        return shape if self.fault is None else f"{shape}, {self.fault}"

    @property
    def name(self) -> str:
        if self.read_ratio <= 0 or not self.consistency:
            return self.kind
        return f"{self.kind} {self.consistency}"

    @property
    def cluster(self) -> Shape:
        return Shape(self.nodes, self.backend, self.secure)

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(op for op, present in (("set", self.read_ratio < 1),
                                            ("get", self.read_ratio > 0)) if present)

    def for_target(self, kind: str) -> Step | None:
        """This step as `kind` runs it: Redis and Memcached have no read levels; the PySyncObj
        comparison has sets only (its reads are local dict lookups in the leader's process)."""
        if kind == "raftcache":
            return self
        if kind == "pysyncobj" and (self.read_ratio > 0 or self.load is not None):
            return None  # its runner has closed loops only
        if self.fault is not None:
            return None
        return attrs.evolve(self, consistency=None, nodes=None, backend=None, secure=None)


@attrs.frozen
class Shape:
    """A raftcache cluster: nodes, backend, and auth with encryption both on (True), both off
    (False) or as the run's flags say (None). A step's shape has None where it keeps the
    run's."""

    nodes: int | None = None
    backend: str | None = None
    secure: bool | None = None

    def over(self, base: Shape) -> Shape:
        """This shape, with `base`'s settings where it has none."""
        return Shape(*(mine if mine is not None else theirs
                       for mine, theirs in zip(attrs.astuple(self), attrs.astuple(base),
                                               strict=True)))


@attrs.frozen
class Scenario:
    name: str
    doc: str
    steps: Callable  # (options) -> [Step]


def _size(n: int) -> str:
    for unit, scale in (("MB", 1_000_000), ("KB", 1000)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _spread_clients(total: int, processes: int) -> int:
    return max(1, math.ceil(total / processes))


def _latency_steps(o) -> list[Step]:
    return [Step(0.0, None, 1, 1)] + [Step(1.0, level, 1, 1) for level in CONSISTENCY]


def _throughput_steps(o) -> list[Step]:
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(0.0, None, o.processes, clients),
            Step(1.0, o.consistency, o.processes, clients)]


def _read_heavy_steps(o) -> list[Step]:
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(0.9, o.consistency, o.processes, clients)]


VALUE_SIZES = (100, 10_000, 1_000_000)
CLUSTER_SIZES = (3, 5, 7)


def _nodes_steps(o) -> list[Step]:
    """Per cluster size: one sequential client's sets, then 50 greenlets' sets and gets."""
    clients = o.clients or _spread_clients(50, o.processes)
    steps = []
    for n in CLUSTER_SIZES:
        steps += [Step(0.0, None, 1, 1, nodes=n), Step(0.0, None, o.processes, clients, nodes=n),
                  Step(1.0, o.consistency, o.processes, clients, nodes=n)]
    return steps


def _value_size_steps(o) -> list[Step]:
    """Per size: one sequential client's sets (latency), then 50 greenlets' sets and gets."""
    clients = o.clients or _spread_clients(50, o.processes)
    steps = []
    for size in VALUE_SIZES:
        steps += [Step(0.0, None, 1, 1, size), Step(0.0, None, o.processes, clients, size),
                  Step(1.0, o.consistency, o.processes, clients, size)]
    return steps


OVERLOAD_INFLIGHT = 100  # requests in flight per client process (2 x 100 stays under the
# nodes' 256 connections per source address: the raftcache client holds one per call)


def _overload_steps(o) -> list[Step]:
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(0.0, None, o.processes, clients),
            Step(0.0, None, o.processes, OVERLOAD_INFLIGHT, load=2.0)]


# The backends the scenario compares: the built-ins. The servers each needs (and hybrid's
# routes) come from its provider's declaration (BackendProvider.dev_servers, dev_options).
BACKENDS = ("memory", "redis", "memcached", "hybrid")


def _backends_steps(o) -> list[Step]:
    """Per backend: 50 greenlets' sets, then gets."""
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(ratio, o.consistency if ratio else None, o.processes, clients, backend=b)
            for b in BACKENDS for ratio in (0.0, 1.0)]


def _security_steps(o) -> list[Step]:
    """Auth and encryption both off, then both on: 50 greenlets' sets, then gets."""
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(ratio, o.consistency if ratio else None, o.processes, clients, secure=secure)
            for secure in (False, True) for ratio in (0.0, 1.0)]


def _leader_kill_steps(o) -> list[Step]:
    clients = o.clients or _spread_clients(50, o.processes)
    return [Step(0.0, None, o.processes, clients, fault="leader-kill")]


def _custom_steps(o) -> list[Step]:
    """--read-ratio R: 0 runs a set phase then a get phase; otherwise one mixed phase."""
    clients = o.clients or _spread_clients(50, o.processes)
    ratio = o.read_ratio or 0.0
    if ratio <= 0:
        return [Step(0.0, None, o.processes, clients),
                Step(1.0, o.consistency, o.processes, clients)]
    return [Step(ratio, o.consistency, o.processes, clients)]


SCENARIOS = {s.name: s for s in [
    Scenario("latency", "one sequential client: set, then get at each read level", _latency_steps),
    Scenario("throughput", "50 greenlets in all (by default): set, then get at "
                           "--consistency (linearizable)", _throughput_steps),
    Scenario("read-heavy", "50 greenlets in all (by default), 90% gets at --consistency, "
                           "10% sets",
             _read_heavy_steps),
    Scenario("custom", "--read-ratio 0: a set phase then a get phase; above 0: a mix "
                       "(the default scenario with --read-ratio)", _custom_steps),
    Scenario("nodes", "clusters of 3, 5 and 7 nodes: sequential sets, then 50 greenlets' sets "
                      "and gets", _nodes_steps),
    Scenario("value-sizes", "values of 100 B, 10 KB and 1 MB: sequential sets, then 50 "
                            "greenlets' sets and gets", _value_size_steps),
    Scenario("overload", "50 greenlets' sets find the peak; then an open loop offers twice "
                         "that rate (at most 100 in flight per process, the rest shed): "
                         "completions against the peak, errors by kind, leader changes",
             _overload_steps),
    Scenario("leader-kill", "50 greenlets' sets with a kill -9 of the leader halfway (raftcache "
                            "only): errors, the slowest requests, the dip; the node restarts "
                            "after the step", _leader_kill_steps),
    Scenario("backends", "each backend (memory, redis, memcached, hybrid; 3 nodes, the "
                         "redis and memcached servers started per node): 50 greenlets' sets "
                         "and gets", _backends_steps),
    Scenario("security", "auth (signed tokens) and encryption at rest both off, then both on: "
                         "50 greenlets' sets and gets", _security_steps),
]}
DEFAULT_SCENARIOS = ("latency", "throughput", "read-heavy")


# -- targets and their client processes -------------------------------------------------------------


def key_names(count: int, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """The key space: `count` keys spread over `prefixes` (key n takes prefix n mod len, so a
    hybrid backend's routes each get their share)."""
    return [f"{prefixes[i % len(prefixes)]}bench{i}" for i in range(count)]


def key_count(options: Options, value_size: int) -> int:
    """--keys, but fewer for big values: 1,000 keys of 1 MB would be a gigabyte per node."""
    return min(options.keys, max(16, KEY_SPACE_BYTES // value_size))


def route_prefixes(extra: dict) -> tuple[str, ...]:
    """The literal prefixes of a hybrid backend's routes ("session:*" -> "session:"), plus ""
    for the default instance; ("",) without routes."""
    routes = extra.get("backend", {}).get("options", {}).get("routes", [])
    prefixes = [r["match"].rstrip("*") for r in routes
                if not any(c in r["match"].rstrip("*") for c in "*?[")]
    return (*prefixes, "") if prefixes else ("",)


@attrs.define
class Options:
    """What a run needs besides its targets (the CLI's arguments, or an example's)."""

    seconds: float = 3.0
    reps: int = 3
    processes: int = 2
    clients: int | None = None  # greenlets per process; None: the scenario's (50 in all)
    value_size: int = 100
    keys: int = 1000
    read_ratio: float | None = None
    consistency: str = "linearizable"
    key_prefixes: tuple = ("",)


def _stop(procs) -> None:
    """End processes that run until their stdin closes (killed after 10 s)."""
    for p in procs:
        with contextlib.suppress(OSError):
            p.stdin.close()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class Pool:
    """`processes` worker processes with `clients` greenlets each, connected to one target."""

    def __init__(self, target: dict, processes: int, clients: int, options: Options,
                 value_size: int | None = None):
        self.target = target
        self.procs = []
        self.value_size = value_size or options.value_size
        setup = {"target": target, "clients": clients, "value_size": self.value_size,
                 "keys": key_names(key_count(options, self.value_size), options.key_prefixes)}
        for _ in range(processes):
            p = subprocess.Popen([sys.executable, "-m", "raftcache.bench.worker"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 bufsize=1)
            self.procs.append(p)
            p.stdin.write(json.dumps(setup) + "\n")
            p.stdin.flush()
        for p in self.procs:
            self._read(p)

    def _read(self, p) -> dict:
        line = p.stdout.readline()
        if not line:
            code = p.wait()
            raise RuntimeError(f"a client process for {self.target['name']} exited with "
                               f"{code} (see its stderr above)")
        return json.loads(line)

    def command(self, cmds: list[dict], on_progress: Callable | None = None) -> list[dict]:
        """Send one command to each process; their results. `on_progress(done)` sees the
        completions so far, summed over the processes, as they report them."""
        import gevent

        for p, cmd in zip(self.procs, cmds, strict=True):
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        done = [0] * len(self.procs)
        results: list = [None] * len(self.procs)

        def reader(i: int) -> None:
            while True:
                message = self._read(self.procs[i])
                if "result" in message:
                    results[i] = message["result"]
                    return
                done[i] = message.get("done", done[i])
                if on_progress is not None:
                    on_progress(sum(done))

        gevent.joinall([gevent.spawn(reader, i) for i in range(len(self.procs))],
                       raise_error=True)
        return results

    def close(self) -> None:
        _stop(self.procs)


class PySyncObjCluster:
    """A 3-node PySyncObj cluster, one process per node on free 127.0.0.1 ports; `command`
    runs a step in the leader's process."""

    def __init__(self, directory: str, nodes: int = 3):
        from raftcache.servers import free_ports

        base = free_ports(nodes)
        addresses = [f"127.0.0.1:{base + i}" for i in range(nodes)]
        self.address = ",".join(addresses)
        self.procs = []
        os.makedirs(directory, exist_ok=True)
        self.logs = [os.path.join(directory, f"node{i + 1}.log") for i in range(nodes)]
        for a, log in zip(addresses, self.logs, strict=True):
            spec = {"self": a, "partners": [b for b in addresses if b != a]}
            with open(log, "w") as stderr:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "raftcache.bench.pysyncobj_node", json.dumps(spec)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                    bufsize=1))
        for p in self.procs:
            if not p.stdout.readline():
                raise RuntimeError(f"a PySyncObj node exited with {p.wait()}")

    def run(self, cmd: dict) -> dict:
        import gevent

        for p in self.procs:
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()
        answers = gevent.joinall([gevent.spawn(p.stdout.readline) for p in self.procs])
        results = [json.loads(g.value)["result"] for g in answers if g.value]
        led = [r for r in results if r is not None]
        if not led:
            raise RuntimeError("no PySyncObj node was leader for the step")
        return led[0]

    def divergence_warnings(self) -> int:
        """How many "state machine may have diverged" lines its nodes logged."""
        count = 0
        for log in self.logs:
            with contextlib.suppress(OSError), open(log, errors="replace") as f:
                count += sum("may have diverged" in line for line in f)
        return count

    def close(self) -> None:
        _stop(self.procs)


@attrs.define
class Target:
    """Where the load goes: `spec` is what a worker connects with ({"name", "kind", "address",
    perhaps "token", "transport", "tls"})."""

    spec: dict
    options: Options
    pools: dict = attrs.Factory(dict)  # (processes, clients, value size) -> Pool
    pysyncobj: PySyncObjCluster | None = None
    filled: int | None = None  # the value size every key was last written with
    shape: Shape | None = None  # a raftcache cluster that the bench started: its shape
    # (Shape) -> a Target on another cluster of that shape, started here (raftcache targets
    # that the bench started; steps that want another size, backend or security run on them)
    start_cluster: Callable | None = None
    others: dict = attrs.Factory(dict)  # Shape -> Target (one at a time)
    cluster: object = None  # the LocalCluster the bench started for this target, if any
    peak: float | None = None  # sets/s of its last closed-loop step of sets
    owns_cluster: bool = False  # stop it at close (other shapes; the first is the stack's)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    def pool(self, step: Step) -> Pool:
        shape = (step.processes, step.clients, step.value_size or self.options.value_size)
        if shape not in self.pools:
            self.pools[shape] = Pool(self.spec, *shape[:2], self.options, shape[2])
        return self.pools[shape]

    def fill(self, step: Step) -> None:
        """Write every key once, so that gets find them (again when the value size changes:
        a get must read values of the size it is timed for)."""
        pool = self.pool(step)
        if self.filled == pool.value_size or self.kind == "pysyncobj":
            return
        n = len(pool.procs)
        results = pool.command([{"cmd": "fill", "part": i, "of": n} for i in range(n)])
        errors = sum(r["errors"] for r in results)
        if errors:
            print(f"  ({self.name}: {errors} keys not written beforehand, e.g. "
                  f"{results[0]['last_error'] or results[-1]['last_error']})", flush=True)
        self.filled = pool.value_size

    def on(self, shape: Shape) -> Target:
        """The target that runs steps of this cluster shape: this one, or another cluster
        started for it (closing the previous other: an idle cluster would share the CPUs)."""
        wanted = shape.over(self.shape or Shape())
        if self.shape is None or wanted == self.shape:
            return self
        if wanted not in self.others:
            for other in self.others.values():
                other.close()
            self.others = {wanted: self.start_cluster(wanted)}
        return self.others[wanted]

    def run(self, step: Step, seed: int, on_progress: Callable | None = None) -> list[dict]:
        target = self.on(step.cluster)
        if target is not self:
            results = target.run(step, seed, on_progress)
            results[0]["cluster"] = describe(target.cluster)
            return results
        o = self.options
        if self.kind == "pysyncobj":
            size = step.value_size or o.value_size
            return [self.pysyncobj.run({"cmd": "run", "clients": step.processes * step.clients,
                                        "seconds": o.seconds, "value_size": size,
                                        "keys": key_count(o, size), "seed": seed})]
        pool = self.pool(step)
        self.fill(step)
        start_at = time.time() + START_DELAY
        cmds = [{"cmd": "run", "read_ratio": step.read_ratio, "consistency": step.consistency,
                 "start_at": start_at, "seconds": o.seconds, "seed": seed * 100 + i}
                for i in range(len(pool.procs))]
        if step.fault == "leader-kill":
            return self._killing_the_leader(pool, cmds, on_progress, start_at + o.seconds / 2)
        if step.load is not None:
            if not self.peak:
                raise RuntimeError(f"{step.name} needs a closed-loop step of sets before it")
            for c in cmds:
                c["rate"] = step.load * self.peak / len(cmds)
            terms = self._terms()
            results = pool.command(cmds, on_progress)
            results[0]["peak_ops_per_s"] = self.peak
            if terms is not None:
                results[0]["elections"] = max(0, self._terms() - terms)
            return results
        results = pool.command(cmds, on_progress)
        if step.read_ratio <= 0:
            self.peak = sum(len(r["latencies_us"]["set"]) for r in results) / o.seconds
        return results

    def _terms(self) -> int | None:
        """The highest term any node of this raftcache cluster reports (None: not one)."""
        if self.kind != "raftcache":
            return None
        from raftcache.client import Client
        from raftcache.pluginapi import TLSConfig

        spec = self.spec
        tls = TLSConfig(**spec["tls"]) if spec.get("tls") else None
        addresses = spec["address"].split(",")
        with Client(addresses, token=spec.get("token"), tls=tls, timeout=5.0,
                    transport=spec.get("transport", "thrift")) as c:
            return max(c.status(a).term for a in addresses)

    def _killing_the_leader(self, pool: Pool, cmds: list, on_progress, kill_at: float):
        """The step's results, with the leader killed (-9) at `kill_at` and, unless its log
        was in memory only, restarted once the step is over."""
        import gevent

        if self.cluster is None:
            raise RuntimeError("leader-kill needs a cluster that the bench started")
        job = gevent.spawn(pool.command, cmds, on_progress)
        gevent.sleep(max(0.0, kill_at - time.time()))
        victim = self.cluster.wait_for_leader(timeout=5)
        killed_at = time.time()
        self.cluster.kill(victim)
        results = job.get()
        results[0]["fault"] = (f"killed the leader, node {victim}, "
                               f"{killed_at - cmds[0]['start_at']:.1f} s into the step")
        if self.cluster.plugin("storage") != "memory":  # memory: it would come back empty
            self.cluster.start(victim)
            self.cluster.wait_for_leader(timeout=30)
        return results

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        for target in self.others.values():
            target.close()
        if self.pysyncobj is not None:
            self.pysyncobj.close()
        if self.owns_cluster:
            self.cluster.stop()


# -- results ---------------------------------------------------------------------------------------


def merge_rep(results: list[dict], step: Step, seconds: float) -> dict:
    """One repetition, every client process together: ops/s and percentiles per operation,
    completions per second, errors; and the raw latencies (µs) for the plot."""
    rep = {"ops_per_s": 0.0, "ops": {}, "errors": 0, "misses": 0, "late": False,
           "last_error": "", "per_second": []}
    raw = {}
    for op in step.ops:
        lat = [us for r in results for us in r["latencies_us"][op]]
        raw[op] = lat
        rep["ops"][op] = latency_summary(lat) | {"ops_per_s": len(lat) / seconds}
        rep["ops_per_s"] += len(lat) / seconds
    width = max(len(r["per_second"]) for r in results)
    rep["per_second"] = [sum(r["per_second"][i] for r in results if i < len(r["per_second"]))
                         for i in range(width)]
    rep["errors"] = sum(r["errors"] for r in results)
    rep["misses"] = sum(r["misses"] for r in results)
    rep["late"] = any(r["late"] for r in results)
    rep["last_error"] = next((r["last_error"] for r in results if r["last_error"]), "")
    faults = [r["fault"] for r in results if r.get("fault")]
    if faults:
        rep["fault"] = faults[0]
    if "cluster" in results[0]:
        rep["cluster"] = results[0]["cluster"]
    if any("offered" in r for r in results):  # an open loop
        rep["offered_per_s"] = sum(r["offered"] for r in results) / seconds
        rep["shed"] = sum(r["shed"] for r in results)
        kinds: dict[str, int] = {}
        for r in results:
            for kind, n in r["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        rep["error_kinds"] = kinds
        for key in ("peak_ops_per_s", "elections"):
            if key in results[0]:
                rep[key] = results[0][key]
    return rep | {"_raw": raw}


def summarize(reps: list[dict], step: Step) -> dict:
    """Median and spread (min-max) over repetitions of ops/s and of each op's figures."""
    out = {"ops_per_s": spread([r["ops_per_s"] for r in reps]), "ops": {}}
    for op in step.ops:
        out["ops"][op] = {f: spread([r["ops"][op][f] for r in reps])
                          for f in ("ops_per_s", "p50_ms", "p99_ms", "p999_ms")}
    return out


@attrs.define
class Outcome:
    """One target's figures for one step of one scenario."""

    scenario: str
    step: Step  # as the target ran it
    target: str
    kind: str
    reps: list = attrs.Factory(list)

    def summary(self) -> dict:
        return summarize(self.reps, self.step)


def _compared(ours: Outcome, other: Outcome) -> bool:
    """Whether `other` ran `ours`'s step as its target runs it (Redis: one get for every read
    level, one set for every cluster size), in the same scenario."""
    return (other.kind != "raftcache" and other.scenario == ours.scenario
            and ours.step.for_target(other.kind) == other.step)


def ratios(outcomes: list[Outcome]) -> list[dict]:
    """raftcache / each other target, per scenario, raftcache step and op: ops/s (above 1:
    raftcache does more) and p50 latency (above 1: raftcache is slower), from the medians."""
    out = []
    for ours in (o for o in outcomes if o.kind == "raftcache"):
        for other in outcomes:
            if not _compared(ours, other):
                continue
            a, b = ours.summary()["ops"], other.summary()["ops"]
            for op in ours.step.ops:
                if op not in b:
                    continue
                ops_b, p50_b = b[op]["ops_per_s"]["median"], b[op]["p50_ms"]["median"]
                out.append({
                    "scenario": ours.scenario, "step": ours.step.name, "op": op,
                    "raftcache": ours.target, "against": other.target,
                    "ops_per_s": a[op]["ops_per_s"]["median"] / ops_b if ops_b else None,
                    "p50_ms": a[op]["p50_ms"]["median"] / p50_b if p50_b else None,
                })
    return out


def to_json(outcomes: list[Outcome], options: Options, meta: dict) -> dict:
    return {
        "schema": SCHEMA,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "options": attrs.asdict(options) | {"key_prefixes": list(options.key_prefixes)},
        **meta,
        "results": [{"scenario": o.scenario, "step": o.step.name, "target": o.target,
                     "kind": o.kind, "processes": o.step.processes, "clients": o.step.clients,
                     "read_ratio": o.step.read_ratio, "consistency": o.step.consistency,
                     "value_size": o.step.value_size or options.value_size,
                     "nodes": o.step.nodes, "backend": o.step.backend,
                     "secure": o.step.secure,
                     "summary": o.summary(),
                     "reps": [{k: v for k, v in r.items() if not k.startswith("_")}
                              for r in o.reps]}
                    for o in outcomes],
        "ratios": ratios(outcomes),
    }


# -- the table --------------------------------------------------------------------------------------


def _fmt_spread(s: dict, fmt: str) -> str:
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def table_rows(outcomes: list[Outcome]) -> dict:
    """Per scenario: rows of cells (step, op, target, ops/s, p50, p99, p99.9, ratios)."""
    by_ratio = {(r["scenario"], r["step"], r["op"], r["against"]): r for r in ratios(outcomes)}
    scenarios: dict[str, list] = {}
    ours = [o for o in outcomes if o.kind == "raftcache"]
    for o in ours:
        rows = scenarios.setdefault(o.scenario, [])
        others = [x for x in outcomes if _compared(o, x)]
        for op in o.step.ops:
            for x in [o, *others]:
                s = x.summary()["ops"].get(op)
                if s is None:
                    continue
                r = by_ratio.get((o.scenario, o.step.name, op, x.target))
                cells = [o.step.name if x is o and op == o.step.ops[0] else "",
                         op if x is o else "", x.target,
                         _fmt_spread(s["ops_per_s"], ",.0f"), _fmt_spread(s["p50_ms"], ".2f"),
                         _fmt_spread(s["p99_ms"], ".2f"), _fmt_spread(s["p999_ms"], ".2f"),
                         f"{r['ops_per_s']:.2f}x" if r and r["ops_per_s"] else "",
                         f"{r['p50_ms']:.2f}x" if r and r["p50_ms"] else ""]
                problems = sum(p["errors"] for p in x.reps), sum(p["misses"] for p in x.reps)
                if x is o or op == x.step.ops[0]:
                    notes = [f"{n} {what}" for n, what in
                             zip(problems, ("errors", "misses"), strict=True) if n]
                    notes += _open_loop_notes(x.reps)
                    cells.append(", ".join(notes))
                else:
                    cells.append("")
                rows.append(cells)
    return scenarios


def security_cost(outcomes: list[Outcome]) -> dict[str, float]:
    """The security scenario's throughput with auth and encryption on / off, per op."""
    by = {(o.step.secure, o.step.kind.split()[0]): o.summary()["ops_per_s"]["median"]
          for o in outcomes if o.scenario == "security" and o.kind == "raftcache"}
    return {op: by[(True, op)] / by[(False, op)] for op in ("set", "get")
            if by.get((False, op)) and (True, op) in by}


def _open_loop_notes(reps: list[dict]) -> list[str]:
    """An open loop's completions against the peak, what it shed, and elections."""
    if not reps or "offered_per_s" not in reps[0]:
        return []
    share = [r["ops_per_s"] / r["peak_ops_per_s"] for r in reps if r.get("peak_ops_per_s")]
    notes = [f"{spread(share)['median']:.0%} of peak"] if share else []
    notes.append(f"{sum(r['shed'] for r in reps):,} shed")
    if all("elections" in r for r in reps):
        notes.append(f"terms moved {sum(r['elections'] for r in reps)}")
    return notes


HEADER = ("step", "op", "target", "ops/s median [min-max]", "p50 ms", "p99 ms", "p99.9 ms",
          "ops/s: raftcache/this", "p50: raftcache/this", "notes")


def print_tables(outcomes: list[Outcome], options: Options, rich_console=None) -> None:
    for scenario, rows in table_rows(outcomes).items():
        shapes = sorted({(o.step.processes, o.step.clients) for o in outcomes
                         if o.scenario == scenario and o.kind == "raftcache"})
        clients = ", ".join(f"{p} process{'es' if p > 1 else ''} x {c} greenlet"
                            f"{'s' if c > 1 else ''}" for p, c in shapes)
        title = (f"{scenario}: {SCENARIOS[scenario].doc} ({clients}); medians [min-max] of "
                 f"{options.reps} repetitions of {options.seconds:g} s")
        widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        if rich_console is not None and rich_console.width >= sum(widths) + 3 * len(widths) + 1:
            from rich.markup import escape
            from rich.table import Table

            t = Table(title=escape(title), title_justify="left")
            for i, h in enumerate(HEADER):
                t.add_column(escape(h), justify="right" if i >= 3 else "left", no_wrap=True)
            for row in rows:
                t.add_row(*map(escape, row))
            rich_console.print(t)
            continue
        print(f"\n{title}")  # plain on a narrow terminal and in files
        for row in [HEADER, *rows]:
            print("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())


# -- the live display ------------------------------------------------------------------------------


class Display:
    """A rich progress bar per step on a terminal; a plain line per finished step otherwise."""

    def __init__(self, console=None):
        self.console = console
        self.progress = None
        if console is not None:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=12),
                                     TextColumn("{task.fields[rate]}"), console=console)
            self.progress.start()

    def step(self, label: str, seconds: float):
        """A callback (done so far) for a step's progress, and a function that closes it."""
        started = time.monotonic() + START_DELAY
        if self.progress is None:
            return None, (lambda line: print(f"  {label}: {line}", flush=True))
        from rich.markup import escape

        task = self.progress.add_task(escape(label), total=seconds, rate="")

        def update(done: int) -> None:
            elapsed = time.monotonic() - started
            if elapsed > 0:
                self.progress.update(task, completed=min(seconds, elapsed),
                                     rate=f"{done / elapsed:,.0f} ops/s")

        def finish(line: str) -> None:
            self.progress.update(task, completed=seconds, rate=escape(line))

        return update, finish

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# -- running --------------------------------------------------------------------------------------


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
                    r = merge_rep(results, o.step, options.seconds)
                    o.reps.append(r)
                    line = f"{r['ops_per_s']:,.0f} ops/s" + "".join(
                        f", {op} p50 {s['p50_ms']:.2f} ms" for op, s in r["ops"].items())
                    if r["errors"]:
                        line += f", {r['errors']} errors (e.g. {r['last_error']})"
                    if r["late"]:
                        line += " (a client process started late)"
                    if r.get("fault"):
                        line += f" ({r['fault']})"
                    if "offered_per_s" in r:
                        line += (f"; offered {r['offered_per_s']:,.0f}/s, peak "
                                 f"{r['peak_ops_per_s']:,.0f}/s, shed {r['shed']:,}, errors "
                                 f"{r['error_kinds'] or 0}")
                        if "elections" in r:
                            line += f", terms moved {r['elections']}"
                    finish(line)
    return outcomes


def plot(outcomes: list[Outcome], path: str) -> None:
    """Per scenario: a latency histogram per target (every op, every rep) and the completions
    per second over the measured time, steps and repetitions one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(o.scenario for o in outcomes))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(13, 3.6 * len(scenarios)),
                             squeeze=False)
    for row, scenario in zip(axes, scenarios, strict=True):
        mine = [o for o in outcomes if o.scenario == scenario]
        targets = list(dict.fromkeys(o.target for o in mine))
        everything = [us for o in mine for r in o.reps for lat in r["_raw"].values()
                      for us in lat]
        if everything:
            low, high = max(1, min(everything)), max(everything)
            bins = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 10
        for t in targets:
            lat = [us / 1000 for o in mine if o.target == t for r in o.reps
                   for x in r["_raw"].values() for us in x]
            if lat:  # each target's share of its own requests: shapes compare across rates
                row[0].hist(lat, bins=[b / 1000 for b in bins] if everything and
                            not isinstance(bins, int) else 10, histtype="step", label=t,
                            weights=[1 / len(lat)] * len(lat))
            series = [n for o in mine if o.target == t for r in o.reps for n in r["per_second"]]
            row[1].plot(range(len(series)), series, label=t, marker=".")
        row[0].set_xscale("log")
        row[0].set_xlabel("latency, ms (log)")
        row[0].set_ylabel("share of the target's requests")
        row[0].set_title(f"{scenario}: latency")
        row[1].set_xlabel("measured second (steps and repetitions in turn)")
        row[1].set_ylabel("completions / s")
        row[1].set_title(f"{scenario}: throughput over time")
        row[0].legend(fontsize="small")
        row[1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


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


def describe(cluster) -> str:
    """A LocalCluster's settings in a few words."""
    return (f"{cluster.nodes} nodes, {cluster.plugin('storage')} storage, "
            f"{cluster.plugin('transport')}, {cluster.plugin('backend')} backend, "
            f"auth {'on' if cluster.auth else 'off'}, encryption "
            f"{'on' if cluster.encryption else 'off'}")


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
