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
from collections.abc import Callable

import attrs

from raftcache.node.config import private_dir, write_secret
from raftcache.pluginapi import PluginError, write_private
from raftcache.pluginapi.manager import PluginSet, make_manager
from raftcache.servers import MemcachedServer, RedisServer, die_with_parent, free_ports

JOIN_HEADER = """\
# A new node of this cluster (written by `raftcache up`):
#
#   raftcache serve --config join.toml --id ID --address HOST:PORT --data-dir DIR
#   raftcache member add ID HOST:PORT [--learner]
#
# The node asks the members under cluster.join where everyone is, then waits to be added;
# the log carries its address to every node. A backend that needs a server of its own
# (redis, memcached: its provider's dev_servers) needs its address in [backend.options] first.

"""


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


@attrs.frozen
class ServerKind:
    """A kind of server a local cluster starts: how, and which of its attributes is the
    address a plugin's option gets."""

    start: Callable  # (directory) -> a servers.RedisServer or MemcachedServer
    address: str  # "url" or "address"


# Backends name the kinds they need (pluginapi.DevServer); "redis-aof" is the storage's.
# Each listens on a unix socket in its 0700 directory and on no TCP port: only the node's user
# can read, delete or replace what it holds. Its socket is fixed at its first start, written
# into the node's config, and kept across restarts.
SERVER_KINDS = {
    # a backend's cache: nothing on disk, and full means refusing writes
    "redis": ServerKind(lambda directory: RedisServer(
        directory, unix=True, appendonly=False,
        extra_args=["--maxmemory-policy", "noeviction"]), "url"),
    "memcached": ServerKind(lambda directory: MemcachedServer(directory, unix=True), "address"),
    "redis-aof": ServerKind(lambda directory: RedisServer(  # the durable defaults
        directory, unix=True), "url"),
}


@attrs.frozen
class ServerNeed:
    """A server a node's config needs and does not name: `up` starts one per node."""

    # "storage", "backend", "backend.<instance>" of a composite; "<that>:<option>" when one
    # backend declares several servers
    name: str
    kind: str  # a key of SERVER_KINDS
    option: str  # the option that gets its address
    options: dict  # the plugin's options table holding it


def server_needs(config: dict, plugins: PluginSet) -> list[ServerNeed]:
    """The servers a node's config (as written to its file) lacks: the redis-aof storage
    without a url, and the dev servers its backend's provider declares (`DevServer`; for a
    composite, each instance's plugin's) whose option it leaves unset."""
    needs = []
    storage = config.get("storage", {})
    # `slow-disk` (fault suite) wraps another storage: options.inner
    if "redis-aof" in (storage.get("plugin"), storage.get("options", {}).get("inner")):
        options = storage.setdefault("options", {})
        if not options.get("url"):
            needs.append(ServerNeed("storage", "redis-aof", "url", options))
    backend = config.get("backend", {})
    if isinstance(backend.get("plugin"), str):
        needs += _backend_needs(plugins, "backend", backend["plugin"],
                                lambda: backend.setdefault("options", {}))
    return needs


def _backend_needs(plugins: PluginSet, name: str, plugin: str,
                   options: Callable[[], dict]) -> list[ServerNeed]:
    """`plugin`'s unmet dev servers. `options()` is its options table: [backend.options]
    (made when missing, so only asked for when a server is declared), or an instance's."""
    try:
        provider = plugins.backend(plugin)
    except PluginError:
        return []  # the node names the unknown backend itself, with the known ones
    needs = []
    for server in provider.dev_servers:
        if server.kind not in SERVER_KINDS:
            raise ValueError(f"backend {plugin!r} declares a dev server of unknown kind "
                             f"{server.kind!r} (known: {', '.join(sorted(SERVER_KINDS))})")
        if not options().get(server.option):
            unique = name if len(provider.dev_servers) == 1 else f"{name}:{server.option}"
            needs.append(ServerNeed(unique, server.kind, server.option, options()))
    instances = options().get(provider.dev_instances) if provider.dev_instances else None
    for instance, table in (instances or {}).items():
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            needs += _backend_needs(plugins, f"{name}.{instance}", table["plugin"],
                                    lambda table=table: table)
    return needs


def _is_backend(server_name: str) -> bool:
    """Whether a `ServerNeed.name` is a backend's ("backend", "backend.x", "backend:url")."""
    return server_name.split(".")[0].split(":")[0] == "backend"


def backend_runs_servers(backend: str, plugins: PluginSet, section: dict | None = None) -> bool:
    """Whether a local cluster starts servers for `backend` run as `dev_backend` says (so
    that a fault can kill them)."""
    config = {"backend": copy.deepcopy(dev_backend(backend, plugins, section))}
    return bool(server_needs(config, plugins))


def dev_backend(backend: str, plugins: PluginSet, section: dict | None = None) -> dict:
    """The [backend] section a test or bench cluster runs `backend` with: `section` (the
    config's, whose plugin wins), with its provider's dev options when it gives none
    (`BackendProvider.dev_options`)."""
    out = {"plugin": backend, **(section or {})}
    if "options" not in out:
        try:
            options = plugins.backend(out["plugin"]).dev_options
        except PluginError:
            options = None
        if options is not None:
            out["options"] = copy.deepcopy(options)
    return out


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
    # Plugin objects (modules) the nodes load besides the entry points, through a launcher
    # that registers them (raftcache.testing.node --plugin): their backends' dev servers are
    # started like the built-ins'.
    plugins: list = attrs.Factory(list)
    processes: dict = attrs.Factory(dict)
    # The servers the configs need and do not name (`server_needs`), one of each per node,
    # started before it and stopped after it: node id -> {ServerNeed.name: server}.
    servers: dict = attrs.Factory(dict)

    _plugin_set: PluginSet | None = attrs.field(default=None, init=False)

    def plugin_set(self) -> PluginSet:
        """The providers the nodes can load: whose declarations say which servers to start."""
        if self._plugin_set is None:
            self._plugin_set = PluginSet(make_manager(extra=self.plugins))
        return self._plugin_set

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
            servers[need.name] = SERVER_KINDS[need.kind].start(directory)
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
        for need in server_needs(data, self.plugin_set()):
            need.options[need.option] = getattr(self._server(i, need),
                                                SERVER_KINDS[need.kind].address)
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
            write_private(self.config_path(i), to_toml(self.node_config(i)))
        if nodes is None:
            write_private(self.join_config_path(), JOIN_HEADER + to_toml(self.join_config()))

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
        names = [n for n in self.servers.get(node_id, {}) if _is_backend(n)]
        if instance is not None:
            names = [n for n in names if n.split(":")[0] == f"backend.{instance}"]
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


def tighten_data_dir(path: str) -> str | None:
    """Make an existing DATA_DIR owner-only (0700): it holds the keyring, the cluster secret,
    tokens and every value. What was done, to print; None when it was already 0700 or is not
    there yet (`private_dir` makes it so). Refuses (ValueError) a directory another user owns:
    they could read or swap what we write into it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_uid != os.geteuid():
        raise ValueError(f"--data-dir {path} belongs to uid {st.st_uid}, not to us "
                         f"(uid {os.geteuid()}): use a directory of our own")
    if st.st_mode & 0o077 == 0:
        return None
    os.chmod(path, 0o700)
    return (f"tightened --data-dir {path} from mode {st.st_mode & 0o777:04o} to 0700: it "
            "holds keys, secrets and every value")


def run_local_cluster(args) -> int:
    """`raftcache up`: start the cluster, show it, keep it in the foreground until a signal.
    Exits 1 at once when a node or a server it needs exits during start-up, saying which and
    why, and when no leader is elected within `args.leader_timeout` seconds."""
    import tomllib

    extra = {}
    if args.config:
        with open(args.config, "rb") as f:
            extra = {k: v for k, v in tomllib.load(f).items() if k not in ("node", "cluster")}
    auth = getattr(args, "auth", False)
    transport = getattr(args, "transport", None)
    if transport is None:  # a token must not cross a readable wire: TLS with --auth
        transport = "tcp-tls" if auth and "transport" not in extra else "thrift"
    cluster = LocalCluster(os.path.abspath(args.data_dir), nodes=args.nodes, host=args.host,
                           port=args.port, storage=args.storage, transport=transport,
                           backend=args.backend, extra=extra, insecure=args.insecure,
                           auth=auth,
                           encryption=not getattr(args, "no_encryption", False),
                           metrics_port=getattr(args, "metrics_port", None) or None)
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        tightened = tighten_data_dir(cluster.data_dir)
        if tightened:
            print(f"raftcache: {tightened}", flush=True)
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
    tls = cluster.tls_files()
    if tls:
        print("clients talk TLS with the certificates in "
              f"{os.path.dirname(tls['ca'])}: export RAFTCACHE_TRANSPORT={cluster.transport} "
              f"RAFTCACHE_CA={tls['ca']} RAFTCACHE_CERT={tls['cert']} RAFTCACHE_KEY={tls['key']}")
    auth = cluster.auth_files()
    if auth and not tls:
        print("WARNING: --auth over plaintext thrift: every token, the admin token too, "
              "crosses the network readable by anyone who can see the traffic; run "
              "--auth without --transport (tcp-tls) where that is not only this machine",
              file=sys.stderr)
    if auth:
        from raftcache.plugins.security.tokens import expires_at, expiry_text

        print(f"clients need a signed token; the admin token is in {auth['admin.token']} "
              f"(expires at {expiry_text(expires_at(auth['admin.token']))}, renewed by a "
              f"start with less than a day left; signing key: {auth['signing.key']}). Use it "
              "with")
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
