"""Linearizable reads: ReadIndex (a heartbeat round per batch) and leases."""

from __future__ import annotations

import pytest
from raft_harness import Network

from raftcache.core.raft import RaftConfig, ReadOnlyOption
from raftcache.core.raft.messages import NONE, MsgType, NotLeader, ReadState, StateRole

ET = 10
LEASE = {"read_only": ReadOnlyOption.LEASE}


def _heartbeats_with(net: Network, context: bytes) -> list:
    return [m for m in net.queue if m.type == MsgType.HEARTBEAT and m.context == context]


# -- ReadIndex -------------------------------------------------------------------------------
def test_leader_serves_a_read_only_after_a_quorum_acknowledges_a_heartbeat():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.read_index(b"r1")
    net.process(1)
    assert net.read_states[1] == []
    assert sorted(m.to for m in _heartbeats_with(net, b"r1")) == [2, 3]
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT and m.to == 2)
    assert net.read_states[1] == []  # the acknowledgement has not arrived yet
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT_RESP and m.frm == 2)
    assert net.read_states[1] == [ReadState(2, b"r1")]  # itself and node 2: a quorum
    net.stabilize()
    assert net.read_states[1] == [ReadState(2, b"r1")]  # answered once


def test_reads_queued_before_a_confirmed_heartbeat_are_answered_in_order():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.read_index(b"a")
    net.process(1)
    net.take(lambda m: m.type == MsgType.HEARTBEAT)  # the first round is lost
    net.propose(1, b"w")
    net.stabilize()
    leader.read_index(b"b")
    net.process(1)
    net.stabilize()
    # One quorum answer to the newest heartbeat confirms every read queued before it.
    # Each keeps the commit index it was asked at.
    assert net.read_states[1] == [ReadState(2, b"a"), ReadState(3, b"b")]


def test_reads_asked_between_two_readies_share_one_heartbeat_round():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    for n in range(10):
        leader.read_index(b"r%d" % n)
    net.process(1)
    beats = [m for m in net.queue if m.type == MsgType.HEARTBEAT]
    # One heartbeat per follower, carrying the newest read; not one per read.
    assert sorted((m.to, m.context) for m in beats) == [(2, b"r9"), (3, b"r9")]
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT and m.to == 2)
    net.deliver(lambda m: m.type == MsgType.HEARTBEAT_RESP and m.frm == 2)
    assert net.read_states[1] == [ReadState(2, b"r%d" % n) for n in range(10)]


def test_new_leader_defers_reads_until_an_entry_of_its_term_commits():
    net = Network.bootstrap([1, 2, 3])
    net.campaign(1)
    net.stabilize(lambda m: m.type in (MsgType.VOTE, MsgType.VOTE_RESP))
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER and leader.commit == 1
    leader.read_index(b"early")
    net.process(1)
    assert not [m for m in net.queue if m.type == MsgType.HEARTBEAT]  # nothing to confirm yet
    net.stabilize(lambda m: m.type in (MsgType.APP, MsgType.APP_RESP))
    assert leader.commit == 2
    assert [m.to for m in _heartbeats_with(net, b"early")] == [2, 3]
    net.stabilize()
    # The read index is the new leader's commit index, not what it had when it won.
    assert net.read_states[1] == [ReadState(2, b"early")]


def test_follower_read_index_asks_the_leader():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.propose(1, b"x")
    net.stabilize()
    net.nodes[2].read_index(b"f")
    net.process(2)
    (ask,) = net.queue
    assert (ask.type, ask.frm, ask.to, ask.context) == (MsgType.READ_INDEX, 2, 1, b"f")
    net.stabilize()
    answers = net.messages(MsgType.READ_INDEX_RESP)
    assert [(m.to, m.index, m.context, m.reject) for m in answers] == [(2, 3, b"f", False)]
    assert net.read_states[2] == [ReadState(3, b"f")] and net.read_states[1] == []
    # The leader confirmed its leadership with a heartbeat round carrying the context first.
    assert net.messages(MsgType.HEARTBEAT_RESP, to=1)[-1].context == b"f"


def test_leader_isolated_from_the_majority_never_produces_a_read_state():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.isolate(1)
    leader.read_index(b"stale?")
    net.nodes[2].read_index(b"via-follower")  # this one is lost on the way
    net.process_all()
    for _ in range(3 * ET):
        net.tick(1)
        if leader.role == StateRole.LEADER:
            leader.read_index(b"t%d" % leader.ticks)
            net.process(1)
    assert net.read_states[1] == [] and net.read_states[2] == []
    assert leader.role == StateRole.FOLLOWER  # check-quorum deposed it meanwhile


def test_leader_isolated_without_check_quorum_still_never_serves_reads():
    net = Network.bootstrap([1, 2, 3], check_quorum=False)
    leader = net.elect(1)
    net.isolate(1)
    leader.read_index(b"r")
    net.run(5 * ET)
    assert leader.role == StateRole.LEADER and net.read_states[1] == []


def test_single_node_serves_reads_at_once():
    net = Network.bootstrap([1])
    net.run(2 * ET)
    net.nodes[1].read_index(b"solo")
    net.process(1)
    assert net.read_states[1] == [ReadState(2, b"solo")]


def test_read_index_with_no_leader_raises_not_leader():
    net = Network.bootstrap([1, 2, 3])
    with pytest.raises(NotLeader) as err:
        net.nodes[2].read_index(b"x")
    assert err.value.leader == NONE and err.value.reason == "no leader known"


# -- leases ----------------------------------------------------------------------------------
def _lease_cluster() -> tuple[Network, object]:
    net = Network.bootstrap([1, 2, 3], **LEASE)
    leader = net.elect(1)
    net.run(1)  # a heartbeat round: the followers' acknowledgements start the lease
    return net, leader


def test_lease_read_is_served_without_a_heartbeat_round():
    net, leader = _lease_cluster()
    assert leader.lease_valid()
    leader.read_index(b"fast", lease=True)
    net.process(1)
    assert net.read_states[1] == [ReadState(2, b"fast")]
    assert net.queue == []  # no heartbeat was needed


def test_lease_read_from_a_follower_is_answered_without_a_heartbeat_round():
    net, leader = _lease_cluster()
    net.nodes[3].read_index(b"f", lease=True)
    net.process(3)
    net.deliver()  # READ_INDEX reaches the leader, which answers at once
    assert [m.type for m in net.queue] == [MsgType.READ_INDEX_RESP]
    net.deliver()
    assert net.read_states[3] == [ReadState(2, b"f")]


def test_lease_expires_without_acknowledgements():
    net, leader = _lease_cluster()
    net.isolate(1)
    lease = ET - RaftConfig(id=1).lease_margin_ticks
    net.tick(1, lease - 1)
    assert leader.lease_valid()
    net.tick(1)
    assert not leader.lease_valid()
    assert leader.role == StateRole.LEADER  # still leader, but no longer sure nobody else is
    leader.read_index(b"late", lease=True)
    net.process(1)
    assert net.read_states[1] == []
    assert net.dropped[-1].type == MsgType.HEARTBEAT and net.dropped[-1].context == b"late"
    net.tick(1, 2 * ET)
    assert net.read_states[1] == []


def test_lease_is_renewed_by_acknowledged_heartbeats():
    net, leader = _lease_cluster()
    net.run(5 * ET)  # long after the first lease would have run out
    assert leader.lease_valid()
    leader.read_index(b"r", lease=True)
    net.process(1)
    assert net.read_states[1] == [ReadState(2, b"r")]


def test_no_lease_reads_after_timeout_now_was_sent():
    net, leader = _lease_cluster()
    leader.transfer_leadership(2)  # node 2 is caught up: TimeoutNow goes out at once
    net.process(1)
    assert [m.type for m in net.take()] == [MsgType.TIMEOUT_NOW]  # and is lost
    assert not leader.lease_valid()
    leader.read_index(b"r", lease=True)
    net.process(1)
    assert net.read_states[1] == []
    assert sorted(m.to for m in _heartbeats_with(net, b"r")) == [2, 3]
    # Even once the transfer is abandoned, the target may still campaign with that message.
    net.run(2 * ET)
    assert leader.role == StateRole.LEADER and leader.lead_transferee == NONE
    assert not leader.lease_valid()


def test_new_leader_with_leases_still_waits_for_its_term_to_commit():
    net = Network.bootstrap([1, 2, 3], **LEASE)
    net.campaign(1)
    net.stabilize(lambda m: m.type in (MsgType.VOTE, MsgType.VOTE_RESP))
    leader = net.nodes[1]
    leader.read_index(b"r", lease=True)
    net.process(1)
    assert net.read_states[1] == []
    net.stabilize()
    assert net.read_states[1] == [ReadState(2, b"r")]


def test_lease_reads_are_per_request():
    """A read that asks for linearizable still gets a heartbeat round on a lease cluster."""
    net, leader = _lease_cluster()
    assert leader.lease_valid()
    leader.read_index(b"strict")
    net.process(1)
    assert net.read_states[1] == []
    assert sorted(m.to for m in _heartbeats_with(net, b"strict")) == [2, 3]
    net.nodes[3].read_index(b"strict-follower")  # the choice travels with a follower's request
    net.process(3)
    net.deliver()
    assert [m.type for m in net.queue if m.context == b"strict-follower"] == [
        MsgType.HEARTBEAT, MsgType.HEARTBEAT]


def test_lease_request_without_lease_option_is_a_read_index_read():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.run(1)
    leader.read_index(b"r", lease=True)
    net.process(1)
    assert net.read_states[1] == []
    assert sorted(m.to for m in _heartbeats_with(net, b"r")) == [2, 3]


def test_lease_is_never_valid_with_read_index_option():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.run(1)
    assert not leader.lease_valid()
    assert not net.nodes[2].lease_valid()


def test_config_refuses_lease_reads_without_check_quorum():
    with pytest.raises(ValueError, match="check_quorum"):
        RaftConfig(id=1, read_only=ReadOnlyOption.LEASE, check_quorum=False)
    with pytest.raises(ValueError, match="lease_margin_ticks"):
        RaftConfig(id=1, read_only=ReadOnlyOption.LEASE, lease_margin_ticks=10)
    RaftConfig(id=1, read_only=ReadOnlyOption.LEASE)  # check_quorum defaults to True
