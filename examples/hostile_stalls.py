"""How long one hostile request stops a node: the longest gap between two turns of a greenlet
that wakes every millisecond, while another process sends the request.

    python examples/hostile_stalls.py

A node's ticks and heartbeats share its gevent hub: a stall longer than the election timeout
(60-120 ms by default) lets followers elect a new leader. Prints, per input, the answer it got
and the longest stall seen (median of 3 rounds). The node runs in this process (thrift, memory
storage, and a cluster secret, so that Raft frames need proof).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import gevent

from raftcache.cluster import free_port_block
from raftcache.node import Node, config
from raftcache.node.config import write_secret

CLIENT = """
import socket, sys
from raftcache import Client, errors, wire
from raftcache.plugins.transport import thrift
from thriftpy2.thrift import TMessageType
address, kind = sys.argv[1], sys.argv[2]
c = Client([address], timeout=20)
try:
    if kind == "put 16 MiB":
        c.set("big", b"x" * ((16 << 20) - 200))
    elif kind == "mset 100k":
        c.mset({f"k{i}": "v" for i in range(100_000)})
    elif kind == "mget 100k":
        c.mget([f"k{i}" for i in range(100_000)])
    elif kind == "raft 16 MiB, no proof":  # a one-way raft() call and 16 MB of anything
        args = wire.RaftCacheService.raft_args(batch=wire.RaftBatch(1, []))
        body = thrift._encode("raft", TMessageType.ONEWAY, 0, args)[4:] + bytes(16_000_000)
        host, port = thrift.parse_address(address)
        with socket.create_connection((host, port)) as s:
            s.sendall(len(body).to_bytes(4, "big") + body)
            s.recv(1)
    print("answered")
except errors.RaftCacheError as exc:
    print(type(exc).__name__)
except OSError as exc:
    print(type(exc).__name__)
"""
KINDS = ["put 16 MiB", "mset 100k", "mget 100k", "raft 16 MiB, no proof"]


def main() -> int:
    base = tempfile.mkdtemp(prefix="raftcache-stalls-")
    port = free_port_block(1)
    address = f"127.0.0.1:{port}"
    secret = os.path.join(base, "cluster.secret")
    write_secret(secret)
    cfg = config.parse({
        "node": {"id": 1, "address": address, "data_dir": os.path.join(base, "n1")},
        "cluster": {"peers": {"1": address}, "secret_file": secret},
        "storage": {"plugin": "memory"},
    }, "hostile_stalls")
    node = Node(cfg)
    node.start()
    gaps: list[float] = []

    def ticker():
        last = time.perf_counter()
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    gevent.spawn(ticker)
    gevent.sleep(0.5)
    print(f"{'input':<24} {'answer':<16} {'longest stall':>14}")
    try:
        for kind in KINDS:
            stalls, answer = [], ""
            for _ in range(3):
                gaps.clear()
                p = subprocess.Popen([sys.executable, "-c", CLIENT, address, kind],
                                     stdout=subprocess.PIPE, text=True)
                while p.poll() is None:
                    gevent.sleep(0.01)
                answer = p.stdout.read().strip()
                stalls.append(max(gaps))
            print(f"{kind:<24} {answer:<16} {statistics.median(stalls) * 1000:>11.1f} ms",
                  flush=True)
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
