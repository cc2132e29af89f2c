"""The doors of a node: its client port and its /metrics endpoint under connection floods.

Issue #22 ("Hostile input, round two"): a burst of connections from one address, or idle
connections to /metrics, cost the leader its leadership or the node its descriptors. Each test
here starts real node processes and bounds its flood in time.
"""

from __future__ import annotations

import resource
import socket
import time

from raftcache.plugins.transport import thrift

WAIT = 5.0

# The module's shared `cluster` (tests/conftest.py).
CLUSTER = {"metrics": True, "storage": "file-wal"}


def raise_nofile(want: int) -> None:
    """This test process's descriptor limit raised towards `want` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def terms(cluster) -> dict[int, int]:
    with cluster.client(timeout=WAIT) as c:
        return {i: c.status(cluster.address(i)).term for i in range(1, cluster.nodes + 1)}


def open_idle(address: str, count: int, source: str) -> list[socket.socket]:
    """`count` non-blocking connects from `source` to `address`, left idle."""
    host, port = thrift.parse_address(address)
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex((host, port))
    except OSError:
        close_all(socks)
        raise
    return socks


def close_all(socks) -> None:
    for s in socks:
        s.close()


def write_within(cluster, key: str, seconds: float) -> float:
    """A write goes through within `seconds` (retrying across a lost leader); its time."""
    started = time.monotonic()
    with cluster.client(timeout=seconds) as c:
        c.set(key, "v")
        assert c.get(key) == b"v"
    took = time.monotonic() - started
    assert took < seconds, f"a write took {took:.1f}s"
    return took


def test_a_burst_of_2000_connections_from_one_address_costs_no_leadership(cluster):
    raise_nofile(2000 + 512)
    for attempt in range(2):
        leader = cluster.wait_for_leader()
        before = terms(cluster)
        idle = open_idle(cluster.address(leader), 2000, "127.0.0.77")
        try:
            time.sleep(1.0)  # the burst is accepted and shed meanwhile
            write_within(cluster, f"burst{attempt}", 2.0)
            time.sleep(0.5)
            assert terms(cluster) == before, f"attempt {attempt}: the term moved"
        finally:
            close_all(idle)
        time.sleep(0.5)
