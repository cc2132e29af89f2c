"""Node operations: leadership transfer, membership changes, admin actions, backups."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import attrs
import gevent
import gevent.event

from raftcache.core import api
from raftcache.core.operations import BadRequest
from raftcache.core.raft.messages import (
    ConfChange,
    ConfChangeSingle,
    ConfChangeType,
    NotLeader,
    ProposalRefused,
    StateRole,
    address_problem,
)
from raftcache.pluginapi import BackendLost, BackendUnavailable

if TYPE_CHECKING:
    from .requests import Requests

CHANGES = {"add-voter": ConfChangeType.ADD_VOTER, "add-learner": ConfChangeType.ADD_LEARNER,
           "remove": ConfChangeType.REMOVE_NODE, "update-address": ConfChangeType.UPDATE_ADDRESS}
BACKUP_PART = 1 << 20  # bytes of a backup per call: well within a frame


class ClusterCalls:
    """The node operations a client may call (`OPERATIONS` kind "node" but `status`), once
    `Requests` has authenticated and authorized them. Each answers with a Response; raises
    BadRequest for a malformed call and NotLeader where only the leader can act (the request
    handler redirects or forwards). Calls that wait answer before the client's own deadline
    (0.8 of it), so that it can still try elsewhere."""

    def __init__(self, requests: Requests):
        self.requests = requests
        self.replica = requests.replica

    def transfer_leader(self, request: api.Request, _caller) -> api.Response:
        target = request.node_id
        if not target:
            raise BadRequest("transfer_leader needs node_id")
        deadline = time.monotonic() + 0.8 * self.requests.timeout(request)
        raw = self.replica.raw
        try:
            raw.transfer_leadership(target)
        except NotLeader:
            raise  # a ProposalRefused too: the request handler redirects or forwards
        except ProposalRefused as exc:
            return api.error("InvalidRequest", exc.reason)
        self.replica.wakeup.set()
        while raw.status().lead != target:
            if time.monotonic() >= deadline:
                return api.error("Unavailable", f"node {target} did not take over "
                                 "in time; retry")
            gevent.sleep(self.replica.config.raft.tick_ms / 1000.0)
        return api.Response(status=self.requests.status())

    def change_member(self, request: api.Request, _caller) -> api.Response:
        change, target = request.change, request.node_id
        if change not in CHANGES or not target or target < 1:
            raise BadRequest(f"change_member needs node_id and a change out of "
                             f"{', '.join(CHANGES)}")
        address = request.address or ""
        problem = address_problem(address)
        if problem:
            raise BadRequest(f"the node's address: {problem}")
        if change == "update-address" and not address:
            raise BadRequest("update-address needs the node's new address")
        peers = self.requests.addresses.peers
        if change != "remove" and not address and target not in peers:
            raise BadRequest(f"node {target} has no known address: give the address it "
                             f"listens on (known nodes: "
                             f"{', '.join(map(str, sorted(peers)))})")
        deadline = time.monotonic() + 0.8 * self.requests.timeout(request)
        raw = self.replica.raw
        while True:
            st = raw.status()
            if st.role != StateRole.LEADER:
                # Only the leader's view counts: a removed node that never heard of its
                # removal still believes it is a voter (and may sit in a joint configuration).
                return self.requests.not_leader(st.lead, request)
            conf = st.conf
            # Placed where the log says, not where this node dials it: cluster.dial may
            # route the target through a relay, and then the two never match.
            placed = not address or self.replica.sm.members.get(target) == address
            done = {"add-voter": target in conf.voters and not conf.joint and placed,
                    "add-learner": target in conf.learners and placed,
                    "update-address": placed,
                    "remove": target not in conf.all_nodes()}[change]
            if done:  # the leader's applied configuration, hence committed
                return api.Response(status=self.requests.status())
            kind = CHANGES[change]
            if change != "remove" and target in (conf.learners if change == "add-learner"
                                                 else conf.voters):
                kind = ConfChangeType.UPDATE_ADDRESS  # a member already: only its address
            cc = ConfChange((ConfChangeSingle(kind, target, address),))
            try:
                if conf.joint:
                    raise ProposalRefused("a configuration change is still being applied")
                term, index = raw.propose_conf_change(cc)
            except NotLeader:
                raise  # a ProposalRefused too: the request handler redirects or forwards
            except ProposalRefused as exc:
                # One change at a time: wait for the one in progress (or the joint state) to end.
                if time.monotonic() >= deadline:
                    return api.error("Unavailable", exc.reason)
                self.replica.wakeup.set()
                gevent.sleep(self.replica.config.raft.tick_ms / 1000.0)
                continue
            result = self.replica.writes.wait(index, term, self.requests.timeout(request))
            if isinstance(result, api.Response) and result.error:
                return result
            # Applied; loop once more to report the settled (non-joint) configuration.

    def admin(self, request: api.Request, caller) -> api.Response:
        st = self.replica.raw.status()
        if st.role != StateRole.LEADER:  # actions read and change the newest settings
            return self.requests.not_leader(st.lead, request)
        if not request.action:
            raise BadRequest("admin needs an action")
        try:
            outcome = self.requests.pm.hook.raftcache_admin(
                node=self.requests.context, action=request.action,
                args=list(request.arguments or ()), caller=caller)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if outcome is None:
            raise BadRequest(f"unknown admin action {request.action!r} (no plugin offers it)")
        if isinstance(outcome, dict):
            return api.Response(text=json.dumps(outcome, sort_keys=True))
        command, report = outcome if isinstance(outcome, tuple) else (outcome, {})
        result = self.requests.propose(command, request, caller)
        if isinstance(result, api.Response):
            return result
        return api.Response(text=json.dumps({**report, "result": result}, sort_keys=True))

    def snapshot(self, request: api.Request, _caller) -> api.Response:
        """A backup, a part at a time: offset 0 (and no index) takes a new image of the whole
        state on the leader once it has applied everything committed before the call; the
        next calls name its index and read on from an offset."""
        index, offset = request.index or 0, request.offset or 0
        if offset < 0:
            raise BadRequest("offset must not be negative")
        backups = self.replica.backups
        if not index:
            if offset:
                raise BadRequest("a snapshot read from an offset names its index")
            refused = self.requests.read_index(request)
            if refused is not None:
                return refused
            try:
                index = backups.take(self.requests.timeout(request)).index
            except gevent.Timeout:
                return api.error("Unavailable", "the snapshot took too long; retry")
            except (BackendUnavailable, BackendLost) as exc:
                return api.error("Unavailable", f"no snapshot now: {exc}")
        backup = backups.newest
        if backup is None or backup.index != index:
            raise BadRequest(f"this node no longer holds the snapshot at index {index}; "
                             "start again from offset 0")
        return api.Response(part=attrs.evolve(backup, offset=offset,
                                               data=backup.data[offset:offset + BACKUP_PART]))
