"""Compaction, chunked snapshot transfer, and restarting from a snapshot."""

from __future__ import annotations

import math
import random

from raft_harness import Network, StateMachine, log_of

from raftcache.core.raft import RaftConfig, RawNode
from raftcache.core.raft.messages import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MsgType,
    Snapshot,
    SnapshotMeta,
)
from raftcache.core.raft.progress import ProgressState

ET = 10
CHUNK = 64


def _cluster_with_entries(n: int, **config) -> Network:
    net = Network.bootstrap([1, 2, 3], **config)
    net.elect(1)
    for i in range(n):
        net.propose(1, b"value-%03d" % i)
    net.stabilize()
    return net


def test_compact_drops_the_log_prefix_and_describes_what_it_covers():
    net = _cluster_with_entries(10)
    node = net.nodes[1]
    assert node.applied == 12
    snap = net.compact(1)
    assert snap.meta == SnapshotMeta(12, 2, ConfState(voters=frozenset({1, 2, 3})))
    assert node.raft_log.first_index() == 13 and node.raft_log.last_index() == 12
    assert node.raft_log.term(12) == 2 and node.raft_log.term(11) is None
    assert node.raft_log.entries == [] and net.storage[1].entries == []
    # The image is the state machine at the applied index.
    restored = StateMachine()
    restored.restore(snap)
    assert restored.data == net.sm[1].data and restored.index == 12


def test_compact_can_keep_a_tail_for_slow_followers():
    net = _cluster_with_entries(10)
    node = net.nodes[1]
    snap = net.compact(1, keep_entries=3)
    assert snap.meta.index == 12  # the snapshot covers everything applied...
    assert node.raft_log.offset == 9 and [e.index for e in node.raft_log.entries] == [10, 11, 12]
    assert [e.index for e in net.storage[1].entries] == [10, 11, 12]
    net.compact(1, keep_entries=5)  # ...and compacting is never undone
    assert node.raft_log.offset == 9


def _far_behind(**config) -> tuple[Network, Snapshot]:
    """Node 3 misses 30 entries that leader 1 then compacts away."""
    net = Network.bootstrap([1, 2, 3], snapshot_chunk_bytes=CHUNK, **config)
    net.elect(1)
    net.isolate(3)
    for i in range(30):
        net.propose(1, b"value-%03d" % i)
    net.stabilize()
    snap = net.compact(1)
    assert snap.meta.index == 32 and len(snap.data) > 3 * CHUNK
    net.heal()
    return net, snap


def _snaps_to_3(net: Network) -> list[tuple[int, int, bool]]:
    return [(m.offset, len(m.data), m.done) for m in net.messages(MsgType.SNAP, to=3)]


def test_far_behind_follower_gets_the_snapshot_in_chunks_then_appends():
    net, snap = _far_behind()
    net.run(1)  # a heartbeat: node 3 answers, the leader finds it needs the snapshot
    assert net.nodes[1].tracker.progress[3].state != ProgressState.SNAPSHOT  # done within the round
    chunks = _snaps_to_3(net)
    n = math.ceil(len(snap.data) / CHUNK)
    assert len(chunks) == n >= 4
    assert [off for off, _, _ in chunks] == [i * CHUNK for i in range(n)]
    assert [done for _, _, done in chunks] == [False] * (n - 1) + [True]
    assert all(m.snapshot_meta == snap.meta for m in net.messages(MsgType.SNAP))
    node3 = net.nodes[3]
    assert node3.raft_log.offset == 32 and node3.commit == 32 and node3.applied == 32
    assert net.sm[3].data == net.sm[1].data
    installed = [rd for rd in net.readys[3] if rd.snapshot is not None]
    assert len(installed) == 1 and installed[0].snapshot == snap and installed[0].must_sync
    assert net.storage[3].snapshot == snap and net.storage[3].entries == []
    # After the snapshot the follower is back to normal appends.
    acks = [m.index for m in net.messages(MsgType.APP_RESP, frm=3) if not m.reject]
    assert acks[-1] == 32
    net.propose(1, b"after")
    net.stabilize()
    (app,) = [m for m in net.messages(MsgType.APP, to=3) if m.entries and m.index >= 32]
    assert (app.index, app.log_term, [e.index for e in app.entries]) == (32, 2, [33])
    assert net.nodes[1].tracker.progress[3].state == ProgressState.REPLICATE
    assert net.sm[3].data[-1] == b"after" and node3.raft_log.last_index() == 33


def test_lost_chunk_is_resent():
    net, snap = _far_behind()
    net.drop(lambda m: m.type == MsgType.SNAP and m.offset == CHUNK, times=1)
    net.run(1)
    assert [off for off, _, _ in _snaps_to_3(net)] == [0, CHUNK]  # stop and wait
    assert net.nodes[1].tracker.progress[3].state == ProgressState.SNAPSHOT
    resend = net.make_config(1).snapshot_resend_ticks
    net.run(resend - 1)
    assert len(_snaps_to_3(net)) == 2
    net.run(1)
    offsets = [off for off, _, _ in _snaps_to_3(net)]
    assert offsets[:3] == [0, CHUNK, CHUNK]  # the same chunk again, then on
    assert net.nodes[3].raft_log.offset == 32 and net.sm[3].data == net.sm[1].data


def test_lost_final_acknowledgement_is_recovered():
    net, snap = _far_behind()
    net.drop(lambda m: m.type == MsgType.APP_RESP and m.frm == 3 and not m.reject, times=1)
    net.run(1)
    assert net.nodes[3].raft_log.offset == 32
    assert net.nodes[1].tracker.progress[3].state == ProgressState.SNAPSHOT  # it does not know yet
    net.run(5)
    assert net.nodes[1].tracker.progress[3].state == ProgressState.REPLICATE
    assert net.nodes[1].tracker.progress[3].match == 32
    assert len([m for m in net.messages(MsgType.SNAP, to=3) if m.done]) == 2  # resent once


def test_follower_restarted_mid_transfer_makes_the_leader_start_over():
    net2, _ = _far_behind()
    net2.drop(lambda m: m.type == MsgType.SNAP and m.offset == 2 * CHUNK, times=1)
    net2.run(1)
    net2.restart(3)  # forgets the two chunks it had
    net2.run(2 * ET)
    rejects = [m for m in net2.messages(MsgType.SNAP_RESP, frm=3) if m.reject]
    assert rejects  # "start over"
    offsets = [off for off, _, _ in _snaps_to_3(net2)]
    assert offsets[:3] == [0, CHUNK, 2 * CHUNK] and 0 in offsets[3:]
    assert net2.nodes[3].raft_log.offset == 32 and net2.sm[3].data == net2.sm[1].data


def test_restart_from_a_persisted_snapshot():
    net, snap = _far_behind()
    net.run(1)
    net.propose(1, b"tail")
    net.stabilize()
    for nid in (1, 3):  # the leader compacted itself; node 3 installed the leader's snapshot
        persisted = net.storage[nid].persisted()
        assert persisted.snapshot == snap and [e.index for e in persisted.entries] == [33]
        node = net.restart(nid)
        assert node.raft_log.offset == 32 and node.raft_log.first_index() == 33
        assert node.conf == snap.meta.conf_state  # the membership comes from the snapshot
        assert node.commit == node.applied == 33
        assert net.sm[nid].data == net.sm[2].data
    net.run(3 * ET)
    leader = net.leader()
    net.propose(leader, b"later")
    net.stabilize()
    assert all(net.sm[n].data[-1] == b"later" for n in net.nodes)


def test_snapshot_at_an_index_the_follower_already_holds_is_acknowledged_at_that_index():
    # Node 2 holds (3, term 1) but, after it, a suffix of term 2 that the leader of term 3 does
    # not have. A snapshot at (3, term 1) only fast-forwards its commit index; its reply must
    # not claim that the stale suffix matches the leader's log.
    ids = [1, 2, 3]
    net = Network.from_logs({2: log_of([1, 1, 2, 2, 2], ids)}, term=3)
    node = net.nodes[2]
    meta = SnapshotMeta(3, 1, ConfState(voters=frozenset(ids)))
    node.step(Message(MsgType.SNAP, 2, 1, 3, snapshot_meta=meta, data=b"[]", done=True))
    rd = node.ready()
    assert [(m.type, m.index, m.reject) for m in rd.all_messages] == [(MsgType.APP_RESP, 3, False)]
    assert rd.snapshot is None and node.commit == 3 and node.raft_log.last_index() == 6
    node.advance(rd)


def test_snapshot_behind_the_commit_index_is_answered_with_the_commit_index():
    net = _cluster_with_entries(5)
    node = net.nodes[2]
    meta = SnapshotMeta(4, 2, ConfState(voters=frozenset({1, 2, 3})))
    node.step(Message(MsgType.SNAP, 2, 1, 2, snapshot_meta=meta, offset=CHUNK, data=b"x"))
    rd = node.ready()
    assert [(m.type, m.index) for m in rd.all_messages] == [(MsgType.APP_RESP, 7)]
    assert rd.snapshot is None
    node.advance(rd)


def test_snapshot_restored_while_a_ready_is_outstanding_keeps_its_configuration():
    # A driver may step messages while a Ready is being persisted. If a snapshot is restored
    # meanwhile, the configuration changes among that Ready's committed entries are already
    # part of the snapshot's configuration and must not be applied on top of it.
    node = RawNode.bootstrap(RaftConfig(id=2), random.Random(0), [1, 2, 3])
    node.advance(node.ready())
    add_learner = ConfChange((ConfChangeSingle(ConfChangeType.ADD_LEARNER, 4),))
    node.step(
        Message(
            MsgType.APP,
            2,
            1,
            2,
            log_term=1,
            index=1,
            commit=3,
            entries=(Entry(2, 2), Entry(2, 3, EntryType.CONF_CHANGE, add_learner.encode())),
        )
    )
    rd = node.ready()
    assert [e.index for e in rd.committed_entries] == [2, 3]
    # Learner 4 was added at 3 and removed again by index 10, which the snapshot covers.
    meta = SnapshotMeta(10, 2, ConfState(voters=frozenset({1, 2, 3})))
    node.step(Message(MsgType.SNAP, 2, 1, 2, snapshot_meta=meta, data=b"[]", done=True))
    node.advance(rd)
    assert node.conf == meta.conf_state
    assert node.applied == 10 and node.raft_log.offset == 10
    rd = node.ready()
    assert rd.snapshot is not None and rd.snapshot.meta == meta
    node.advance(rd)
    assert node.conf == meta.conf_state


def test_follower_within_the_kept_tail_is_caught_up_by_appends_not_a_snapshot():
    net = Network.bootstrap([1, 2, 3], snapshot_chunk_bytes=CHUNK)
    net.elect(1)
    net.isolate(3)
    for i in range(10):
        net.propose(1, b"value-%03d" % i)
    net.stabilize()
    net.compact(1, keep_entries=11)  # node 3 has up to 2; the leader keeps 2..12
    assert net.nodes[1].raft_log.offset == 1
    net.heal()
    net.run(1)
    assert not net.messages(MsgType.SNAP)
    assert net.log(3)[1:] == net.log(1) and net.sm[3].data == net.sm[1].data


def test_a_transfer_interrupted_halfway_resumes_where_the_follower_got_to():
    """The leader loses track of a transfer (its view of the follower starts over, as after
    a lost connection); the follower still holds the chunks it got and says how far it is,
    so the leader goes on from there instead of sending them all again."""
    net, snap = _far_behind()
    net.drop(lambda m: m.type == MsgType.SNAP and m.offset == 2 * CHUNK, times=1)
    net.run(1)
    assert [off for off, _, _ in _snaps_to_3(net)] == [0, CHUNK, 2 * CHUNK]  # cut off there
    net.nodes[1].tracker.progress[3].become_probe()  # the leader starts over...
    net.run(2 * ET)
    offsets = [off for off, _, _ in _snaps_to_3(net)][3:]
    assert offsets[0] == 0  # ... from its first chunk
    assert CHUNK not in offsets  # but the follower's answer skipped what it already held
    assert offsets[1] == 2 * CHUNK, offsets
    assert net.nodes[3].raft_log.offset == 32 and net.sm[3].data == net.sm[1].data
