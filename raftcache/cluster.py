"""A local cluster of node processes: what `raftcache up` runs, and what tests and the fault
suite start, kill, pause and restart."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import threading
import time

import attrs

from raftcache.node.config import private_dir, write_secret
from raftcache.servers import MemcachedServer, RedisServer, die_with_parent, free_port, free_ports

# The hybrid backend as examples/hybrid/hybrid.toml configures it (sessions in memcached,
# configuration in redis, the rest in memory); LocalCluster starts a memcached and a
# redis-server per node for the instances. The fault suite and `raftcache bench` run it.
HYBRID_EXAMPLE = {
    "plugin": "hybrid",
    "options": {
        "default": "local",
        "routes": [{"match": "session:*", "to": "sessions"},
                   {"match": "config:*", "to": "config"}],
        "instances": {"sessions": {"plugin": "memcached"}, "config": {"plugin": "redis"},
                      "local": {"plugin": "memory"}},
    },
}


JOIN_HEADER = """\
# A new node of this cluster (written by `raftcache up`):
#
#   raftcache serve --config join.toml --id ID --address HOST:PORT --data-dir DIR
#   raftcache member add ID HOST:PORT [--learner]
#
# The node asks the members under cluster.join where everyone is, then waits to be added;
# the log carries its address to every node. A backend that needs a server of its own
# (redis, memcached) needs its address in [backend.options] first.

"""


def _write_private(path: str, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def free_port_block(n: int, host: str = "127.0.0.1") -> int:
    """A base port with n consecutive free ports after it (below the ephemeral range, so no
    outgoing connection can take one before the nodes bind them)."""
    return free_ports(n, host)


def _toml_key(k) -> str:
    k = str(k)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def _toml_value(v) -> str:
    """`v` written inline: arrays and tables inside arrays stay on one line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict) -> str:
    """A minimal TOML writer for our configs: a table inside a table becomes its own section
    ([backend.options.instances.sessions]); arrays, of tables too, are written inline."""
    lines = []

    def table(name: str, body: dict) -> None:
        pairs = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()
                 if not isinstance(v, dict)]
        if pairs or not body:  # a table of tables only needs no header of its own
            lines.extend([f"[{name}]", *pairs, ""])
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{_toml_key(k)}", v)

    for section, body in data.items():
        table(_toml_key(section), body)
    return "\n".join(lines)


# The option that tells a plugin where its server is, by the kind of server `up` starts.
_ADDRESS_OPTION = {"redis-aof": "url", "redis": "url", "memcached": "address"}


@attrs.frozen
class ServerNeed:
    """A server a node's config needs and does not name: `up` starts one per node."""

    name: str  # "storage", "backend", or "backend.<hybrid instance>"
    kind: str  # "redis-aof" (durable), "redis" (a cache: no persistence), "memcached"
    options: dict  # the plugin options that get its address (`_ADDRESS_OPTION[kind]`)


def server_needs(config: dict) -> list[ServerNeed]:
    """The servers a node's config (as written to its file) lacks: the redis-aof storage
    without a url, a redis or memcached backend without its url or address, and each hybrid
    backend instance of those plugins without one."""
    def options(section: dict) -> dict:
        return section.setdefault("options", {})

    def unnamed(name: str, kind: str, opts: dict) -> list[ServerNeed]:
        return [] if opts.get(_ADDRESS_OPTION[kind]) else [ServerNeed(name, kind, opts)]

    needs = []
    storage = config.get("storage", {})
    # `slow-disk` (fault suite) wraps another storage: options.inner
    if "redis-aof" in (storage.get("plugin"), storage.get("options", {}).get("inner")):
        needs += unnamed("storage", "redis-aof", options(storage))
    backend = config.get("backend", {})
    plugin = backend.get("plugin")
    if plugin in ("redis", "memcached"):
        needs += unnamed("backend", plugin, options(backend))
    if plugin == "hybrid":
        for instance, opts in options(backend).get("instances", {}).items():
            if opts.get("plugin") in ("redis", "memcached"):
                needs += unnamed(f"backend.{instance}", opts["plugin"], opts)
    return needs


def _make_server(kind: str, directory: str, host: str):
    # Its port is fixed now, written into the node's config, and kept across restarts.
    port = free_port(host)
    if kind == "memcached":
        return MemcachedServer(directory, port=port, host=host)
    if kind == "redis":  # a backend's cache: nothing on disk, and full means refusing writes
        return RedisServer(directory, port=port, host=host, appendonly=False,
                           extra_args=["--maxmemory-policy", "noeviction"])
    return RedisServer(directory, port=port, host=host)  # redis-aof: the durable defaults


def last_error_line(log_path: str) -> str:
    """What a process said last about going wrong: its last `raftcache: ...`, ERROR or
    CRITICAL line, else its last line (a traceback ends with the exception)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (64 << 10)))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("raftcache: ") or " ERROR " in line or " CRITICAL " in line:
            return line.removeprefix("raftcache: ")
    return lines[-1] if lines else "(its log is empty)"


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
    # Clients need signed tokens (`raftcache up --auth`): a signing key and an admin token
    # under data_dir/auth, every node with [auth] required and the public key.
    auth: bool = False
    # Values encrypted at rest with the keyring DATA_DIR/keyring (made at the first start);
    # False writes `[encryption] enabled = false` (`raftcache up --no-encryption`).
    encryption: bool = True
    # How a node process starts, before `--config PATH` (the fault suite runs its test-only
    # plugins and mutants through raftcache.testing.node instead).
    launcher: list = attrs.Factory(lambda: ["-m", "raftcache", "serve"])
    node_args: dict = attrs.Factory(dict)  # node id -> arguments after its --config
    hosts: list | None = None  # per-node host (distinct 127.0.0.x "hosts"); overrides host
    # (from node, to node) -> the address `from` dials to reach `to` (a fault relay); clients
    # still reach every node at its own address.
    routes: dict = attrs.Factory(dict)
    # Node i serves /metrics, /healthz and /readyz on host:metrics_port+i-1 (None: no endpoint).
    metrics_port: int | None = None
    processes: dict = attrs.Factory(dict)
    # The servers the configs need and do not name (`server_needs`), one of each per node,
    # started before it and stopped after it: node id -> {ServerNeed.name: server}.
    servers: dict = attrs.Factory(dict)

    def host_of(self, node_id: int) -> str:
        return self.hosts[node_id - 1] if self.hosts else self.host

    def address(self, node_id: int) -> str:
        return f"{self.host_of(node_id)}:{self.port + node_id - 1}"

    def plugin(self, kind: str) -> str:
        """The storage, transport or backend plugin the nodes run (`extra` may name it)."""
        return self.extra.get(kind, {}).get("plugin", getattr(self, kind))

    def metrics_address(self, node_id: int) -> str:
        return f"{self.host_of(node_id)}:{self.metrics_port + node_id - 1}"

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

    def auth_files(self) -> dict | None:
        """signing.key, signing.pub and admin.token under data_dir/auth (made at the first
        start, kept after: tokens stay valid across restarts); None without `auth`."""
        if not self.auth:
            return None
        from raftcache.plugins.security.tokens import init_auth_dir

        return init_auth_dir(os.path.join(self.data_dir, "auth"))

    def admin_token(self) -> str:
        """The token `up --auth` writes: subject "admin", admin on every key."""
        with open(self.auth_files()["admin.token"]) as f:
            return f.read().strip()
    def keyring_path(self) -> str | None:
        """The keyring every node seals values with (made at the first start, mode 0600,
        kept after); None when encryption is off."""
        if not self.encryption:
            return None
        from raftcache.plugins.security.encryption import make_keyring

        path = os.path.join(private_dir(self.data_dir), "keyring")
        try:
            make_keyring(path)
        except FileExistsError:
            pass
        return path

    def _server(self, node_id: int, need: ServerNeed):
        servers = self.servers.setdefault(node_id, {})
        if need.name not in servers:
            directory = os.path.join(self.data_dir, f"node{node_id}", f"{need.name}-{need.kind}")
            servers[need.name] = _make_server(need.kind, directory, self.host_of(node_id))
        return servers[need.name]

    def node_config(self, i: int) -> dict:
        """What node i's config file holds, with the addresses of its servers. Nodes beyond
        `nodes` join the running cluster (cluster.join) instead of founding it."""
        founder = i <= self.nodes
        data = self.join_config(node_id=i)
        cluster = data["cluster"]
        if founder:
            del cluster["join"]
            cluster["peers"] = {str(j): self.address(j) for j in range(1, self.nodes + 1)}
        routes = {str(j): a for (frm, j), a in self.routes.items() if frm == i}
        if routes:
            cluster["dial"] = routes
        if self.tls_files():
            certs = os.path.dirname(self.tls_files()["ca"])
            if not os.path.exists(os.path.join(certs, f"node{i}.pem")):  # a joiner
                from raftcache.certs import add_node_cert

                add_node_cert(certs, i)
            data["transport"]["tls"].update(cert=os.path.join(certs, f"node{i}.pem"),
                                            key=os.path.join(certs, f"node{i}-key.pem"))
        data["node"] = {"id": i, "address": self.address(i),  # first: extra may add limits
                        "data_dir": os.path.join(self.data_dir, f"node{i}"),
                        **data.get("node", {})}
        if self.metrics_port:
            data["node"]["metrics_address"] = self.metrics_address(i)
        for need in server_needs(data):
            need.options[_ADDRESS_OPTION[need.kind]] = getattr(
                self._server(i, need), _ADDRESS_OPTION[need.kind])
        return data

    def join_config(self, node_id: int | None = None) -> dict:
        """What a node that joins this cluster needs (`raftcache up` writes it as
        DATA_DIR/join.toml; `serve --id --address --data-dir` adds the node's own part): the
        members to ask, the cluster secret or TLS files, the keyring, auth, storage and
        backend. Its node certificate, under TLS, is node<ID>.pem beside the CA."""
        cluster: dict = {"join": self.endpoints()}
        secret = self.secret_path()
        if secret:
            cluster["secret_file"] = secret
        elif self.insecure:
            cluster["insecure"] = True
        transport: dict = {"plugin": self.transport}
        tls = self.tls_files()
        if tls:
            certs = os.path.dirname(tls["ca"])
            name = f"node{node_id}" if node_id is not None else "node<ID>"
            transport["tls"] = {"ca": tls["ca"], "cert": os.path.join(certs, f"{name}.pem"),
                                "key": os.path.join(certs, f"{name}-key.pem")}
        data = {
            "cluster": cluster,
            "storage": {"plugin": self.storage},
            "transport": transport,
            "backend": {"plugin": self.backend},
            "encryption": ({"keyring": self.keyring_path()} if self.encryption
                           else {"enabled": False}),
        }
        auth = self.auth_files()
        if auth:
            data["auth"] = {"required": True, "public_keys": [auth["signing.pub"]]}
        for section, body in copy.deepcopy(self.extra).items():
            data.setdefault(section, {}).update(body)
        return data

    def write_configs(self, nodes=None) -> None:
        """The config of each of `nodes` (default: the founders, and then join.toml)."""
        private_dir(self.data_dir)
        for i in nodes or range(1, self.nodes + 1):
            _write_private(self.config_path(i), to_toml(self.node_config(i)))
        if nodes is None:
            _write_private(self.join_config_path(), JOIN_HEADER + to_toml(self.join_config()))

    def join_config_path(self) -> str:
        return os.path.join(self.data_dir, "join.toml")

    def start(self, node_id: int | None = None) -> None:
        """Start one node, or every node (writing their configs first). A node beyond
        `nodes` gets a config that joins the cluster, written at its first start."""
        if node_id is None:
            self.write_configs()
            for i in range(1, self.nodes + 1):
                self.start(i)
            return
        if not os.path.exists(self.config_path(node_id)):
            self.write_configs([node_id])
        for server in self.servers.get(node_id, {}).values():
            server.start()  # no-op when it runs; the node needs it to load
        log = open(os.open(self.log_path(node_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                           0o600), "ab")
        self.processes[node_id] = subprocess.Popen(
            [sys.executable, *self.launcher, "--config", self.config_path(node_id),
             *self.node_args.get(node_id, ())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=0o077,
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

    def kill_server(self, node_id: int, name: str) -> None:
        """kill -9 one of the node's servers (`servers[node_id]`: "storage", "backend",
        "backend.<instance>"); a redis-aof storage's AOF stays for restart_server."""
        self.servers[node_id][name].kill()

    def restart_server(self, node_id: int, name: str) -> None:
        """Start it again on the same port and dir: a redis-aof storage loads its AOF, a
        backend's memcached or redis comes back empty."""
        self.servers[node_id][name].restart()

    def backend_servers(self, node_id: int, instance: str | None = None) -> list[str]:
        """The names of the node's backend servers: every one, or the hybrid `instance`'s."""
        names = [n for n in self.servers.get(node_id, {}) if n.split(".")[0] == "backend"]
        if instance is not None:
            names = [n for n in names if n == f"backend.{instance}"]
            if not names:
                raise KeyError(f"node {node_id} runs no server for backend instance {instance!r}")
        return names

    def kill_backend(self, node_id: int, name: str | None = None) -> None:
        """kill -9 the node's backend servers: every one, or hybrid instance `name`'s."""
        for server in self.backend_servers(node_id, name):
            self.kill_server(node_id, server)

    def restart_backend(self, node_id: int, name: str | None = None) -> None:
        """Start them again, empty, on the same ports."""
        for server in self.backend_servers(node_id, name):
            self.restart_server(node_id, server)

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
            for servers in self.servers.values():
                for server in servers.values():
                    server.stop()

    def failures(self) -> list[str]:
        """One line for each node process and each server that has exited, saying why: its
        exit code and the last error line of its log."""
        out = []
        for i, p in sorted(self.processes.items()):
            if p.poll() is not None:
                out.append(f"node {i} exited with code {p.returncode}: "
                           f"{last_error_line(self.log_path(i))}")
        for i, servers in sorted(self.servers.items()):
            for name, server in servers.items():
                if server.process is not None and not server.running():
                    out.append(f"node {i}'s {name} server ({server.executable} on "
                               f"{server.address}) exited: {last_error_line(server.log_path)}")
        return out

    def client(self, **kwargs):
        from raftcache.client import Client

        tls = self.tls_files()
        if tls and "tls" not in kwargs:
            from raftcache.pluginapi import TLSConfig

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
    """`raftcache up`: start the cluster, show it, keep it in the foreground until a signal.
    Exits 1 at once when a node or a server it needs exits during start-up, saying which and
    why, and when no leader is elected within `args.leader_timeout` seconds."""
    import tomllib

    extra = {}
    if args.config:
        with open(args.config, "rb") as f:
            extra = {k: v for k, v in tomllib.load(f).items() if k not in ("node", "cluster")}
    cluster = LocalCluster(os.path.abspath(args.data_dir), nodes=args.nodes, host=args.host,
                           port=args.port, storage=args.storage, transport=args.transport,
                           backend=args.backend, extra=extra, insecure=args.insecure,
                           auth=getattr(args, "auth", False),
                           encryption=not getattr(args, "no_encryption", False),
                           metrics_port=getattr(args, "metrics_port", None) or None)
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
    _describe_cluster(cluster, args)
    try:
        leader = _wait_for_leader_or_failure(cluster, args.leader_timeout, stopping)
    except RuntimeError as exc:
        for problem in exc.args:
            print(f"raftcache: {problem}", file=sys.stderr, flush=True)
        cluster.stop()
        return 1
    if leader is not None:
        print(f"leader: node {leader} at {cluster.address(leader)}")
        print("export RAFTCACHE_ENDPOINTS=" + ",".join(cluster.endpoints()))
        print("Ctrl-C stops the cluster.", flush=True)
    reported = set()
    while not stopping:
        for failure in cluster.failures():
            if failure not in reported:
                reported.add(failure)
                print(f"raftcache: {failure} (not restarted)", flush=True)
        time.sleep(0.2)
    print("raftcache: stopping the cluster", flush=True)
    cluster.stop()
    return 0


def _describe_cluster(cluster: LocalCluster, args) -> None:
    print(f"raftcache: {args.nodes} nodes ({cluster.plugin('storage')} storage, "
          f"{cluster.plugin('transport')} transport, {cluster.plugin('backend')} backend), "
          f"data and logs in {cluster.data_dir}")
    for i in range(1, args.nodes + 1):
        servers = "".join(f", {name}: {getattr(server, 'url', server.address)}"
                          for name, server in cluster.servers.get(i, {}).items())
        metrics = (f", metrics: http://{cluster.metrics_address(i)}/metrics"
                   if cluster.metrics_port else "")
        print(f"  node {i}: {cluster.address(i)}  (log: {cluster.log_path(i)}{servers}{metrics})")
    if args.insecure:
        print("WARNING: --insecure: the nodes accept Raft messages from anyone who can reach "
              "their ports", file=sys.stderr)
    elif cluster.tls_files():
        print(f"peers prove themselves with node certificates ({cluster.data_dir}/certs)")
    else:
        print(f"peers prove themselves with the cluster secret {cluster.secret_path()}")
    auth = cluster.auth_files()
    if auth:
        print(f"clients need a signed token; the admin token is in {auth['admin.token']} "
              f"(signing key: {auth['signing.key']}). Use it with")
        print(f"  export RAFTCACHE_TOKEN=$(cat {auth['admin.token']})")
        print(f"and issue others with: raftcache token issue --data-dir {cluster.data_dir} "
              "--subject NAME --grant PREFIX=r|w|rw|admin")
    print(f"a new node joins with its config {cluster.join_config_path()}: raftcache serve "
          "--config it --id ID --address HOST:PORT --data-dir DIR, then raftcache member add "
          "ID HOST:PORT")
    if cluster.encryption and cluster.extra.get("encryption", {}).get("enabled") is not False:
        print(f"values are encrypted at rest with the keyring {cluster.keyring_path()}")
    else:
        print("WARNING: --no-encryption: values are stored in plaintext", file=sys.stderr)


def _wait_for_leader_or_failure(cluster: LocalCluster, timeout: float, stopping: list):
    """The leader's id; None when a signal asked us to stop first. RuntimeError (a line per
    problem) when a node or one of its servers exits meanwhile, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not stopping:
        failures = cluster.failures()
        if failures:
            raise RuntimeError(*failures)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"no leader after {timeout:g} s; see the node logs in "
                               f"{cluster.data_dir}")
        try:
            return cluster.wait_for_leader(timeout=min(0.5, remaining))
        except TimeoutError:
            continue
    return None
