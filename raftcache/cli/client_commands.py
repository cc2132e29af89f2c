"""The commands for the client operations on keys (set, get, mget, mset, delete, cas, incr,
append, invalidate), status, member and transfer-leader (from `member`), and admin.

Contract: each prints what the operation answers on stdout (values as raw bytes, one per
line) and exits as the package docstring says; `add_client_commands` adds them in the order
`raftcache --help` lists them.
"""

from __future__ import annotations

import argparse
import sys

from raftcache.cli.cluster_calls import (
    EXIT_CAS_FAILED,
    EXIT_ERROR,
    EXIT_MISSING,
    client_command,
    connect,
    fail,
    run_client,
)
from raftcache.cli.member import add_member_commands
from raftcache.core.operations import OPERATIONS


class _Pairs(argparse.Action):
    """KEY VALUE [KEY VALUE ...]: an odd count is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) % 2:
            parser.error(f"expected KEY VALUE pairs, got an odd number of arguments "
                         f"({len(values)})")
        setattr(namespace, self.dest, dict(zip(values[::2], values[1::2], strict=True)))


def add_client_commands(sub) -> None:
    s = client_command(sub, "set", "set", _cmd_set, "key", "value",
                       help="store a value; prints its version")
    s.add_argument("--ttl", type=float, default=None, help="seconds")
    g = client_command(sub, "get", "get", _cmd_get, "key",
                       help=f"print a value (exit {EXIT_MISSING} when missing)")
    g.add_argument("--with-version", action="store_true", help="print VERSION VALUE")
    g.add_argument("--consistency", default="linearizable",
                   choices=["linearizable", "lease", "stale"])
    mg = client_command(sub, "mget", "mget", _cmd_mget,
                        help="print several values read at one point, one line per key (a "
                             f"missing key: an empty line; exit {EXIT_MISSING} if any is)")
    mg.add_argument("keys", nargs="+", metavar="KEY")
    mg.add_argument("--with-version", action="store_true",
                    help="print VERSION VALUE lines (a missing key: version 0)")
    mg.add_argument("--consistency", default="linearizable",
                    choices=["linearizable", "lease", "stale"])
    ms = client_command(sub, "mset", "mset", _cmd_mset,
                        help="store several values in one write; prints their version")
    ms.add_argument("items", nargs="+", action=_Pairs, metavar="KEY VALUE")
    ms.add_argument("--ttl", type=float, default=None, help="seconds")
    client_command(sub, "delete", "delete", _cmd_delete, "key",
                   help="delete a key; prints deleted or not found")
    c = client_command(sub, "cas", "cas", _cmd_cas, "key",
                       help="store VALUE only if KEY is at VERSION (0: missing); prints the new "
                            "version (\"swapped\" when the transport does not carry it); exit "
                            f"{EXIT_CAS_FAILED} when the version check fails")
    c.add_argument("version", type=int)
    c.add_argument("value")
    c.add_argument("--ttl", type=float, default=None, help="seconds")
    i = client_command(sub, "incr", "incr", _cmd_incr, "key",
                       help="add DELTA (default 1) to a decimal integer (missing: 0); prints "
                            "the new value")
    i.add_argument("delta", type=int, nargs="?", default=1)
    client_command(sub, "append", "append", _cmd_append, "key", "value",
                   help="append to a value (missing: empty); prints the new length")
    inv = client_command(sub, "invalidate", "invalidate", _cmd_invalidate,
                         help="delete every key that starts with PREFIX; prints how many")
    inv.add_argument("prefix", nargs="?", default="")
    inv.add_argument("--all", action="store_true", help="every key (an empty prefix)")
    st = client_command(sub, "status", "status", _cmd_status,
                        help="a table of the nodes: " + OPERATIONS["status"].doc + "; exits 2 "
                             "when a node is unreachable or none knows a leader (a health check)")
    st.add_argument("--json", action="store_true",
                    help="one JSON object per node and line: id, address, role, term, commit, "
                         "applied, leader, leader_address, voters, learners, peer_addresses, "
                         "joined, metrics_url (or address and error)")
    add_member_commands(sub)  # here, so that --help lists them after status
    a = client_command(sub, "admin", "admin", _cmd_admin, "action",
                       help="run an admin action of a security plugin (revoke, role-set, "
                            "keys-rotate, ...) and print its JSON answer")
    a.add_argument("arguments", nargs="*", metavar="ARG")


def _write_found(found, with_version: bool) -> None:
    """One line: the value (VERSION VALUE with --with-version); a missing key: empty (0)."""
    value, version = found or (b"", 0)
    prefix = b"%d " % version if with_version else b""
    sys.stdout.buffer.write(prefix + value + b"\n")


def _cmd_set(args):
    def go():
        with connect(args) as c:
            print(c.set(args.key, args.value, ttl=args.ttl))
    return run_client(go)


def _cmd_get(args):
    def go():
        with connect(args) as c:
            found = c.get_with_version(args.key, consistency=args.consistency)
        if found is None:
            return EXIT_MISSING
        _write_found(found, args.with_version)
        return 0
    return run_client(go)


def _cmd_mget(args):
    def go():
        with connect(args) as c:
            found = c.mget_with_versions(args.keys, consistency=args.consistency)
        for f in found:
            _write_found(f, args.with_version)
        return EXIT_MISSING if None in found else 0
    return run_client(go)


def _cmd_mset(args):
    def go():
        with connect(args) as c:
            versions = c.mset(args.items, ttl=args.ttl)
        print(max(versions))  # one log entry writes them all: one version
    return run_client(go)


def _cmd_cas(args):
    def go():
        with connect(args) as c:
            swapped, version = c.cas_with_version(args.key, args.version, args.value,
                                                  ttl=args.ttl)
        if not swapped:
            return fail("VersionMismatch", f"{args.key!r} is not at version {args.version}; "
                                           "nothing was written", EXIT_CAS_FAILED)
        print("swapped" if version is None else version)
        return 0
    return run_client(go)


def _cmd_incr(args):
    def go():
        with connect(args) as c:
            print(c.incr(args.key, args.delta))
    return run_client(go)


def _cmd_append(args):
    def go():
        with connect(args) as c:
            print(c.append(args.key, args.value))
    return run_client(go)


def _cmd_invalidate(args):
    if bool(args.prefix) == args.all:  # an empty prefix is every key: only when asked for
        args.usage_error("give a PREFIX, or --all for every key (not both)")

    def go():
        with connect(args) as c:
            print(c.invalidate(args.prefix))
    return run_client(go)


def _cmd_delete(args):
    def go():
        with connect(args) as c:
            print("deleted" if c.delete(args.key) else "not found")
    return run_client(go)


def _cmd_admin(args):
    import json

    def go():
        with connect(args) as c:
            print(json.dumps(c.admin(args.action, *args.arguments), sort_keys=True))
    return run_client(go)


def _cmd_status(args):
    import json

    import attrs

    from raftcache import errors

    answers = {}  # endpoint -> its NodeStatus, or why it did not answer
    with connect(args) as c:
        for endpoint in c.endpoints:
            try:
                answers[endpoint] = c.status(endpoint)
            except (errors.RaftCacheError, OSError, TimeoutError) as exc:
                answers[endpoint] = exc
    if args.json:
        for endpoint, s in answers.items():
            row = (attrs.asdict(s) if not isinstance(s, Exception)
                   else {"address": endpoint, "error": f"{type(s).__name__}: {s}"})
            print(json.dumps(row))
    else:
        rows = [(str(s.id), endpoint, s.role, str(s.term), str(s.commit), str(s.applied),
                 str(s.leader or "-")) if not isinstance(s, Exception)
                else ("?", endpoint, f"unreachable ({type(s).__name__})", "", "", "", "")
                for endpoint, s in answers.items()]
        header = ("NODE", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    # A health check: every node answers and they know a leader.
    problems = [f"{endpoint} unreachable" for endpoint, s in answers.items()
                if isinstance(s, Exception)]
    if not any(s.leader for s in answers.values() if not isinstance(s, Exception)):
        problems.append("no leader")
    if problems:
        print(f"raftcache: unhealthy: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_ERROR
    return 0
