"""Quorum arithmetic for simple and joint configurations.

A joint configuration (Raft dissertation 4.3) needs a majority of *both* the incoming and the
outgoing voter sets; an empty outgoing set places no constraint.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from .messages import ConfState, NodeId

_UNBOUNDED = 1 << 62  # "no constraint": an empty voter set agrees with anything


class VoteResult(enum.IntEnum):
    PENDING = 0
    LOST = 1
    WON = 2


def majority_index(voters: frozenset[NodeId], acked: Mapping[NodeId, int]) -> int:
    """The largest value that a majority of `voters` have reached in `acked` (missing = 0)."""
    if not voters:
        return _UNBOUNDED
    values = sorted((acked.get(v, 0) for v in voters), reverse=True)
    return values[len(values) // 2]


def majority_vote(voters: frozenset[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    if not voters:
        return VoteResult.WON
    granted = rejected = 0
    for v in voters:
        answer = votes.get(v)
        if answer is True:
            granted += 1
        elif answer is False:
            rejected += 1
    need = len(voters) // 2 + 1
    if granted >= need:
        return VoteResult.WON
    if rejected > len(voters) - need:
        return VoteResult.LOST
    return VoteResult.PENDING


def committed_index(conf: ConfState, acked: Mapping[NodeId, int]) -> int:
    """The largest value acknowledged by a quorum of `conf` (both halves when joint)."""
    return min(majority_index(conf.voters, acked), majority_index(conf.voters_outgoing, acked))


def vote_result(conf: ConfState, votes: Mapping[NodeId, bool]) -> VoteResult:
    incoming = majority_vote(conf.voters, votes)
    outgoing = majority_vote(conf.voters_outgoing, votes)
    if incoming == outgoing:
        return incoming
    if VoteResult.LOST in (incoming, outgoing):
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(conf: ConfState, members: set[NodeId] | frozenset[NodeId]) -> bool:
    return vote_result(conf, {n: True for n in members}) == VoteResult.WON
