"""Deliberately broken Raft cores, to prove that the simulator's checks have teeth.

Each one removes a single safety rule. `python -m raftcache.testing.sim --mutant NAME` runs the
simulator against it and should report a violation within a few hundred seeds; the tests in
tests/test_sim_mutants.py assert exactly that.
"""

from __future__ import annotations

from raftcache.core.raft import RawNode


class VoteWithoutLogCheck(RawNode):
    """Grants votes without the up-to-date-log check (Raft 5.4.1)."""

    def _vote_log_ok(self, last_index: int, last_term: int) -> bool:
        return True


class CommitByCountingOldTerms(RawNode):
    """Commits entries of earlier terms by counting replicas (the paper's Figure 8)."""

    def _commit_allowed(self, index: int) -> bool:
        return True


class ReadIndexWithoutHeartbeat(RawNode):
    """Serves ReadIndex from the leader's commit index without confirming leadership."""

    def _handle_read_index(self, context: bytes, requester: int) -> None:
        if not self._committed_in_current_term():
            self._reads_waiting_for_commit.append((context, requester))
            return
        self._answer_read(context, requester, self.log.committed)


class ReadIndexBeforeOwnCommit(RawNode):
    """Serves ReadIndex before the new leader has committed an entry of its own term."""

    def _committed_in_current_term(self) -> bool:
        return True


MUTANTS = {
    "vote-without-log-check": VoteWithoutLogCheck,
    "commit-old-terms": CommitByCountingOldTerms,
    "read-without-heartbeat": ReadIndexWithoutHeartbeat,
    "read-before-own-commit": ReadIndexBeforeOwnCommit,
}
