"""A local cluster of node processes: what `raftcache up` runs, and what tests and the fault
suite start, kill, pause and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import attrs

from raftcache.core.config import write_secret
from raftcache.servers import RedisServer, die_with_parent, free_port, free_ports


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A base port with n consecutive free ports after it (below the ephemeral range, so no
    outgoing connection can take one before the nodes bind them)."""
    return free_ports(n, host)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict) -> str:
    """A minimal TOML writer for our config (tables of scalars, arrays and inline tables)."""
    lines = []
    for section, body in data.items():
        scalars = {k: v for k, v in body.items() if not (isinstance(v, dict) and k == "tls")}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
        if "tls" in body and isinstance(body["tls"], dict):
            lines.append(f"[{section}.tls]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body["tls"].items()]
        lines.append("")
    return "\n".join(lines)


@attrs.define
class LocalCluster:
    """Node i listens on host:port+i-1 and keeps its files under data_dir/node<i>."""

    data_dir: str
    nodes: int = 3
    host: str = "127.0.0.1"
    port: int = 7400
    storage: str = "memory"
    transport: str = "thrift"
    backend: str = "memory"
    extra: dict = attrs.Factory(dict)  # extra config sections shared by every node
    # Peers without proof of membership (no secret, no node certificates): must be asked for.
    insecure: bool = False
    # How a node process starts, before `--config PATH` (the fault suite runs its test-only
    # plugins and mutants through raftcache.testing.node instead).
    launcher: list = attrs.Factory(lambda: ["-m", "raftcache", "serve"])
    hosts: list | None = None  # per-node host (distinct 127.0.0.x "hosts"); overrides host
    # (from node, to node) -> the address `from` dials to reach `to` (a fault relay); clients
    # still reach every node at its own address.
    routes: dict = attrs.Factory(dict)
    processes: dict = attrs.Factory(dict)
    # redis-aof storage without a configured url: one redis-server per node, started and
    # stopped with it (node id -> raftcache.servers.RedisServer).
    redis: dict = attrs.Factory(dict)

    def address(self, node_id: int) -> str:
        host = self.hosts[node_id - 1] if self.hosts else self.host
        return f"{host}:{self.port + node_id - 1}"

    def endpoints(self) -> list[str]:
        return [self.address(i) for i in range(1, self.nodes + 1)]

    def config_path(self, node_id: int) -> str:
        return os.path.join(self.data_dir, f"node{node_id}.toml")

    def log_path(self, node_id: int) -> str:
        return os.path.join(self.data_dir, f"node{node_id}.log")

    def tls_files(self) -> dict | None:
        if self.transport != "tcp-tls" and "tls" not in self.extra.get("transport", {}):
            return None
        certs = os.path.join(self.data_dir, "certs")
        if not os.path.exists(os.path.join(certs, "ca.pem")):
            from raftcache.certs import init_certs

            init_certs(certs, nodes=self.nodes)
        return {"ca": os.path.join(certs, "ca.pem"), "cert": os.path.join(certs, "client.pem"),
                "key": os.path.join(certs, "client-key.pem")}

    def secret_path(self) -> str | None:
        """The cluster secret peers prove they hold, on a plaintext transport (made at the
        first start, kept after); None when node certificates or --insecure stand instead."""
        if self.insecure or self.tls_files():
            return None
        path = os.path.join(self.data_dir, "cluster.secret")
        write_secret(path)
        return path

    def owns_redis(self) -> bool:
        options = self.extra.get("storage", {}).get("options", {})
        # `slow-disk` (fault suite) wraps another storage: options.inner
        return "redis-aof" in (self.storage, options.get("inner")) and not options.get("url")

    def _redis_for(self, node_id: int):
        if node_id not in self.redis:
            # Its port is fixed now, written into the node's config, and kept across restarts.
            self.redis[node_id] = RedisServer(
                os.path.join(self.data_dir, f"node{node_id}", "redis"), port=free_port(self.host),
                host=self.host)
        return self.redis[node_id]

    def write_configs(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        tls = self.tls_files()
        secret = self.secret_path()
        for i in range(1, self.nodes + 1):
            peers = {str(j): self.routes.get((i, j), self.address(j))
                     for j in range(1, self.nodes + 1)}
            cluster = {"peers": peers}
            if secret:
                cluster["secret_file"] = secret
            elif self.insecure:
                cluster["insecure"] = True
            if self.routes:
                cluster["client_addresses"] = {str(j): self.address(j)
                                               for j in range(1, self.nodes + 1)}
            transport = {"plugin": self.transport}
            if tls:
                certs = os.path.dirname(tls["ca"])
                transport["tls"] = {"ca": tls["ca"], "cert": os.path.join(certs, f"node{i}.pem"),
                                    "key": os.path.join(certs, f"node{i}-key.pem")}
            data = {
                "node": {"id": i, "address": self.address(i),
                         "data_dir": os.path.join(self.data_dir, f"node{i}")},
                "cluster": cluster,
                "storage": {"plugin": self.storage},
                "transport": transport,
                "backend": {"plugin": self.backend},
            }
            for section, body in self.extra.items():
                data.setdefault(section, {}).update(body)
            if self.owns_redis():
                options = dict(data["storage"].get("options", {}))
                options["url"] = self._redis_for(i).url
                data["storage"]["options"] = options
            with open(self.config_path(i), "w") as f:
                f.write(to_toml(data))

    def start(self, node_id: int | None = None) -> None:
        """Start one node, or every node (writing their configs first)."""
        if node_id is None:
            self.write_configs()
            for i in range(1, self.nodes + 1):
                self.start(i)
            return
        if node_id in self.redis:
            self.redis[node_id].start()  # no-op when it runs; the node needs it to load
        log = open(self.log_path(node_id), "ab")
        self.processes[node_id] = subprocess.Popen(
            [sys.executable, *self.launcher, "--config", self.config_path(node_id)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # Nodes die with `up` even when it is killed with -9 (PDEATHSIG follows the
            # forking thread, so only from the main thread).
            preexec_fn=die_with_parent
            if threading.current_thread() is threading.main_thread() else None,
        )
        log.close()

    def signal(self, node_id: int, sig: int) -> None:
        p = self.processes.get(node_id)
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)

    def kill(self, node_id: int) -> None:
        """kill -9: no goodbye, nothing flushed."""
        self.signal(node_id, signal.SIGKILL)
        p = self.processes.get(node_id)
        if p is not None:
            p.wait(10)

    def kill_redis(self, node_id: int) -> None:
        """kill -9 the node's redis-server (its AOF stays for restart_redis)."""
        self.redis[node_id].kill()

    def restart_redis(self, node_id: int) -> None:
        """Start the node's redis-server again on the same port and data (loads its AOF)."""
        self.redis[node_id].restart()

    def pause(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGSTOP)

    def resume(self, node_id: int) -> None:
        self.signal(node_id, signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> None:
        for i in list(self.processes):
            self.resume(i)
            self.signal(i, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            for p in self.processes.values():
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        finally:
            # After the nodes: a stopping node may still write its last hard state.
            for server in self.redis.values():
                server.stop()

    def client(self, **kwargs):
        from raftcache.client import Client

        tls = self.tls_files()
        if tls and "tls" not in kwargs:
            from raftcache.core.hookspecs import TLSConfig

            kwargs["tls"] = TLSConfig(**tls)
        kwargs.setdefault("transport", self.transport)
        return Client(self.endpoints(), **kwargs)

    def wait_for_leader(self, timeout: float = 20.0, exclude=()) -> int:
        """The id of a leader that every reachable node agrees on; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.client(timeout=1.0) as c:
            while time.monotonic() < deadline:
                leaders = set()
                for i in range(1, self.nodes + 1):
                    if i in exclude or self.processes.get(i) is None:
                        continue
                    if self.processes[i].poll() is not None:
                        continue
                    try:
                        leaders.add(c.status(self.address(i)).leader)
                    except Exception:
                        leaders.add(None)
                if len(leaders) == 1 and None not in leaders and 0 not in leaders:
                    (leader,) = leaders
                    if leader not in exclude:
                        return leader
                time.sleep(0.05)
        raise TimeoutError(f"no agreed leader within {timeout} s")


def run_local_cluster(args) -> int:
    """`raftcache up`: start the cluster, show it, keep it in the foreground until a signal."""
    import tomllib

    extra = {}
    if args.config:
        with open(args.config, "rb") as f:
            extra = {k: v for k, v in tomllib.load(f).items() if k not in ("node", "cluster")}
    cluster = LocalCluster(os.path.abspath(args.data_dir), nodes=args.nodes, host=args.host,
                           port=args.port, storage=args.storage, transport=args.transport,
                           backend=args.backend, extra=extra, insecure=args.insecure)
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
    except Exception as exc:  # e.g. redis-server missing: say so, leave nothing running
        cluster.stop()
        print(f"raftcache: {exc}", file=sys.stderr)
        return 1
    print(f"raftcache: {args.nodes} nodes ({args.storage} storage, {args.transport} transport, "
          f"{args.backend} backend), data and logs in {cluster.data_dir}")
    for i in range(1, args.nodes + 1):
        where = f", redis: {cluster.redis[i].url}" if i in cluster.redis else ""
        print(f"  node {i}: {cluster.address(i)}  (log: {cluster.log_path(i)}{where})")
    if args.insecure:
        print("WARNING: --insecure: the nodes accept Raft messages from anyone who can reach "
              "their ports", file=sys.stderr)
    elif cluster.tls_files():
        print(f"peers prove themselves with node certificates ({cluster.data_dir}/certs)")
    else:
        print(f"peers prove themselves with the cluster secret {cluster.secret_path()}")
    try:
        leader = cluster.wait_for_leader(timeout=30)
        print(f"leader: node {leader} at {cluster.address(leader)}")
        print("export RAFTCACHE_ENDPOINTS=" + ",".join(cluster.endpoints()))
        print("Ctrl-C stops the cluster.", flush=True)
    except TimeoutError:
        print("raftcache: no leader after 30 s; see the node logs", file=sys.stderr)
        stopping.append(signal.SIGTERM)
    reported = set()
    while not stopping:
        for i, p in cluster.processes.items():
            if i not in reported and p.poll() is not None:
                reported.add(i)
                print(f"raftcache: node {i} exited with code {p.returncode} (not restarted)",
                      flush=True)
        time.sleep(0.2)
    print("raftcache: stopping the cluster", flush=True)
    cluster.stop()
    return 0
