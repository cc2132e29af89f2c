"""No single clock moves the cluster (issue #22): real nodes, auth required, one of them run
with its clock a year ahead or behind (`python -m raftcache.testing.node --clock-offset-ms`).

A leader a year ahead must not expire every token and key for good; a leader a year behind must
not freeze cluster time (expired tokens writing, TTLs never passing); an idle follower a year
behind must refuse an expired token. Then the node restarts with a correct clock and nothing is
left behind. The teeth tests run the same scenarios on a node whose cluster time is its own
clock (mutant `clock-local`, what every node did before) and assert they catch it.
"""

from __future__ import annotations

import time

from test_auth import WAIT, eventually, issue, node_client, refused

from raftcache import errors
from raftcache.node.replica import MAX_CLOCK_SKEW_MS

YEAR_MS = 365 * 24 * 3600 * 1000
BOUND_S = MAX_CLOCK_SKEW_MS / 1000


def skewed(node: int, offset_ms: int, mutant: str | None = None) -> dict:
    args = ["--clock-offset-ms", str(offset_ms)] + (["--mutant", mutant] if mutant else [])
    return {"auth": True, "storage": "file-wal", "launcher": ["-m", "raftcache.testing.node"],
            "node_args": {node: args}}


def lead(cluster, node: int) -> None:
    with cluster.client(token=cluster.admin_token(), timeout=WAIT) as admin:
        def leads():
            try:
                return admin.transfer_leader(node).leader == node
            except errors.RaftCacheError:
                return False
        eventually(leads, timeout=15, what=f"node {node} leads")


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
            if not refused(lambda: c.get(key, consistency="stale")):
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


def restart_correct(cluster, node: int) -> None:
    cluster.kill(node)
    cluster.node_args[node] = []
    cluster.start(node)
    cluster.wait_for_leader()
    lead(cluster, node)


def leader_problems(cluster) -> list[str]:
    """Node 1 (its clock skewed) leads after node 2 (a correct clock) stamped a write."""
    problems: list[str] = []
    lead(cluster, 2)
    admin_write(cluster, problems, "before")
    lead(cluster, 1)
    problems += verdict_problems(cluster, "skewed")
    restart_correct(cluster, 1)
    return problems + verdict_problems(cluster, "restarted")


def idle_follower_problems(cluster) -> list[str]:
    """Node 3, a year behind, idle: no write since the token expired."""
    problems = time_problems(cluster)
    lead(cluster, 1)
    token = issue(cluster, "erin", {"e:": "rw"}, ttl=1.5, not_before=time.time() - 1)
    with cluster.client(token=token, timeout=WAIT) as c:
        c.set("e:k", "v")
    time.sleep(3.0)  # idle: nothing is written meanwhile
    with node_client(cluster, 3, token) as c:
        if not refused(lambda: c.get("e:k", consistency="stale")):
            problems.append("node 3 (idle, a year behind) served a stale read with an "
                            "expired token")
        if not refused(lambda: c.get("e:k")):
            problems.append("node 3 (idle, a year behind) served a linearizable read with an "
                            "expired token")
    restart_correct(cluster, 3)
    lead(cluster, 1)
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
    assert any("fresh token was refused" in p for p in problems), problems
    # It left its stamps behind: after the restart with a correct clock, still all expired.
    assert any(p.startswith("restarted:") for p in problems), problems


def test_teeth_a_leader_behind_by_its_own_clock_is_caught(running):
    problems = leader_problems(running(**skewed(1, -YEAR_MS, "clock-local")))
    print("caught:", problems)
    # Frozen at the last stamp: valid tokens that came after it are "not valid yet" there.
    assert any(p.startswith("skewed:") and "not valid yet" in p for p in problems), problems
    assert any(p.startswith("node 1's cluster time is -") for p in problems), problems


def test_teeth_an_idle_follower_behind_by_its_own_clock_is_caught(running):
    problems = idle_follower_problems(running(**skewed(3, -YEAR_MS, "clock-local")))
    print("caught:", problems)
    assert any("stale read with an expired token" in p for p in problems), problems
