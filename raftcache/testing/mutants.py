"""Deliberately broken Raft cores and nodes, to prove that the checks have teeth.

Each one removes a single safety rule. `python -m raftcache.testing.sim --mutant NAME` runs the
simulator against a core mutant and should report a violation within a few hundred seeds; the
tests in tests/test_sim_mutants.py assert exactly that. A real node runs one (core or node
mutants) only when started by the test-only launcher `python -m raftcache.testing.node --mutant
NAME` (a node's config has no such setting); tests/test_jepsen.py uses that to show the fault
suite catches them on a running cluster.
"""

from __future__ import annotations

import zlib

from raftcache.core.raft import RawNode
from raftcache.testing.auth_mutants import AUTH_MUTANTS


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

    def _handle_read_index(self, context: bytes, requester: int, lease: bool) -> None:
        if not self._committed_in_current_term():
            self.read_only.wait_for_commit(context, requester, lease)
            return
        self._answer_read(context, requester, self.raft_log.committed)


class ReadIndexBeforeOwnCommit(RawNode):
    """Serves ReadIndex before the new leader has committed an entry of its own term."""

    def _committed_in_current_term(self) -> bool:
        return True


class FastFailoverUnderLease(RawNode):
    """Forgets a leader whose connection ended even with lease reads, breaking the promise
    the leader's lease rests on (not to vote for another for an election timeout)."""

    def _may_campaign_early(self) -> bool:
        return self.config.pre_vote


MUTANTS = {
    "vote-without-log-check": VoteWithoutLogCheck,
    "commit-old-terms": CommitByCountingOldTerms,
    "read-without-heartbeat": ReadIndexWithoutHeartbeat,
    "read-before-own-commit": ReadIndexBeforeOwnCommit,
    "fast-failover-under-lease": FastFailoverUnderLease,
}


def report_writes_failed(node) -> None:
    """A node that answers "surely not applied" (Unavailable) for some writes it did apply: the
    RedisRaft "aborted read". Chosen by (client id, sequence), so client retries are refused
    too and the client ends up reporting the write as failed."""
    from raftcache.core import api
    from raftcache.core.cache import commands

    writes = node.replica.writes
    resolve = writes.resolve

    def chosen(entry) -> bool:
        waiter = writes.waiting.get(entry.index)
        if waiter is None or waiter.term != entry.term or not entry.data:
            return False
        try:
            env = commands.decode_envelope(entry.data)
        except commands.CommandError:
            return False
        return env.client_id is not None and zlib.crc32(
            b"%s:%d" % (env.client_id.encode(), env.seq)) % 10 == 0

    def lying(applied) -> None:
        lied_to = [writes.waiting.pop(e.index) for e, _ in applied if chosen(e)]
        resolve(applied)  # they were all applied; the chosen writers just are not told
        for waiter in lied_to:
            waiter.result.set(api.error("Unavailable", "not applied (mutant: it was)"))

    writes.resolve = lying


def ignore_backend_loss(node) -> None:
    """A node that does not notice its Redis restarted empty (the bookkeeping check gone): it
    carries on over the empty server instead of rebuilding it, so every value it held and
    nobody rewrote since reads as not found there. On a hybrid backend, its Redis routes."""
    from raftcache.pluginapi import BackendLost
    from raftcache.plugins.backend.redis import RedisBackend

    def adopting(backend: RedisBackend, call):
        def wrapped(*args):
            try:
                return call(*args)
            except BackendLost:
                backend.recorded = backend.redis.get(backend.marker) or b""  # "it is ours"
                return call(*args)

        return wrapped

    backend = node.replica.sm.backend
    for b in [backend, *getattr(backend, "instances", {}).values()]:
        if isinstance(b, RedisBackend):
            b.get_many, b.apply = adopting(b, b.get_many), adopting(b, b.apply)


def memcached_skips_sets(node) -> None:
    """A node whose Memcached keeps the old value for one set in ten (a write error ignored):
    a read then serves an older value, which no "linearizable or miss" route may."""
    from raftcache.plugins.backend.memcached import MemcachedBackend

    def skipping(apply):
        def wrapped(index, changes):
            return apply(index, [c for c in changes if c.value is None
                                 or zlib.crc32(b"%s:%d" % (c.key, index)) % 10])

        return wrapped

    backend = node.replica.sm.backend
    for b in [backend, *getattr(backend, "instances", {}).values()]:
        if isinstance(b, MemcachedBackend):
            b.apply = skipping(b.apply)


def clock_local(node) -> None:
    """A node whose cluster time is its own clock (what every node did before cluster time
    was agreed): as a leader a year ahead it expires everything for good, a year behind it
    freezes time; as an idle follower behind it accepts expired tokens."""
    replica = node.replica

    def stamp() -> int:
        replica._last_stamp = max(int(replica.clock() * 1000), replica._last_stamp,
                                  replica.sm.last_stamp_ms)
        return replica._last_stamp

    replica.stamp = stamp


# Node mutants patch a raftcache.node.Node before it starts: its replica's parts.
NODE_MUTANTS = {
    "clock-local": clock_local,
    "report-writes-failed": report_writes_failed,
    "ignore-backend-loss": ignore_backend_loss,
    "memcached-skips-sets": memcached_skips_sets,
}
# Access control broken one way each (the rbac plugin swapped for a mutant of it).
NODE_MUTANTS.update(AUTH_MUTANTS)
