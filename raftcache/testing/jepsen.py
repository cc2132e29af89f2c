"""A Jepsen-style fault suite: a real cluster, real faults, a linearizability checker.

    python -m raftcache.testing.jepsen --time 120 --nemesis all --seed 7 [--backend hybrid]

starts a cluster from scratch in a temporary directory (nodes on distinct 127.0.0.x "hosts",
reaching each other only through fault relays: :mod:`raftcache.testing.relay`), runs a workload
of registers (read, write, cas, delete) and counters (read, incr) with many concurrent clients
while nemeses inject faults chosen at random from the seed, heals everything, checks, prints a
summary and exits non-zero on any anomaly.

``--backend`` picks where the nodes keep values (docs/backends.md): ``memory``, ``redis``,
``memcached`` (the cluster starts a server per node), or ``hybrid``, routed as in
examples/hybrid/hybrid.toml, whose keys the workload spreads over its three routes by prefix
(``session:`` to memcached, ``config:`` to redis, the rest to memory; :data:`KEY_ROUTES`). With
servers, the ``kill-backend`` nemesis kill -9s them and brings them back empty.

The checks:

* **linearizability** of every register key's history
  (:mod:`raftcache.testing.linearizability`);
* **counters** (Jepsen's counter check, :func:`counter_anomalies`): every value read lies
  between the increments acknowledged before the read began and all those invoked before it
  ended, and one version never holds two values;
* **final reads**: after healing, every acknowledged write is still readable unless a later
  acknowledged write replaced it (:func:`lost_writes`); a counter's final value is checked
  like any read of it;
* **replicas agree**: once caught up, every node holds the same value for every key;
* **nodes stay up**: a node that exits without being killed, or fails to restart, is an anomaly;
* **progress**: once healed, the cluster elects a leader, takes a write and has its membership
  back within a bounded time.

Operations are recorded as invoke and ok / fail / info with times from the runner's monotonic
clock. OutcomeUnknown and write timeouts are ``info`` (the process then continues under a new
id, as in Jepsen); a failed read, or a write the system said surely did not apply, is ``fail``.

**Misses.** A memcached route is "linearizable or miss": a node may have lost a value its
server dropped (eviction, restart), and then reads it as not found. On keys of such a route
(:func:`may_miss`), reads that found nothing are taken out of the history before the checks
(:func:`drop_misses`; the summary counts them). That is sound and loses nothing else: under
"linearizable or miss" a read answering not-found is legal in every state and changes none, so
wherever the other operations linearize, it fits anywhere within its own interval; a history
passes the weakened specification exactly when it passes the register (or counter) checks
without those reads. Every read that returns a value is still checked in full, so an older
value, a value never written to the key, or a wrong version stays an anomaly; on every other
route a read that wrongly finds nothing is one too.

``SCENARIOS`` maps every anomaly Jepsen found in Raft-backed stores (RedisRaft, etcd, Consul) to the
faults and checks here that would catch it; ``--scenario NAME`` runs one.
"""

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import bisect  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402

import attrs  # noqa: E402

from raftcache.testing import relay  # noqa: E402
from raftcache.testing.history import History, Kind, Operation, Status  # noqa: E402

# -- the checks of our own (pure) ----------------------------------------------------------------------


@attrs.frozen
class Anomaly:
    kind: str  # not-linearizable, version-conflict, undecided, counter, lost-write,
    #            replicas-diverge, node-crashed, no-progress, unexpected-error
    key: object
    message: str


def _writes(op: Operation) -> bool:
    if op.kind in (Kind.WRITE, Kind.DELETE):
        return op.status is not Status.FAIL
    if op.kind is Kind.CAS:
        return op.status is Status.INFO or (op.status is Status.OK and op.result[0])
    return False


def lost_writes(ops: Iterable[Operation], final: dict) -> list[Anomaly]:
    """Every acknowledged write must still be readable at the end unless a later acknowledged
    write replaced it.

    ``final`` maps each key to what a linearizable read returned once every fault had healed:
    ``(value, version)`` or ``None``. A write "could be last" unless some acknowledged write was
    invoked after it completed (an ``info`` write never completed, so it always could be). The
    final state must come from a write that could be last; when the key was never written by
    an acknowledged op, absence is fine too.
    """
    by_key: dict = {}
    for op in ops:
        if _writes(op):
            by_key.setdefault(op.key, []).append(op)
    out = []
    for key, result in final.items():
        writes = by_key.get(key, [])
        acked = [w for w in writes if w.status is Status.OK]
        last_invoke = max((w.invoke_time for w in acked), default=-1.0)
        could_be_last = [w for w in writes
                         if w.status is Status.INFO or w.complete_time >= last_invoke]
        if result is None:
            if not acked or any(w.kind is Kind.DELETE for w in could_be_last):
                continue
            problem = "the key is gone"
        else:
            if any(w.kind is not Kind.DELETE and w.value == result[0] for w in could_be_last):
                continue
            problem = f"it reads {result[0]!r} @ version {result[1]}"
        latest = sorted((w for w in could_be_last if w.status is Status.OK),
                        key=lambda w: w.invoke_time)[-3:]
        shown = "; ".join(w.describe() for w in latest)
        out.append(Anomaly("lost-write", key, f"{problem}, but the acknowledged write(s) "
                                              f"that could be last were: {shown}"))
    return out


def counter_anomalies(ops: Iterable[Operation]) -> list[Anomaly]:
    """Jepsen's counter check, per key of ``ops`` (counter keys only: incr with positive
    deltas, and reads whose value is an int, None counting as 0).

    Every value a read returned must lie between the sum of the increments acknowledged before
    the read began and the sum of every increment (ok or info) invoked before it ended; so must
    the new value an incr returned, counting its own delta as acknowledged. ``fail`` increments
    never applied. One version must also never hold two values (a version is one log entry).
    """
    from raftcache.testing.linearizability import version_conflicts

    by_key: dict = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    out = []
    for key, key_ops in by_key.items():
        incrs = [op for op in key_ops if op.kind is Kind.INCR and op.status is not Status.FAIL]
        acked = sorted((op.complete_time, op.value) for op in incrs if op.status is Status.OK)
        invoked = sorted((op.invoke_time, op.value) for op in incrs)
        acked_times = [t for t, _ in acked]
        acked_sums = list(itertools.accumulate((d for _, d in acked), initial=0))
        invoked_times = [t for t, _ in invoked]
        invoked_sums = list(itertools.accumulate((d for _, d in invoked), initial=0))
        wrong = []
        for op in key_ops:
            if op.status is not Status.OK or op.kind not in (Kind.READ, Kind.INCR):
                continue
            if op.kind is Kind.READ:
                value, own = (0 if op.result is None else op.result[0]), 0
            else:
                value, own = op.result, op.value
            # Ties count the lenient way: an incr ending as the read begins may be before it.
            lower = acked_sums[bisect.bisect_left(acked_times, op.invoke_time)] + own
            upper = invoked_sums[bisect.bisect_right(invoked_times, op.complete_time)]
            if not isinstance(value, int) or not lower <= value <= upper:
                wrong.append(f"{op.describe()}: expected a value in [{lower}, {upper}]")
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            out.append(Anomaly("counter", key, f"{len(wrong)} value(s) out of bounds: "
                                               + "; ".join(wrong[:3]) + more))
        out += [Anomaly(a.kind, key, a.message) for a in version_conflicts(key, key_ops)]
    return out


def drop_misses(ops: Iterable[Operation],
                may_miss: Callable[[object], bool]) -> tuple[list[Operation], int]:
    """``ops`` without the reads that found nothing on keys where ``may_miss(key)`` (a
    "linearizable or miss" route), and how many there were. Why that is sound: module doc."""
    kept, dropped = [], 0
    for op in ops:
        if (op.kind is Kind.READ and op.status is Status.OK and op.result is None
                and may_miss(op.key)):
            dropped += 1
        else:
            kept.append(op)
    return kept, dropped


# -- scenarios: the anomalies Jepsen found in Raft-backed stores, and what catches each ---------------


@attrs.frozen
class Scenario:
    anomaly: str  # as Jepsen's analyses tell it
    nemesis: tuple[str, ...]
    catches: str  # which check reports it
    read: str = "linearizable"
    settings: tuple[str, ...] = ()  # extra config, "section.key=value"
    auth: bool = False  # tokens required (as --auth)


SCENARIOS: dict[str, Scenario] = {
    "failover-data-loss": Scenario(
        "RedisRaft: total data loss on failover", ("kill-leader", "pause-leader"),
        "final reads (lost-write) and linearizability"),
    "restart-stale-reads": Scenario(
        "RedisRaft: stale or empty reads after restart, because a new leader served reads "
        "before committing an entry of its own term", ("kill-all", "kill-majority"),
        "linearizability (a read older than an acknowledged write)"),
    "aborted-read": Scenario(
        "RedisRaft: a write reported as failed that had committed",
        ("partition-leader", "kill-leader", "transfer"),
        "linearizability: fail means never applied, so reading a failed write's value breaks it"),
    "membership-split-brain": Scenario(
        "RedisRaft: split brain with lost updates during a partition plus a membership change",
        ("partition-halves", "partition-leader", "member-readd", "member-join"),
        "linearizability, final reads, replicas agree"),
    "crash-partition-loss": Scenario(
        "RedisRaft: committed writes lost under crashes plus partitions",
        ("kill-one", "kill-leader", "partition-halves", "partition-bridge"),
        "final reads (lost-write) and linearizability"),
    "membership-empty-reads": Scenario(
        "RedisRaft: empty reads after membership changes", ("member-readd", "member-learner"),
        "linearizability (absent where a value was acknowledged) and final reads"),
    "proxy-crossed-replies": Scenario(
        "RedisRaft: crossed replies when followers proxied requests",
        ("slow", "reset", "lossy", "transfer"),
        "linearizability: every value is unique to one key and write, so a reply meant for "
        "another request reads a value never written to this key",
        settings=("node.proxy=true",)),
    "reapplied-command": Scenario(
        "RedisRaft: a command re-applied forever", ("kill-one", "lossy", "reset"),
        "replicas agree, nodes stay up, progress after healing (and exactly-once retries: a "
        "re-applied write shows as a value or version no linearization explains)"),
    "snapshot-startup-crash": Scenario(
        "RedisRaft: crashes when snapshot and log indexes disagreed at start-up",
        ("kill-one", "kill-majority", "kill-all", "member-learner"),
        "nodes stay up (a node that cannot restart is an anomaly); snapshots every 200 entries",
        settings=("raft.snapshot_entries=200", "raft.snapshot_keep_entries=20")),
    "deposed-leader-reads": Scenario(
        "etcd/Consul 2014: stale reads from a deposed leader serving local reads",
        ("partition-leader", "partition-oneway", "pause-leader"),
        "linearizability (the teeth test runs this with the read-without-heartbeat mutant)"),
    "lease-slow-disk": Scenario(
        "etcd: every lease revoked while the leader was stuck in a slow fdatasync",
        ("slow-disk", "pause-leader", "partition-leader"),
        "linearizability of lease reads while the leader's fsyncs stall (slow-disk wraps the "
        "storage), it is paused, or cut off",
        read="lease"),
    "unfsynced-write-loss": Scenario(
        "etcd: stale reads after losing un-fsynced writes", ("kill-all", "kill-majority"),
        "final reads and linearizability after every node restarted from its disk"),
    "clock-skew": Scenario(
        "issue #22: one node's clock a year off moved cluster time: a leader ahead expired "
        "every token, TTL and session for good, one behind froze them",
        ("clock-ahead", "clock-behind", "kill-leader", "partition-leader"),
        "unexpected errors (the workload's token, valid for the run, refused; its session "
        "expired), linearizability and final reads; auth required, values encrypted",
        auth=True),
}


# -- nemeses -----------------------------------------------------------------------------------------


@attrs.define
class Fault:
    name: str
    detail: str
    heal: Callable[[], None] = lambda: None


NEMESES: dict[str, Callable] = {}


def nemesis(name: str):
    def register(fn):
        NEMESES[name] = fn
        return fn

    return register


FAMILIES = {
    "kill": ("kill-one", "kill-leader", "kill-majority", "kill-all"),
    "pause": ("pause-one", "pause-leader"),
    "partition": ("partition-one", "partition-leader", "partition-halves", "partition-ring",
                  "partition-bridge", "partition-oneway"),
    "link": ("slow", "lossy", "reset"),
    "disk": ("slow-disk",),
    "transfer": ("transfer",),
    "member": ("member-readd", "member-learner", "member-join"),
    "backend": ("kill-backend",),
    "clock": ("clock-ahead", "clock-behind"),
}


@functools.cache
def backend_has_servers(backend: str) -> bool:
    """Whether the cluster starts servers for `backend` (its provider's `dev_servers`, run
    with its `dev_options`: LocalCluster starts one of each per node) for a nemesis to kill."""
    from raftcache.cluster import backend_runs_servers
    from raftcache.pluginapi.manager import PluginSet, make_manager

    return backend_runs_servers(backend, PluginSet(make_manager()))


def expand_nemeses(spec: Iterable[str], backend: str = "memory") -> list[str]:
    """Names and family names (kill, pause, partition, link, transfer, member, backend, all)
    -> names. The backend family needs a backend with servers, and only then is in "all"."""
    servers: bool | None = None  # asked once, when a name depends on it

    def has_servers() -> bool:
        nonlocal servers
        if servers is None:
            servers = backend_has_servers(backend)
        return servers

    out: list[str] = []
    for item in spec:
        for name in (x.strip() for x in item.split(",") if x.strip()):
            if name in ("backend", *FAMILIES["backend"]) and not has_servers():
                with_servers = [b for b in BACKENDS if backend_has_servers(b)]
                raise ValueError(f"nemesis {name!r} needs a backend with servers "
                                 f"({', '.join(with_servers)}), not {backend!r}")
            if name == "all":
                names = [n for family, names in FAMILIES.items()
                         if family != "backend" or has_servers() for n in names]
            elif name == "none":
                names = []
            elif name in FAMILIES:
                names = list(FAMILIES[name])
            elif name in NEMESES:
                names = [name]
            else:
                known = sorted(set(NEMESES) | set(FAMILIES) | {"all", "none"})
                raise ValueError(f"unknown nemesis {name!r} (known: {', '.join(known)})")
            out += [n for n in names if n not in out]
    return out


def _kill(run, nodes: list[int], label: str) -> Fault:
    redis_too = []
    for n in nodes:
        run.kill(n)
        if "storage" in run.cluster.servers.get(n, {}) and run.rng.random() < 0.3:
            run.cluster.kill_server(n, "storage")  # the AOF must hold everything acknowledged
            redis_too.append(n)

    def heal():
        for n in nodes:
            if n in redis_too:
                run.cluster.restart_server(n, "storage")
            run.restart(n)

    extra = f" (and its redis-server: {redis_too})" if redis_too else ""
    return Fault(label, f"kill -9 {nodes}{extra}", heal)


@nemesis("kill-one")
def _nemesis_kill(run) -> Fault:
    return _kill(run, [run.rng.choice(run.live())], "kill-one")


@nemesis("kill-leader")
def _nemesis_kill_leader(run) -> Fault:
    return _kill(run, [run.leader_or_any()], "kill-leader")


@nemesis("kill-majority")
def _nemesis_kill_majority(run) -> Fault:
    live = run.live()
    k = min(len(live), run.nodes // 2 + 1)
    return _kill(run, run.rng.sample(live, k), "kill-majority")


@nemesis("kill-all")
def _nemesis_kill_all(run) -> Fault:
    return _kill(run, run.live(), "kill-all")


def _pause(run, node: int, label: str) -> Fault:
    run.pause(node)
    return Fault(label, f"SIGSTOP node {node}", lambda: run.resume(node))


@nemesis("pause-one")
def _nemesis_pause(run) -> Fault:
    return _pause(run, run.rng.choice(run.live()), "pause-one")


@nemesis("pause-leader")
def _nemesis_pause_leader(run) -> Fault:
    return _pause(run, run.leader_or_any(), "pause-leader")


def _partition(run, links: set, label: str, detail: str) -> Fault:
    run.net.block(links)

    def heal():
        for link in links:
            run.net.faults[link].blocked = False

    return Fault(label, f"{detail}: {len(links)} links blocked", heal)


@nemesis("partition-one")
def _nemesis_partition_one(run) -> Fault:
    n = run.rng.choice(run.node_ids())
    return _partition(run, relay.isolate(n, run.members()), "partition-one", f"isolate {n}")


@nemesis("partition-leader")
def _nemesis_partition_leader(run) -> Fault:
    n = run.leader_or_any()
    return _partition(run, relay.isolate(n, run.members()), "partition-leader",
                      f"isolate leader {n}")


@nemesis("partition-halves")
def _nemesis_partition_halves(run) -> Fault:
    return _partition(run, relay.halves(run.members(), run.rng), "partition-halves",
                      "majority | minority")


@nemesis("partition-ring")
def _nemesis_partition_ring(run) -> Fault:
    return _partition(run, relay.majorities_ring(run.members(), run.rng), "partition-ring",
                      "majorities ring")


@nemesis("partition-bridge")
def _nemesis_partition_bridge(run) -> Fault:
    return _partition(run, relay.bridge(run.members(), run.rng), "partition-bridge", "bridge")


@nemesis("partition-oneway")
def _nemesis_partition_oneway(run) -> Fault:
    n = run.leader_or_any() if run.rng.random() < 0.5 else run.rng.choice(run.members())
    return _partition(run, relay.one_way(n, run.members()), "partition-oneway",
                      f"node {n} hears nobody")


def _some_links(run) -> list:
    links = run.net.links()
    if run.rng.random() < 0.5:
        return links
    return run.rng.sample(links, max(1, len(links) // 3))


@nemesis("slow")
def _nemesis_slow(run) -> Fault:
    links = _some_links(run)
    delay, jitter = run.rng.uniform(0.005, 0.08), run.rng.uniform(0.0, 0.05)
    run.net.slow(links, delay, jitter)

    def heal():
        run.net.slow(links, 0.0, 0.0)

    return Fault("slow", f"{len(links)} links delayed {delay * 1000:.0f} ms "
                         f"+ up to {jitter * 1000:.0f} ms", heal)


@nemesis("lossy")
def _nemesis_lossy(run) -> Fault:
    links = _some_links(run)
    drop = run.rng.uniform(0.01, 0.15)
    run.net.lossy(links, drop)

    def heal():
        run.net.lossy(links, 0.0)

    return Fault("lossy", f"{len(links)} links drop {drop:.0%} of chunks", heal)


@nemesis("reset")
def _nemesis_reset(run) -> Fault:
    return Fault("reset", f"reset {run.net.reset()} connections")


@nemesis("slow-disk")
def _nemesis_slow_disk(run) -> Fault:
    from raftcache.testing.slow_disk import set_delay

    n = run.leader_or_any() if run.rng.random() < 0.7 else run.rng.choice(run.node_ids())
    delay = run.rng.uniform(0.1, 1.5)
    data_dir = os.path.join(run.dir, f"node{n}")
    set_delay(data_dir, delay)
    return Fault("slow-disk", f"node {n}: every fsync stalls {delay * 1000:.0f} ms",
                 lambda: set_delay(data_dir, 0))


@nemesis("transfer")
def _nemesis_transfer(run) -> Fault:
    found = run.leader_status()
    leader, voters = (found[0], found[1].voters) if found else (None, run.node_ids())
    candidates = [n for n in voters if n != leader and n in run.live()]
    if not candidates:
        return Fault("transfer", "no live voter to transfer to")
    target = run.rng.choice(candidates)
    outcome = run.admin(lambda c: c.transfer_leader(target))
    return Fault("transfer", f"leadership {leader} -> {target}: {outcome}")


YEAR_MS = 365 * 24 * 3600 * 1000


def _skew_clock(run, offset_ms: int, label: str) -> Fault:
    """Restart the leader (or a node) with its clock `offset_ms` off and hand it leadership, so
    it stamps the writes; the heal restarts it with a correct clock. One node at a time: the
    promise is about one clock (a majority of wrong clocks is the cluster's time)."""
    skewed = [m for m, args in run.cluster.node_args.items() if "--clock-offset-ms" in args]
    if skewed:
        return Fault(label, f"node {skewed[0]}'s clock is off already: one at a time")
    n = run.leader_or_any()
    run.kill(n)
    run.cluster.node_args[n] = ["--clock-offset-ms", str(offset_ms)]
    run.restart(n)
    outcome = _lead(run, n)

    def heal():
        run.kill(n)
        run.cluster.node_args.pop(n, None)
        run.restart(n)

    return Fault(label, f"node {n} restarted with its clock {offset_ms / YEAR_MS:+.0f} year; "
                        f"leadership to it: {outcome}", heal)


def _lead(run, n: int, seconds: float = 5.0) -> str:
    """Hand leadership to node `n`, retrying while it catches up after a restart."""
    import gevent

    deadline = time.monotonic() + seconds
    while True:
        try:
            with run.client(timeout=2.0, admin=True) as c:
                c.transfer_leader(n)
            return "done"
        except Exception as exc:  # not caught up yet, an election: again, for a while
            if time.monotonic() >= deadline:
                run.nemesis_errors += 1
                return f"{type(exc).__name__}: {exc}"
        gevent.sleep(0.2)


@nemesis("clock-ahead")
def _nemesis_clock_ahead(run) -> Fault:
    return _skew_clock(run, YEAR_MS, "clock-ahead")


@nemesis("clock-behind")
def _nemesis_clock_behind(run) -> Fault:
    return _skew_clock(run, -YEAR_MS, "clock-behind")


@nemesis("kill-backend")
def _nemesis_kill_backend(run) -> Fault:
    """kill -9 one node's backend servers (sometimes several nodes', sometimes one hybrid
    instance's); the heal starts them again, empty, on the same ports."""
    nodes = [n for n in run.node_ids() if run.cluster.backend_servers(n)]
    if not nodes:
        raise ValueError("the backend runs no servers")
    picked = [run.rng.choice(nodes)]
    if len(nodes) > 1 and run.rng.random() < 0.3:
        picked = sorted(run.rng.sample(nodes, run.rng.randint(2, len(nodes))))
    instances = sorted({name.removeprefix("backend.") for name in
                        run.cluster.backend_servers(picked[0]) if name != "backend"})
    instance = run.rng.choice(instances) if instances and run.rng.random() < 0.6 else None
    for n in picked:
        run.cluster.kill_backend(n, instance)

    def heal():
        for n in picked:
            run.cluster.restart_backend(n, instance)

    what = f"instance {instance!r}" if instance else "every server"
    return Fault("kill-backend", f"kill -9 the backend ({what}) of {picked}", heal)


@nemesis("member-readd")
def _nemesis_member_readd(run) -> Fault:
    n = run.rng.choice(run.node_ids())
    outcome = run.admin(lambda c: c.remove_member(n))

    def heal():
        run.admin(lambda c: c.add_member(n))

    return Fault("member-readd", f"remove node {n}: {outcome}", heal)


@nemesis("member-learner")
def _nemesis_member_learner(run) -> Fault:
    n = run.rng.choice(run.node_ids())
    removed = run.admin(lambda c: c.remove_member(n))
    learner = run.admin(lambda c: c.add_member(n, learner=True))

    def heal():
        run.admin(lambda c: c.add_member(n))  # promote

    return Fault("member-learner", f"remove node {n}: {removed}; add as learner: {learner}",
                 heal)


SPARE_START_S = 30.0  # member-join: how long a started spare may take to answer
SPARE_FOLLOW_S = 5.0  # and, once added, to follow a leader before the heal removes it


@nemesis("member-join")
def _nemesis_member_join(run) -> Fault:
    """A node that no config lists joins at a new address (a join config; its address goes
    through the log), as a voter or a learner, half the time while a random member is cut
    off; the heal removes it, stops it and wipes its disk, as an operator replacing it.

    As an operator would, it adds the node once the node answers (it waits to be added),
    and removes it only after giving it a while to follow a leader: a node added before it
    listens, or removed before any leader reached it, shows nothing of the join (a loaded
    machine takes seconds to start one)."""
    spare = run.spare
    if spare is None or spare in run.joined:
        raise ValueError("no spare node to join (or it is still a member)")
    cut: set = set()
    if run.rng.random() < 0.5:
        cut = relay.isolate(run.rng.choice(run.node_ids()), run.members() + [spare])
        run.net.block(cut)
    run.joined.add(spare)
    run.cluster.start(spare)
    if run.wait_for_status(spare, lambda s: True, SPARE_START_S) is None:
        run._note(f"node {spare} did not answer within {SPARE_START_S:.0f} s of its start")
    learner = run.rng.random() < 0.5
    for _ in range(5):  # under faults the change may time out: an operator tries again
        outcome = run.admin(lambda c: c.add_member(spare, run.cluster.address(spare),
                                                   learner=learner))
        if outcome == "done":
            break

    def heal():
        for link in cut:
            run.net.faults[link].blocked = False
        if run.wait_for_status(spare, lambda s: s.leader, SPARE_FOLLOW_S) is not None:
            run.joins_followed += 1
        else:  # the other faults may leave no leader; the run's checks count the joins
            run._note(f"node {spare} followed no leader within {SPARE_FOLLOW_S:.0f} s")
        for _ in range(10):  # under faults the removal may time out: it must happen
            if run.admin(lambda c: c.remove_member(spare)) == "done":
                run.retire(spare)
                return
        raise RuntimeError(f"could not remove node {spare}; it stays a member")

    kind = "learner" if learner else "voter"
    where = f", {len(cut)} links of a member cut" if cut else ""
    return Fault("member-join", f"join node {spare} at {run.cluster.address(spare)} as a "
                                f"{kind}{where}: {outcome}", heal)


def _perform(c, kind: Kind, key: str, value, expected, read: str):
    if kind is Kind.READ:
        return c.get_with_version(key, read)
    if kind is Kind.WRITE:
        return c.set(key, value)
    if kind is Kind.CAS:
        return c.cas_with_version(key, expected, value)
    if kind is Kind.INCR:
        return c.incr(key, value)
    return c.delete(key)


# Per backend, the key prefixes the workload spreads its keys over (key n takes prefix
# n mod len), each with whether its route is "linearizable or miss" (Memcached); the
# prefix "" comes last, as it matches every key.
KEY_ROUTES: dict[str, tuple[tuple[str, bool], ...]] = {
    "memory": (("", False),),
    "redis": (("", False),),
    "memcached": (("", True),),
    "hybrid": (("session:", True), ("config:", False), ("", False)),
}


# The backends the workload knows the routes of (`--backend`).
BACKENDS = tuple(KEY_ROUTES)


def may_miss(backend: str, key) -> bool:
    """Whether `key`'s route may read a value it lost as not found (memcached)."""
    return next(miss for prefix, miss in KEY_ROUTES[backend] if key.startswith(prefix))


# -- the runner ---------------------------------------------------------------------------------------


@attrs.define
class Options:
    time: float = 60.0
    seed: int = 0
    nodes: int = 5
    nemesis: tuple = ("all",)
    transport: str = "thrift"
    storage: str = "file-wal"
    backend: str = "memory"  # or redis, memcached, hybrid
    read: str = "linearizable"  # or "lease"
    clients: int = 10
    keys: int = 5  # keys in play at once
    ops_per_key: int = 150  # then the key retires for a fresh one (keeps the search small)
    counters: int = 3  # counter keys (incr), in play all along: their check is linear
    counter_share: float = 0.2  # of the operations, on counters
    op_timeout: float = 1.5
    rate: float = 0.0  # cap on operations per second over all clients (0: as fast as they go)
    quiet: tuple = (0.5, 2.0)  # seconds between faults
    hold: tuple = (1.0, 4.0)  # seconds a fault lasts
    compose: float = 0.3  # chance that a second fault joins the first
    settings: tuple = ()  # "section.key=value" config overrides
    mutant: str = ""
    auth: bool = False  # tokens required: the workload's grants rw, the nemesis' admin
    encryption: bool = True  # values sealed at rest (a keyring in the cluster's dir)
    dir: str | None = None  # keep everything here (default: a temp dir, kept on anomalies)
    history: str | None = None  # where to write the history (default: dir/history.jsonl)


def _seconds_range(text: str) -> tuple[float, float]:
    """"MIN,MAX" or "SECONDS" (both ends) as a (min, max) pair of seconds."""
    low, _, high = text.partition(",")
    pair = (float(low), float(high or low))
    if not 0 <= pair[0] <= pair[1]:
        raise ValueError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return pair


def _parse_setting(text: str) -> tuple[str, str, object]:
    import tomllib

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"settings look like section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


class Run:
    """One run: cluster, relays, workload, nemeses, final checks. See the module doc."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.nodes = opts.nodes
        # The seed names the fault schedule: the nemeses draw from their own generator, not
        # from one the workload and the relays also draw from as fast as they happen to run.
        self.rng = random.Random(opts.seed)
        self.key_rng = random.Random(f"keys {opts.seed}")
        self.names = expand_nemeses(opts.nemesis, opts.backend)
        self.history = History()
        self.anomalies: list[Anomaly] = []
        self.faults = Counter()
        self.fault_log: list[str] = []
        self.nemesis_errors = 0
        self.refused_admin = 0  # nemesis calls the cluster refused as Unauthorized
        self.down: set[int] = set()
        self.paused: set[int] = set()
        self.exits_seen: set[tuple[int, int]] = set()
        self.terms_with_leader: set[int] = set()
        self.keys_used: list[str] = []  # register keys
        self.counters = [self.key_name("c", i) for i in range(opts.counters)]
        self.stopping = False
        self._next_op = 0.0
        self._status_client = None
        self.tokens: dict = {}  # with --auth: "workload" (rw on every key) and "admin"
        self.verbose = False
        self.t0 = time.monotonic()
        self.cluster = None
        self.net = None
        # member-join: one more node id, at an address no config lists, joining and leaving
        self.spare = self.nodes + 1 if "member-join" in self.names else None
        self.joined: set[int] = set()  # the spare while it is a member
        self.joins_followed = 0  # joins whose spare followed a leader before it left

    # -- set-up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        from raftcache.cluster import LocalCluster, dev_backend, free_port_block
        from raftcache.pluginapi.manager import PluginSet, make_manager

        o = self.opts
        self.tmp = o.dir is None
        self.dir = o.dir or tempfile.mkdtemp(prefix="raftcache-jepsen-")
        os.makedirs(self.dir, exist_ok=True)
        every = self.nodes + (1 if self.spare else 0)
        hosts = [f"127.0.0.{i + 1}" for i in range(1, every + 1)]
        extra: dict = {
            "raft": {"snapshot_entries": 2000, "snapshot_keep_entries": 200},
            "node": {"proxy": True, "request_timeout_ms": int(o.op_timeout * 1000)},
        }
        if o.read == "lease":
            extra["raft"]["read_only"] = "lease"
        # The backend's dev options (hybrid: examples/hybrid/hybrid.toml's routes, whose
        # prefixes KEY_ROUTES spreads keys over); settings may change them.
        extra["backend"] = dev_backend(o.backend, PluginSet(make_manager()))
        for text in o.settings:
            section, key, value = _parse_setting(text)
            extra.setdefault(section, {})[key] = value
        storage = o.storage
        if "slow-disk" in self.names and o.storage != "memory":
            # The same storage, behind the wrapper that lets the nemesis stall its fsyncs.
            options = extra.setdefault("storage", {}).setdefault("options", {})
            options["inner"], storage = o.storage, "slow-disk"
        port = free_port_block(every)
        # Nodes run through the test-side launcher: the slow-disk storage and mutants are test
        # code that no production node can load.
        launcher = ["-m", "raftcache.testing.node", "--plugin", "raftcache.testing.slow_disk"]
        if o.mutant:
            launcher += ["--mutant", o.mutant]
        self.cluster = LocalCluster(self.dir, nodes=self.nodes, port=port, storage=storage,
                                    transport=o.transport, backend=o.backend, hosts=hosts,
                                    extra=extra, launcher=launcher, auth=o.auth,
                                    encryption=o.encryption)
        self.net = relay.RelayNet({i: self.cluster.address(i) for i in range(1, every + 1)},
                                  random.Random(f"relays {o.seed}"))
        self.cluster.routes = self.net.routes()
        self.cluster.start()
        self.cluster.wait_for_leader(timeout=30)
        if o.auth:
            from raftcache.plugins.security import tokens

            key = tokens.load_private_key(self.cluster.auth_files()["signing.key"])
            # Valid for the run (and an hour): a cluster time a year ahead expires it.
            self.tokens = {"workload": tokens.issue(key, "jepsen", {"": "rw"},
                                                    ttl=o.time + 3600),
                           "admin": self.cluster.admin_token()}

    def key_name(self, stem: str, n: int) -> str:
        """Key n of the register ("k") or counter ("c") keys, on its route's prefix."""
        routes = KEY_ROUTES[self.opts.backend]
        return f"{routes[n % len(routes)][0]}{stem}{n}"

    def may_miss(self, key) -> bool:
        return may_miss(self.opts.backend, key)

    def node_ids(self) -> list[int]:
        """The founders: the nodes every check expects to be voters in the end."""
        return list(range(1, self.nodes + 1))

    def members(self) -> list[int]:
        """The founders and the spare while it has joined: what partitions cut."""
        return self.node_ids() + sorted(self.joined)

    def retire(self, n: int) -> None:
        """Stop node `n` for good and wipe its data (it was removed: a new start is new)."""
        p = self.cluster.processes.get(n)
        if p is not None:
            self.exits_seen.add((n, p.pid))  # killed on purpose, not a crash
        self.cluster.kill(n)
        shutil.rmtree(os.path.join(self.dir, f"node{n}"), ignore_errors=True)
        self.joined.discard(n)

    def live(self) -> list[int]:
        return [n for n in self.node_ids() if n not in self.down] or self.node_ids()

    def client(self, endpoints=None, timeout: float | None = None, admin: bool = False):
        """A client of the cluster; with --auth it carries the workload's token (reads and
        writes on every key), or the admin token (the nemesis' membership changes)."""
        from raftcache.client import Client
        from raftcache.pluginapi import TLSConfig

        tls = self.cluster.tls_files()
        return Client(endpoints or self.cluster.endpoints(), timeout=timeout or self.opts.op_timeout,
                      transport=self.opts.transport, tls=TLSConfig(**tls) if tls else None,
                      token=self.tokens.get("admin" if admin else "workload"))

    # -- process control (the nemeses' hands) -------------------------------------------------------
    def kill(self, n: int) -> None:
        self.down.add(n)
        self.cluster.kill(n)

    def restart(self, n: int) -> None:
        if n in self.down:
            self.cluster.start(n)
            self.down.discard(n)
            self.paused.discard(n)

    def pause(self, n: int) -> None:
        self.paused.add(n)
        self.cluster.pause(n)

    def resume(self, n: int) -> None:
        self.paused.discard(n)
        self.cluster.resume(n)

    def statuses(self) -> dict:
        """node id -> NodeStatus of every node that answers (killed and paused ones are not
        asked)."""
        if self._status_client is None:
            self._status_client = self.client(timeout=0.5)
        out = {}
        for n in self.node_ids():
            if n in self.down or n in self.paused:
                continue
            try:
                out[n] = self._status_client.status(self.cluster.address(n))
            except Exception:
                pass
        return out

    def wait_for_status(self, n: int, ok, seconds: float):
        """Node `n`'s status once `ok(status)` holds (asked every 0.1 s), or None when it
        does not within `seconds` (the spare too, which `statuses` leaves out)."""
        import gevent

        if self._status_client is None:
            self._status_client = self.client(timeout=0.5)
        deadline = time.monotonic() + seconds
        while True:
            try:
                status = self._status_client.status(self.cluster.address(n))
                if ok(status):
                    return status
            except Exception:
                pass
            if time.monotonic() >= deadline:
                return None
            gevent.sleep(0.1)

    def leader_status(self):
        """(id, status) of the leader with the highest term among the nodes that answer."""
        leaders = [(s.term, n, s) for n, s in self.statuses().items() if s.role == "leader"]
        return max(leaders, key=lambda x: x[:2])[1:] if leaders else None

    def leader(self) -> int | None:
        found = self.leader_status()
        return found[0] if found else None

    def leader_or_any(self) -> int:
        leader = self.leader()
        return leader if leader is not None else self.rng.choice(self.live())


    def admin(self, action) -> str:
        try:
            with self.client(timeout=3.0, admin=True) as c:
                action(c)
            return "done"
        except Exception as exc:  # under faults a membership change may time out: counted
            from raftcache import errors

            self.nemesis_errors += 1
            self.refused_admin += isinstance(exc, errors.Unauthorized)
            return f"{type(exc).__name__}: {exc}"

    # -- workload -----------------------------------------------------------------------------------
    def _pace(self) -> None:
        if not self.opts.rate:
            return
        import gevent

        # One shared schedule: operation i may start at t0 + i / rate.
        now = time.monotonic()
        self._next_op = max(self._next_op, now) + 1.0 / self.opts.rate
        if self._next_op - now > 1.0 / self.opts.rate:
            gevent.sleep(self._next_op - now - 1.0 / self.opts.rate)

    def _pick_key(self, active: list, counts: Counter) -> str:
        slot = self.key_rng.randrange(len(active))
        key = active[slot]
        counts[key] += 1
        if counts[key] >= self.opts.ops_per_key:
            fresh = self.key_name("k", len(self.keys_used))
            self.keys_used.append(fresh)
            active[slot] = fresh
        return key

    def _worker(self, w: int, active: list, counts: Counter) -> None:
        from raftcache import errors

        o = self.opts
        rng = random.Random(o.seed * 1000 + w)
        # Half the clients stick to one node: they exercise follower reads and proxying.
        endpoints = None if w % 2 == 0 else [self.cluster.address(w // 2 % self.nodes + 1)]
        process = w
        seen: dict[str, int] = {}  # key -> latest version this worker saw
        counter = 0
        with self.client(endpoints) as c:
            while not self.stopping:
                counter += 1
                value, expected = f"{w}.{counter}", None
                if self.counters and rng.random() < o.counter_share:
                    key = rng.choice(self.counters)
                    kind, value = ((Kind.READ, None) if rng.random() < 0.5
                                   else (Kind.INCR, rng.randint(1, 5)))
                else:
                    key = self._pick_key(active, counts)
                    roll = rng.random()
                    if roll < 0.45:
                        kind, value = Kind.READ, None
                    elif roll < 0.75:
                        kind = Kind.WRITE
                    elif roll < 0.9:
                        kind, expected = Kind.CAS, seen.get(key) or 1
                    else:
                        kind, value = Kind.DELETE, None
                self._pace()
                op = self.history.invoke(process, kind, key, value, expected)
                try:
                    result = _perform(c, kind, key, value, expected, o.read)
                except errors.Unavailable:
                    self.history.fail(op)  # surely not applied / the read was not served
                    continue
                except (errors.OutcomeUnknown, OSError, TimeoutError):
                    if kind is Kind.READ:
                        self.history.fail(op)
                        continue
                    self.history.info(op)
                    process += o.clients  # the op may still be pending: a new process
                    continue
                except errors.RaftCacheError as exc:
                    self.history.info(op)
                    process += o.clients
                    self.anomalies.append(Anomaly("unexpected-error", key, f"{kind}: {exc!r}"))
                    continue
                if kind is Kind.READ:
                    result = self._read_result(key, result)
                    if result is not None:
                        seen[key] = result[1]
                elif kind is Kind.WRITE:
                    seen[key] = result
                elif kind is Kind.CAS and result[0]:
                    seen[key] = result[1]
                self.history.ok(op, result)

    def _read_result(self, key: str, found) -> tuple | None:
        """A get's answer as the history records it: (text, version); a counter's value as
        an int when it is one (the counter check reports anything else)."""
        if found is None:
            return None
        text = found[0].decode(errors="replace")
        if key in self.counters:
            try:
                return int(text), found[1]
            except ValueError:
                pass
        return text, found[1]

    # -- nemesis schedule ---------------------------------------------------------------------------
    def _nemesis_loop(self, names: list[str], until: float) -> None:
        import gevent

        o = self.opts
        while names and time.monotonic() < until:
            gevent.sleep(min(self.rng.uniform(*o.quiet), max(0.0, until - time.monotonic())))
            if time.monotonic() >= until:
                break
            picks = [self.rng.choice(names)]
            if self.rng.random() < o.compose:
                picks.append(self.rng.choice(names))
            active = []
            for name in picks:
                try:
                    fault = NEMESES[name](self)
                except Exception as exc:
                    self.nemesis_errors += 1
                    self._note(f"{name}: could not start: {exc!r}")
                    continue
                self.faults[name] += 1
                active.append(fault)
                self._note(f"start {fault.name}: {fault.detail}")
            gevent.sleep(min(self.rng.uniform(*o.hold), max(0.0, until - time.monotonic())))
            for fault in reversed(active):
                try:
                    fault.heal()
                except Exception as exc:
                    self.nemesis_errors += 1
                    self._note(f"{fault.name}: heal failed: {exc!r}")
                self._note(f"heal {fault.name}")

    def _note(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:8.3f} {text}"
        self.fault_log.append(line)
        if self.verbose:
            print(line, flush=True)

    def _monitor(self) -> None:
        import gevent

        while not self.stopping:
            self._check_processes()
            for s in self.statuses().values():
                if s.role == "leader":
                    self.terms_with_leader.add(s.term)
            gevent.sleep(0.25)

    def _check_processes(self) -> None:
        for n, p in self.cluster.processes.items():
            code = p.poll()
            if code is None or n in self.down or (n, p.pid) in self.exits_seen:
                continue
            self.exits_seen.add((n, p.pid))
            self.anomalies.append(Anomaly(
                "node-crashed", None, f"node {n} exited with code {code} without being killed; "
                                      f"log tail:\n{self._log_tail(n)}"))

    def _log_tail(self, n: int, lines: int = 8) -> str:
        try:
            with open(self.cluster.log_path(n), errors="replace") as f:
                return "".join("    " + x for x in f.readlines()[-lines:])
        except OSError:
            return "    (no log)"

    # -- healing and the final checks ---------------------------------------------------------------
    def heal_all(self) -> None:
        self.net.heal()
        for n in list(self.paused):
            self.resume(n)
        for n in list(self.down):
            self.restart(n)
        for n in self.node_ids():
            for name, server in self.cluster.servers.get(n, {}).items():
                if not server.running():
                    self.cluster.restart_server(n, name)

    def _until(self, seconds: float, what: str, attempt) -> object:
        """Retry `attempt` until it returns non-None; an anomaly when `seconds` pass."""
        import gevent

        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            try:
                result = attempt()
                if result is not None:
                    return result
            except Exception as exc:
                last = exc
            gevent.sleep(0.2)
        self.anomalies.append(Anomaly("no-progress", None, f"{what} within {seconds:.0f} s "
                                                           f"after healing (last: {last!r})"))
        return None

    def _restore_membership(self):
        found = self.leader_status()
        if found is None:
            return None
        missing = [n for n in self.node_ids() if n not in found[1].voters]
        extra = [n for n in (*found[1].voters, *found[1].learners) if n not in self.node_ids()]
        if not missing and not extra:
            return True
        with self.client(timeout=3.0, admin=True) as c:
            for n in missing:
                c.add_member(n)
            for n in extra:  # a spare whose removal did not go through under the faults
                c.remove_member(n)
                self.retire(n)
        return None

    def final_checks(self) -> dict:
        from raftcache.testing.linearizability import check, format_anomaly

        self._check_processes()
        self._until(30, "a leader", self.leader)
        self._until(30, "every node a voter again", self._restore_membership)
        with self.client(timeout=5.0) as c:
            sentinel = self._until(20, "an acknowledged write", lambda: c.set("jepsen-sentinel", "1"))
        # Final reads, recorded like any other read (so the linearizability check sees them).
        final: dict = {}
        process = "final"
        with self.client(timeout=5.0) as c:
            for key in self.keys_used + self.counters:
                for _ in range(10):
                    op = self.history.invoke(process, Kind.READ, key)
                    try:
                        found = c.get_with_version(key)
                    except Exception:
                        self.history.fail(op)
                        continue
                    found = self._read_result(key, found)
                    self.history.ok(op, found)
                    final[key] = found
                    break
                else:
                    self.anomalies.append(Anomaly("no-progress", key, "final read failed 10 "
                                                                      "times after healing"))
        self._check_replicas(sentinel)
        self._check_processes()
        ops, misses = drop_misses(self.history.operations(), self.may_miss)
        counters = set(self.counters)
        result = check([op for op in ops if op.key not in counters])
        for a in result.anomalies:
            self.anomalies.append(Anomaly(a.kind, a.key, format_anomaly(a)))
        registers_final = {k: v for k, v in final.items()
                           if k not in counters and not (v is None and self.may_miss(k))}
        self.anomalies.extend(lost_writes(ops, registers_final))
        counter_ops = [op for op in ops if op.key in counters and op.status is not Status.FAIL
                       and (op.kind is Kind.INCR or op.status is Status.OK)]
        self.anomalies.extend(counter_anomalies(counter_ops))
        return {"keys": result.keys_checked + len(counters),
                "checked": result.operations_checked + len(counter_ops), "misses": misses}

    def _check_replicas(self, sentinel) -> None:
        if sentinel is None:
            return

        def caught_up():
            statuses = self.statuses()
            if len(statuses) == self.nodes and all(s.applied >= sentinel
                                                   for s in statuses.values()):
                return True
            return None

        if self._until(20, "every node applying the final write", caught_up) is None:
            return
        keys = self.keys_used + self.counters
        views = {}
        for n in self.node_ids():
            with self.client([self.cluster.address(n)], timeout=5.0) as c:
                # A node whose backend lost its data answers Unavailable until it rebuilt it.
                view = self._until(20, f"node {n} serving reads", lambda c=c: [
                    value for i in range(0, len(keys), 500)  # max_batch_keys
                    for value in c.mget(keys[i:i + 500], consistency="stale")])
            if view is not None:
                views[n] = view
        # A node may miss a value its memcached lost; the values nodes do hold must agree.
        differ = []
        for i, key in enumerate(keys):
            held = {n: view[i] for n, view in sorted(views.items())
                    if view[i] is not None or not self.may_miss(key)}
            if len(set(held.values())) > 1:
                differ.append((key, held))
        if differ:
            key, held = differ[0]
            self.anomalies.append(Anomaly(
                "replicas-diverge", key, f"the nodes disagree on {len(differ)} keys, e.g. "
                                         f"{key!r} (node: value): {held}"))

    # -- the whole run ------------------------------------------------------------------------------
    def run(self, verbose: bool = False) -> dict:
        import gevent

        self.verbose = verbose
        o = self.opts
        names = self.names
        self.t0 = time.monotonic()
        started = time.monotonic()
        try:
            self.start()
            active = [self.key_name("k", i) for i in range(o.keys)]
            self.keys_used = list(active)
            counts: Counter = Counter()
            until = time.monotonic() + o.time
            monitor = gevent.spawn(self._monitor)
            workers = [gevent.spawn(self._worker, w, active, counts) for w in range(o.clients)]
            self._nemesis_loop(names, until)
            gevent.sleep(max(0.0, until - time.monotonic()))
            self.stopping = True
            gevent.joinall(workers, timeout=o.op_timeout * 4 + 5)
            gevent.killall(workers, timeout=1)
            monitor.kill()
            self._note("healing")
            self.heal_all()
            self.stopping = False
            checked = self.final_checks()
        finally:
            self.stopping = True
            if self._status_client is not None:
                self._status_client.close()
            if self.cluster is not None:
                self.cluster.stop()
            if self.net is not None:
                self.net.close()
        history_path = o.history or os.path.join(self.dir, "history.jsonl")
        self.history.dump(history_path)
        ops = self.history.operations()
        summary = {
            "seed": o.seed, "seconds": round(time.monotonic() - started, 1), "nodes": o.nodes,
            "transport": o.transport, "storage": o.storage, "backend": o.backend,
            "read": o.read, "nemesis": names, "mutant": o.mutant, "auth": o.auth,
            "encryption": o.encryption,
            "ops": {s: sum(1 for op in ops if op.status is Status(s))
                    for s in ("ok", "fail", "info")},
            "by_kind": {str(k): Counter(str(op.status) for op in ops if op.kind is k)
                        for k in Kind},
            "latency_ms": {str(k): percentiles([op.complete_time - op.invoke_time for op in ops
                                                if op.kind is k and op.status is Status.OK
                                                and op.process != "final"])
                           for k in Kind},
            "faults": dict(self.faults), "nemesis_errors": self.nemesis_errors,
            "refused_admin": self.refused_admin, "joins_followed": self.joins_followed,
            "elections": len(self.terms_with_leader),
            "anomalies": [attrs.asdict(a) | {"key": repr(a.key)} for a in self.anomalies],
            "history": history_path, "dir": self.dir, **checked,
        }
        if self.tmp and not self.anomalies:
            shutil.rmtree(self.dir, ignore_errors=True)
            summary["history"] = None
        return summary


def percentiles(seconds: list[float]) -> dict:
    """{"p50": ms, "p99": ms} of latencies in seconds (sorts them in place)."""
    if not seconds:
        return {"p50": 0.0, "p99": 0.0}
    seconds.sort()
    return {q: round(seconds[min(len(seconds) - 1, int(len(seconds) * f))] * 1000, 2)
            for q, f in (("p50", 0.5), ("p99", 0.99))}


def format_summary(s: dict) -> str:
    lines = [f"raftcache jepsen: seed {s['seed']}, {s['seconds']} s, {s['nodes']} nodes, "
             f"{s['transport']}, {s['storage']}, {s['backend']} backend, reads {s['read']}"
             + (", auth required" if s.get("auth") else "")
             + (", values encrypted" if s.get("encryption") else "")
             + (f", MUTANT {s['mutant']}" if s["mutant"] else "")]
    lines.append("")
    lines.append(f"  {'operation':<10}{'ok':>8}{'fail':>8}{'info':>8}"
                 f"{'ok p50 ms':>11}{'ok p99 ms':>11}")
    for kind, c in s["by_kind"].items():
        lat = s["latency_ms"][kind]
        lines.append(f"  {kind:<10}{c.get('ok', 0):>8}{c.get('fail', 0):>8}{c.get('info', 0):>8}"
                     f"{lat['p50']:>11.2f}{lat['p99']:>11.2f}")
    o = s["ops"]
    lines.append(f"  {'total':<10}{o['ok']:>8}{o['fail']:>8}{o['info']:>8}")
    lines.append("")
    faults = ", ".join(f"{k} {v}" for k, v in sorted(s["faults"].items())) or "none"
    lines.append(f"  faults injected: {faults} ({s['nemesis_errors']} nemesis calls failed)")
    if s["faults"].get("member-join"):
        lines.append(f"  joins: {s['joins_followed']} of {s['faults']['member-join']} spares "
                     "followed a leader before they left")
    lines.append(f"  elections (terms that had a leader): {s['elections']}")
    lines.append(f"  checked: {s.get('checked', 0)} operations on {s.get('keys', 0)} keys")
    if s.get("misses"):
        lines.append(f"  reads that found nothing on memcached routes (allowed, left out): "
                     f"{s['misses']}")
    lines.append(f"  anomalies: {len(s['anomalies'])}")
    for a in s["anomalies"]:
        lines.append(f"  - {a['kind']}: {a['message']}")
    if s["history"]:
        lines.append(f"  history: {s['history']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raftcache.testing.jepsen",
                                description="Run a fault-injection test against a local cluster.")
    p.add_argument("--time", type=float, default=60.0, help="seconds of workload under faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--nemesis", action="append", default=None,
                   help="nemesis names or families, comma separated (default: all): "
                        + ", ".join(list(FAMILIES) + ["all", "none"]))
    p.add_argument("--scenario", choices=sorted(SCENARIOS),
                   help="the nemeses, read level and settings of one anomaly scenario")
    p.add_argument("--transport", default="thrift")
    p.add_argument("--storage", default="file-wal")
    p.add_argument("--backend", choices=BACKENDS, default="memory",
                   help="where nodes keep values; hybrid spreads keys over memcached, redis "
                        "and memory routes")
    p.add_argument("--read", choices=("linearizable", "lease"), default=None)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--keys", type=int, default=5)
    p.add_argument("--ops-per-key", type=int, default=150)
    p.add_argument("--counters", type=int, default=3, help="counter keys (incr)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="cap on operations per second (default: as fast as the clients go); "
                        "long runs keep their history small with it")
    p.add_argument("--hold", type=_seconds_range, default=attrs.fields(Options).hold.default,
                   metavar="MIN[,MAX]",
                   help="seconds each fault lasts, drawn from MIN..MAX (default: 1,4)")
    p.add_argument("--set", dest="settings", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a node setting, e.g. "
                                                     "raft.check_quorum=false")
    p.add_argument("--auth", action="store_true",
                   help="require signed tokens (the workload's grant rw on every key; the "
                        "nemesis uses the admin token)")
    p.add_argument("--no-encryption", dest="encryption", action="store_false",
                   help="store values as written (default: sealed with the cluster's keyring)")
    p.add_argument("--mutant", default="", help="TEST-ONLY: run a deliberately broken core")
    p.add_argument("--dir", help="keep the cluster's files and the history here")
    p.add_argument("--json", help="also write the summary as JSON to this file")
    p.add_argument("--list", action="store_true", help="list the nemeses and scenarios")
    p.add_argument("-v", "--verbose", action="store_true", help="print each fault as it happens")
    a = p.parse_args(argv)
    if a.list:
        for family, names in FAMILIES.items():
            print(f"{family}: {', '.join(names)}")
        for name, sc in SCENARIOS.items():
            print(f"scenario {name}: {sc.anomaly}\n    nemeses {', '.join(sc.nemesis)}; "
                  f"caught by {sc.catches}")
        return 0
    nemeses, read, settings = a.nemesis or ["all"], a.read or "linearizable", list(a.settings)
    if a.scenario:
        sc = SCENARIOS[a.scenario]
        nemeses = a.nemesis or list(sc.nemesis)
        read = a.read or sc.read
        settings = list(sc.settings) + settings
        a.auth = a.auth or sc.auth
    if not 1 <= a.nodes <= 15:
        p.error("--nodes must be 1..15 (node i lives on 127.0.0.<i+1>, which the generated "
                "certificates name up to 127.0.0.16)")
    try:
        expand_nemeses(nemeses, a.backend)
        for text in settings:
            _parse_setting(text)
    except ValueError as exc:
        p.error(str(exc))
    opts = Options(time=a.time, seed=a.seed, nodes=a.nodes, nemesis=tuple(nemeses),
                   transport=a.transport, storage=a.storage, backend=a.backend, read=read,
                   clients=a.clients, keys=a.keys, ops_per_key=a.ops_per_key,
                   counters=a.counters, rate=a.rate, hold=a.hold, settings=tuple(settings),
                   mutant=a.mutant, auth=a.auth, encryption=a.encryption, dir=a.dir)
    summary = Run(opts).run(verbose=a.verbose)
    print(format_summary(summary), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 1 if summary["anomalies"] else 0


if __name__ == "__main__":
    sys.exit(main())
