"""What the core refuses: proposals and reads on non-leaders, bad configs, misuse of Ready."""

from __future__ import annotations

import random

import pytest
from raft_harness import Network

from raftcache.core.raft import RaftConfig, RawNode
from raftcache.core.raft.messages import (
    NONE,
    ConfChangeSingle,
    ConfChangeType,
    Message,
    MsgType,
    NotLeader,
    ProposalRefused,
    StateRole,
)

ET = 10


def test_propose_on_a_follower_names_the_leader():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    follower = net.nodes[2]
    with pytest.raises(NotLeader) as err:
        follower.propose(b"x")
    assert isinstance(err.value, ProposalRefused)
    assert err.value.leader == 1 and err.value.reason == "not the leader"
    assert "try node 1" in str(err.value)
    with pytest.raises(NotLeader) as err:
        follower.propose_conf_change([ConfChangeSingle(ConfChangeType.ADD_VOTER, 4)])
    assert err.value.leader == 1
    with pytest.raises(NotLeader) as err:
        follower.transfer_leadership(3)
    assert err.value.leader == 1
    assert not follower.has_ready() and follower.raft_log.last_index() == 2


def test_propose_with_no_leader_known():
    net = Network.bootstrap([1, 2, 3])
    node = net.nodes[2]
    with pytest.raises(NotLeader) as err:
        node.propose(b"x")
    assert err.value.leader == NONE and err.value.reason == "no leader known"
    assert str(err.value) == "no leader known"
    with pytest.raises(NotLeader):
        node.read_index(b"r")
    assert not node.has_ready()


def test_candidates_refuse_proposals_and_reads():
    net = Network.bootstrap([1, 2, 3], pre_vote=False)
    net.elect(1)
    net.isolate(2)
    net.tick(2, 3 * ET)
    node = net.nodes[2]
    assert node.role == StateRole.CANDIDATE
    with pytest.raises(NotLeader) as err:
        node.propose(b"x")
    assert err.value.leader == NONE
    with pytest.raises(NotLeader):
        node.read_index(b"r")


def test_deposed_leader_refuses_proposals():
    net = Network.bootstrap([1, 2, 3])
    old = net.elect(1)
    net.isolate(1)
    net.run(4 * ET)
    assert old.role in (StateRole.FOLLOWER, StateRole.PRE_CANDIDATE) and old.term == 2
    with pytest.raises(NotLeader) as err:
        old.propose(b"x")
    assert err.value.leader == NONE
    net.heal()
    net.run(2)
    with pytest.raises(NotLeader) as err:
        old.propose(b"x")
    assert err.value.leader == net.leader() != 1


def test_config_validation():
    with pytest.raises(ValueError, match="node id"):
        RaftConfig(id=NONE)
    with pytest.raises(ValueError, match="heartbeat_tick"):
        RaftConfig(id=1, heartbeat_tick=0)
    with pytest.raises(ValueError, match="heartbeat_tick"):
        RaftConfig(id=1, election_tick=3, heartbeat_tick=3)


def test_ready_twice_without_advance_is_an_error():
    node = RawNode.bootstrap(RaftConfig(id=1), random.Random(0), [1])
    rd = node.ready()
    assert not node.has_ready()
    with pytest.raises(RuntimeError):
        node.ready()
    node.advance(rd)
    assert not node.has_ready()


def test_messages_for_another_node_are_ignored():
    net = Network.bootstrap([1, 2, 3])
    node = net.nodes[2]
    node.step(Message(MsgType.VOTE, 3, 1, 9, log_term=1, index=1))
    node.step(Message(MsgType.APP, 3, 1, 9, log_term=1, index=1))
    assert node.term == 1 and not node.has_ready()


def test_stale_term_messages_do_not_change_state():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.nodes[1].transfer_leadership(2)
    net.stabilize()
    node3 = net.nodes[3]
    assert node3.term == 3
    # The old leader's append from term 2 is answered with the current term so it steps down.
    node3.step(Message(MsgType.APP, 3, 1, 2, log_term=2, index=2))
    rd = node3.ready()
    assert [(m.type, m.to, m.term) for m in rd.all_messages] == [(MsgType.APP_RESP, 1, 3)]
    assert node3.lead == 2 and node3.term == 3
    node3.advance(rd)
    # A stale vote request is dropped without an answer.
    node3.step(Message(MsgType.VOTE, 3, 1, 2, log_term=9, index=99))
    assert not node3.has_ready() and node3.vote == 2
