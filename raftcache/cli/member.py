"""Membership and leadership: `member add|remove|promote|update` and `transfer-leader`; with
`member add --learner`, the learner's catching up is shown until it holds what was
committed when it was added.

Contract: each prints the membership the leader answers with (`describe_membership`); a
learner that has not caught up within --wait is an Unavailable error (it stays a learner).
"""

from __future__ import annotations

import sys

from raftcache.cli.cluster_calls import client_command, connect, run_client


def add_member_commands(sub) -> None:
    m = client_command(sub, "member", "change_member", _cmd_member,
                       help="change membership: add a node at its address, remove, promote a "
                            "learner, or update a member's address")
    m.add_argument("action", choices=["add", "remove", "promote", "update"],
                   help="add a voter (--learner: a learner), remove a node, promote a learner, "
                        "update a member's address")
    m.add_argument("node", type=int)
    m.add_argument("address", nargs="?", metavar="HOST:PORT",
                   help="add, update: where the node listens (the log carries it to every "
                        "node; add may leave it out for a node listed in cluster.peers)")
    m.add_argument("--learner", action="store_true")
    m.add_argument("--wait", type=float, default=600.0, metavar="SECONDS",
                   help="add --learner: show its catching up until it holds what was committed "
                        "when it was added, for at most this long (0: do not wait)")
    t = client_command(sub, "transfer-leader", "transfer_leader", _cmd_transfer_leader)
    t.add_argument("node", type=int)


def describe_membership(status) -> str:
    learners = ",".join(map(str, status.learners)) or "-"
    return (f"leader {status.leader}, term {status.term}, voters "
            f"{','.join(map(str, status.voters))}, learners {learners}")


def _cmd_member(args):
    def go():
        with connect(args) as c:
            if args.action == "remove":
                status = c.remove_member(args.node)
            elif args.action == "update":
                if not args.address:
                    raise ValueError("member update needs the node's new HOST:PORT")
                status = c.update_member_address(args.node, args.address)
            else:
                learner = args.learner and args.action == "add"
                status = c.add_member(args.node, args.address, learner=learner)
                if learner and args.wait > 0:
                    print(describe_membership(status), flush=True)
                    status = _wait_caught_up(c, args.node, status, args.wait)
            print(describe_membership(status))
    return run_client(go)


def _wait_caught_up(c, node_id: int, status, seconds: float):
    """Poll a new learner until it applied what the leader had committed when it was added:
    a progress bar on a terminal, a line a second otherwise. The leader's status after."""
    import time

    from raftcache import errors

    target = status.commit
    address = status.peer_addresses.get(node_id)
    if not address:
        return status
    deadline = time.monotonic() + seconds
    bar = None
    if sys.stdout.isatty():
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"node {node_id} catching up", total=target)
    applied, said = 0, 0.0
    try:
        while applied < target:
            if time.monotonic() >= deadline:
                raise errors.Unavailable(f"node {node_id} at {address} applied {applied} of "
                                         f"{target} after {seconds:g} s; it is a learner: "
                                         "promote it once it has caught up")
            try:
                applied = c.status(address).applied
            except (OSError, errors.RaftCacheError):
                pass  # it may still be starting
            if bar is not None:
                bar.update(task, completed=min(applied, target))
            elif time.monotonic() - said >= 1.0 or applied >= target:
                said = time.monotonic()
                print(f"node {node_id}: applied {min(applied, target)} of {target}", flush=True)
            time.sleep(0.1)
    finally:
        if bar is not None:
            bar.stop()
    return c.status(status.leader_address or None)


def _cmd_transfer_leader(args):
    def go():
        with connect(args) as c:
            print(describe_membership(c.transfer_leader(args.node)))
    return run_client(go)
