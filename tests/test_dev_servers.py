"""Backends declare the servers a local cluster starts for them (`BackendProvider.dev_servers`,
`pluginapi.DevServer`): a third-party backend that declares a redis server gets a real
redis-server per node, its address in the option it names; one that declares none gets none.
The third-party backends are raftcache.testing.dev_server_backends, loaded by the nodes with
`--plugin` as a package's entry point would be."""

from __future__ import annotations

import time
import tomllib

import pytest
import redis

from raftcache.cluster import LocalCluster, free_port_block, server_needs
from raftcache.pluginapi import BackendProvider, DevServer, hookimpl
from raftcache.pluginapi.manager import PluginSet, make_manager
from raftcache.servers import RedisServer
from raftcache.testing import dev_server_backends

MODULE = "raftcache.testing.dev_server_backends"


def third_party_cluster(tmp_path, backend: str) -> LocalCluster:
    # Encryption off: the test reads the value the node wrote into its redis-server.
    return LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1), backend=backend,
                        encryption=False, plugins=[dev_server_backends],
                        launcher=["-m", "raftcache.testing.node", "--plugin", MODULE])


def written_backend(cluster: LocalCluster) -> dict:
    with open(cluster.config_path(1), "rb") as f:
        return tomllib.load(f)["backend"]


def test_a_third_party_backend_gets_the_redis_server_it_declares(tmp_path):
    cluster = third_party_cluster(tmp_path, "kv-on-redis")
    try:
        cluster.start()
        cluster.wait_for_leader(timeout=20)
        [(name, server)] = cluster.servers[1].items()
        assert name == "backend" and isinstance(server, RedisServer) and server.running()
        # its address in the option the provider names, not the built-in redis's "url"
        assert written_backend(cluster) == {"plugin": "kv-on-redis",
                                            "options": {"redis_at": server.url}}
        with cluster.client(timeout=3.0) as c:
            c.set("colour", "blue")
        with redis.Redis.from_url(server.url) as r:
            deadline = time.monotonic() + 10
            while r.get(dev_server_backends.PREFIX + "colour") != b"blue":
                assert time.monotonic() < deadline, "the value never reached the redis-server"
                time.sleep(0.05)
    finally:
        cluster.stop()
    assert not server.running()


def test_a_third_party_backend_that_declares_nothing_gets_no_server(tmp_path):
    cluster = third_party_cluster(tmp_path, "kv-in-process")
    try:
        cluster.start()
        cluster.wait_for_leader(timeout=20)
        with cluster.client(timeout=3.0) as c:
            c.set("colour", "blue")
            assert c.get("colour") == b"blue"
        assert cluster.servers == {}
        assert written_backend(cluster) == {"plugin": "kv-in-process"}
    finally:
        cluster.stop()


class TwoServers:
    """A backend that reaches a redis and a memcached, and one of a kind no cluster knows."""

    @hookimpl
    def raftcache_backends(self):
        yield BackendProvider("two-servers", dev_server_backends.make_kv_on_redis,
                              dev_servers=(DevServer("redis", "cache_url"),
                                           DevServer("memcached", "sessions_at")))
        yield BackendProvider("odd-server", dev_server_backends.make_kv_on_redis,
                              dev_servers=(DevServer("etcd", "endpoint"),))


def test_each_declared_server_is_its_own_need_and_an_unknown_kind_is_refused():
    plugins = PluginSet(make_manager(extra=[TwoServers()]))
    config = {"backend": {"plugin": "two-servers", "options": {"cache_url": "redis://x:1/0"}}}
    [need] = server_needs(config, plugins)  # the option the config sets keeps its server
    assert (need.name, need.kind, need.option) == ("backend:sessions_at", "memcached",
                                                   "sessions_at")
    need.options[need.option] = "127.0.0.1:1"  # what the cluster does with its address
    assert config["backend"]["options"]["sessions_at"] == "127.0.0.1:1"
    assert server_needs(config, plugins) == []
    with pytest.raises(ValueError, match="backend 'odd-server' declares a dev server of "
                                         "unknown kind 'etcd' \\(known: memcached, redis"):
        server_needs({"backend": {"plugin": "odd-server"}}, plugins)
    # an unknown backend: no servers (the node says it is unknown, naming the known ones)
    assert server_needs({"backend": {"plugin": "no-such-backend"}}, plugins) == []
