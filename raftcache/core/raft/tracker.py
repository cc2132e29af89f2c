"""What a node knows of the others (etcd's tracker package): each one's replication `Progress`,
the votes of a campaign, and the quorum questions asked of them under a configuration.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from . import quorum
from .messages import ConfState, NodeId
from .progress import Progress, ProgressState


class ProgressTracker:
    def __init__(self) -> None:
        self.progress: dict[NodeId, Progress] = {}
        self.votes: dict[NodeId, bool] = {}

    # -- membership -----------------------------------------------------------------------------
    def rebuild(self, conf: ConfState, self_id: NodeId, last_index: int, stable: int) -> None:
        """Follow a new configuration: drop nodes that left, track the ones that joined."""
        nodes = conf.all_nodes()
        for node in list(self.progress):
            if node not in nodes:
                del self.progress[node]
        for node in nodes:
            if node not in self.progress:
                self.progress[node] = Progress(
                    match=stable if node == self_id else 0,
                    next=last_index + 1,
                    recent_active=True,  # give new members one check-quorum round of grace
                )

    def restart(self, self_id: NodeId, last_index: int, stable: int) -> None:
        """Fresh bookkeeping at the start of a term: nothing is known of the others."""
        self.votes = {}
        for node, pr in self.progress.items():
            mine = node == self_id
            pr.restart(match=stable if mine else 0, next=last_index + 1, active=mine)

    def peers(self, self_id: NodeId):
        """(node, progress) of every tracked node but `self_id`."""
        return ((node, pr) for node, pr in self.progress.items() if node != self_id)

    # -- elections -------------------------------------------------------------------------------
    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, conf: ConfState, node: NodeId, granted: bool) -> quorum.VoteResult:
        """Count `node`'s answer (its first one only) and tell how the campaign stands."""
        self.votes.setdefault(node, granted)
        return quorum.vote_result(conf, self.votes)

    # -- replication -----------------------------------------------------------------------------
    def committed_index(self, conf: ConfState) -> int:
        """The largest index a quorum of `conf` has acknowledged."""
        return quorum.committed_index(conf, {node: pr.match for node, pr in self.progress.items()})

    def quorum_active(self, conf: ConfState, self_id: NodeId) -> bool:
        """Whether a quorum was heard from since the last check (check-quorum)."""
        active = {node for node, pr in self.progress.items()
                  if pr.recent_active or node == self_id}
        return quorum.has_quorum(conf, active)

    def start_activity_round(self, self_id: NodeId) -> None:
        """Begin the next check-quorum round: only we are known to be active."""
        for node, pr in self.progress.items():
            pr.recent_active = node == self_id

    def stalled_snapshots(self, now_tick: int, resend_ticks: int):
        """Nodes whose snapshot chunk has gone unacknowledged for `resend_ticks`."""
        return [(node, pr) for node, pr in self.progress.items()
                if pr.state == ProgressState.SNAPSHOT
                and now_tick - pr.snapshot_sent_tick >= resend_ticks]
