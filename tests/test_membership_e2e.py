"""Membership at run time, end to end: nodes that join at addresses no config file lists,
learn where everyone is from the log, and a node that lost its data refused until re-added."""

import os
import time
import tomllib

import pytest
from writer import Writer

from raftcache import errors
from raftcache.client import Client
from raftcache.cluster import to_toml


@pytest.fixture
def cluster(running):
    """A cluster of the test's own (its tests change the membership): ports for 5 nodes; 3
    found the cluster, 4 and 5 join it later."""
    return running(nodes=3, ports=5, storage="file-wal",
                   extra={"raft": {"tick_ms": 10, "election_tick": 10,
                                   "snapshot_entries": 200, "snapshot_keep_entries": 20}})


def config_of(cluster, node_id) -> dict:
    with open(cluster.config_path(node_id), "rb") as f:
        return tomllib.load(f)


def wait_applied(cluster, node_id, index, timeout=20.0) -> None:
    """Until node `node_id` applied `index` (it may still be starting)."""
    deadline = time.monotonic() + timeout
    with Client([cluster.address(node_id)], timeout=2.0, tls=cluster.client().tls,
                transport=cluster.transport) as c:
        while True:
            try:
                if c.status(cluster.address(node_id)).applied >= index:
                    return
            except (OSError, errors.RaftCacheError):
                pass
            assert time.monotonic() < deadline, f"node {node_id} did not reach {index}"
            time.sleep(0.05)


def test_grow_to_five_and_shrink_to_three_at_addresses_no_config_lists(cluster):
    founders = cluster.endpoints()
    with Client(founders, timeout=20.0) as c:
        for i in range(250):  # past raft.snapshot_entries: the log the joiners need is gone
            c.set(f"early{i}", "x")
    with Writer(founders + [cluster.address(4), cluster.address(5)]) as writer, \
            Client(founders, timeout=20.0) as c:
        for n in (4, 5):
            cluster.start(n)
            config = config_of(cluster, n)["cluster"]
            assert "peers" not in config and config["join"] == founders  # nobody lists it
            status = c.add_member(n, cluster.address(n), learner=True)
            assert n in status.learners
            wait_applied(cluster, n, status.commit)  # caught up through the log or a snapshot
            status = c.add_member(n)  # promote
            assert n in status.voters
        assert sorted(status.voters) == [1, 2, 3, 4, 5]
        for n in (4, 5):  # they caught up through the chunked snapshot transfer
            with open(cluster.log_path(n)) as f:
                assert "installed the leader's snapshot" in f.read()
        # Every node knows where the new ones are: from the log, not from its config.
        for i in range(1, 6):
            peers = c.status(cluster.address(i)).peer_addresses
            assert peers[4] == cluster.address(4) and peers[5] == cluster.address(5), (i, peers)
        # Shrink to 3 by removing two founders; the cluster is then 3, 4 and 5.
        for n in (1, 2):
            status = c.remove_member(n)
            assert n not in status.voters
            cluster.kill(n)
        assert sorted(status.voters) == [3, 4, 5]
        time.sleep(0.5)
    assert len(writer.acked) > 50, writer.errors[-5:]

    # A restarted joiner whose join endpoints are all gone finds its peers from its log.
    cluster.kill(4)
    config = config_of(cluster, 4)
    config["cluster"]["join"] = [cluster.address(1)]  # stopped
    with open(cluster.config_path(4), "w") as f:
        f.write(to_toml(config))
    cluster.start(4)
    survivors = [cluster.address(n) for n in (3, 4, 5)]
    with Client(survivors, timeout=20.0) as c:
        version = c.set("after-restart", "yes")
        wait_applied(cluster, 4, version)
        for key, value in writer.acked.items():  # nothing acknowledged was lost
            assert c.get(key) == value, key
    with Client([cluster.address(4)], timeout=5.0) as c:
        assert c.get("after-restart", consistency="stale") == b"yes"


def test_member_add_without_an_address_names_what_is_missing(cluster):
    with cluster.client(timeout=10.0) as c:
        with pytest.raises(errors.InvalidRequest, match="node 9 has no known address"):
            c.add_member(9)
        with pytest.raises(errors.InvalidRequest, match='expected "host:port"'):
            c.add_member(9, "nowhere")
        with pytest.raises(errors.InvalidRequest, match="update-address needs"):
            c._call("change_member", change="update-address", node_id=3)


def test_a_member_that_lost_its_data_is_refused_until_removed_and_added_again(cluster):
    cluster.start(4)
    with Client(cluster.endpoints(), timeout=20.0) as c:
        status = c.add_member(4, cluster.address(4))
        assert 4 in status.voters
        wait_applied(cluster, 4, c.set("k", "v"))
    cluster.kill(4)
    data_dir = config_of(cluster, 4)["node"]["data_dir"]
    for name in os.listdir(data_dir):  # the disk is lost
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            os.unlink(path)
        else:
            import shutil

            shutil.rmtree(path)
    cluster.start(4)
    assert cluster.processes[4].wait(30) == 2
    with open(cluster.log_path(4)) as f:
        log = f.read()
    assert "node 4 is already a member of the cluster" in log
    assert "raftcache member remove 4" in log and "could vote twice" in log
    with Client(cluster.endpoints(), timeout=20.0) as c:
        assert 4 not in c.remove_member(4).voters
        cluster.start(4)
        status = c.add_member(4, cluster.address(4))
        assert 4 in status.voters
        wait_applied(cluster, 4, c.set("k2", "v2"))
    with Client([cluster.address(4)], timeout=5.0) as c:
        assert c.get("k", consistency="stale") == b"v"


def test_a_node_joins_with_join_toml_and_the_cli(cluster, tmp_path):
    """What an operator does: serve join.toml with the node's own id, address and data dir,
    then `raftcache member add`."""
    import subprocess
    import sys

    join = cluster.join_config_path()
    with open(join, "rb") as f:
        config = tomllib.load(f)
    assert "node" not in config and config["cluster"]["join"] == cluster.endpoints()
    address = cluster.address(4)
    log = open(tmp_path / "node4.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "raftcache", "serve", "--config", join,
                             "--id", "4", "--address", address, "--data-dir",
                             str(tmp_path / "node4")], stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoints = ",".join(cluster.endpoints())
        with Client(cluster.endpoints(), timeout=20.0) as c:
            for i in range(300):  # a log to catch up on
                c.set(f"before{i}", "x")
        added = subprocess.run([sys.executable, "-m", "raftcache", "member", "add", "4", address,
                                "--learner", "--endpoints", endpoints, "--timeout", "20"],
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        lines = added.stdout.splitlines()
        assert "learners 4" in lines[0] and lines[-1].endswith("learners 4"), lines
        # not a terminal: plain progress lines, the last one at the commit index it waited for
        applied, of = lines[-2].removeprefix("node 4: applied ").split(" of ")
        assert applied == of and int(of) > 300, lines
        promoted = subprocess.run([sys.executable, "-m", "raftcache", "member", "promote", "4",
                                   "--endpoints", endpoints, "--timeout", "20"],
                                  capture_output=True, text=True, timeout=60)
        assert promoted.returncode == 0, promoted.stderr
        assert "voters 1,2,3,4" in promoted.stdout
        with Client(cluster.endpoints(), timeout=20.0) as c:
            wait_applied(cluster, 4, c.set("joined", "yes"))
        with Client([address], timeout=5.0) as c:
            assert c.get("joined", consistency="stale") == b"yes"
        moved = subprocess.run([sys.executable, "-m", "raftcache", "member", "update", "4",
                                "--endpoints", endpoints], capture_output=True, text=True,
                               timeout=60)
        assert moved.returncode != 0 and "needs the node's new HOST:PORT" in moved.stderr
    finally:
        node.terminate()
        node.wait(10)
        log.close()


def test_a_node_joins_over_mutual_tls_with_a_certificate_issued_for_it(running):
    import subprocess
    import sys

    c = running(nodes=3, ports=4, transport="tcp-tls", storage="file-wal")
    certs = os.path.dirname(c.tls_files()["ca"])
    issued = subprocess.run([sys.executable, "-m", "raftcache", "certs", "add-node", "--dir",
                             certs, "--node", "9", "--host", "node-9.example"],
                            capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0 and "node9.pem" in issued.stdout, issued.stderr
    again = subprocess.run([sys.executable, "-m", "raftcache", "certs", "add-node", "--dir",
                            certs, "--node", "9"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    c.start(4)  # LocalCluster issues node4.pem the same way
    with c.client(timeout=20.0) as client:
        assert 4 in client.add_member(4, c.address(4)).voters
        wait_version = client.set("over-tls", "yes")
    wait_applied(c, 4, wait_version)
    with Client([c.address(4)], timeout=5.0, tls=c.client().tls,
                transport="tcp-tls") as client:
        assert client.get("over-tls", consistency="stale") == b"yes"


def test_a_founder_that_lost_its_data_is_refused_too(cluster):
    with cluster.client(timeout=10.0) as c:
        c.set("k", "v")
    deadline = time.monotonic() + 10
    with cluster.client(timeout=5.0) as c:
        while set(c.status().joined) != {1, 2, 3}:  # marked by the leader
            assert time.monotonic() < deadline
            time.sleep(0.1)
    victim = next(n for n in (1, 2, 3) if n != cluster.wait_for_leader())
    cluster.kill(victim)
    import shutil

    shutil.rmtree(config_of(cluster, victim)["node"]["data_dir"])
    cluster.start(victim)  # the same static config: it would found the cluster again
    assert cluster.processes[victim].wait(30) == 2
    with open(cluster.log_path(victim)) as f:
        log = f.read()
    assert f"cluster.peers: node {victim} is already a member" in log
    assert "join.toml" in log
