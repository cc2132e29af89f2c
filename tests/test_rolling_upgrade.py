"""The rolling upgrade of the README's Operations section, performed: every node of a 3-node
cluster replaced in turn (stopped, started again from its data directory) while a client
keeps writing. Nothing acknowledged is lost; the cluster is never long without a leader."""

import time
import urllib.request

from writer import Writer

from raftcache.client import Client
from raftcache.cluster import LocalCluster, free_port_block


def ready(cluster, node_id) -> bool:
    try:
        with urllib.request.urlopen(f"http://{cluster.metrics_address(node_id)}/readyz",
                                    timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_replace_every_node_one_at_a_time_under_writes(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), port=free_port_block(3),
                           metrics_port=free_port_block(3), storage="file-wal",
                           extra={"raft": {"snapshot_entries": 500,
                                           "snapshot_keep_entries": 50}})
    cluster.start()
    try:
        cluster.wait_for_leader()
        with Writer(cluster.endpoints()) as writer, \
                Client(cluster.endpoints(), timeout=10.0) as admin:
            time.sleep(0.5)
            leader = cluster.wait_for_leader()
            for node in [n for n in (1, 2, 3) if n != leader] + [leader]:  # the leader last
                if cluster.wait_for_leader() == node:  # hand leadership over first
                    admin.transfer_leader(next(n for n in (1, 2, 3) if n != node))
                cluster.signal(node, 15)  # SIGTERM: the old version stops
                cluster.processes[node].wait(10)
                cluster.start(node)  # the new version, on the same data directory
                deadline = time.monotonic() + 30
                while not ready(cluster, node):  # it knows the leader and caught up
                    assert time.monotonic() < deadline, f"node {node} never became ready"
                    time.sleep(0.1)
            time.sleep(0.5)
        print(f"rolling upgrade: {len(writer.acked)} writes acknowledged, longest gap "
              f"{writer.longest_gap:.3f} s, {len(writer.errors)} errors")
        assert len(writer.acked) > 100
        # At most a few seconds without a leader (the handovers are planned, not timeouts).
        assert writer.longest_gap < 5.0, (writer.longest_gap, writer.errors[-3:])
        with cluster.client(timeout=10.0) as c:
            for key, value in writer.acked.items():  # nothing acknowledged was lost
                assert c.get(key) == value, key
    finally:
        cluster.stop()
