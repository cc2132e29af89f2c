"""No single clock moves the cluster (issue #22): real nodes, auth required, one of them run
with its clock a year ahead or behind (`python -m raftcache.testing.node --clock-offset-ms`).

A leader a year ahead must not expire every token and key for good; a leader a year behind must
not freeze cluster time (expired tokens writing, TTLs never passing); an idle follower a year
behind must refuse an expired token. Then the node restarts with a correct clock and nothing is
left behind. The teeth tests run the same scenarios on a node whose cluster time is its own
clock (mutant `clock-local`, what every node did before) and assert they catch it.
"""

from __future__ import annotations

import random
import threading
import time

from test_auth import WAIT, eventually, issue, node_client, refused

from raftcache import errors
from raftcache.client import Client
from raftcache.cluster import LocalCluster, free_port_block
from raftcache.node.replica import MAX_CLOCK_SKEW_MS
from raftcache.testing import relay

YEAR_MS = 365 * 24 * 3600 * 1000
BOUND_S = MAX_CLOCK_SKEW_MS / 1000


def not_served(fn) -> bool:
    """Whether the node refused: Unauthorized, or Unavailable (a stale read past
    node.max_stale_ms when a loaded machine delays heartbeats): either way nothing was read."""
    try:
        fn()
    except (errors.Unauthorized, errors.Unavailable):
        return True
    return False


def skewed(node: int, offset_ms: int, mutant: str | None = None) -> dict:
    args = ["--clock-offset-ms", str(offset_ms)] + (["--mutant", mutant] if mutant else [])
    return {"auth": True, "storage": "file-wal", "launcher": ["-m", "raftcache.testing.node"],
            "node_args": {node: args}}


def lead(cluster, node: int) -> str | None:
    """Hand leadership to `node`, asking each node in turn; None once it leads, else why not
    (a leader whose cluster time is wrong may refuse even the admin's token)."""
    deadline, why = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        for i in range(1, cluster.nodes + 1):
            with node_client(cluster, i, cluster.admin_token(), timeout=2.0) as admin:
                try:
                    if admin.transfer_leader(node).leader == node:
                        return None
                except errors.RaftCacheError as exc:
                    why = str(exc)
        time.sleep(0.1)
    return f"node {node} could not be made leader: {why}"


def time_problems(cluster) -> list[str]:
    """Every node's cluster time (its status) within MAX_CLOCK_SKEW_MS of real time."""
    problems = []
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as c:
        for i in range(1, cluster.nodes + 1):
            before = time.time()
            t = c.status(cluster.address(i)).cluster_time_ms / 1000
            after = time.time()
            if not before - BOUND_S <= t <= after + BOUND_S:
                problems.append(f"node {i}'s cluster time is {t - after:+.1f} s off")
    return problems


def admin_write(cluster, problems: list, tag: str) -> None:
    """A write by the admin: the leader stamps an entry (what stays in every replica)."""
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        try:
            admin.set("admin:tick", tag)
        except errors.RaftCacheError as exc:
            problems.append(f"{tag}: an admin write failed: {exc}")


def verdict_problems(cluster, tag: str) -> list[str]:
    """Tokens, TTLs and sessions through the leader, judged against real time: a fresh token
    writes and reads, a key with 30 s to live is there, one with 1 s is gone 3 s later, and a
    token 1.5 s past its expiry is refused everywhere."""
    problems = time_problems(cluster)
    admin_write(cluster, problems, tag)
    # Valid from 1 s ago: cluster time may trail a correct clock by up to the bound.
    token = issue(cluster, "dave", {"d:": "rw"}, ttl=1.5, not_before=time.time() - 1)
    key = f"d:{tag}"
    with cluster.client(token=token, timeout=WAIT) as c:  # a session: client id and seq
        try:
            c.set(key, "v", ttl=30)
            c.set(key + ":short", "v", ttl=1)
            if c.get(key) != b"v":
                problems.append(f"{tag}: a key with 30 s to live is gone at once")
        except errors.Unauthorized as exc:
            problems.append(f"{tag}: a fresh token was refused: {exc}")
    time.sleep(3.0)
    with cluster.client(token=token, timeout=WAIT) as c:
        if not refused(lambda: c.set(key, "late")):
            problems.append(f"{tag}: a write with a token 1.5 s past its expiry applied")
    for i in range(1, cluster.nodes + 1):
        with node_client(cluster, i, token) as c:
            if not not_served(lambda: c.get(key, consistency="stale")):
                problems.append(f"{tag}: node {i} served a stale read with an expired token")
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        try:
            if admin.get(key + ":short") is not None:
                problems.append(f"{tag}: a key is served 2 s after its ttl passed")
            if admin.get(key) != b"v":
                problems.append(f"{tag}: a key with 27 s left is gone")
        except errors.RaftCacheError as exc:
            problems.append(f"{tag}: the admin cannot read: {exc}")
    return problems


def restart_correct(cluster, node: int) -> str | None:
    cluster.kill(node)
    cluster.node_args[node] = []
    cluster.start(node)
    cluster.wait_for_leader()
    return lead(cluster, node)


def leader_problems(cluster) -> list[str]:
    """Node 1 (its clock skewed) leads after node 2 (a correct clock) stamped a write."""
    problems = [p for p in (lead(cluster, 2),) if p]
    admin_write(cluster, problems, "before")
    failed = lead(cluster, 1)
    if failed:
        return problems + time_problems(cluster) + [f"skewed: {failed}"]
    problems += verdict_problems(cluster, "skewed")
    failed = restart_correct(cluster, 1)
    if failed:
        return problems + [f"restarted: {failed}"]
    return problems + verdict_problems(cluster, "restarted")


def idle_follower_problems(cluster) -> list[str]:
    """Node 3, a year behind, idle: no write since the token expired."""
    problems = time_problems(cluster)
    failed = lead(cluster, 1)
    if failed:  # node 3 led from the start, and judges the admin by its own clock
        return problems + [failed]
    token = issue(cluster, "erin", {"e:": "rw"}, ttl=1.5, not_before=time.time() - 1)
    with cluster.client(token=token, timeout=WAIT) as c:
        c.set("e:k", "v")
    time.sleep(3.0)  # idle: nothing is written meanwhile
    with node_client(cluster, 3, token) as c:
        if not not_served(lambda: c.get("e:k", consistency="stale")):
            problems.append("node 3 (idle, a year behind) served a stale read with an "
                            "expired token")
        if not not_served(lambda: c.get("e:k")):
            problems.append("node 3 (idle, a year behind) served a linearizable read with an "
                            "expired token")
    failed = restart_correct(cluster, 3) or lead(cluster, 1)
    if failed:
        return problems + [f"restarted: {failed}"]
    return problems + verdict_problems(cluster, "restarted")


def test_a_leader_a_year_ahead_moves_no_verdict(running):
    assert leader_problems(running(**skewed(1, YEAR_MS))) == []


def test_a_leader_a_year_behind_does_not_freeze_cluster_time(running):
    assert leader_problems(running(**skewed(1, -YEAR_MS))) == []


def test_an_idle_follower_a_year_behind_refuses_an_expired_token(running):
    assert idle_follower_problems(running(**skewed(3, -YEAR_MS))) == []


# ---- teeth: a node whose cluster time is its own clock is caught --------------------------------
def test_teeth_a_leader_ahead_by_its_own_clock_is_caught(running):
    problems = leader_problems(running(**skewed(1, YEAR_MS, "clock-local")))
    print("caught:", problems)
    assert any(p.startswith("node 1's cluster time is +") for p in problems), problems
    # Valid tokens judged expired: a fresh one, or the admin's (up --auth's lasts 7 days), which
    # then cannot even hand leadership back. Where the run gets past that, the node left its
    # stamps behind: after the restart with a correct clock, everything is still expired.
    assert any("fresh token was refused" in p or "token of 'admin' expired" in p
               for p in problems), problems


def test_teeth_a_leader_behind_by_its_own_clock_is_caught(running):
    problems = leader_problems(running(**skewed(1, -YEAR_MS, "clock-local")))
    print("caught:", problems)
    # Frozen at the last stamp (0 if it led from the start), or a year back: valid tokens
    # that came after it are "not valid yet" there, or "issued in the future", the admin's too.
    assert any(("not valid yet" in p or "issued in the future" in p) for p in problems), problems
    assert any(p.startswith("node 1's cluster time is -") for p in problems), problems


def test_teeth_an_idle_follower_behind_by_its_own_clock_is_caught(running):
    problems = idle_follower_problems(running(**skewed(3, -YEAR_MS, "clock-local")))
    print("caught:", problems)
    assert any(p.startswith("node 3's cluster time is -") for p in problems), problems
    # Node 3 a follower: it serves the expired token; node 3 leading from the start (frozen
    # at stamp 0, or a year back): it refuses even the admin, and keeps its leadership.
    assert any("stale read with an expired token" in p or "not valid yet" in p
               or "issued in the future" in p for p in problems), problems


# ================================================================================================
# Stale reads get a staleness bound (node.max_stale_ms)
# ================================================================================================
def partition_problems(cluster, net) -> list[str]:
    """Node 3 cut off; "mallory" revoked through the majority: node 3 must stop serving her
    (and anyone) stale reads once node.max_stale_ms passes, and serve again once healed."""
    problems = []
    assert lead(cluster, 1) is None
    token = issue(cluster, "mallory", {"m:": "rw"})
    with node_client(cluster, 1, token) as c:
        c.set("m:k", "v")
    with node_client(cluster, 3, token, timeout=2.0) as c:
        eventually(lambda: c.get("m:k", consistency="stale") == b"v", what="node 3 applies")
    net.block(relay.isolate(3, [1, 2, 3]))
    with Client([cluster.address(1), cluster.address(2)], token=cluster.admin_token(),
                timeout=WAIT) as admin:
        def revoked():
            try:
                return admin.admin("revoke", "mallory")["result"] > 0
            except errors.RaftCacheError:
                return False  # an election in the majority: again
        eventually(revoked, timeout=15, what="the majority revokes")
    time.sleep(1.0)  # past node.max_stale_ms (500 ms)
    for who, t in (("the revoked subject", token), ("the admin", cluster.admin_token())):
        with node_client(cluster, 3, t, timeout=1.0) as c:
            try:
                c.get("m:k", consistency="stale")
                problems.append(f"partitioned node 3 served {who} a stale read")
            except errors.Unavailable as exc:
                if "max_stale_ms" not in str(exc):
                    problems.append(f"node 3 refused for another reason: {exc}")
            except errors.Unauthorized:
                problems.append(f"partitioned node 3 judged {who} (it knows no revocation)")
    net.heal()
    with node_client(cluster, 3, cluster.admin_token(), timeout=1.0) as c:
        def serves():
            try:
                return c.get("m:k", consistency="stale") == b"v"
            except errors.Unavailable:
                return False
        eventually(serves, timeout=15, what="node 3 serves stale reads once healed")
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as c:
        def caught_up():
            return len({c.status(cluster.address(i)).applied for i in (1, 2, 3)}) == 1
        eventually(caught_up, timeout=15, what="node 3 catches up")
    with node_client(cluster, 3, token) as c:
        if not not_served(lambda: c.get("m:k", consistency="stale")):
            problems.append("healed node 3 served the revoked subject")
    return problems


class ThreadRelays:
    """The fault relays (gevent) on a thread of their own, whose hub runs while this one
    sleeps or blocks in a client call; the test flips their faults from here."""

    def __init__(self, nodes: dict[int, str]):
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(nodes,), daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _serve(self, nodes) -> None:
        import gevent

        self.net = relay.RelayNet(nodes, random.Random(1))
        self.ready.set()
        while not self.stopping.is_set():
            gevent.sleep(0.05)
        self.net.close()

    def block(self, links) -> None:
        self.net.block(links)

    def heal(self) -> None:
        self.net.heal()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)


def partitioned_cluster(running, tmp_path, max_stale_ms: int):
    cluster = LocalCluster(str(tmp_path / "p"), nodes=3, port=free_port_block(3), auth=True,
                           extra={"node": {"max_stale_ms": max_stale_ms}})
    net = ThreadRelays({i: cluster.address(i) for i in (1, 2, 3)})
    cluster.routes = net.net.routes()
    return running(cluster), net


def test_a_partitioned_follower_stops_serving_stale_reads(running, tmp_path):
    cluster, net = partitioned_cluster(running, tmp_path, 500)
    try:
        assert partition_problems(cluster, net) == []
    finally:
        net.close()


def test_teeth_without_a_staleness_bound_a_partitioned_follower_serves_the_revoked(
        running, tmp_path):
    cluster, net = partitioned_cluster(running, tmp_path, 86_400_000)  # a day: no bound
    try:
        problems = partition_problems(cluster, net)
    finally:
        net.close()
    print("caught:", problems)
    assert "partitioned node 3 served the revoked subject a stale read" in problems, problems
