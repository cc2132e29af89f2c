"""Leader election: randomized timeouts, split votes, pre-vote and check-quorum."""

from __future__ import annotations

import random

import pytest
from raft_harness import Network

from raftcache.core.raft import RaftConfig, RawNode, ReadOnlyOption
from raftcache.core.raft.messages import NONE, EntryType, Message, MsgType, StateRole
from raftcache.testing import mutants

ET = 10  # the default election_tick


def test_single_node_cluster_elects_itself_after_its_randomized_timeout():
    net = Network.bootstrap([1])
    node = net.nodes[1]
    timeout = node.randomized_election_timeout
    assert ET <= timeout < 2 * ET
    net.tick(1, timeout - 1)
    assert node.role == StateRole.FOLLOWER and node.term == 1
    net.tick(1)
    assert node.role == StateRole.LEADER
    assert node.term == 2 and node.lead == 1 and node.vote == 1
    # Its no-op (term 2, index 2) commits on its own disk alone and is applied.
    assert net.log(1) == [(1, 1), (2, 2)]
    assert node.commit == 2 and node.applied == 2
    assert net.storage[1].hard_state.term == 2 and net.storage[1].hard_state.vote == 1
    assert net.sent == []  # nobody to ask


def _seed_where(pred, ids, **config) -> int:
    """The first seed whose initial randomized timeouts satisfy `pred`."""
    for seed in range(2000):
        net = Network.bootstrap(ids, seed=seed, **config)
        if pred({n: node.randomized_election_timeout for n, node in net.nodes.items()}):
            return seed
    raise AssertionError("no seed found")


def test_three_nodes_elect_the_first_to_time_out():
    ids = [1, 2, 3]
    seed = _seed_where(lambda t: sorted(t.values())[0] < sorted(t.values())[1], ids)
    net = Network.bootstrap(ids, seed=seed)
    timeouts = {n: node.randomized_election_timeout for n, node in net.nodes.items()}
    first = min(timeouts, key=timeouts.get)
    for _ in range(timeouts[first] - 1):
        net.tick_all()
        net.stabilize()
    assert net.sent == [] and net.leader() == NONE
    net.tick_all()
    # Pre-vote first (at the term it would campaign in), then the real vote.
    assert {m.type for m in net.queue} == {MsgType.PRE_VOTE}
    assert {(m.frm, m.term) for m in net.queue} == {(first, 2)}
    net.stabilize()
    assert net.leader() == first
    for node in net.nodes.values():
        assert node.term == 2 and node.lead == first
    votes = net.messages(MsgType.VOTE)
    assert {m.to for m in votes} == set(ids) - {first} and {m.term for m in votes} == {2}
    # The new leader's first entry is its no-op, committed everywhere.
    assert all(net.log(n) == [(1, 1), (2, 2)] for n in ids)
    assert all(node.commit == 2 for node in net.nodes.values())


def test_randomized_timeouts_are_in_range_rerandomized_per_term_and_seeded():
    seen = set()
    for seed in range(40):
        node = RawNode(RaftConfig(id=1, election_tick=ET), random.Random(seed))
        timeouts = []
        for term in range(2, 7):
            node.become_follower(term, NONE)
            timeouts.append(node.randomized_election_timeout)
        assert all(ET <= t < 2 * ET for t in timeouts)
        seen.update(timeouts)
        again = RawNode(RaftConfig(id=1, election_tick=ET), random.Random(seed))
        again_timeouts = []
        for term in range(2, 7):
            again.become_follower(term, NONE)
            again_timeouts.append(again.randomized_election_timeout)
        assert again_timeouts == timeouts  # a pure function of the injected Random
    assert seen == set(range(ET, 2 * ET))


def test_split_vote_resolves_in_a_later_term():
    ids = [1, 2, 3, 4]
    # Nodes 1 and 2 draw the same (smallest) timeout: they campaign at the same tick.
    seed = _seed_where(lambda t: t[1] == t[2] < min(t[3], t[4]), ids)
    net = Network.bootstrap(ids, seed=seed)
    net.tick_all(net.nodes[1].randomized_election_timeout)
    assert {(m.type, m.frm) for m in net.queue} == {(MsgType.PRE_VOTE, 1), (MsgType.PRE_VOTE, 2)}
    net.deliver(lambda m: m.type == MsgType.PRE_VOTE)
    net.deliver(lambda m: m.type == MsgType.PRE_VOTE_RESP)  # a pre-vote is granted to both
    assert net.nodes[1].role == net.nodes[2].role == StateRole.CANDIDATE
    assert net.nodes[1].term == net.nodes[2].term == 2
    # Node 3 hears node 1 first and node 4 hears node 2 first: two votes each, out of four.
    net.deliver(lambda m: m.type == MsgType.VOTE and (m.frm, m.to) in {(1, 3), (2, 4)})
    net.deliver(lambda m: m.type == MsgType.VOTE)
    net.deliver()
    assert net.leaders() == []
    granted = [m for m in net.messages(MsgType.VOTE_RESP) if not m.reject]
    assert sorted((m.frm, m.to) for m in granted) == [(3, 1), (4, 2)]
    assert all(node.term == 2 and node.role == StateRole.FOLLOWER for node in net.nodes.values())
    # Timeouts were drawn afresh; the next election has a winner.
    for _ in range(4 * ET):
        net.tick_all()
        net.stabilize()
        if net.leader():
            break
    leader = net.nodes[net.leader()]
    assert leader.term == 3
    assert all(node.term == 3 and node.lead == leader.id for node in net.nodes.values())
    assert not any(m.type == MsgType.APP and m.term == 2 for m in net.sent)


# -- pre-vote -------------------------------------------------------------------------------------
def _partition_and_rejoin(pre_vote: bool) -> tuple[Network, int]:
    net = Network.bootstrap([1, 2, 3], pre_vote=pre_vote)
    net.elect(1)
    assert net.nodes[1].term == 2
    net.isolate(3)
    net.run(5 * ET)
    isolated_term = net.nodes[3].term
    net.heal()
    net.run(3 * ET)
    return net, isolated_term


def test_prevote_rejoining_node_does_not_bump_the_term_or_disrupt_the_leader():
    net, isolated_term = _partition_and_rejoin(pre_vote=True)
    assert isolated_term == 2  # it campaigned only as a pre-candidate
    assert net.messages(MsgType.PRE_VOTE, frm=3) and not net.messages(MsgType.VOTE, frm=3)
    assert net.leader() == 1
    assert all(node.term == 2 and node.lead == 1 for node in net.nodes.values())


def test_without_prevote_rejoining_node_disrupts_the_leader():
    net, isolated_term = _partition_and_rejoin(pre_vote=False)
    assert isolated_term > 2  # every timeout bumped its term
    assert {m.term for m in net.messages(MsgType.VOTE, frm=3)} >= {3, 4}
    # Its higher term deposed leader 1 when it came back, forcing a new election.
    leader = net.nodes[net.leader()]
    assert leader.term > isolated_term
    assert all(node.term == leader.term for node in net.nodes.values())


def test_prevote_is_granted_without_changing_the_voters_term_or_vote():
    net = Network.bootstrap([1, 2, 3], check_quorum=False)
    net.elect(1)
    node2 = net.nodes[2]
    # A pre-vote from a node with an up-to-date log for term 3 is granted but nothing changes.
    node2.step(Message(MsgType.PRE_VOTE, 2, 3, 3, log_term=2, index=2))
    rd = node2.ready()
    assert [(m.type, m.to, m.term, m.reject) for m in rd.all_messages] == [
        (MsgType.PRE_VOTE_RESP, 3, 3, False)
    ]
    assert rd.hard_state is None and node2.term == 2 and node2.vote == 1
    node2.advance(rd)
    # A stale log is refused.
    node2.step(Message(MsgType.PRE_VOTE, 2, 3, 3, log_term=1, index=5))
    rd = node2.ready()
    assert [(m.type, m.reject) for m in rd.all_messages] == [(MsgType.PRE_VOTE_RESP, True)]
    node2.advance(rd)


def test_election_restriction_refuses_votes_for_stale_logs():
    net = Network.bootstrap([1, 2, 3], check_quorum=False, pre_vote=False)
    net.elect(1)
    net.propose(1, b"x")
    net.stabilize()  # everyone has (3, term 2)
    node2 = net.nodes[2]
    for log_term, index, granted in [(2, 2, False), (1, 9, False), (2, 3, True)]:
        node2.become_follower(node2.term, NONE)  # forget the leader, keep any vote
        term = node2.term + 1
        node2.step(Message(MsgType.VOTE, 2, 3, term, log_term=log_term, index=index))
        rd = node2.ready()
        assert [(m.type, m.term, m.reject) for m in rd.all_messages] == [
            (MsgType.VOTE_RESP, term, not granted)
        ]
        assert node2.vote == (3 if granted else NONE)
        node2.advance(rd)


# -- check-quorum ---------------------------------------------------------------------------------
def test_check_quorum_leader_steps_down_when_it_cannot_hear_a_majority():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.isolate(1)
    # Followers acknowledged the no-op within the first check-quorum round: it survives that.
    net.tick(1, 2 * ET - 1)
    assert leader.role == StateRole.LEADER
    net.tick(1)
    assert leader.role == StateRole.FOLLOWER
    assert leader.term == 2 and leader.lead == NONE
    assert net.readys[1][-1].soft_state.role == StateRole.FOLLOWER


def test_without_check_quorum_an_isolated_leader_stays_leader():
    net = Network.bootstrap([1, 2, 3], check_quorum=False)
    leader = net.elect(1)
    net.isolate(1)
    net.tick(1, 10 * ET)
    assert leader.role == StateRole.LEADER and leader.term == 2


def test_check_quorum_leader_survives_while_acks_keep_coming():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.isolate(3)  # a minority is unreachable: 1 and 2 are still a majority
    net.run(10 * ET)
    assert leader.role == StateRole.LEADER and leader.term == 2


def test_follower_in_lease_ignores_a_vote_request():
    net = Network.bootstrap([1, 2, 3], pre_vote=False)
    net.elect(1)
    node2 = net.nodes[2]
    vote = Message(MsgType.VOTE, 2, 3, 3, log_term=2, index=2)
    node2.step(vote)
    assert not node2.has_ready()  # no answer at all, and no new term
    assert node2.term == 2 and node2.vote == 1 and node2.lead == 1
    # Once the leader has been silent for an election timeout, the lease is over.
    net.isolate(1)
    net.tick(2, ET)
    node2.step(vote)
    rd = node2.ready()
    assert [(m.type, m.to, m.term, m.reject) for m in rd.all_messages] == [
        (MsgType.VOTE_RESP, 3, 3, False)
    ]
    assert rd.hard_state.term == 3 and rd.hard_state.vote == 3
    node2.advance(rd)


def test_leader_in_lease_ignores_higher_term_vote_request():
    net = Network.bootstrap([1, 2, 3], pre_vote=False)
    leader = net.elect(1)
    leader.step(Message(MsgType.VOTE, 1, 3, 9, log_term=2, index=2))
    assert leader.role == StateRole.LEADER and leader.term == 2
    assert not leader.has_ready()


def test_timeout_now_campaign_bypasses_the_lease():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    net.nodes[1].transfer_leadership(2)
    net.stabilize()  # no tick: node 3 is still in its lease from leader 1
    assert net.leader() == 2 and net.nodes[2].term == 3
    assert net.nodes[3].vote == 2 and net.nodes[3].lead == 2
    votes = net.messages(MsgType.VOTE, frm=2)
    assert votes and all(m.context for m in votes)  # marked as a forced campaign
    assert not net.messages(MsgType.PRE_VOTE, frm=2)  # and no pre-vote phase


def test_unforced_vote_is_refused_in_lease_but_same_message_forced_is_granted():
    net = Network.bootstrap([1, 2, 3], pre_vote=False)
    net.elect(1)
    net.nodes[1].transfer_leadership(2)
    net.process(1)
    forced = net.take(lambda m: m.type == MsgType.TIMEOUT_NOW)
    assert len(forced) == 1
    net.step(forced[0])
    vote_to_3 = net.take(lambda m: m.type == MsgType.VOTE and m.to == 3)[0]
    plain = Message(
        MsgType.VOTE, 3, 2, vote_to_3.term, log_term=vote_to_3.log_term, index=vote_to_3.index
    )
    net.nodes[3].step(plain)
    assert not net.nodes[3].has_ready() and net.nodes[3].term == 2
    net.step(vote_to_3)
    assert net.nodes[3].term == 3 and net.nodes[3].vote == 2


def test_node_without_a_configuration_never_campaigns():
    node = RawNode(RaftConfig(id=9), random.Random(1))  # joining: no configuration yet
    for _ in range(5 * ET):
        node.tick()
    assert node.role == StateRole.FOLLOWER and node.term == 0 and not node.has_ready()


def test_node_does_not_campaign_before_applying_committed_conf_changes():
    # The bootstrap membership (index 1) is committed but applied only by the first Ready.
    node = RawNode.bootstrap(RaftConfig(id=1), random.Random(1), [1])
    for _ in range(3 * ET):
        node.tick()
    assert node.role == StateRole.FOLLOWER and node.term == 1
    rd = node.ready()
    assert [e.type for e in rd.committed_entries] == [EntryType.CONF_CHANGE]
    node.advance(rd)
    for _ in range(2 * ET):
        node.tick()
    assert node.role == StateRole.LEADER and node.term == 2


@pytest.mark.parametrize("pre_vote", [True, False])
def test_elections_are_deterministic_per_seed(pre_vote):
    def history(seed):
        net = Network.bootstrap([1, 2, 3, 4, 5], seed=seed, pre_vote=pre_vote)
        net.run(4 * ET)
        return net.leader(), net.nodes[1].term, [(m.type, m.frm, m.to) for m in net.sent]

    assert history(7) == history(7)
    assert len({history(s)[0] for s in range(8)}) > 1  # different seeds, different winners


# -- a connection from the leader that ends (the process died) ------------------------------------
def test_followers_that_lose_the_leaders_connection_elect_another_within_a_few_ticks():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    term = net.nodes[2].term
    net.crash(1)
    for nid in (2, 3):  # each saw its connection from node 1 close
        net.nodes[nid].peer_lost(1)
    net.run(5)  # half the shortest election timeout
    (leader,) = [n for n in (2, 3) if net.nodes[n].role == StateRole.LEADER]
    assert net.nodes[leader].term == term + 1


def test_a_lost_connection_to_a_live_leader_disrupts_nothing():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    term = net.nodes[2].term
    net.nodes[2].peer_lost(1)  # a flapping link: node 3 still hears from node 1
    assert net.nodes[2].lead == NONE
    net.run(3 * ET)
    assert net.leader() == 1 and net.nodes[1].term == term
    assert all(net.nodes[n].lead == 1 for n in (2, 3))


@pytest.mark.parametrize("config", [{"read_only": ReadOnlyOption.LEASE}, {"pre_vote": False}],
                         ids=["lease-reads", "no-pre-vote"])
def test_a_lost_connection_waits_out_the_timeout_where_campaigning_early_is_unsafe(config):
    # Lease reads rely on followers not voting for an election timeout after a heartbeat;
    # without pre-vote an early campaign would bump the term of a healthy cluster.
    net = Network.bootstrap([1, 2, 3], **config)
    net.elect(1)
    net.crash(1)
    for nid in (2, 3):
        net.nodes[nid].peer_lost(1)
        assert net.nodes[nid].lead == 1
    net.run(ET - 1)
    assert not [n for n in (2, 3) if net.nodes[n].role == StateRole.LEADER]


def test_losing_a_peer_that_is_not_the_leader_changes_nothing():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    for nid, peer in ((2, 3), (1, 2)):
        net.nodes[nid].peer_lost(peer)
    assert net.nodes[2].lead == 1 and net.nodes[1].role == StateRole.LEADER


def _new_leader_while_the_old_lease_holds(core: type) -> bool:
    """Cut the leader off with its connections reset, as a switch port flap would: do the
    others elect a new leader while the old one still trusts its lease?"""
    net = Network.bootstrap([1, 2, 3], read_only=ReadOnlyOption.LEASE)
    net.elect(1)
    net.run(1)
    for nid in (2, 3):
        net.nodes[nid].__class__ = core
    net.isolate(1)
    for nid in (2, 3):
        net.nodes[nid].peer_lost(1)
    for _ in range(ET):
        net.run(1)
        if net.nodes[1].lease_valid() and any(
                net.nodes[n].role == StateRole.LEADER for n in (2, 3)):
            return True
    return False


def test_with_lease_reads_a_lost_connection_never_shortens_the_lease():
    assert not _new_leader_while_the_old_lease_holds(RawNode)
    # Teeth: a core that fails over early under leases elects a second leader while the
    # first still serves lease reads (stale ones, once the new leader commits a write).
    assert _new_leader_while_the_old_lease_holds(mutants.FastFailoverUnderLease)
