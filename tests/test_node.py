"""The gevent node in-process: plugin hooks, the apply pipeline and request handling."""

import logging

import gevent
import pytest

from raftcache import pluginapi
from raftcache.cluster import free_port_block
from raftcache.core import api
from raftcache.node import Node, config
from raftcache.pluginapi.manager import make_manager


class Recorder:
    """A third-party plugin: observes life-cycle hooks and vetoes writes to `secret/`."""

    def __init__(self):
        self.events = []

    @pluginapi.hookimpl
    def raftcache_node_started(self, node):
        self.events.append(("started", node.id))

    @pluginapi.hookimpl
    def raftcache_node_stopping(self, node):
        self.events.append(("stopping", node.id))

    @pluginapi.hookimpl
    def raftcache_role_changed(self, node, role, term, leader):
        self.events.append(("role", role, term, leader))

    @pluginapi.hookimpl
    def raftcache_check_command(self, command, identity, stamp_ms):
        key = getattr(command, "key", b"")
        if key.startswith(b"secret/"):
            return "writes under secret/ are not allowed"
        return None

    @pluginapi.hookimpl
    def raftcache_snapshot_taken(self, node, index, size):
        self.events.append(("snapshot", index))

    @pluginapi.hookimpl
    def raftcache_value_codecs(self):
        yield Reverser()

    @pluginapi.hookimpl
    def raftcache_metrics(self, node, metrics):
        metrics["recorder_events"] = len(self.events)


class Reverser:
    """A toy value codec: what reaches the log and the backend is marked and reversed."""

    def encode(self, key, value):
        return b"R:" + value[::-1]

    def decode(self, key, blob):
        assert blob.startswith(b"R:"), blob
        return blob[2:][::-1]


def single_node_config(tmp_path, node=None, **raft):
    port = free_port_block(1)
    address = f"127.0.0.1:{port}"
    return config.parse({
        "node": {"id": 1, "address": address, "data_dir": str(tmp_path / "n1"), **(node or {})},
        "cluster": {"peers": {"1": address}},
        "raft": {"tick_ms": 5, **raft},
    }, "test.toml")


@pytest.fixture
def node_and_plugin(tmp_path):
    plugin = Recorder()
    node = Node(single_node_config(tmp_path, snapshot_entries=20, snapshot_keep_entries=5),
                pm=make_manager(extra=[plugin]))
    node.start()
    with gevent.Timeout(5):
        # The driver, not only the core, must have seen it (role hooks run there).
        while node.replica.raw.role.name != "LEADER" or node.replica.role[1].name != "LEADER":
            gevent.sleep(0.01)
    yield node, plugin
    node.stop()


def call(node, **fields):
    fields.setdefault("header", api.RequestHeader())
    return node.handle_request(api.Request(**fields))


def test_hooks_and_veto(node_and_plugin):
    node, plugin = node_and_plugin
    assert ("started", 1) in plugin.events
    assert any(e[0] == "role" and e[1] == "leader" for e in plugin.events), plugin.events
    ok = call(node, op="put", key=b"public/a", value=b"1")
    assert ok.error is None and ok.number > 0
    denied = call(node, op="put", key=b"secret/a", value=b"1")
    assert denied.error == "Unauthorized" and "secret/" in denied.reason
    got = call(node, op="get", key=b"secret/a")
    assert got.result.found is False  # the veto changed nothing, on every replica


def test_snapshots_are_taken_and_hooked(node_and_plugin):
    node, plugin = node_and_plugin
    for i in range(50):
        assert call(node, op="put", key=b"k%d" % i, value=b"v").error is None
    assert any(e[0] == "snapshot" for e in plugin.events)
    assert node.replica.raw.raft_log.offset > 0  # the log prefix was compacted
    assert call(node, op="get", key=b"k0").result.value == b"v"


def test_exactly_once_retry(node_and_plugin):
    node, _ = node_and_plugin
    header = api.RequestHeader(client_id="c1", seq=1)
    first = call(node, op="incr", key=b"n", delta=5, header=header)
    retry = call(node, op="incr", key=b"n", delta=5, header=header)
    assert first.number == retry.number == 5
    assert call(node, op="get", key=b"n").result.value == b"5"


def test_bad_requests_get_clear_errors(node_and_plugin):
    node, _ = node_and_plugin
    assert call(node, op="fly").error == "InvalidRequest"
    assert call(node, op="put", key=b"", value=b"x").error == "InvalidRequest"
    assert call(node, op="put", key=b"k").error == "InvalidRequest"
    assert call(node, op="incr", key=b"k", delta=1 << 70).error == "InvalidRequest"
    assert call(node, op="get", key=b"k", consistency="weird").error == "InvalidRequest"
    assert call(node, op="put", key=b"k", value=b"v", ttl_ms=-1).error == "InvalidRequest"
    # and the node still serves
    assert call(node, op="put", key=b"k", value=b"v").error is None


def test_keys_and_values_over_the_configured_limits_are_refused_and_change_nothing(tmp_path):
    node = Node(single_node_config(tmp_path, node={"max_key_bytes": 8, "max_value_bytes": 16}))
    node.start()
    try:
        with gevent.Timeout(5):
            while node.replica.raw.role.name != "LEADER":
                gevent.sleep(0.01)
        k8, v16 = b"k" * 8, b"v" * 16
        assert call(node, op="put", key=k8, value=v16).error is None  # at the limits: fine
        commit = node.status().commit
        key_over = "a key of 9 bytes; node.max_key_bytes is 8"
        value_over = "a value of 17 bytes; node.max_value_bytes is 16"
        for fields, reason in [
            ({"op": "put", "key": b"k" * 9, "value": b"v"}, key_over),
            ({"op": "put", "key": k8, "value": v16 + b"v"}, value_over),
            ({"op": "cas", "key": k8, "expected_version": 0, "value": v16 + b"v"}, value_over),
            ({"op": "append", "key": k8, "value": v16 + b"v"}, value_over),
            ({"op": "incr", "key": b"k" * 9, "delta": 1}, key_over),
            ({"op": "remove", "key": b"k" * 9}, key_over),
            ({"op": "mset", "items": {b"a": b"1", b"k" * 9: b"2"}}, key_over),
            ({"op": "mset", "items": {b"a": b"1", b"b": v16 + b"v"}}, value_over),
            ({"op": "invalidate", "key": b"k" * 9},
             "a prefix of 9 bytes; node.max_key_bytes is 8"),
            ({"op": "get", "key": b"k" * 9}, key_over),
            ({"op": "mget", "keys": [k8, b"k" * 9]}, key_over),
        ]:
            r = call(node, **fields)
            assert (r.error, r.reason) == ("InvalidRequest", reason), fields
        assert node.status().commit == commit  # nothing was proposed
        assert call(node, op="get", key=k8).result.value == v16
    finally:
        node.stop()


def test_ttl_expires_by_leader_stamp(node_and_plugin):
    node, _ = node_and_plugin
    assert call(node, op="put", key=b"t", value=b"v", ttl_ms=50).error is None
    assert call(node, op="get", key=b"t").result.found is True
    gevent.sleep(0.1)
    assert call(node, op="get", key=b"t").result.found is False


def test_stop_runs_hook(tmp_path):
    plugin = Recorder()
    node = Node(single_node_config(tmp_path), pm=make_manager(extra=[plugin]))
    node.start()
    node.stop()
    assert ("stopping", 1) in plugin.events
    assert node.wait(0)


def test_unknown_plugin_name_stops_start_up(tmp_path):
    c = single_node_config(tmp_path)
    import attrs

    c = attrs.evolve(c, storage=config.PluginChoice("flie-wal"))
    with pytest.raises(config.ConfigError) as err:
        Node(c)
    assert "test.toml: storage.plugin: unknown storage 'flie-wal' (known: " in str(err.value)


def test_value_codecs_wrap_what_is_stored(node_and_plugin):
    node, _ = node_and_plugin
    assert call(node, op="put", key=b"c", value=b"hello").error is None
    assert node.replica.sm.backend.get(b"c") == b"R:olleh"  # the backend never saw the plain value
    assert call(node, op="get", key=b"c").result.value == b"hello"
    assert call(node, op="incr", key=b"n", delta=41).number == 41
    assert call(node, op="incr", key=b"n", delta=1).number == 42
    assert node.replica.sm.backend.get(b"n") == b"R:24"
    assert call(node, op="mget", keys=[b"c", b"n"]).results[1].value == b"42"


def test_metrics_hook_extends_metrics(node_and_plugin):
    node, plugin = node_and_plugin
    m = node.metrics()
    assert m["role"] == "leader" and m["commit"] >= 1
    assert m["recorder_events"] == len(plugin.events)


def test_not_leader_hints_and_status_name_client_addresses(tmp_path):
    """When peers are reached through relays or proxies, clients must still be told where a
    node really is (cluster.client_addresses), never the peer route."""
    from raftcache.core.raft.messages import Message, MsgType

    port = free_port_block(1)
    me = f"127.0.0.1:{port}"
    c = config.parse({
        "node": {"id": 1, "address": me, "data_dir": str(tmp_path / "n1")},
        "cluster": {"peers": {"1": me, "2": "127.0.0.2:1", "3": "127.0.0.3:1"},
                    "client_addresses": {"2": "127.0.0.9:7402", "3": "127.0.0.9:7403"},
                    "insecure": True},
        "raft": {"tick_ms": 1000},  # no election of our own meanwhile
    }, "test.toml")
    node = Node(c)
    node.start()
    try:
        node.handle_peer_messages([Message(MsgType.HEARTBEAT, 1, 2, term=5, commit=0)], 2)
        gevent.sleep(0.05)
        assert node.replica.raw.lead == 2
        r = call(node, op="put", key=b"k", value=b"v")
        assert (r.error, r.leader_hint) == ("NotLeader", "127.0.0.9:7402")
        status = node.status()
        assert (status.leader, status.leader_address) == (2, "127.0.0.9:7402")
    finally:
        node.stop()


def test_status_places_peers_where_the_cluster_does_not_where_this_node_dials(tmp_path):
    """A joining node adopts a member's `status().peer_addresses` (JoinCheck) to answer the
    leader: a member's local cluster.dial route (a relay or proxy on its own host) means
    nothing elsewhere, and a joiner replying there would never be heard."""
    port = free_port_block(1)
    me = f"127.0.0.1:{port}"
    c = config.parse({
        "node": {"id": 1, "address": me, "data_dir": str(tmp_path / "n1")},
        "cluster": {"peers": {"1": me, "2": "127.0.0.2:1", "3": "127.0.0.3:1"},
                    "dial": {"2": "127.0.0.1:9", "3": "127.0.0.1:10"}, "insecure": True},
        "raft": {"tick_ms": 1000},  # no election of our own meanwhile
    }, "test.toml")
    node = Node(c)
    node.start()
    try:
        assert node.addresses.peers[2] == "127.0.0.1:9"  # where this node dials it
        assert node.status().peer_addresses == {1: me, 2: "127.0.0.2:1", 3: "127.0.0.3:1"}
    finally:
        node.stop()


def test_a_rebuild_during_a_batch_that_finds_a_newer_snapshot_skips_what_it_covers():
    """The backend loses its data while an entry of a batch stages (an incr reads it), and
    meanwhile the leader's snapshot at a later index reached the core (a peer message is
    stepped while the backend is retried): the rebuild can start only from that snapshot, so
    the rest of the batch is already in it. It must be skipped, not staged behind the state
    machine's index (which stopped the node with a ValueError)."""
    import attrs
    import gevent.event

    from raftcache.core.cache.commands import Envelope, Incr, Put, encode_envelope
    from raftcache.core.cache.statemachine import ApplyError, StateMachine
    from raftcache.core.raft.messages import Entry, EntryType, Snapshot, SnapshotMeta
    from raftcache.node.applier import Applier
    from raftcache.plugins.backend.memory import MemoryBackend

    def entry(index, command):
        return Entry(term=1, index=index, type=EntryType.NORMAL,
                     data=encode_envelope(Envelope(command)))

    log = [entry(1, Put(b"k1", b"1")), entry(2, Incr(b"n", 5)), entry(3, Incr(b"n", 1)),
           *(entry(i, Put(b"k%d" % i, b"1")) for i in range(4, 11))]
    leader = StateMachine(MemoryBackend())
    for e in log:
        leader.apply(e.index, e.data)
    newer = Snapshot(SnapshotMeta(index=10, term=1, conf_state=None), leader.snapshot())

    class LosesItsData(MemoryBackend):
        lost = False

        def get_many(self, keys):
            if not self.lost:
                self.lost = True
                raise pluginapi.BackendLost("the server restarted empty")
            return super().get_many(keys)

    sm = StateMachine(LosesItsData())
    for e in log[:2]:  # n = 5: the incr below reads it
        sm.apply(e.index, e.data)

    @attrs.define
    class Core:  # what the applier asks of the replica's core: its newest snapshot
        snapshot: Snapshot

    applier = Applier(sm, logging.getLogger("test"), gevent.event.Event(), wake=lambda: None,
                      on_backend_down=lambda why: None, on_members_changed=lambda: None)
    applier.raw = Core(newer)
    results = [result for _, result in applier.apply(log[2:4])]
    assert all(isinstance(r, ApplyError) and r.kind == "OutcomeUnknown" for r in results)
    assert sm.applied_index == 10 and sm.read(b"n", 0) == (b"6", 3)
    assert sm.snapshot() == leader.snapshot()
