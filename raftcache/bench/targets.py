"""The targets of `raftcache bench` and the processes that load them.

Contract: a `Target` is where load goes (a raftcache cluster, a redis-server, a memcached, a
PySyncObj cluster); `Target.run(step, seed)` runs one repetition of a step on it and returns the
raw results of its client processes (`raftcache.bench.worker`), one dict per process, which
`raftcache.bench.results.merge_rep` merges. Client processes (`Pool`) stay up for the whole run;
a step starts `START_DELAY` seconds after its command so that every process starts together.
Steps of another cluster shape run on a cluster the target starts for it (`Target.on`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import attrs

from raftcache.bench.scenarios import Options, Shape, Step

KEY_SPACE_BYTES = 64 << 20  # keys x value size at most (at least 16 keys)
START_DELAY = 1.0  # s: every process of a step gets its command and warms up before the clock


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


def _send(process, message: dict) -> None:
    """One line of JSON to a worker or PySyncObj node, flushed: it waits for it."""
    process.stdin.write(json.dumps(message) + "\n")
    process.stdin.flush()


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
            _send(p, setup)
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
            _send(p, cmd)
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
            _send(p, cmd)
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


def describe(cluster) -> str:
    """A LocalCluster's settings in a few words."""
    return (f"{cluster.nodes} nodes, {cluster.plugin('storage')} storage, "
            f"{cluster.plugin('transport')}, {cluster.plugin('backend')} backend, "
            f"auth {'on' if cluster.auth else 'off'}, encryption "
            f"{'on' if cluster.encryption else 'off'}")
