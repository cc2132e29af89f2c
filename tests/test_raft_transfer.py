"""Leadership transfer: catch the target up, then TimeoutNow; refuse proposals meanwhile."""

from __future__ import annotations

import pytest
from raft_harness import Network

from raftcache.core.raft.messages import (
    NONE,
    ConfChangeSingle,
    ConfChangeType,
    MsgType,
    NotLeader,
    ProposalRefused,
    StateRole,
)

ET = 10


def _lagging_target() -> Network:
    """Leader 1 of term 2 has entries 3..7 that node 3 (isolated meanwhile) does not."""
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.isolate(3)
    for i in range(5):
        net.propose(1, b"w%d" % i)
    net.stabilize()
    assert net.nodes[1].commit == 7 and net.nodes[3].raft_log.last_index() == 2
    net.heal()
    return net


def test_target_is_caught_up_before_timeout_now():
    net = _lagging_target()
    leader = net.nodes[1]
    leader.transfer_leadership(3)
    net.process(1)
    assert [m.type for m in net.queue] == [MsgType.APP]  # not TimeoutNow: it is behind
    net.stabilize()
    to_3 = [m for m in net.sent if m.frm == 1 and m.to == 3 and m.term == 2]
    timeout_now = [i for i, m in enumerate(net.sent) if m.type == MsgType.TIMEOUT_NOW]
    assert len(timeout_now) == 1
    caught_up = next(
        i
        for i, m in enumerate(net.sent)
        if m.type == MsgType.APP_RESP and m.frm == 3 and m.index == 7
    )
    assert caught_up < timeout_now[0]  # only once it acknowledged the leader's last index
    assert to_3[-1].type == MsgType.TIMEOUT_NOW
    # It wins at once, without waiting for a timeout, and keeps every entry.
    assert net.leader() == 3 and net.nodes[3].term == 3
    assert leader.role == StateRole.FOLLOWER and leader.lead == 3
    assert net.sm[3].data == [b"w%d" % i for i in range(5)]
    assert all(node.commit == 8 for node in net.nodes.values())  # its no-op


def test_up_to_date_target_gets_timeout_now_at_once():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.transfer_leadership(2)
    rd = leader.ready()
    assert [(m.type, m.to) for m in rd.all_messages] == [(MsgType.TIMEOUT_NOW, 2)]
    leader.advance(rd)


def test_proposals_are_refused_during_a_transfer():
    net = _lagging_target()
    net.isolate(3)  # it cannot catch up: the transfer stays pending
    leader = net.nodes[1]
    leader.transfer_leadership(3)
    with pytest.raises(ProposalRefused) as err:
        leader.propose(b"during")
    assert not isinstance(err.value, NotLeader)
    assert err.value.reason == "leadership transfer in progress" and err.value.leader == 3
    with pytest.raises(ProposalRefused, match="transfer"):
        leader.propose_conf_change([ConfChangeSingle(ConfChangeType.ADD_LEARNER, 4)])
    assert leader.raft_log.last_index() == 7  # nothing was appended


def test_transfer_aborts_after_an_election_timeout_if_the_target_is_unreachable():
    net = _lagging_target()
    net.isolate(3)
    leader = net.nodes[1]
    leader.transfer_leadership(3)
    net.run(ET - 1)
    assert leader.lead_transferee == 3
    with pytest.raises(ProposalRefused):
        leader.propose(b"still")
    net.run(1)
    assert leader.lead_transferee == NONE
    assert leader.role == StateRole.LEADER and leader.term == 2  # node 2 kept it in office
    assert net.propose(1, b"again") == (2, 8)
    net.stabilize()
    assert leader.commit == 8
    assert not net.messages(MsgType.TIMEOUT_NOW)


def test_old_leader_refuses_proposals_with_the_new_leader_id():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.transfer_leadership(2)
    net.stabilize()
    with pytest.raises(NotLeader) as err:
        leader.propose(b"x")
    assert err.value.leader == 2 and err.value.reason == "not the leader"


def test_transfer_argument_checks():
    net = Network.bootstrap([1, 2, 3])
    with pytest.raises(NotLeader):
        net.nodes[1].transfer_leadership(2)
    leader = net.elect(1)
    leader.transfer_leadership(1)  # to itself: nothing to do
    assert leader.lead_transferee == NONE and not leader.has_ready()
    with pytest.raises(ProposalRefused, match="not a voter"):
        leader.transfer_leadership(9)
    leader.propose_conf_change([ConfChangeSingle(ConfChangeType.ADD_LEARNER, 4)])
    net.add_node(4)
    net.stabilize()
    assert 4 in leader.conf.learners
    with pytest.raises(ProposalRefused, match="not a voter"):
        leader.transfer_leadership(4)


def test_transfer_to_a_target_behind_a_lost_append_still_completes():
    net = _lagging_target()
    net.drop(lambda m: m.type == MsgType.APP and m.to == 3, times=1)
    net.nodes[1].transfer_leadership(3)
    net.stabilize()
    assert net.leader() == 1  # the first append was lost: still catching up
    net.run(2)  # a heartbeat round resumes the catch-up, then TimeoutNow
    assert net.leader() == 3
