"""`raftcache up` with redis, memcached and hybrid backends: one server per node and backend
(instance) that the config names none for, its address in the node's config, stopped on exit.

Most drive LocalCluster's servers and configs directly; the last runs the whole thing through
`raftcache up`, as a user would.
"""

import os
import signal
import socket
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


def ask(address: str, request: bytes, until: bytes) -> bytes:
    """Send `request` to host:port and read the answer until it ends with `until`."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as s:
        s.sendall(request)
        answer = b""
        while not answer.endswith(until):
            chunk = s.recv(4096)
            assert chunk, f"{address} closed after {answer!r}"
            answer += chunk
    return answer


def redis_address(url: str) -> str:
    return url.removeprefix("redis://").rsplit("/", 1)[0]


def listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
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
    (["--backend", "redis"], ["backend: redis://"]),
    (["--backend", "memcached"], ["backend: 127.0.0.1:"]),
    (["--config", HYBRID], ["backend.sessions: 127.0.0.1:", "backend.config: redis://"]),
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
        addresses = [redis_address(a) if a.startswith("redis://") else a for a in addresses]
        assert len(addresses) == 3 * len(servers) and all(map(listening, addresses))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert not any(listening(a) for a in addresses)

