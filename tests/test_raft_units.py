"""The core's building blocks in isolation: quorum arithmetic, the log and follower progress."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from raft_harness import entry

from raftcache.core.raft import quorum
from raftcache.core.raft.log import LogError, RaftLog
from raftcache.core.raft.messages import ConfState, Snapshot, SnapshotMeta
from raftcache.core.raft.progress import Progress, ProgressState
from raftcache.core.raft.quorum import VoteResult


def fs(*xs):
    return frozenset(xs)


# -- quorum ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "voters, acked, want",
    [
        ({1}, {1: 5}, 5),
        ({1, 2}, {1: 5, 2: 3}, 3),  # two voters: both must have it
        ({1, 2, 3}, {1: 5, 2: 3, 3: 1}, 3),
        ({1, 2, 3, 4}, {1: 5, 2: 3, 3: 1, 4: 9}, 3),  # four voters need three
        ({1, 2, 3, 4, 5}, {1: 5, 2: 3, 3: 1, 4: 9, 5: 7}, 5),
        ({1, 2, 3}, {1: 5}, 0),  # a voter not heard from counts as 0
        ({1, 2, 3}, {1: 5, 9: 7}, 0),  # non-voters do not count
    ],
)
def test_majority_index(voters, acked, want):
    assert quorum.majority_index(frozenset(voters), acked) == want


@given(st.dictionaries(st.integers(1, 9), st.integers(0, 100), min_size=1))
def test_majority_index_is_reached_by_a_majority_and_is_the_largest_such(acked):
    voters = frozenset(acked)
    idx = quorum.majority_index(voters, acked)
    assert sum(v >= idx for v in acked.values()) > len(voters) // 2
    assert sum(v >= idx + 1 for v in acked.values()) <= len(voters) // 2


def test_joint_commit_needs_both_majorities():
    joint = ConfState(voters=fs(1, 2, 3, 4, 5), voters_outgoing=fs(1, 2, 3))
    assert quorum.committed_index(joint, {1: 9, 4: 9, 5: 9, 2: 1, 3: 1}) == 1
    assert quorum.committed_index(joint, {1: 9, 2: 9, 4: 9, 3: 1, 5: 1}) == 9
    simple = ConfState(voters=fs(1, 2, 3))
    assert quorum.committed_index(simple, {1: 9, 2: 9}) == 9


def test_vote_results():
    c = ConfState(voters=fs(1, 2, 3))
    assert quorum.vote_result(c, {1: True}) == VoteResult.PENDING
    assert quorum.vote_result(c, {1: True, 2: True}) == VoteResult.WON
    assert quorum.vote_result(c, {1: True, 2: False}) == VoteResult.PENDING
    assert quorum.vote_result(c, {1: True, 2: False, 3: False}) == VoteResult.LOST
    even = ConfState(voters=fs(1, 2, 3, 4))
    assert quorum.vote_result(even, {1: True, 2: True, 3: False, 4: False}) == VoteResult.LOST
    joint = ConfState(voters=fs(1, 4, 5), voters_outgoing=fs(1, 2, 3))
    assert quorum.vote_result(joint, {1: True, 4: True, 5: True}) == VoteResult.PENDING
    assert quorum.vote_result(joint, {1: True, 4: True, 2: True}) == VoteResult.WON
    assert quorum.vote_result(joint, {2: False, 3: False, 4: True, 5: True}) == VoteResult.LOST
    assert quorum.has_quorum(joint, {1, 2, 4}) and not quorum.has_quorum(joint, {1, 4, 5})


# -- log -------------------------------------------------------------------------------------
def _log(*terms, offset=0, offset_term=0):
    snap = Snapshot(SnapshotMeta(offset, offset_term)) if offset else None
    return RaftLog(snap, [entry(offset + 1 + i, t) for i, t in enumerate(terms)])


def test_log_basics():
    log = _log(1, 1, 2, offset=5, offset_term=1)
    assert (log.first_index(), log.last_index(), log.last_term()) == (6, 8, 2)
    assert log.term(5) == 1 and log.term(4) is None and log.term(9) is None
    assert log.committed == 5 and log.applied == 5 and log.stable == 8
    with pytest.raises(LogError, match="gap"):
        RaftLog(None, [entry(1, 1), entry(3, 1)])


def test_is_up_to_date_compares_last_term_then_last_index():
    log = _log(1, 2, 2)
    assert log.is_up_to_date(3, 2) and log.is_up_to_date(1, 3)
    assert not log.is_up_to_date(2, 2) and not log.is_up_to_date(9, 1)


@pytest.mark.parametrize(
    "index, term, want",
    [
        (7, 5, (7, 4)),  # the last term <= 5 ends at 7
        (7, 3, (4, 3)),  # skip the whole term-4 run
        (7, 2, (2, 2)),
        (7, 1, (1, 1)),
        (7, 0, (0, 0)),
        (3, 4, (3, 3)),
        (99, 9, (7, 4)),  # clamped to the last index
    ],
)
def test_find_conflict_by_term(index, term, want):
    log = _log(1, 2, 3, 3, 4, 4, 4)
    assert log.find_conflict_by_term(index, term) == want


def test_find_conflict_by_term_stops_at_the_snapshot():
    log = _log(4, 4, offset=5, offset_term=3)
    assert log.find_conflict_by_term(7, 3) == (5, 3)
    assert log.find_conflict_by_term(7, 2) == (5, 0)  # cannot look behind the snapshot


def test_maybe_append_keeps_matching_prefix_and_replaces_a_conflicting_suffix():
    log = _log(1, 1, 2, 2)
    assert log.maybe_append(2, 1, 0, [entry(3, 2), entry(4, 2)]) == 4
    assert log.stable == 4  # duplicates change nothing
    assert log.maybe_append(2, 1, 0, [entry(3, 2)]) == 3
    assert log.last_index() == 4  # a shorter (reordered) append does not truncate
    assert log.maybe_append(3, 2, 3, [entry(4, 3), entry(5, 3)]) == 5
    assert [e.term for e in log.entries] == [1, 1, 2, 3, 3] and log.stable == 3
    assert log.committed == 3
    assert log.maybe_append(5, 2, 5, []) is None  # mismatch at 5
    assert log.maybe_append(9, 3, 9, []) is None  # beyond the end
    assert log.maybe_append(5, 3, 9, []) == 5 and log.committed == 5  # commit capped


def test_log_refuses_to_overwrite_committed_entries_or_commit_beyond_its_end():
    log = _log(1, 1, 1)
    log.commit_to(2)
    with pytest.raises(LogError):
        log.append([entry(2, 2)])
    with pytest.raises(LogError):
        log.commit_to(4)
    log.commit_to(1)  # never moves back
    assert log.committed == 2


def test_slice_limits():
    log = RaftLog(None, [entry(i, 1, b"x" * 100) for i in range(1, 11)])
    assert len(log.slice(1, 11, 4, 1 << 20)) == 4
    assert len(log.slice(1, 11, 100, 250)) == 2  # 124 bytes each, counted with overhead
    assert len(log.slice(1, 11, 100, 1)) == 1  # always at least one


def test_compact_and_restore():
    log = _log(1, 1, 2, 2)
    log.commit_to(3)
    log.applied_to(3)
    with pytest.raises(LogError):
        log.compact(4)
    log.compact(3)
    assert (log.offset, log.offset_term, log.last_index()) == (3, 2, 4)
    log.compact(2)  # already covered: no-op
    assert log.offset == 3
    log.restore(Snapshot(SnapshotMeta(10, 5)))
    assert (log.offset, log.last_index(), log.committed, log.applied, log.stable) == (
        10,
        10,
        10,
        10,
        10,
    )


# -- progress --------------------------------------------------------------------------------
def test_probe_decrease_uses_the_hint_and_ignores_stale_rejections():
    pr = Progress(match=2, next=11)
    pr.probe_sent = True
    assert not pr.maybe_decrease_to(7, 3)  # a rejection of an older probe
    assert pr.probe_sent
    assert pr.maybe_decrease_to(10, 4)
    assert pr.next == 5 and not pr.probe_sent
    pr2 = Progress(match=6, next=11)
    assert pr2.maybe_decrease_to(10, 0) and pr2.next == 7  # never below match + 1


def test_replicate_decrease_goes_back_to_match():
    pr = Progress(match=5, next=20)
    pr.become_replicate()
    pr.next = 20
    assert not pr.maybe_decrease_to(5, 0)  # at or below match: stale
    assert pr.maybe_decrease_to(12, 0) and pr.next == 6


def test_replicate_window():
    pr = Progress(match=3, next=4)
    pr.become_replicate()
    pr.sent_entries(5)
    pr.sent_entries(5)  # an empty append (only a commit index): takes no slot
    pr.sent_entries(8)
    assert list(pr.inflights) == [5, 8] and pr.next == 9
    assert pr.is_paused(2) and not pr.is_paused(3)
    assert pr.maybe_update(6)
    pr.free_inflights_to(6)
    assert list(pr.inflights) == [8] and not pr.is_paused(2)


def test_probe_pauses_after_one_append_and_snapshot_always_pauses():
    pr = Progress(match=0, next=5)
    assert not pr.is_paused(8)
    pr.sent_entries(4)
    assert pr.is_paused(8)
    pr.become_snapshot(Snapshot(SnapshotMeta(20, 3)), tick=7)
    assert pr.is_paused(8) and pr.state == ProgressState.SNAPSHOT
    pr.become_probe()
    assert pr.state == ProgressState.PROBE and pr.next == 21  # after the snapshot
