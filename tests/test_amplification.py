"""Small requests that cost a node a great deal ("Hostile input, round two", #22): an mget of
one big value asked for a thousand times, and an invalidate or a sweep that walked every key
whatever it reclaimed. Each is bounded by what the answer or the change holds.

The in-process tests (unit tier) count what the node does: values opened, keys visited. The
cluster tests (real nodes, encryption on) check what the issue saw: no term moved, a
concurrent write went through, the node did not grow.
"""

from __future__ import annotations

import threading
import time

import gevent
import pytest

from raftcache import errors, pluginapi
from raftcache.cluster import free_port_block
from raftcache.core import api
from raftcache.node import Node, config
from raftcache.pluginapi.manager import make_manager

MIB = 1 << 20


def single_node_config(tmp_path, **node):
    address = f"127.0.0.1:{free_port_block(1)}"
    return config.parse({
        "node": {"id": 1, "address": address, "data_dir": str(tmp_path / "n1"), **node},
        "cluster": {"peers": {"1": address}},
        "raft": {"tick_ms": 5},
    }, "test.toml")


def call(node, **fields):
    return node.handle_request(api.Request(header=api.RequestHeader(), **fields))


# ================================================================================================
# mget, in process: what is opened, and when the hub gets a turn
# ================================================================================================
class CountingCodec:
    """A value codec that counts the values it opens and notes, for each, how many times a
    ticker greenlet had run by then (the hub's turns)."""

    def __init__(self):
        self.opened = 0
        self.ticks_seen: list[int] = []
        self.ticks = 0

    def encode(self, key, value):
        return b"C:" + value

    def decode(self, key, blob):
        self.opened += 1
        self.ticks_seen.append(self.ticks)
        return blob[2:]


class CodecPlugin:
    def __init__(self, codec):
        self.codec = codec

    @pluginapi.hookimpl
    def raftcache_value_codecs(self):
        yield self.codec


@pytest.fixture
def counted(tmp_path):
    codec = CountingCodec()
    node = Node(single_node_config(tmp_path, max_response_bytes=4 * MIB),
                pm=make_manager(extra=[CodecPlugin(codec)]))
    node.start()
    with gevent.Timeout(5):
        while node.replica.raw.role.name != "LEADER" or node.replica.role[1].name != "LEADER":
            gevent.sleep(0.01)
    try:
        yield node, codec
    finally:
        node.stop()


@pytest.mark.unit
def test_a_key_asked_for_many_times_is_opened_once(counted):
    node, codec = counted
    assert call(node, op="put", key=b"k", value=b"v" * 1000).error is None
    assert call(node, op="put", key=b"j", value=b"w").error is None
    codec.opened = 0
    r = call(node, op="mget", keys=[b"k", b"j", b"missing"] * 300)
    assert r.error is None, r.reason
    assert [(g.found, g.value) for g in r.results[:3]] == [(True, b"v" * 1000), (True, b"w"),
                                                            (False, b"")]
    assert [g.value for g in r.results] == [g.value for g in r.results[:3]] * 300
    assert codec.opened == 2  # once per stored key, not once per time it was asked for


@pytest.mark.unit
def test_an_answer_over_max_response_bytes_is_refused_before_any_value_is_opened(counted):
    node, codec = counted
    assert call(node, op="put", key=b"big", value=b"x" * MIB).error is None
    codec.opened = 0
    # Four copies of a 1 MiB value (plus the codec's two bytes each): over the 4 MiB limit.
    r = call(node, op="mget", keys=[b"big"] * 4)
    assert r.error == "InvalidRequest"
    assert "node.max_response_bytes is 4194304" in r.reason, r.reason
    assert codec.opened == 0
    r = call(node, op="mget", keys=[b"big"] * 3)  # within it: answered
    assert r.error is None and [g.value for g in r.results] == [b"x" * MIB] * 3
    assert codec.opened == 1


@pytest.mark.unit
def test_a_large_answer_is_opened_with_the_hub_getting_turns_between_values(counted):
    node, codec = counted
    keys = [b"v%d" % i for i in range(3)]
    for k in keys:
        assert call(node, op="put", key=k, value=b"x" * MIB).error is None

    def ticker():
        while True:
            codec.ticks += 1
            gevent.sleep(0)

    g = gevent.spawn(ticker)
    try:
        codec.ticks_seen.clear()
        r = call(node, op="mget", keys=keys)
    finally:
        g.kill()
    assert r.error is None
    # Each MiB opened, the hub ran the ticker before the next value was opened.
    seen = codec.ticks_seen
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2], seen
