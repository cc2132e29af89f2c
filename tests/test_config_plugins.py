"""Config errors name the file, the key and what is accepted; plugins resolve by name."""

import pytest

from raftcache import pluginapi
from raftcache.node import config
from raftcache.pluginapi.manager import PluginError, PluginSet, entry_point_names, make_manager

GOOD = """
[node]
id = 2
address = "127.0.0.1:7401"

[cluster]
peers = { 1 = "127.0.0.1:7400", 2 = "127.0.0.1:7401", 3 = "127.0.0.1:7402" }

[raft]
election_tick = 12

[storage]
plugin = "memory"

[transport]
plugin = "tcp-tls"
[transport.tls]
ca = "ca.pem"
cert = "node2.pem"
key = "node2-key.pem"
"""


def write(tmp_path, text):
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_good_config_loads(tmp_path):
    c = config.load(write(tmp_path, GOOD))
    assert c.node.id == 2
    assert c.peer_addresses() == {1: "127.0.0.1:7400", 2: "127.0.0.1:7401", 3: "127.0.0.1:7402"}
    assert c.raft.election_tick == 12 and c.raft.heartbeat_tick == 2
    assert c.transport.plugin == "tcp-tls" and c.transport.tls.cert == "node2.pem"
    assert c.backend.plugin == "memory"
    assert (c.node.max_key_bytes, c.node.max_value_bytes) == (64 << 10, 1 << 20)
    assert c.node.max_response_bytes == 8 << 20


@pytest.mark.parametrize(
    "change,message",
    [
        (("election_tick = 12", 'election_tick = "ten"'),
         "raft.election_tick: expected an integer, got 'ten'"),
        (("election_tick = 12", "election_ticks = 12"),
         "raft.election_ticks: unknown key (accepted: check_quorum, election_tick"),
        (('address = "127.0.0.1:7401"', ""), "node.address: missing (required)"),
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:9999"'),
         "node.address: '127.0.0.1:9999' differs from cluster.peers.2"),
        (("election_tick = 12", 'read_only = "fast"'), "raft.read_only: expected"),
        (("[raft]", "[raft\n"), "not valid TOML"),
        (("[raft]", 'client_addresses = { x = "127.0.0.1:1" }\n[raft]'),
         "cluster.client_addresses.x: node ids must be integers >= 1"),
        (("[raft]", 'dial = { 7 = "127.0.0.1" }\n[raft]'),
         "cluster.dial.7: expected \"host:port\", got '127.0.0.1'"),
        (("[raft]", 'join = ["127.0.0.1:7400", "nowhere"]\n[raft]'),
         "cluster.join[1]: expected \"host:port\", got 'nowhere'"),
        (("[raft]", "[raft]\nmax_key_bytes = 1"), "raft.max_key_bytes: unknown key"),
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:7401"\nmax_key_bytes = 0'),
         "node.max_key_bytes: must be between 1 and 1048576, got 0"),
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:7401"\nmax_value_bytes = 0'),
         "node.max_value_bytes: must be between 1 and 1073741824, got 0"),
        # a set within both limits must fit a write's log entry
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:7401"\nmax_value_bytes = 4194304'),
         "node.max_value_bytes: node.max_key_bytes (65536) + node.max_value_bytes (4194304) "
         "must leave 4096 bytes of node.max_request_bytes (4194304)"),
        # a value a put accepts must be readable
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:7401"\n'
          'max_response_bytes = 1048575'),
         "node.max_response_bytes: 1048575 is less than node.max_value_bytes (1048576)"),
        (('address = "127.0.0.1:7401"', 'address = "127.0.0.1:7401"\nmax_response_bytes = 0'),
         "node.max_response_bytes: must be between 1024 and 1073741824, got 0"),
        (("[raft]", '[testing]\nmutant = "oops"\n[raft]'),  # test code is not config
         "testing: unknown key (accepted: auth, backend, cluster, encryption, log, metrics, node, "
         "plugins, raft"),
    ],
)
def test_mistakes_give_one_clear_line(tmp_path, change, message):
    old, new = change
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    text = str(err.value)
    assert text.startswith(path + ": ")
    assert message in text
    assert "\n" not in text


def test_client_addresses_default_to_peers_and_may_differ(tmp_path):
    c = config.load(write(tmp_path, GOOD))
    assert c.client_addresses() == c.peer_addresses()
    text = GOOD.replace('peers = { 1 = "127.0.0.1:7400", 2',
                        'client_addresses = { 1 = "127.0.0.9:7400" }\npeers = { 1 = "127.0.0.1:7400", 2')
    c = config.load(write(tmp_path, text))
    assert c.client_addresses()[1] == "127.0.0.9:7400" and c.peer_addresses()[1] == "127.0.0.1:7400"


def test_missing_file():
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load("/nonexistent/node.toml")


def test_builtin_plugins_are_entry_points():
    names = entry_point_names()
    for name in ["memory-storage", "thrift", "tcp-tls", "memory-backend"]:
        assert name in names


def test_unknown_name_lists_known_ones():
    plugins = PluginSet(make_manager())
    with pytest.raises(PluginError) as err:
        plugins.storage("flie-wal")
    assert "unknown storage 'flie-wal' (known: " in str(err.value)
    assert "memory" in str(err.value)


class _Dupe:
    @pluginapi.hookimpl
    def raftcache_backends(self):
        yield pluginapi.BackendProvider("memory", lambda node_id, options: None)


def test_duplicate_names_fail_loudly():
    with pytest.raises(PluginError, match="backend 'memory' is provided twice"):
        PluginSet(make_manager(extra=[_Dupe()]))


def test_blocked_plugin_is_not_loaded():
    plugins = PluginSet(make_manager(block=["memory-backend"]))
    with pytest.raises(PluginError, match="unknown backend 'memory'"):
        plugins.backend("memory")
    assert plugins.storage("memory").name == "memory"


def test_a_misspelt_hook_is_refused_at_start_in_one_line():
    from raftcache.pluginapi.manager import make_manager

    class Misspelt:
        @pluginapi.hookimpl
        def raftcache_node_strated(self, node):  # the typo is the test
            pass

    with pytest.raises(pluginapi.PluginError) as caught:
        make_manager(extra=[Misspelt()])
    message = str(caught.value)
    assert "\n" not in message
    assert "raftcache_node_strated" in message and "raftcache_node_started" in message
