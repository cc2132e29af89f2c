"""Steps and scenarios of `raftcache bench`: what load each scenario puts on the targets.

Contract: pure data and pure functions, no processes, no I/O. A *step* (`Step`) is one load
shape (client processes x greenlets, the share of gets, the read level, and optionally the
raftcache cluster it runs on: `Shape`); a *scenario* (`Scenario`, by name in `SCENARIOS`) turns
the run's `Options` into its list of steps. `Step.for_target` says how a target without read
levels or clusters (Redis, Memcached, PySyncObj) runs a step, or that it does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

CONSISTENCY = ("linearizable", "lease", "stale")


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


def _clients(o: Options) -> int:
    """Greenlets per client process: --clients, else 50 in all spread over the processes."""
    return o.clients or max(1, math.ceil(50 / o.processes))


def _sets_then_gets(o: Options, **cluster) -> list[Step]:
    """50 greenlets' sets, then their gets at --consistency (on `cluster`'s shape, size)."""
    return [Step(0.0, None, o.processes, _clients(o), **cluster),
            Step(1.0, o.consistency, o.processes, _clients(o), **cluster)]


def _latency_steps(o: Options) -> list[Step]:
    return [Step(0.0, None, 1, 1)] + [Step(1.0, level, 1, 1) for level in CONSISTENCY]


def _throughput_steps(o: Options) -> list[Step]:
    return _sets_then_gets(o)


def _read_heavy_steps(o: Options) -> list[Step]:
    return [Step(0.9, o.consistency, o.processes, _clients(o))]


VALUE_SIZES = (100, 10_000, 1_000_000)
CLUSTER_SIZES = (3, 5, 7)


def _nodes_steps(o: Options) -> list[Step]:
    """Per cluster size: one sequential client's sets, then 50 greenlets' sets and gets."""
    return [step for n in CLUSTER_SIZES
            for step in [Step(0.0, None, 1, 1, nodes=n), *_sets_then_gets(o, nodes=n)]]


def _value_size_steps(o: Options) -> list[Step]:
    """Per size: one sequential client's sets (latency), then 50 greenlets' sets and gets."""
    return [step for size in VALUE_SIZES
            for step in [Step(0.0, None, 1, 1, size), *_sets_then_gets(o, value_size=size)]]


OVERLOAD_INFLIGHT = 100  # requests in flight per client process (2 x 100 stays under the
# nodes' 256 connections per source address: the raftcache client holds one per call)


def _overload_steps(o: Options) -> list[Step]:
    return [Step(0.0, None, o.processes, _clients(o)),
            Step(0.0, None, o.processes, OVERLOAD_INFLIGHT, load=2.0)]


# The backends the scenario compares: the built-ins. The servers each needs (and hybrid's
# routes) come from its provider's declaration (BackendProvider.dev_servers, dev_options).
BACKENDS = ("memory", "redis", "memcached", "hybrid")


def _backends_steps(o: Options) -> list[Step]:
    """Per backend: 50 greenlets' sets, then gets."""
    return [step for b in BACKENDS for step in _sets_then_gets(o, backend=b)]


def _security_steps(o: Options) -> list[Step]:
    """Auth and encryption both off, then both on: 50 greenlets' sets, then gets."""
    return [step for secure in (False, True) for step in _sets_then_gets(o, secure=secure)]


def _leader_kill_steps(o: Options) -> list[Step]:
    return [Step(0.0, None, o.processes, _clients(o), fault="leader-kill")]


def _custom_steps(o: Options) -> list[Step]:
    """--read-ratio R: 0 runs a set phase then a get phase; otherwise one mixed phase."""
    ratio = o.read_ratio or 0.0
    if ratio <= 0:
        return _sets_then_gets(o)
    return [Step(ratio, o.consistency, o.processes, _clients(o))]


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
