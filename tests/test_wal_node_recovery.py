"""A real node on the file WAL after damage: a torn tail is cut and the node serves; a corrupt
record in the middle stops `raftcache serve` with the file and the offset."""

import glob
import os
import subprocess
import sys

from raftcache.cluster import LocalCluster, free_port_block


def one_node_with_data(tmp_path, writes=200):
    cluster = LocalCluster(str(tmp_path / "c"), nodes=1, port=free_port_block(1),
                           storage="file-wal")
    cluster.start()
    try:
        cluster.wait_for_leader()
        with cluster.client() as c:
            for i in range(writes):
                c.set(f"k{i}", f"v{i}")
    finally:
        cluster.stop()
    segments = sorted(glob.glob(str(tmp_path / "c" / "node1" / "wal" / "*.seg")))
    assert segments, "the WAL has no segment"
    return cluster, segments


def test_torn_tail_is_cut_and_the_node_serves(tmp_path):
    cluster, segments = one_node_with_data(tmp_path)
    with open(segments[-1], "ab") as f:  # a crash in the middle of a write
        f.write(b"RCW1\x00\x00\x01\x00garbage-and-half-a-record")
    cluster.start(1)
    try:
        cluster.wait_for_leader()
        with cluster.client() as c:
            assert c.get("k0") == b"v0"
            assert c.get("k199") == b"v199"
            c.set("after", "restart")
            assert c.get("after") == b"restart"
    finally:
        cluster.stop()


def test_flipped_byte_mid_segment_refuses_to_start(tmp_path):
    cluster, segments = one_node_with_data(tmp_path)
    path = segments[0]
    size = os.path.getsize(path)
    offset = size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = subprocess.run(
        [sys.executable, "-m", "raftcache", "serve", "--config", cluster.config_path(1)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert os.path.basename(path) in message
    assert "offset" in message and "repair" in message
