"""Membership changes: joint consensus, learners, removing the leader, one change at a time."""

from __future__ import annotations

import pytest
from raft_harness import Network, log_of

from raftcache.core.raft import RawNode
from raftcache.core.raft.messages import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    EntryType,
    MsgType,
    ProposalRefused,
    StateRole,
)

ET = 10
ADD, REMOVE, LEARNER = (
    ConfChangeType.ADD_VOTER,
    ConfChangeType.REMOVE_NODE,
    ConfChangeType.ADD_LEARNER,
)


def conf(voters, outgoing=(), learners=()) -> ConfState:
    return ConfState(frozenset(voters), frozenset(outgoing), frozenset(learners))


def change(net: Network, leader: int, *changes: tuple) -> int:
    """Propose (type, node[, address]) changes on `leader`; their index."""
    _, index = net.nodes[leader].propose_conf_change([ConfChangeSingle(*c) for c in changes])
    net.process(leader)
    return index


def _until(net: Network, cond, rounds: int = 50) -> None:
    for _ in range(rounds):
        if cond():
            return
        net.deliver()
    assert cond()


def test_add_voter_goes_through_a_joint_configuration_and_leaves_it_automatically():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.add_node(4)
    assert change(net, 1, (ADD, 4)) == 3
    net.stabilize()
    c0, joint, c1 = conf({1, 2, 3}), conf({1, 2, 3, 4}, {1, 2, 3}), conf({1, 2, 3, 4})
    for n in (1, 2, 3):
        assert net.confs[n] == [c0, joint, c1], n
    assert net.nodes[4].conf == c1
    # Index 3 enters the joint configuration; index 4, proposed by the leader itself once
    # index 3 was applied, leaves it.
    entries = net.nodes[4].raft_log.entries
    assert [(e.index, e.type) for e in entries[2:]] == [
        (3, EntryType.CONF_CHANGE),
        (4, EntryType.CONF_CHANGE),
    ]
    assert ConfChange.decode(entries[3].data) == ConfChange()
    assert leader.commit == 4 and set(leader.tracker.progress) == {1, 2, 3, 4}
    net.propose(1, b"with 4")
    net.stabilize()
    assert net.sm[4].data == [b"with 4"]


def test_joining_node_learns_the_bootstrap_configuration_by_replication():
    net = Network.bootstrap([1, 2, 3], max_msg_entries=1)  # one entry, one Ready at a time
    net.elect(1)
    node4 = net.add_node(4)
    assert node4.conf == ConfState() and not node4.is_promotable()
    change(net, 1, (ADD, 4))
    net.stabilize()
    first = net.storage[4].entries[0]
    assert (first.index, first.term, first.type) == (1, 1, EntryType.CONF_CHANGE)
    assert ConfChange.decode(first.data) == ConfChange(
        tuple(ConfChangeSingle(ADD, n) for n in (1, 2, 3))
    )
    # Before its own addition, it applied the bootstrap configuration like any other change.
    assert net.confs[4][0] == conf({1, 2, 3}) and net.confs[4][-1] == conf({1, 2, 3, 4})
    assert node4.is_promotable()


def test_joining_node_gets_the_configuration_from_a_snapshot_after_compaction():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    for i in range(5):
        net.propose(1, b"%d" % i)
    net.stabilize()
    net.compact(1)
    net.add_node(4)
    change(net, 1, (LEARNER, 4))
    net.stabilize()
    net.run(2)
    assert net.messages(MsgType.SNAP, to=4)
    assert net.confs[4][0] == conf({1, 2, 3})  # the snapshot's configuration
    assert net.nodes[4].conf == conf({1, 2, 3}, learners={4})
    assert net.sm[4].data == [b"%d" % i for i in range(5)]


def test_joint_configuration_needs_a_majority_of_both_halves():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.add_node(4)
    net.add_node(5)
    change(net, 1, (ADD, 4), (ADD, 5))
    _until(net, lambda: leader.conf.joint)
    assert leader.conf == conf({1, 2, 3, 4, 5}, {1, 2, 3})
    # 1, 4 and 5 are a majority of the new voters but not of the old ones.
    net.isolate(2, 3)
    net.stabilize()
    net.propose(1, b"x")
    net.stabilize()
    assert leader.tracker.progress[4].match == leader.tracker.progress[5].match == leader.raft_log.last_index()
    assert leader.commit < leader.raft_log.last_index() and leader.conf.joint
    net.heal()
    net.run(1)
    assert leader.commit == leader.raft_log.last_index()
    assert leader.conf == conf({1, 2, 3, 4, 5})


def test_remove_a_voter():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    change(net, 1, (REMOVE, 3))
    net.stabilize()
    assert net.confs[1] == [conf({1, 2, 3}), conf({1, 2}, {1, 2, 3}), conf({1, 2})]
    assert set(leader.tracker.progress) == {1, 2}
    net.crash(3)
    net.propose(1, b"two of two")
    net.stabilize()
    assert leader.commit == leader.raft_log.last_index() and net.sm[2].data == [b"two of two"]
    sent_before = len(net.sent)
    net.run(5 * ET)
    assert not [m for m in net.sent[sent_before:] if m.to == 3]  # no longer a member
    assert leader.role == StateRole.LEADER  # check-quorum counts only 1 and 2 now


def test_removing_the_leader_makes_it_step_down_once_the_change_is_applied():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    change(net, 1, (REMOVE, 1))
    _until(net, lambda: leader.conf.joint)
    assert leader.role == StateRole.LEADER  # still a voter of the outgoing half
    net.stabilize()
    assert net.confs[1][-1] == conf({2, 3})
    assert leader.role == StateRole.FOLLOWER and not leader.is_promotable()
    # The others learned the final configuration with the commit that deposed it.
    assert all(net.nodes[n].conf == conf({2, 3}) for n in (2, 3))
    sent_before = len(net.sent)
    net.run(6 * ET)
    new = net.leader()
    assert new in (2, 3) and net.nodes[new].term == 3
    assert not [
        m
        for m in net.sent[sent_before:]
        if m.frm == 1 and m.type in (MsgType.PRE_VOTE, MsgType.VOTE)
    ]
    assert not [
        m
        for m in net.sent[sent_before:]
        if m.to == 1 and m.type in (MsgType.PRE_VOTE, MsgType.VOTE)
    ]
    net.propose(new, b"after")
    net.stabilize()
    assert net.sm[2].data == net.sm[3].data == [b"after"]


def test_learners_receive_entries_but_neither_vote_nor_count_for_commit():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.add_node(4)
    net.add_node(5)
    change(net, 1, (LEARNER, 4), (LEARNER, 5))
    net.stabilize()
    # No joint step: the voters do not change.
    assert net.confs[1] == [conf({1, 2, 3}), conf({1, 2, 3}, learners={4, 5})]
    net.propose(1, b"for all")
    net.stabilize()
    for n in (4, 5):
        assert net.sm[n].data == [b"for all"] and net.log(n) == net.log(1)
    # With the other voters cut off, the leader and two learners (three of five nodes) hold
    # the entry, but only one of three voters does: not committed.
    net.isolate(2, 3)
    net.propose(1, b"learners only")
    net.stabilize()
    assert leader.tracker.progress[4].match == leader.tracker.progress[5].match == leader.raft_log.last_index()
    assert leader.commit == leader.raft_log.last_index() - 1
    # They never campaign, and nobody asks them for a vote.
    net.heal()
    net.isolate(1)
    net.run(6 * ET)
    assert net.nodes[4].role == net.nodes[5].role == StateRole.FOLLOWER
    votes = [m for m in net.sent if m.type in (MsgType.PRE_VOTE, MsgType.VOTE)]
    assert votes and not [m for m in votes if {m.frm, m.to} & {4, 5}]
    assert net.leader() in (2, 3)


def test_promote_a_learner():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.add_node(4)
    change(net, 1, (LEARNER, 4))
    net.stabilize()
    change(net, 1, (ADD, 4))
    net.stabilize()
    assert net.confs[1][-3:] == [
        conf({1, 2, 3}, learners={4}),
        conf({1, 2, 3, 4}, {1, 2, 3}),
        conf({1, 2, 3, 4}),
    ]
    assert net.nodes[4].is_promotable()


def test_second_change_is_refused_while_one_is_pending():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.add_node(4)
    change(net, 1, (LEARNER, 4))
    with pytest.raises(ProposalRefused, match="still being applied"):
        change(net, 1, (ADD, 4))
    net.stabilize()
    change(net, 1, (ADD, 4))  # now it is applied
    _until(net, lambda: leader.conf.joint)
    with pytest.raises(ProposalRefused, match="still being applied"):
        change(net, 1, (REMOVE, 2))  # the automatic leave is pending
    net.stabilize()
    assert not leader.conf.joint
    change(net, 1, (REMOVE, 4))
    net.stabilize()
    assert leader.conf == conf({1, 2, 3})


def test_new_leader_refuses_changes_until_its_log_is_applied():
    # Entries 2..5 are in every log but not known committed: any could be a conf change.
    ids = [1, 2, 3]
    net = Network.from_logs({n: log_of([1, 1, 1, 1], ids) for n in ids}, term=1)
    net.campaign(1)
    net.stabilize(lambda m: m.type in (MsgType.VOTE, MsgType.VOTE_RESP))
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER and leader.applied == 1
    with pytest.raises(ProposalRefused, match="still being applied"):
        change(net, 1, (LEARNER, 4))
    net.stabilize()
    assert leader.applied == 6
    assert change(net, 1, (LEARNER, 4)) == 7


def test_invalid_changes_are_refused():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    with pytest.raises(ProposalRefused, match="demote"):
        change(net, 1, (LEARNER, 2))
    with pytest.raises(ProposalRefused, match="at least one voter"):
        change(net, 1, (REMOVE, 1), (REMOVE, 2), (REMOVE, 3))
    with pytest.raises(ProposalRefused, match="not in a joint configuration"):
        leader.propose_conf_change(ConfChange())
    assert leader.raft_log.last_index() == 2
    with pytest.raises(ProposalRefused):
        net.nodes[2].propose_conf_change([ConfChangeSingle(ADD, 4)])


# -- addresses and joins: what the log carries besides the membership itself -------------------


def test_conf_changes_carry_addresses_and_old_entries_still_decode():
    cc = ConfChange((ConfChangeSingle(ADD, 4, "10.0.0.4:7400"),
                     ConfChangeSingle(ConfChangeType.UPDATE_ADDRESS, 2, "node-2.raftcache:7400"),
                     ConfChangeSingle(REMOVE, 3)))
    assert ConfChange.decode(cc.encode()) == cc
    assert ConfChange.decode(b"[[0, 4], [1, 3]]") == ConfChange(
        (ConfChangeSingle(ADD, 4), ConfChangeSingle(REMOVE, 3)))  # before addresses
    for data, problem in [(b'[[0, 4, "nowhere"]]', 'expected "host:port"'),
                          (b'[[0, 4, "a b:1"]]', 'expected "host:port"'),
                          (b'[[0, 4, "h:70000"]]', 'expected "host:port"'),
                          (b'[[0, 4, 7400]]', "is not a string"),
                          (b'[[0, 4, "' + b"h" * 300 + b':1"]]', "longer than 255"),
                          (b'[[3, 4]]', "an address update of node 4 without an address"),
                          (b'[[0, 4, "h:1", "x"]]', "not a configuration change")]:
        with pytest.raises(ValueError, match=problem):
            ConfChange.decode(data)


def test_bootstrap_puts_the_founders_addresses_in_the_first_entry():
    (entry,) = RawNode.bootstrap_entries({2: "b:2", 1: "a:1"})
    assert ConfChange.decode(entry.data).changes == (ConfChangeSingle(ADD, 1, "a:1"),
                                                     ConfChangeSingle(ADD, 2, "b:2"))
    assert RawNode.bootstrap_entries([1, 2])[0].data == b"[[0, 1], [0, 2]]"


def test_address_updates_and_join_marks_keep_the_membership():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    index = change(net, 1, (ConfChangeType.UPDATE_ADDRESS, 2, "b:2"), (ConfChangeType.JOINED, 3))
    _until(net, lambda: all(n.status().applied >= index for n in net.nodes.values()))
    assert leader.conf == conf([1, 2, 3])  # no joint configuration, nobody added or removed
    with pytest.raises(ProposalRefused, match="invalid change"):
        change(net, 1, (ConfChangeType.JOINED, 9))  # not a member
    with pytest.raises(ProposalRefused, match="invalid change"):
        change(net, 1, (ConfChangeType.UPDATE_ADDRESS, 9, "i:9"))
    with pytest.raises(ProposalRefused, match="without an address"):  # followers would drop it
        change(net, 1, (ConfChangeType.UPDATE_ADDRESS, 2))


def test_an_address_update_keeps_the_leaders_view_of_its_followers():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    _, index = leader.propose(b"x")
    net.process(1)
    _until(net, lambda: leader.tracker.progress[2].match >= index)
    before = {n: leader.tracker.progress[n].match for n in (2, 3)}
    done = change(net, 1, (ConfChangeType.UPDATE_ADDRESS, 2, "b:2"), (ConfChangeType.JOINED, 3))
    _until(net, lambda: leader.status().applied >= done)
    # Progress was not rebuilt (which would send the leader back to probing every follower).
    assert all(leader.tracker.progress[n].match >= before[n] for n in (2, 3))
