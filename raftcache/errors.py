"""The errors a client sees, and what each promises about the operation that raised it."""

from __future__ import annotations


class RaftCacheError(Exception):
    """Base class of every error the client raises."""


class NotLeader(RaftCacheError):
    """The node is not the leader; `leader_hint` is the leader's address when known."""

    def __init__(self, reason: str = "not the leader", leader_hint: str = ""):
        super().__init__(f"{reason} (leader: {leader_hint or 'unknown'})")
        self.leader_hint = leader_hint


class Unauthorized(RaftCacheError):
    """The token does not allow this operation (or is missing, expired or revoked)."""


class InvalidRequest(RaftCacheError):
    """The request itself is wrong; retrying it will not help."""


class Unavailable(RaftCacheError):
    """Nothing was applied (nothing was sent, or it surely did not apply): safe to retry."""


class OutcomeUnknown(RaftCacheError):
    """A write that may or may not have applied (for example a timeout after sending it)."""


BY_NAME = {cls.__name__: cls for cls in
           (NotLeader, Unauthorized, InvalidRequest, Unavailable, OutcomeUnknown)}
