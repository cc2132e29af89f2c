"""The commit rule: Figures 7 and 8 of the Raft paper, and the new leader's no-op."""

from __future__ import annotations

from raft_harness import Network, log_of

from raftcache.core.raft.messages import Entry, EntryType, Message, MsgType, StateRole

FIG7 = {
    # Index 1 is the bootstrap membership entry (term 1), standing in for the figure's index 1.
    1: [1, 1, 4, 4, 5, 5, 6, 6, 6],  # the leader for term 8
    2: [1, 1, 4, 4, 5, 5, 6, 6],  # (a) missing one entry
    3: [1, 1, 4],  # (b) missing many
    4: [1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # (c) one extra uncommitted entry
    5: [1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # (d) two extra entries of term 7
    6: [1, 1, 4, 4, 4, 4],  # (e) missing entries and extra entries of term 4
    7: [1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # (f) a leader of terms 2 and 3 that never committed
}


def test_figure7_leader_of_term_8_brings_every_follower_to_its_log():
    ids = list(FIG7)
    net = Network.from_logs({n: log_of(t, ids) for n, t in FIG7.items()}, term=7)
    leader_log = [(1, 1)] + [(i, t) for i, t in enumerate(FIG7[1], start=2)]
    net.campaign(1)
    net.stabilize()
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER and leader.term == 8
    # (c) and (d) have more up-to-date logs and refuse; the other four elect it.
    refused = {m.frm for m in net.messages(MsgType.VOTE_RESP) if m.reject}
    assert refused == {4, 5}
    want = leader_log + [(11, 8)]  # plus its no-op
    for n in ids:
        assert net.log(n) == want, f"follower {n}"
        assert net.nodes[n].commit == 11 and net.nodes[n].applied == 11
        assert [(e.index, e.term) for e in net.storage[n].entries] == want
    # Fast backtracking: the probe at index 10 is refused at most once per follower.
    refusals = {
        n: [m.index for m in net.messages(MsgType.APP_RESP, frm=n) if m.reject] for n in ids[1:]
    }
    assert refusals == {2: [10], 3: [10], 4: [], 5: [], 6: [10], 7: [10]}


def _figure8_up_to_c() -> tuple[Network, Message]:
    """Figure 8 (c): S1, leader of term 4, has replicated (2, term 2) to S2 and S3 (a majority)
    and its own no-op (3, term 4) only to S2. S5 holds (2, term 3) from its term-3 leadership."""
    ids = [1, 2, 3, 4, 5]
    logs = {1: [2], 2: [2], 3: [], 4: [], 5: [3]}
    net = Network.from_logs({n: log_of(t, ids) for n, t in logs.items()}, term=3, max_msg_entries=1)
    net.campaign(1)
    net.stabilize(lambda m: m.type in (MsgType.VOTE, MsgType.VOTE_RESP))
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER and leader.term == 4
    assert net.log(1) == [(1, 1), (2, 2), (3, 4)]  # the no-op goes in at once
    net.isolate(4, 5)
    net.stabilize(lambda m: m.to == 2 or m.frm == 2)
    # S3 is missing index 2: after one refusal it is sent (2, term 2) alone...
    net.deliver(lambda m: m.to == 3)
    net.deliver(lambda m: m.frm == 3)
    net.deliver(lambda m: m.to == 3)
    net.deliver(lambda m: m.frm == 3)
    assert net.log(3) == [(1, 1), (2, 2)]
    # ...and the append carrying the no-op to S3 is held back.
    (held,) = net.take(lambda m: m.to == 3 and m.type == MsgType.APP)
    assert [(e.index, e.term) for e in held.entries] == [(3, 4)]
    return net, held


def test_figure8_entry_from_an_earlier_term_on_a_majority_is_not_committed():
    net, _ = _figure8_up_to_c()
    leader = net.nodes[1]
    assert {n: leader.tracker.progress[n].match for n in (1, 2, 3)} == {1: 3, 2: 3, 3: 2}
    holders = [n for n in net.nodes if (2, 2) in net.log(n)]
    assert holders == [1, 2, 3]  # a majority of five holds (2, term 2)...
    assert leader.commit == 1  # ...but replicas are counted only for the leader's own term
    assert all(node.commit == 1 for node in net.nodes.values())
    # (d): S1 crashes; S5 wins term 5 with S3's and S4's votes and overwrites index 2. That is
    # safe precisely because (2, term 2) was never committed.
    net.crash(1)
    net.heal()
    net.campaign(5)
    net.stabilize()
    s5 = net.nodes[5]
    assert s5.role == StateRole.LEADER and s5.term == 5
    granted = sorted(m.frm for m in net.messages(MsgType.VOTE_RESP, to=5) if not m.reject)
    assert granted == [3, 4]
    for n in (2, 3, 4, 5):
        assert net.log(n) == [(1, 1), (2, 3), (3, 5)]
        assert net.nodes[n].commit == 3


def test_figure8_entry_from_an_earlier_term_commits_with_one_of_the_current_term():
    net, held = _figure8_up_to_c()
    leader = net.nodes[1]
    net.step(held)  # (e): the no-op reaches S3 too
    net.deliver(lambda m: m.frm == 3)
    assert leader.commit == 3  # the no-op commits, and (2, term 2) with it
    applied = [(e.index, e.term) for rd in net.readys[1] for e in rd.committed_entries]
    assert applied[-2:] == [(2, 2), (3, 4)]
    # Now S5 cannot win any more: a majority has a log more up to date than its own.
    net.crash(1)
    net.heal()
    net.campaign(5)
    net.stabilize()
    assert net.nodes[5].role != StateRole.LEADER
    refused = sorted(m.frm for m in net.messages(MsgType.VOTE_RESP, to=5) if m.reject)
    assert refused == [2, 3]
    net.run(60)
    leader = net.nodes[net.leader()]
    assert leader.id in (2, 3) and net.log(leader.id)[:3] == [(1, 1), (2, 2), (3, 4)]


def test_new_leader_appends_a_noop_immediately():
    net = Network.bootstrap([1, 2, 3])
    net.campaign(1)
    net.deliver(lambda m: m.type == MsgType.VOTE)
    net.deliver(lambda m: m.type == MsgType.VOTE_RESP and m.frm == 2)  # the winning vote
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER
    rd = net.readys[1][-1]
    assert rd.soft_state.role == StateRole.LEADER
    assert rd.entries == (Entry(2, 2, EntryType.NORMAL, b""),)
    apps = [m for m in rd.all_messages if m.type == MsgType.APP]
    assert sorted(m.to for m in apps) == [2, 3]
    assert all(m.entries == rd.entries for m in apps)
    net.stabilize()
    assert all(node.commit == 2 for node in net.nodes.values())
    assert all(net.sm[n].data == [] for n in net.nodes)  # a no-op is not applied as data


def test_commit_needs_a_majority_of_voters():
    net = Network.bootstrap([1, 2, 3, 4, 5])
    leader = net.elect(1)
    net.isolate(3, 4, 5)
    net.propose(1, b"x")
    net.stabilize()
    assert leader.commit == 2 and leader.tracker.progress[2].match == 3  # two of five hold index 3
    net.heal()
    net.isolate(4, 5)
    net.run(1)  # the heartbeat round brings node 3 back
    assert leader.commit == 3
    assert [net.nodes[n].commit for n in (1, 2, 3)] == [3, 3, 3]
