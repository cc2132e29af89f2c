"""Log replication: conflict backtracking, pipelining, batching and the durability contract."""

from __future__ import annotations

import random

from raft_harness import MemStorage, Network, entry, log_of

from raftcache.core.raft import RaftConfig, RawNode
from raftcache.core.raft.messages import Message, MsgType, StateRole
from raftcache.core.raft.progress import ProgressState

ET = 10


def _rejections(net: Network, frm: int) -> list:
    return [m for m in net.messages(MsgType.APP_RESP, frm=frm) if m.reject]


# -- fast backtracking -----------------------------------------------------------------------
def test_long_divergent_tail_is_repaired_in_one_rejection():
    # Leader-to-be: 20 entries of term 1, then 10 of term 3. Follower 2: the same 20, then a
    # 100-entry tail of term 2 that no quorum ever held.
    good = log_of([1] * 19 + [3] * 10, [1, 2, 3])
    bad = log_of([1] * 19 + [2] * 100, [1, 2, 3])
    net = Network.from_logs({1: good, 2: bad, 3: good}, term=3)
    net.elect(1)
    assert net.nodes[1].term == 4
    # One probe at the leader's last index is refused; the hint (index 30, term 2) lets the
    # leader skip the follower's whole term-2 tail and its own term-3 entries at once.
    rejections = _rejections(net, 2)
    assert [(m.index, m.reject_hint, m.log_term) for m in rejections] == [(30, 30, 2)]
    apps = net.messages(MsgType.APP, frm=1, to=2)
    assert [(m.index, m.log_term) for m in apps[:2]] == [(30, 3), (20, 1)]
    assert net.log(2) == net.log(1) == [(e.index, e.term) for e in good] + [(31, 4)]
    assert net.nodes[2].commit == 31
    assert net.storage[2].entries[-1].index == 31  # the tail is gone from its disk too


def test_follower_with_short_log_is_probed_in_one_rejection():
    long = log_of([1] * 49, [1, 2, 3])
    net = Network.from_logs({1: long, 2: long[:3], 3: long}, term=1)
    net.elect(1)
    rejections = _rejections(net, 2)
    # It refuses the probe at 50 and points at its own last index, 3.
    assert [(m.index, m.reject_hint) for m in rejections] == [(50, 3)]
    assert net.log(2) == net.log(1) and net.nodes[2].commit == 51


def test_figure7_style_divergence_needs_few_round_trips_per_follower():
    # Follower (f) of Figure 7 with many terms to unwind: 1 1 1 2 2 2 3 3 3 3 3 vs leader's
    # 1 1 1 4 4 5 5 6 6 6; each rejection skips at least a whole term.
    leader = log_of([1, 1, 4, 4, 5, 5, 6, 6, 6], [1, 2, 3])
    f = log_of([1, 1, 2, 2, 2, 3, 3, 3, 3, 3], [1, 2, 3])
    net = Network.from_logs({1: leader, 2: f, 3: leader}, term=7)
    net.elect(1)
    assert len(_rejections(net, 2)) <= 2
    assert net.log(2) == net.log(1)


def test_stale_rejection_is_ignored():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    pr = leader.tracker.progress[2]
    assert pr.state == ProgressState.REPLICATE and pr.match == 2
    before = (pr.match, pr.next, pr.state)
    # A rejection of an append at an index it has since acknowledged: nothing to redo.
    leader.step(Message(MsgType.APP_RESP, 1, 2, 2, index=1, reject=True, reject_hint=1))
    assert (pr.match, pr.next, pr.state) == before
    assert not leader.has_ready()


# -- pipelining ------------------------------------------------------------------------------
def test_pipelining_keeps_max_inflight_appends_in_flight():
    net = Network.bootstrap([1, 2, 3], max_inflight=3)
    leader = net.elect(1)
    assert leader.tracker.progress[2].state == ProgressState.REPLICATE
    for i in range(5):
        net.propose(1, b"p%d" % i)  # indexes 3..7, one Ready each, nothing delivered
    apps = [m for m in net.queue if m.type == MsgType.APP and m.to == 2]
    assert [(m.index, [e.index for e in m.entries]) for m in apps] == [
        (2, [3]),
        (3, [4]),
        (4, [5]),
    ]
    assert list(leader.tracker.progress[2].inflights) == [3, 4, 5]
    # One acknowledgement frees one slot: the two unsent entries go out together.
    net.deliver(lambda m: m is apps[0])
    net.deliver(lambda m: m.type == MsgType.APP_RESP and m.frm == 2)
    apps = [m for m in net.queue if m.type == MsgType.APP and m.to == 2]
    assert [(m.index, [e.index for e in m.entries]) for m in apps] == [
        (3, [4]),
        (4, [5]),
        (5, [6, 7]),
    ]
    assert list(leader.tracker.progress[2].inflights) == [4, 5, 7]
    net.stabilize()
    assert net.log(2) == net.log(1) and net.nodes[2].commit == 7


def test_pipeline_recovers_when_every_inflight_append_is_lost():
    net = Network.bootstrap([1, 2, 3], max_inflight=2)
    leader = net.elect(1)
    net.drop(lambda m: m.type == MsgType.APP and m.to == 2)
    for i in range(4):
        net.propose(1, b"p%d" % i)
    net.stabilize()
    assert leader.commit == 6  # with node 3
    assert leader.tracker.progress[2].is_paused(2) and net.nodes[2].raft_log.last_index() == 2
    net.heal()
    net.run(3)  # heartbeats must get the follower going again
    assert net.log(2) == net.log(1) and net.nodes[2].commit == 6


def test_lost_append_in_the_middle_of_a_pipeline_is_resent():
    net = Network.bootstrap([1, 2, 3], max_inflight=8)
    leader = net.elect(1)
    net.drop(
        lambda m: m.type == MsgType.APP and m.to == 2 and m.entries[:1] and m.entries[0].index == 4,
        times=1,
    )
    for i in range(4):
        net.propose(1, b"p%d" % i)  # 3..6; the append carrying 4 is lost
    net.stabilize()
    # Both appends after the gap are refused; the first sends the leader back to probing from
    # the follower's match, the second is then stale and ignored: one resend, not two.
    assert [m.index for m in _rejections(net, 2)] == [4, 5]
    after_3 = [m for m in net.messages(MsgType.APP, to=2) if m.index == 3]
    assert [[e.index for e in m.entries] for m in after_3] == [[4], [4, 5, 6]]  # lost, resent
    assert leader.tracker.progress[2].state == ProgressState.REPLICATE
    assert net.log(2) == net.log(1) and net.nodes[2].commit == 6


# -- batching --------------------------------------------------------------------------------
def test_proposals_between_two_readys_go_out_as_one_batch():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    for i in range(10):
        assert leader.propose(b"b%d" % i) == (2, 3 + i)
    rd = leader.ready()
    assert [e.index for e in rd.entries] == list(range(3, 13)) and rd.must_sync
    assert sorted(m.to for m in rd.all_messages) == [2, 3]
    for m in rd.all_messages:
        assert m.type == MsgType.APP and (m.index, m.log_term) == (2, 2)
        assert [e.data for e in m.entries] == [b"b%d" % i for i in range(10)]
    leader.advance(rd)


def test_batch_is_split_by_max_msg_entries():
    net = Network.bootstrap([1, 2], max_msg_entries=4)
    leader = net.elect(1)
    for i in range(10):
        leader.propose(b"b%d" % i)
    rd = leader.ready()
    assert [len(m.entries) for m in rd.all_messages] == [4, 4, 2]  # pipelined, in order
    assert [m.index for m in rd.all_messages] == [2, 6, 10]
    leader.advance(rd)


# -- durability ------------------------------------------------------------------------------
def test_leader_counts_itself_for_commit_only_after_advance():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.propose(b"x")
    rd = leader.ready()
    assert [e.index for e in rd.entries] == [3]
    app = next(m for m in rd.all_messages if m.to == 2)
    net.step(app)  # the follower persists and acknowledges
    (ack,) = net.take(lambda m: m.type == MsgType.APP_RESP)
    leader.step(ack)
    # Follower 2 has index 3, but the leader has not persisted it yet: no quorum.
    assert leader.tracker.progress[2].match == 3 and leader.tracker.progress[1].match == 2
    assert leader.commit == 2
    leader.advance(rd)
    assert leader.commit == 3
    rd = leader.ready()
    assert rd.hard_state.commit == 3 and [e.index for e in rd.committed_entries] == [3]
    leader.advance(rd)


def test_single_node_commits_only_after_its_own_persist():
    net = Network.bootstrap([1])
    net.run(2 * ET)
    node = net.nodes[1]
    assert node.role == StateRole.LEADER
    node.propose(b"x")
    rd = node.ready()
    assert [e.index for e in rd.entries] == [3]
    assert rd.committed_entries == () and node.commit == 2
    node.advance(rd)
    assert node.commit == 3
    rd = node.ready()
    assert [e.data for e in rd.committed_entries] == [b"x"] and rd.entries == ()
    node.advance(rd)


def test_follower_acknowledges_in_the_same_ready_as_the_entries():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    leader.propose(b"a")
    leader.propose(b"b")
    net.process(1)
    (app,) = net.take(lambda m: m.type == MsgType.APP and m.to == 2)
    follower = net.nodes[2]
    follower.step(app)
    rd = follower.ready()
    assert [e.index for e in rd.entries] == [3, 4] and rd.must_sync
    assert [(m.type, m.index, m.reject) for m in rd.all_messages] == [(MsgType.APP_RESP, 4, False)]
    follower.advance(rd)


class CheckingNetwork(Network):
    """Checks, as each message is sent, that what it promises is already on its sender's disk."""

    def _send(self, m):
        disk: MemStorage = self.storage[m.frm]
        if m.type == MsgType.APP_RESP and not m.reject:
            covered = disk.snapshot.meta.index if disk.snapshot else 0
            assert m.index <= covered or any(e.index == m.index for e in disk.entries), m
        if m.type in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP) and not m.reject:
            if m.type == MsgType.VOTE_RESP:
                assert (disk.hard_state.term, disk.hard_state.vote) == (m.term, m.to), m
        if m.type == MsgType.VOTE:
            assert (disk.hard_state.term, disk.hard_state.vote) == (m.term, m.frm), m
        super()._send(m)


def _replace_the_leader_six_times(net, *, lost_entry: bool) -> set[int]:
    """Six rounds of five writes, each ending with the leader cut off and replaced; returns the
    commit indexes the nodes end on."""
    net.run(3 * ET)
    for round_ in range(6):
        leader = net.leader()
        for i in range(5):
            net.propose(leader, b"%d-%d" % (round_, i))
        net.stabilize()
        if lost_entry:
            net.propose(leader, b"%d-lost" % round_)  # never leaves the old leader
        net.isolate(leader)
        net.run(3 * ET)
        net.heal()
        net.run(ET)
    net.run(2 * ET)
    return {node.commit for node in net.nodes.values()}


def test_messages_only_promise_what_is_persisted():
    net = CheckingNetwork.bootstrap([1, 2, 3, 4, 5], seed=3, max_inflight=2)
    commits = _replace_the_leader_six_times(net, lost_entry=True)
    assert len(commits) == 1 and commits.pop() >= 6 * 6


def test_heartbeat_never_advances_a_follower_commit_past_its_match():
    net = Network.bootstrap([1, 2, 3])
    leader = net.elect(1)
    net.drop(lambda m: m.type == MsgType.APP and m.to == 3)
    net.propose(1, b"x")
    net.stabilize()
    assert leader.commit == 3 and leader.tracker.progress[3].match == 2
    net.tick(1)
    (hb,) = [m for m in net.queue if m.type == MsgType.HEARTBEAT and m.to == 3]
    assert hb.commit == 2
    net.stabilize()
    assert net.nodes[3].commit == 2 and net.nodes[3].raft_log.last_index() == 2


def test_restart_recovers_term_vote_and_log_exactly():
    net = Network.bootstrap([1, 2, 3])
    net.elect(2)
    for i in range(3):
        net.propose(2, b"r%d" % i)
    net.stabilize()
    before = (net.nodes[1].term, net.nodes[1].vote, net.log(1), net.nodes[1].commit)
    net.restart(1)
    node = net.nodes[1]
    assert (node.term, node.vote, net.log(1), node.commit) == before
    assert node.role == StateRole.FOLLOWER and node.lead == 0
    assert net.sm[1].data == [b"r0", b"r1", b"r2"]  # replayed from the committed log
    assert node.applied == node.commit == 5
    net.propose(2, b"after")
    net.stabilize()
    assert net.sm[1].data[-1] == b"after"


def test_suffix_replaced_while_being_persisted_is_not_marked_stable():
    node = RawNode.bootstrap(RaftConfig(id=2), random.Random(0), [1, 2])
    node.advance(node.ready())
    node.step(
        Message(
            MsgType.APP, 2, 1, 2, log_term=1, index=1, entries=(entry(2, 2), entry(3, 2)), commit=1
        )
    )
    rd1 = node.ready()
    assert [(e.index, e.term) for e in rd1.entries] == [(2, 2), (3, 2)]
    # While rd1 is being persisted, a newer leader replaces index 3.
    node.step(Message(MsgType.APP, 2, 1, 3, log_term=2, index=2, entries=(entry(3, 3),), commit=1))
    node.advance(rd1)
    assert node.raft_log.stable == 1  # (3, term 2) was persisted, but (3, term 3) was not
    rd2 = node.ready()
    assert (rd2.entries[-1].index, rd2.entries[-1].term) == (3, 3)
    assert [(m.type, m.index, m.term) for m in rd2.messages] == [(MsgType.APP_RESP, 3, 3)]
    node.advance(rd2)
    assert node.raft_log.stable == 3


def test_must_sync_only_when_entries_term_vote_or_snapshot_change():
    net = Network.bootstrap([1, 2, 3])
    net.elect(1)
    readys = net.readys[2]
    vote_rd = next(rd for rd in readys if rd.hard_state and rd.hard_state.vote == 1)
    assert vote_rd.must_sync  # a vote must be on disk before the VOTE_RESP leaves
    mark = len(readys)
    net.propose(1, b"x")
    net.stabilize()
    got = [
        (tuple(e.index for e in rd.entries), rd.hard_state, rd.must_sync) for rd in readys[mark:]
    ]
    assert got[0][0] == (3,) and got[0][2]
    # The commit index alone can be recovered from the others: no fsync needed for it.
    assert got[-1][0] == () and got[-1][1].commit == 3 and not got[-1][2]


def test_the_core_says_which_messages_need_not_wait_for_the_disk():
    net = Network.bootstrap([1, 2, 3])
    net.nodes[1].campaign()
    rd = net.nodes[1].ready()  # a new term and a vote: nothing may go out before they are durable
    assert rd.hard_state.term == 2 and not rd.early_messages
    assert {m.type for m in rd.messages} == {MsgType.VOTE}
    net.storage[1].save(rd)
    for m in rd.messages:
        net._send(m)
    net.nodes[1].advance(rd)
    net.stabilize()
    leader = net.nodes[1]
    assert leader.role == StateRole.LEADER
    leader.propose(b"x")
    rd = leader.ready()  # the leader's appends: they may leave while the entry is being saved
    assert rd.entries and {m.type for m in rd.early_messages} == {MsgType.APP}
    assert not rd.messages
    net.storage[1].save(rd)
    for m in rd.early_messages:
        net._send(m)
    leader.advance(rd)
    net.process(1)
    (app,) = net.take(lambda m: m.type == MsgType.APP and m.to == 2)
    follower = net.nodes[2]
    follower.step(app)
    rd = follower.ready()  # an acknowledgement: only once the entries are durable
    assert not rd.early_messages and [m.type for m in rd.messages] == [MsgType.APP_RESP]


class EarlyNetwork(CheckingNetwork):
    """Sends early_messages before the Ready is saved, as the real driver does, and checks every
    message against the disk as it leaves."""

    def process(self, nid):
        node = self.nodes[nid]
        while node.has_ready():
            rd = node.ready()
            self.readys[nid].append(rd)
            for m in rd.early_messages:
                self._send(m)
            self.storage[nid].save(rd)
            for m in rd.messages:
                self._send(m)
            self._apply(nid, rd)
            self.read_states[nid].extend(rd.read_states)
            node.advance(rd)
            self._note_conf(nid)


def test_early_messages_promise_nothing_the_disk_does_not_hold():
    net = EarlyNetwork.bootstrap([1, 2, 3, 4, 5], seed=5, max_inflight=2)
    commits = _replace_the_leader_six_times(net, lost_entry=False)
    assert len(commits) == 1 and commits.pop() >= 6 * 5
