"""`raftcache up` with redis, memcached and hybrid backends: one server per node and backend
(instance) that the config names none for, its address in the node's config, stopped on exit.

Most drive LocalCluster's servers and configs directly; the last runs the whole thing through
`raftcache up`, as a user would.
"""

import os
import signal
import socket
import stat
import subprocess
import sys
import tomllib

import pytest
import redis
from local_up import up

from raftcache.cluster import LocalCluster, free_port_block, to_toml
from raftcache.servers import MemcachedServer, ServerError

HYBRID = os.path.join(os.path.dirname(__file__), "..", "examples", "hybrid", "hybrid.toml")
WAIT = 10.0


def connect(address: str, timeout: float) -> socket.socket:
    """A connection to host:port, or to the unix socket at /path (how `up` starts them)."""
    if address.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(address)
        except OSError:
            s.close()
            raise
        return s
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def ask(address: str, request: bytes, until: bytes) -> bytes:
    """Send `request` to host:port or /socket and read the answer until it ends with
    `until`."""
    with connect(address, WAIT) as s:
        s.sendall(request)
        answer = b""
        while not answer.endswith(until):
            chunk = s.recv(4096)
            assert chunk, f"{address} closed after {answer!r}"
            answer += chunk
    return answer


def redis_address(url: str) -> str:
    if url.startswith("unix://"):
        return url.removeprefix("unix://").split("?", 1)[0]
    return url.removeprefix("redis://").rsplit("/", 1)[0]


def listening(address: str) -> bool:
    try:
        connect(address, 1.0).close()
        return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def hybrid_options() -> dict:
    with open(HYBRID, "rb") as f:
        return tomllib.load(f)


def test_to_toml_writes_nested_tables_and_arrays_of_inline_tables():
    data = {"node": {"id": 1, "address": "127.0.0.1:1", "proxy": False},
            "cluster": {"peers": {"1": "127.0.0.1:1"}},
            "storage": {"plugin": "memory", "options": {}},
            **hybrid_options()}
    data["backend"]["options"]["routes"].append({"match": 'odd "key"\\', "to": "local"})
    assert tomllib.loads(to_toml(data)) == data


def test_memcached_server_answers_and_comes_back_empty_on_the_same_port(tmp_path):
    with MemcachedServer(str(tmp_path / "mc"), memory_mb=16) as server:
        port = server.port
        assert ask(server.address, b"set k 0 0 1\r\nv\r\n", b"\r\n") == b"STORED\r\n"
        assert ask(server.address, b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
        assert ask(server.address, b"stats settings\r\n", b"END\r\n").count(
            b"STAT maxbytes %d\r\n" % (16 << 20)) == 1
        server.kill()
        assert not listening(server.address)
        server.restart()
        assert server.port == port
        assert ask(server.address, b"get k\r\n", b"END\r\n") == b"END\r\n"
        pid = server.pid
    assert not alive(pid) and not listening(server.address)
    with pytest.raises(ServerError, match="no-such-memcached not found on PATH"):
        MemcachedServer(str(tmp_path / "x"), executable="no-such-memcached").start()


def configs(cluster: LocalCluster) -> dict:
    out = {}
    for i in range(1, cluster.nodes + 1):
        with open(cluster.config_path(i), "rb") as f:
            out[i] = tomllib.load(f)
    return out


@pytest.mark.parametrize("backend", ["redis", "memcached"])
def test_a_server_per_node_for_a_redis_or_memcached_backend(tmp_path, backend):
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3), backend=backend)
    option = {"redis": "url", "memcached": "address"}[backend]
    pids = []
    try:
        cluster.start()
        written = configs(cluster)
        addresses = set()
        for i in (1, 2, 3):
            server = cluster.servers[i]["backend"]
            assert server.dir.startswith(os.path.join(cluster.data_dir, f"node{i}"))
            assert written[i]["backend"] == {"plugin": backend,
                                             "options": {option: getattr(server, option)}}
            addresses.add(server.address)
            pids.append(server.pid)
        assert len(addresses) == 3 and all(listening(a) for a in addresses)
        if backend == "redis":  # a cache: no persistence, and full means refusing writes
            with redis.Redis.from_url(cluster.servers[1]["backend"].url) as r:
                assert r.config_get("maxmemory-policy", "appendonly", "save") == {
                    "maxmemory-policy": "noeviction", "appendonly": "no", "save": ""}
        # A node restarted by the fault suite keeps its server and its port.
        cluster.kill(2)
        cluster.start(2)
        cluster.write_configs()
        assert configs(cluster) == written
    finally:
        cluster.stop()
    assert not any(alive(p) for p in pids)
    assert not any(listening(a) for a in addresses)


def test_hybrid_instances_without_addresses_get_servers_and_the_others_keep_theirs(tmp_path):
    extra = hybrid_options()
    own = MemcachedServer(str(tmp_path / "own"))  # a server the config names: used as it is
    extra["backend"]["options"]["instances"]["named"] = {"plugin": "memcached"}
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3), extra=extra)
    with own:
        extra["backend"]["options"]["instances"]["named"]["address"] = own.address
        try:
            cluster.start()
            written = configs(cluster)
            for i in (1, 2, 3):
                servers = cluster.servers[i]
                assert sorted(servers) == ["backend.config", "backend.sessions"]
                instances = written[i]["backend"]["options"]["instances"]
                assert instances["sessions"] == {"plugin": "memcached",
                                                 "address": servers["backend.sessions"].address}
                assert instances["config"] == {"plugin": "redis",
                                               "url": servers["backend.config"].url}
                assert instances["local"] == {"plugin": "memory"}
                assert instances["named"] == {"plugin": "memcached", "address": own.address}
                assert written[i]["backend"]["options"]["routes"] == [
                    {"match": "session:*", "to": "sessions"},
                    {"match": "config:*", "to": "config"}]
            # The fault suite's handles: kill -9 one instance's server, then bring it back.
            sessions = cluster.servers[1]["backend.sessions"]
            config = cluster.servers[1]["backend.config"]
            ask(sessions.address, b"set s 0 0 1\r\nx\r\n", b"\r\n")
            with redis.Redis.from_url(config.url) as r:
                r.set("c", "y")
            cluster.kill_backend(1, "sessions")
            assert not listening(sessions.address) and listening(config.address)
            assert any("node 1's backend.sessions server (memcached on "
                       f"{sessions.address}) exited" in f for f in cluster.failures())
            cluster.restart_backend(1, "sessions")
            assert ask(sessions.address, b"get s\r\n", b"END\r\n") == b"END\r\n"  # empty
            cluster.kill_backend(1)  # every backend server of node 1
            assert not listening(sessions.address) and not listening(config.address)
            cluster.restart_backend(1)
            with redis.Redis.from_url(config.url) as r:
                assert r.dbsize() == 0  # empty too
            with pytest.raises(KeyError, match="no server for backend instance 'local'"):
                cluster.kill_backend(1, "local")
            pids = [s.pid for i in (1, 2, 3) for s in cluster.servers[i].values()]
        finally:
            cluster.stop()
        assert len(pids) == 6 and not any(alive(p) for p in pids)
        assert listening(own.address)  # not ours to stop


# ---- end to end through `raftcache up` ----------------------------------------------------------
@pytest.mark.parametrize("args,servers", [
    (["--backend", "redis"], ["backend: unix:///"]),
    (["--backend", "memcached"], ["backend: /"]),
    (["--config", HYBRID], ["backend.sessions: /", "backend.config: unix:///"]),
], ids=["redis", "memcached", "hybrid"])
def test_up_with_a_backend_serves_through_its_servers_and_stops_them(tmp_path, args, servers):
    proc, port, out = up(tmp_path, *args)
    addresses = []
    try:
        assert "leader: node" in out, out
        node_lines = [line for line in out.splitlines() if line.startswith("  node ")]
        assert len(node_lines) == 3
        for line in node_lines:
            for server in servers:
                assert server in line, line
        endpoints = ",".join(f"127.0.0.1:{port + i}" for i in range(3))
        env = dict(os.environ, RAFTCACHE_ENDPOINTS=endpoints)
        for key in ("session:1", "config:colour", "other"):
            assert subprocess.run([sys.executable, "-m", "raftcache", "set", key, "v-" + key],
                                  env=env, capture_output=True, timeout=30).returncode == 0
        got = subprocess.run([sys.executable, "-m", "raftcache", "mget", "session:1",
                              "config:colour", "other"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert got.stdout == "v-session:1\nv-config:colour\nv-other\n", got
        if "--config" in args:  # the routed values sit in node 1's own servers
            config = tomllib.loads((tmp_path / "data" / "node1.toml").read_text())
            instances = config["backend"]["options"]["instances"]
            stats = ask(instances["sessions"]["address"], b"stats\r\n", b"END\r\n")
            assert b"STAT curr_items 0\r\n" not in stats
            with redis.Redis.from_url(instances["config"]["url"]) as r:
                assert r.dbsize() > 0
        addresses = [a.split(": ", 1)[1].rstrip(")") for line in node_lines
                     for a in line.split(", ")[1:] if not a.startswith("metrics: ")]
        addresses = [redis_address(a) if a.startswith("unix://") else a for a in addresses]
        assert len(addresses) == 3 * len(servers) and all(map(listening, addresses))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert not any(listening(a) for a in addresses)



# ---- dev servers reachable by the node's user only ----------------------------------------------
def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_listening(pid: int) -> list[str]:
    """The TCP addresses (hex, as /proc/net shows them) process `pid` listens on."""
    inodes = socket_inodes(pid)
    out = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    out.append(fields[1])
    return out


def pids_serving(path: str) -> list[int]:
    """The processes holding the listening unix socket bound at `path`."""
    with open("/proc/net/unix") as f:
        inodes = {fields[6] for fields in map(str.split, f.readlines()[1:])
                  if len(fields) == 8 and fields[7] == path and fields[5] == "01"}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if socket_inodes(int(pid)) & inodes:
                out.append(int(pid))
        except OSError:
            continue
    return out


def connects_as_nobody(address: str) -> str:
    """Try `address` from a forked child that dropped root for uid/gid 65534: "connected",
    or the error's name."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the answer through the pipe
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                connect(address, 2.0).close()
                answer = "connected"
            except OSError as exc:
                answer = type(exc).__name__
            os.write(write, answer.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.mark.parametrize("args", [["--backend", "redis", "--storage", "redis-aof"],
                                  ["--backend", "memcached"]], ids=["redis", "memcached"])
def test_up_starts_its_servers_reachable_by_the_node_user_only(tmp_path, args):
    # The checks first, against a server on TCP, as the tests' own fixtures run them: they see
    # its port, and a user that is not us reaches it.
    with MemcachedServer(str(tmp_path / "tcp")) as tcp:
        assert tcp_listening(tcp.pid)
        if os.geteuid() == 0:
            assert connects_as_nobody(tcp.address) == "connected"
    proc, port, out = up(tmp_path, *args)
    try:
        assert "leader: node" in out, out
        config = tomllib.loads((tmp_path / "data" / "node1.toml").read_text())
        addresses = [config["backend"]["options"].get("url")
                     or config["backend"]["options"]["address"]]
        if "redis-aof" in args:
            addresses.append(config["storage"]["options"]["url"])
        for address in (redis_address(a) if a.startswith("unix://") else a for a in addresses):
            assert address.startswith("/") and listening(address)
            [pid] = pids_serving(address)
            assert tcp_listening(pid) == [], f"{address}'s server listens on TCP"
            assert os.stat(os.path.dirname(address)).st_mode & 0o777 == 0o700
            if os.geteuid() == 0:
                assert connects_as_nobody(address) == "PermissionError"
        env = dict(os.environ, RAFTCACHE_ENDPOINTS=f"127.0.0.1:{port}")
        for cmd in (["set", "k", "v"], ["get", "k"]):
            got = subprocess.run([sys.executable, "-m", "raftcache", *cmd], env=env,
                                 capture_output=True, text=True, timeout=30)
            assert got.returncode == 0, got.stderr
        assert got.stdout == "v\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0


def test_up_tightens_an_existing_loose_data_dir_and_says_so(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    proc, _port, out = up(tmp_path, "--nodes", "1")
    try:
        assert "leader: node" in out, out
        assert f"raftcache: tightened --data-dir {data} from mode 0755 to 0700" in out, out
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
