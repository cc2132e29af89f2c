"""The plugin manual's promises, checked: a plugin whose every observer raises cannot stop a node
(three nodes in this process, through a leader stop, writes and a snapshot install); the first
veto decides; value codecs run in plugin registration order."""

from __future__ import annotations

import collections

import gevent
import pytest

from raftcache import pluginapi
from raftcache.client import Client
from raftcache.cluster import free_port_block
from raftcache.core import api
from raftcache.node import Node, config
from raftcache.node.config import write_secret
from raftcache.pluginapi.manager import make_manager

OBSERVERS = ("raftcache_node_started", "raftcache_node_stopping", "raftcache_role_changed",
             "raftcache_snapshot_taken", "raftcache_snapshot_installed", "raftcache_metrics")


class Raiser:
    """A buggy third-party plugin: every observer raises (and counts its calls)."""

    def __init__(self):
        self.calls = collections.Counter()

    def _boom(self, name):
        self.calls[name] += 1
        raise RuntimeError(f"{name} is broken")

    @pluginapi.hookimpl
    def raftcache_node_started(self, node):
        self._boom("raftcache_node_started")

    @pluginapi.hookimpl
    def raftcache_node_stopping(self, node):
        self._boom("raftcache_node_stopping")

    @pluginapi.hookimpl
    def raftcache_role_changed(self, role):
        self._boom("raftcache_role_changed")

    @pluginapi.hookimpl
    def raftcache_snapshot_taken(self, node, index):
        self._boom("raftcache_snapshot_taken")

    @pluginapi.hookimpl
    def raftcache_snapshot_installed(self, index):
        self._boom("raftcache_snapshot_installed")

    @pluginapi.hookimpl
    def raftcache_metrics(self, metrics):
        self._boom("raftcache_metrics")


class Counter:
    """A well-behaved plugin registered after the broken one: it must still be called."""

    def __init__(self):
        self.calls = collections.Counter()

    @pluginapi.hookimpl
    def raftcache_role_changed(self):
        self.calls["raftcache_role_changed"] += 1


def _configs(tmp_path, n=3):
    port = free_port_block(n)
    peers = {str(i): f"127.0.0.1:{port + i - 1}" for i in range(1, n + 1)}
    secret = str(tmp_path / "cluster.secret")
    write_secret(secret)
    return [config.parse({
        "node": {"id": i, "address": peers[str(i)], "data_dir": str(tmp_path / f"n{i}")},
        "cluster": {"peers": peers, "secret_file": secret},
        "raft": {"tick_ms": 10, "snapshot_entries": 30, "snapshot_keep_entries": 5},
    }, f"node{i}.toml") for i in range(1, n + 1)]


def _wait(predicate, what, seconds=10.0):
    with gevent.Timeout(seconds, AssertionError(f"timed out waiting for {what}")):
        while not predicate():
            gevent.sleep(0.02)


def _leader(nodes):
    leaders = {n.replica.raw.lead for n in nodes.values()}
    return next(iter(leaders)) if len(leaders) == 1 and 0 not in leaders else None


def test_a_plugin_whose_every_observer_raises_cannot_stop_a_node(tmp_path):
    raiser, counter = Raiser(), Counter()
    configs = _configs(tmp_path)

    def start(cfg):
        node = Node(cfg, pm=make_manager(extra=[raiser, counter]))
        node.start()
        return node

    nodes = {cfg.node.id: start(cfg) for cfg in configs}
    endpoints = [cfg.node.address for cfg in configs]
    try:
        _wait(lambda: _leader(nodes), "a leader")
        with Client(endpoints, timeout=5.0) as c:
            for i in range(40):
                c.set(f"k{i}", f"v{i}")
        # The leader goes; the others elect, take writes and snapshot past the stopped node.
        old = _leader(nodes)
        nodes[old].stop()
        survivors = {i: n for i, n in nodes.items() if i != old}
        _wait(lambda: _leader(survivors) not in (None, old), "a new leader")
        with Client(endpoints, timeout=5.0) as c:
            for i in range(40, 120):
                c.set(f"k{i}", f"v{i}")
        # It comes back and catches up from a snapshot.
        nodes[old] = start(configs[old - 1])
        _wait(lambda: nodes[old].replica.raw.applied
              >= survivors[_leader(survivors)].replica.raw.commit,
              "the restarted node to catch up")
        for n in nodes.values():
            n.metrics()  # raises inside, returns all the same
            with Client([n.config.node.address], timeout=5.0) as c:
                c.endpoints = [n.config.node.address]
                assert c.get("k0", consistency="stale") == b"v0"
                assert c.get("k119", consistency="stale") == b"v119"
        with Client(endpoints, timeout=5.0) as c:
            assert c.get("k119") == b"v119"  # and linearizable reads go through the leader
        assert set(raiser.calls) == set(OBSERVERS), raiser.calls  # every observer ran
        assert counter.calls["raftcache_role_changed"] == raiser.calls["raftcache_role_changed"]
    finally:
        for n in nodes.values():
            n.stop()


def test_the_protection_has_teeth(tmp_path, monkeypatch):
    # Without the helper (pluggy's own call), the first broken observer stops start-up.
    from raftcache.node import host as node_module

    monkeypatch.setattr(node_module, "notify",
                        lambda pm, name, logger, **kw: getattr(pm.hook, name)(**kw))
    cfg = _configs(tmp_path, n=1)[0]
    node = Node(cfg, pm=make_manager(extra=[Raiser()]))
    try:
        with pytest.raises(RuntimeError, match="node_started is broken"):
            node.start()
    finally:
        monkeypatch.undo()
        node.stop()


class Veto:
    def __init__(self, name, reason):
        self.name, self.reason, self.asked = name, reason, 0

    @pluginapi.hookimpl
    def raftcache_check_command(self, command):
        self.asked += 1
        return self.reason


class Prefix:
    def __init__(self, tag: bytes):
        self.tag = tag

    @pluginapi.hookimpl
    def raftcache_value_codecs(self):
        yield self

    def encode(self, key, value):
        return self.tag + value

    def decode(self, key, blob):
        assert blob.startswith(self.tag), (self.tag, blob)
        return blob[len(self.tag):]


def _single(tmp_path, plugins):
    cfg = _configs(tmp_path, n=1)[0]
    node = Node(cfg, pm=make_manager(extra=plugins))
    node.start()
    _wait(lambda: node.replica.raw.role.name == "LEADER", "leadership")
    return node


def _call(node, **fields):
    fields.setdefault("header", api.RequestHeader())
    return node.handle_request(api.Request(**fields))


def test_value_codecs_run_in_registration_order(tmp_path):
    node = _single(tmp_path, [Prefix(b"A:"), Prefix(b"B:")])
    try:
        assert _call(node, op="put", key=b"k", value=b"v").error is None
        assert node.replica.sm.backend.get(b"k") == b"B:A:v"  # A first, then B
        assert _call(node, op="get", key=b"k").result.value == b"v"
        assert _call(node, op="incr", key=b"n", delta=2).number == 2
        assert node.replica.sm.backend.get(b"n") == b"B:A:2"
    finally:
        node.stop()


def test_the_first_veto_decides(tmp_path):
    none, first, second = Veto("none", None), Veto("first", "no, says first"), Veto("2", "no")
    # pluggy asks the last registered first
    node = _single(tmp_path, [second, first, none])
    try:
        denied = _call(node, op="put", key=b"k", value=b"v")
        assert (denied.error, denied.reason) == ("Unauthorized", "no, says first")
        assert (none.asked, first.asked, second.asked) == (1, 1, 0)
    finally:
        node.stop()
