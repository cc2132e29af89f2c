"""The `raftcache` command: up and serve run nodes; a command for every client operation (set,
get, mget, mset, delete, cas, incr, append, invalidate, status, member, transfer-leader); certs
init; keys init, rotate and status (encryption at rest); bench (load, latency and throughput,
with --compare beside Redis, Memcached and PySyncObj).

Exit codes of the client commands: 0 done; 1 not done: a key is missing (get, mget) or cas
found another version; 2 an error, printed as one line `raftcache: <Kind>: <reason>` (or a
usage error); 3 refused: Unauthorized (printed the same way).
"""

from __future__ import annotations

import argparse
import os
import sys

from raftcache.core.operations import BY_CLIENT_NAME, OPERATIONS

EXIT_MISSING = 1  # get, mget: a key is missing
EXIT_CAS_FAILED = 1  # cas: the key is not at the expected version; nothing was written
EXIT_ERROR = 2  # the call failed (or a usage error: argparse exits 2 too)
EXIT_UNAUTHORIZED = 3  # the cluster refused the caller's token (or its lack of one)


def main(argv=None) -> int:
    # gevent must patch the standard library before anything else imports it: thriftpy2's
    # TLS module binds ssl names at import time and would keep the blocking ones.
    from gevent import monkey

    monkey.patch_all()
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftcache", description="A strongly consistent cache.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    _add_server_commands(sub)
    _add_client_commands(sub)
    _add_certs_commands(sub)
    _add_auth_commands(sub)
    _add_keys_commands(sub)
    _add_snapshot_commands(sub)
    _add_bench_command(sub)
    return p


def _add_server_commands(sub) -> None:
    up = sub.add_parser("up", help="run a local cluster in the foreground")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=7400)
    up.add_argument("--data-dir", default="./raftcache-data")
    up.add_argument("--storage", default="file-wal",
                    help="file-wal (default), redis-aof, or memory (not durable)")
    up.add_argument("--transport", default="thrift")
    up.add_argument("--backend", default="memory",
                    help="memory (default), redis, memcached, or hybrid (with --config); "
                         "redis-server or memcached per node when the config names none")
    up.add_argument("--config", help="a TOML file whose settings every node shares")
    up.add_argument("--metrics-port", type=int, default=9400,
                    help="node i serves Prometheus /metrics, /healthz and /readyz on "
                         "PORT+i-1 (default 9400; 0: none)")
    up.add_argument("--leader-timeout", type=float, default=30.0,
                    help="seconds to wait for a leader before giving up (exit 1)")
    up.add_argument("--insecure", action="store_true",
                    help="let peers talk without proving they are nodes of this cluster (no "
                         "cluster secret on plaintext transports); logs a warning")
    up.add_argument("--auth", action="store_true",
                    help="require signed tokens from clients: writes DATA_DIR/auth/admin.token "
                         "(0600) beside the signing key (docs/security.md)")
    up.add_argument("--no-encryption", action="store_true",
                    help="store values in plaintext (by default they are encrypted at rest "
                         "with the keyring DATA_DIR/keyring, made at the first start)")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="run one node in the foreground")
    serve.add_argument("--config", required=True)
    serve.add_argument("--id", type=int, help="this node's id (overrides node.id: one "
                                              "join.toml serves every node that joins)")
    serve.add_argument("--address", help="host:port it listens on (overrides node.address)")
    serve.add_argument("--data-dir", help="its data directory (overrides node.data_dir)")
    serve.add_argument("--metrics-address", help="host:port for /metrics, /healthz and /readyz "
                                                 "(overrides node.metrics_address)")
    serve.set_defaults(func=_cmd_serve)


def _client_command(sub, name: str, op: str, func, *positional: str, help: str = ""):
    """A subcommand that calls the operation the client calls `op` (`Operation.client_name`):
    its positional arguments and the client options. Its help is the operation's doc unless
    `help` says more."""
    operation = BY_CLIENT_NAME[op]
    text = help or operation.doc
    sp = sub.add_parser(name, help=text, description=text)
    for arg in positional:
        sp.add_argument(arg)
    sp.add_argument("--endpoints", default=None,
                    help="host:port,... (default: $RAFTCACHE_ENDPOINTS or 127.0.0.1:7400-7402)")
    sp.add_argument("--token", default=os.environ.get("RAFTCACHE_TOKEN"),
                    help="a signed token (default: $RAFTCACHE_TOKEN)")
    sp.add_argument("--transport", default="thrift")
    sp.add_argument("--ca", help="CA certificate (PEM) for TLS")
    sp.add_argument("--cert", help="client certificate (PEM) for TLS")
    sp.add_argument("--key", dest="tls_key", help="client key (PEM) for TLS")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=func, operation=operation.name, usage_error=sp.error)
    return sp


class _Pairs(argparse.Action):
    """KEY VALUE [KEY VALUE ...]: an odd count is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) % 2:
            parser.error(f"expected KEY VALUE pairs, got an odd number of arguments "
                         f"({len(values)})")
        setattr(namespace, self.dest, dict(zip(values[::2], values[1::2], strict=True)))


def _add_client_commands(sub) -> None:
    s = _client_command(sub, "set", "set", _cmd_set, "key", "value",
                        help="store a value; prints its version")
    s.add_argument("--ttl", type=float, default=None, help="seconds")
    g = _client_command(sub, "get", "get", _cmd_get, "key",
                        help=f"print a value (exit {EXIT_MISSING} when missing)")
    g.add_argument("--with-version", action="store_true", help="print VERSION VALUE")
    g.add_argument("--consistency", default="linearizable",
                   choices=["linearizable", "lease", "stale"])
    mg = _client_command(sub, "mget", "mget", _cmd_mget,
                         help="print several values read at one point, one line per key (a "
                              f"missing key: an empty line; exit {EXIT_MISSING} if any is)")
    mg.add_argument("keys", nargs="+", metavar="KEY")
    mg.add_argument("--with-version", action="store_true",
                    help="print VERSION VALUE lines (a missing key: version 0)")
    mg.add_argument("--consistency", default="linearizable",
                    choices=["linearizable", "lease", "stale"])
    ms = _client_command(sub, "mset", "mset", _cmd_mset,
                         help="store several values in one write; prints their version")
    ms.add_argument("items", nargs="+", action=_Pairs, metavar="KEY VALUE")
    ms.add_argument("--ttl", type=float, default=None, help="seconds")
    _client_command(sub, "delete", "delete", _cmd_delete, "key",
                    help="delete a key; prints deleted or not found")
    c = _client_command(sub, "cas", "cas", _cmd_cas, "key",
                        help="store VALUE only if KEY is at VERSION (0: missing); prints the new "
                             "version (\"swapped\" when the transport does not carry it); exit "
                             f"{EXIT_CAS_FAILED} when the version check fails")
    c.add_argument("version", type=int)
    c.add_argument("value")
    c.add_argument("--ttl", type=float, default=None, help="seconds")
    i = _client_command(sub, "incr", "incr", _cmd_incr, "key",
                        help="add DELTA (default 1) to a decimal integer (missing: 0); prints "
                             "the new value")
    i.add_argument("delta", type=int, nargs="?", default=1)
    _client_command(sub, "append", "append", _cmd_append, "key", "value",
                    help="append to a value (missing: empty); prints the new length")
    inv = _client_command(sub, "invalidate", "invalidate", _cmd_invalidate,
                          help="delete every key that starts with PREFIX; prints how many")
    inv.add_argument("prefix", nargs="?", default="")
    inv.add_argument("--all", action="store_true", help="every key (an empty prefix)")
    st = _client_command(sub, "status", "status", _cmd_status,
                         help="a table of the nodes: " + OPERATIONS["status"].doc + "; exits 2 "
                              "when a node is unreachable or none knows a leader (a health check)")
    st.add_argument("--json", action="store_true",
                    help="one JSON object per node and line: id, address, role, term, commit, "
                         "applied, leader, leader_address, voters, learners, peer_addresses, "
                         "joined, metrics_url (or address and error)")
    m = _client_command(sub, "member", "change_member", _cmd_member,
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
    t = _client_command(sub, "transfer-leader", "transfer_leader", _cmd_transfer_leader)
    t.add_argument("node", type=int)
    a = _client_command(sub, "admin", "admin", _cmd_admin, "action",
                        help="run an admin action of a security plugin (revoke, role-set, "
                             "keys-rotate, ...) and print its JSON answer")
    a.add_argument("arguments", nargs="*", metavar="ARG")


def _add_snapshot_commands(sub) -> None:
    snap = sub.add_parser("snapshot", help="backups: save the cluster's state to a file, "
                                           "restore one into a new cluster")
    snap_sub = snap.add_subparsers(required=True, metavar="ACTION")
    _client_command(snap_sub, "save", "snapshot", _cmd_snapshot_save, "file",
                    help="write a consistent snapshot of the whole cache, taken by the leader "
                         "at a committed index (everything acknowledged before it), with a "
                         "checksum, to FILE (needs an admin token when auth is on)")
    r = snap_sub.add_parser("restore", help="seed the data directories of a new cluster with "
                                            "a backup; then raftcache up --data-dir DIR "
                                            "--nodes N serves it")
    r.add_argument("file")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--nodes", type=int, default=3)
    r.add_argument("--keyring", help="the old cluster's keyring (values stay encrypted with "
                                     "its keys): copied to DATA_DIR/keyring")
    r.add_argument("--storage", default="file-wal", help="the storage the new nodes run")
    r.set_defaults(func=_cmd_snapshot_restore)


def _progress(label: str):
    """A callback (done, total) that shows progress: a bar on a terminal, else a line for
    every tenth of the way; and a function that ends it."""
    if sys.stdout.isatty():
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(label, total=None)
        return (lambda done, total: bar.update(task, completed=done, total=total)), bar.stop
    said = [-1]

    def line(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != said[0]:
            said[0] = tenth
            print(f"{label}: {done:,} of {total:,}", flush=True)

    return line, (lambda: None)


def _cmd_snapshot_save(args):
    from raftcache import backup

    def go():
        show, end = _progress(f"saving {args.file}")
        try:
            with _client(args) as c:
                header = backup.save(c, args.file, show)
        except backup.BackupError as exc:
            return _fail("BackupError", str(exc))
        finally:
            end()
        print(f"saved {args.file}: index {header['index']}, term {header['term']}, "
              f"{header['size']:,} bytes, sha256 {header['sha256']}")
        return 0
    return _run_client(go)


def _cmd_snapshot_restore(args):
    from raftcache import backup

    show, end = _progress("nodes seeded")
    try:
        header = backup.restore(args.file, args.data_dir, args.nodes, keyring=args.keyring,
                                storage=args.storage, on_progress=show)
    except (backup.BackupError, OSError) as exc:
        return _fail("BackupError", str(exc))
    finally:
        end()
    print(f"restored index {header['index']} (term {header['term']}, taken {header['taken']}) "
          f"into {args.nodes} nodes under {args.data_dir}; start them with: raftcache up "
          f"--data-dir {args.data_dir} --nodes {args.nodes}")
    if not args.keyring:
        print("values encrypted at rest need the old cluster's keyring: copy it to "
              f"{os.path.join(args.data_dir, 'keyring')} (or pass --keyring) before `up`")
    return 0


def _add_certs_commands(sub) -> None:
    certs = sub.add_parser("certs", help="certificates for mutual TLS")
    certs_sub = certs.add_subparsers(required=True, metavar="ACTION")
    ci = certs_sub.add_parser("init", help="create a CA, node and client certificates")
    ci.add_argument("--dir", required=True)
    ci.add_argument("--nodes", type=int, default=3)
    ci.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="a DNS name (a leftmost '*' covers one label) or IP address that "
                         "node certificates also name, beside localhost and 127.0.0.1-16; "
                         "repeatable. Peers check it against the address they dial, e.g. "
                         "'*.raftcache-peers.NAMESPACE.svc.cluster.local' for "
                         "examples/kubernetes")
    ci.add_argument("--force", action="store_true",
                    help="replace an existing CA (every certificate it signed stops working)")
    ci.set_defaults(func=_cmd_certs_init)
    ca = certs_sub.add_parser("add-node", help="a certificate for one more node (one that "
                                               "joins), signed by the CA in DIR")
    ca.add_argument("--dir", required=True)
    ca.add_argument("--node", type=int, required=True)
    ca.add_argument("--host", action="append", default=[], metavar="NAME",
                    help="as for init")
    ca.set_defaults(func=_cmd_certs_add_node)


def _add_keys_commands(sub) -> None:
    keys = sub.add_parser("keys", help="encryption at rest: the keyring and data keys")
    keys_sub = keys.add_subparsers(required=True, metavar="ACTION")
    ki = keys_sub.add_parser("init", help="make a keyring file (mode 0600): a random master "
                                          "key; every node of a cluster needs the same file")
    ki.add_argument("file")
    ki.set_defaults(func=_cmd_keys_init)
    _client_command(keys_sub, "rotate", "admin", _cmd_keys_rotate,
                    help="add a data key through the log (new values are sealed with it), "
                         "then seal every older value anew with it, printing progress")
    _client_command(keys_sub, "status", "admin", _cmd_keys_status,
                    help="print the data keys (active, known) and how many values each seals, "
                         "as JSON")


# -- client commands ----------------------------------------------------------------------------
def _client(args):
    from raftcache.client import Client
    from raftcache.pluginapi import TLSConfig

    tls = None
    if args.ca or args.cert or args.tls_key:
        if not (args.ca and args.cert and args.tls_key):
            sys.exit("raftcache: --ca, --cert and --key go together")
        tls = TLSConfig(args.ca, args.cert, args.tls_key)
    return Client(args.endpoints, token=args.token, tls=tls, timeout=args.timeout,
                  transport=args.transport)


def _run_client(fn):
    from raftcache import errors

    try:
        return fn()
    except errors.Unauthorized as exc:
        return _fail("Unauthorized", str(exc), EXIT_UNAUTHORIZED)
    except errors.RaftCacheError as exc:
        return _fail(type(exc).__name__, str(exc))
    except ValueError as exc:  # refused before sending, e.g. a ttl out of range
        return _fail("InvalidRequest", str(exc))


def _fail(kind: str, reason: str, code: int = EXIT_ERROR) -> int:
    print(f"raftcache: {kind}: {reason}", file=sys.stderr)
    return code


def _write_found(found, with_version: bool) -> None:
    """One line: the value (VERSION VALUE with --with-version); a missing key: empty (0)."""
    value, version = found or (b"", 0)
    prefix = b"%d " % version if with_version else b""
    sys.stdout.buffer.write(prefix + value + b"\n")


def _cmd_set(args):
    def go():
        with _client(args) as c:
            print(c.set(args.key, args.value, ttl=args.ttl))
    return _run_client(go)


def _cmd_get(args):
    def go():
        with _client(args) as c:
            found = c.get_with_version(args.key, consistency=args.consistency)
        if found is None:
            return EXIT_MISSING
        _write_found(found, args.with_version)
        return 0
    return _run_client(go)


def _cmd_mget(args):
    def go():
        with _client(args) as c:
            found = c.mget_with_versions(args.keys, consistency=args.consistency)
        for f in found:
            _write_found(f, args.with_version)
        return EXIT_MISSING if None in found else 0
    return _run_client(go)


def _cmd_mset(args):
    def go():
        with _client(args) as c:
            versions = c.mset(args.items, ttl=args.ttl)
        print(max(versions))  # one log entry writes them all: one version
    return _run_client(go)


def _cmd_cas(args):
    def go():
        with _client(args) as c:
            swapped, version = c.cas_with_version(args.key, args.version, args.value,
                                                  ttl=args.ttl)
        if not swapped:
            return _fail("VersionMismatch", f"{args.key!r} is not at version {args.version}; "
                                            "nothing was written", EXIT_CAS_FAILED)
        print("swapped" if version is None else version)
        return 0
    return _run_client(go)


def _cmd_incr(args):
    def go():
        with _client(args) as c:
            print(c.incr(args.key, args.delta))
    return _run_client(go)


def _cmd_append(args):
    def go():
        with _client(args) as c:
            print(c.append(args.key, args.value))
    return _run_client(go)


def _cmd_invalidate(args):
    if bool(args.prefix) == args.all:  # an empty prefix is every key: only when asked for
        args.usage_error("give a PREFIX, or --all for every key (not both)")

    def go():
        with _client(args) as c:
            print(c.invalidate(args.prefix))
    return _run_client(go)


def _cmd_delete(args):
    def go():
        with _client(args) as c:
            print("deleted" if c.delete(args.key) else "not found")
    return _run_client(go)


def _describe(status) -> str:
    learners = ",".join(map(str, status.learners)) or "-"
    return (f"leader {status.leader}, term {status.term}, voters "
            f"{','.join(map(str, status.voters))}, learners {learners}")


def _cmd_member(args):
    def go():
        with _client(args) as c:
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
                    print(_describe(status), flush=True)
                    status = _wait_caught_up(c, args.node, status, args.wait)
            print(_describe(status))
    return _run_client(go)


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
        with _client(args) as c:
            print(_describe(c.transfer_leader(args.node)))
    return _run_client(go)


def _cmd_admin(args):
    import json

    def go():
        with _client(args) as c:
            print(json.dumps(c.admin(args.action, *args.arguments), sort_keys=True))
    return _run_client(go)


def _cmd_status(args):
    import json

    import attrs

    from raftcache import errors

    answers = {}  # endpoint -> its NodeStatus, or why it did not answer
    with _client(args) as c:
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


def _cmd_certs_init(args):
    from raftcache.certs import init_certs

    try:
        paths = init_certs(args.dir, nodes=args.nodes, overwrite=args.force,
                           extra_ips=args.host)
    except FileExistsError as exc:
        print(f"raftcache: {exc} (pass --force to replace the CA)", file=sys.stderr)
        return 2
    print(f"wrote certificates to {args.dir}:")
    for name in sorted(paths):
        print(f"  {name}: {paths[name]}")
    return 0


def _cmd_certs_add_node(args):
    from raftcache.certs import add_node_cert

    try:
        cert, key = add_node_cert(args.dir, args.node, extra_hosts=args.host)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key}")
    return 0


# -- tokens, roles, revocation (the rbac plugin) ---------------------------------------------------
def _add_auth_commands(sub) -> None:
    token = sub.add_parser("token", help="issue, inspect and revoke signed client tokens")
    token_sub = token.add_subparsers(required=True, metavar="ACTION")
    ti = token_sub.add_parser("issue", help="print a new token signed with the cluster's key")
    key = ti.add_mutually_exclusive_group(required=True)
    key.add_argument("--data-dir", help="the data dir of `raftcache up --auth` (its "
                                        "auth/signing.key)")
    key.add_argument("--signing-key", help="an Ed25519 private key (PEM, mode 0600)")
    ti.add_argument("--subject", required=True, help="who the token is for")
    ti.add_argument("--grant", action="append", default=[], metavar="PREFIX=PERMS",
                    help="PERMS (r, w, rw or admin) on every key starting with PREFIX (may be "
                         "empty: every key); repeatable")
    ti.add_argument("--role", action="append", default=[], metavar="NAME",
                    help="a role whose grants the cluster holds (`raftcache role set`)")
    ti.add_argument("--ttl", type=float, default=None, help="seconds until it expires "
                                                           "(default: never)")
    ti.set_defaults(func=_cmd_token_issue)
    tin = token_sub.add_parser("inspect", help="print a token's header and claims as JSON, "
                                               "and whether its signature verifies")
    tin.add_argument("token", help="the token (- reads it from stdin)")
    pub = tin.add_mutually_exclusive_group()
    pub.add_argument("--data-dir", help="verify with DATA_DIR/auth/signing.pub")
    pub.add_argument("--public-key", help="verify with this Ed25519 public key (PEM)")
    tin.set_defaults(func=_cmd_token_inspect)
    _client_command(token_sub, "revoke", "admin", _cmd_auth_admin, "subject",
                    help="revoke every token of SUBJECT issued until now (through the log; "
                         "needs an admin token)").set_defaults(action="revoke")
    _client_command(token_sub, "unrevoke", "admin", _cmd_auth_admin, "subject",
                    help="lift SUBJECT's revocation (its older tokens work again)"
                    ).set_defaults(action="unrevoke")
    role = sub.add_parser("role", help="named sets of grants that tokens refer to")
    role_sub = role.add_subparsers(required=True, metavar="ACTION")
    rs = _client_command(role_sub, "set", "admin", _cmd_auth_admin, "name",
                         help="create or replace a role (through the log)")
    rs.add_argument("--grant", action="append", required=True, metavar="PREFIX=PERMS")
    rs.set_defaults(action="role-set")
    _client_command(role_sub, "delete", "admin", _cmd_auth_admin, "name",
                    help="delete a role").set_defaults(action="role-delete")
    auth = sub.add_parser("auth", help="the cluster's access control")
    auth_sub = auth.add_subparsers(required=True, metavar="ACTION")
    _client_command(auth_sub, "status", "admin", _cmd_auth_admin,
                    help="print revoked subjects (with when) and roles as JSON"
                    ).set_defaults(action="auth-status")


def _cmd_token_issue(args):
    from raftcache.plugins.security import tokens

    path = args.signing_key or os.path.join(args.data_dir, "auth", "signing.key")
    try:
        grants = dict(tokens.parse_grant(g) for g in args.grant)
        if not grants and not args.role:
            raise ValueError("give at least one --grant PREFIX=PERMS or --role NAME")
        key = tokens.load_private_key(path)
        print(tokens.issue(key, args.subject, grants, roles=args.role, ttl=args.ttl))
    except (tokens.TokenError, ValueError) as exc:
        return _fail("InvalidRequest", str(exc))
    return 0


def _cmd_token_inspect(args):
    """Exit 0: printed (verified, or no key given); 1: the signature does not verify with
    the key given; 2: not a token."""
    import json

    from raftcache.plugins.security import tokens

    text = (sys.stdin.read() if args.token == "-" else args.token).strip()
    try:
        header, claims = tokens.unverified(text)
    except tokens.TokenError as exc:
        return _fail("InvalidRequest", str(exc))
    out = {"header": header, "claims": claims, "verified": False}
    path = args.public_key or (os.path.join(args.data_dir, "auth", "signing.pub")
                               if args.data_dir else None)
    code = 0
    if path is None:
        out["note"] = "signature not checked (give --data-dir or --public-key)"
    else:
        try:
            caller = tokens.verify(text, tokens.load_public_keys([path]))
            out["verified"] = True
            out["key_id"] = caller.key_id
        except tokens.TokenError as exc:
            out["error"] = str(exc)
            code = 1
    print(json.dumps(out, indent=2, sort_keys=True))
    return code


def _cmd_auth_admin(args):
    import json

    positional = [getattr(args, name) for name in ("subject", "name") if hasattr(args, name)]
    positional += list(getattr(args, "grant", None) or ())

    def go():
        with _client(args) as c:
            print(json.dumps(c.admin(args.action, *positional), sort_keys=True))
    return _run_client(go)


def _cmd_keys_init(args):
    from raftcache.plugins.security.encryption import make_keyring

    try:
        keyring = make_keyring(args.file)
    except FileExistsError:
        return _fail("InvalidRequest", f"{args.file} exists; a keyring is never replaced (the "
                     "values it sealed could no longer be read)")
    except OSError as exc:
        return _fail("InvalidRequest", f"{args.file}: {exc.strerror}")
    print(f"wrote keyring {args.file} (master key {keyring.master_id}, mode 0600); give every "
          "node of the cluster this same file: [encryption] keyring = \"...\"")
    return 0


def _cmd_keys_status(args):
    import json

    def go():
        with _client(args) as c:
            print(json.dumps(c.admin("keys-status"), sort_keys=True))
    return _run_client(go)


def _cmd_keys_rotate(args):
    def go():
        with _client(args) as c:
            rotated = c.admin("keys-rotate")
            print(f"data key {rotated['key_id']} is active (was {rotated['previous']}); "
                  "sealing older values anew", flush=True)
            return _reseal_all(c)
    return _run_client(go)


def _reseal_all(client, passes: int = 3) -> int:
    """keys-reseal page after page until a pass finds nothing left under an older key (a
    pass can miss values that deletes moved behind it: up to `passes` passes)."""
    import time

    from raftcache import errors

    progress = _Progress()
    failing_since = None
    try:
        for _ in range(passes):
            position, resealed = 0, 0
            while True:
                try:
                    answer = client.admin("keys-reseal", str(position))
                    failing_since = None
                except errors.Unavailable:  # a leader change, a backend catching up
                    failing_since = failing_since or time.monotonic()
                    if time.monotonic() - failing_since > 30:
                        raise
                    time.sleep(0.2)
                    continue
                resealed += answer.get("result") or 0
                position = answer["next"]
                progress.update(position, answer["keys"], resealed)
                if answer["done"]:
                    break
            status = client.admin("keys-status")
            older = {k: n for k, n in (status.get("values") or {}).items()
                     if k.isdigit() and int(k) != status["active"]}
            if not older:
                progress.close(f"done: no value is sealed under an older data key than "
                               f"{status['active']}")
                return 0
            progress.note(f"{sum(older.values())} values still under older keys "
                          f"({older}): another pass")
    finally:
        progress.close()
    return _fail("Unavailable", "values under older data keys remain after "
                                f"{passes} passes; run `raftcache keys rotate` again later")


class _Progress:
    """A progress bar (rich) on a terminal, plain lines otherwise."""

    def __init__(self):
        self.bar = None
        self.task = None
        self.last = 0.0
        if sys.stdout.isatty():
            try:
                from rich.progress import Progress

                self.bar = Progress(transient=False)
                self.bar.start()
                self.task = self.bar.add_task("resealing", total=None)
            except ImportError:
                self.bar = None

    def update(self, position: int, total: int, resealed: int) -> None:
        import time

        if self.bar is not None:
            self.bar.update(self.task, completed=position, total=total,
                            description=f"resealed {resealed}")
            return
        now = time.monotonic()
        if now - self.last >= 1.0 or position >= total:
            self.last = now
            print(f"resealed {resealed} values; at key {position} of {total}", flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self, text: str | None = None) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if text:
            print(text, flush=True)


# -- bench --------------------------------------------------------------------------------------
def _add_bench_command(sub) -> None:
    from raftcache.bench.run import add_arguments

    text = ("drive a local 3-node cluster (or --endpoints) from client processes and report "
            "throughput and p50/p99/p99.9 per operation; --compare: the same load beside "
            "Redis (appendfsync always), Memcached and PySyncObj, with ratios")
    b = sub.add_parser("bench", help=text, description=text)
    add_arguments(b)
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args):
    from raftcache.bench.run import main as bench

    return bench(args)


# -- servers ------------------------------------------------------------------------------------
def _cmd_serve(args):
    node = {k: v for k, v in (("id", args.id), ("address", args.address),
                              ("data_dir", args.data_dir),
                              ("metrics_address", args.metrics_address)) if v is not None}
    return serve(args.config, node=node)


def serve(config_path: str, plugins=(), core=None, prepare=None, node: dict | None = None) -> int:
    """Run the node `config_path` describes until SIGTERM/SIGINT; the exit code.

    `node` overrides keys of the config's [node] table (serve's --id, --address, --data-dir).
    `plugins` are registered beside the entry-point plugins, `core` replaces the Raft core
    class and `prepare(node)` runs before the node starts: what `raftcache.testing.node` hands
    in to run test-only plugins and deliberately broken nodes. `raftcache serve` passes none.
    """
    import logging
    import signal

    import gevent

    from raftcache.core.raft import RawNode
    from raftcache.node import Node
    from raftcache.node import config as config_mod
    from raftcache.pluginapi.manager import make_manager

    try:
        config = config_mod.load(config_path, node)
    except config_mod.ConfigError as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
        return 2
    if config.encryption.enabled is None and not config.encryption.keyring:
        # Encryption at rest is on by default: a node never stores plaintext by omission.
        print(f"raftcache: {config.path}: encryption.keyring: missing: values are encrypted "
              "at rest by default; name a keyring file (`raftcache keys init FILE` makes one) "
              "or set enabled = false in [encryption]", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [node %(node)s] %(name)s: %(message)s",
        defaults={"node": config.node.id},
    ))
    logging.basicConfig(level=config.log.level.upper(), handlers=[handler])
    try:
        node = Node(config, pm=make_manager(block=config.plugins.block, extra=plugins),
                    core=core or RawNode)
        if prepare is not None:
            prepare(node)
        node.start()
    except config_mod.ConfigError as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # storage refusing to start (corruption, weak durability, ...)
        print(f"raftcache: cannot start node {config.node.id}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    gevent.signal_handler(signal.SIGTERM, node.stop)
    gevent.signal_handler(signal.SIGINT, node.stop)
    node.wait()
    return 0


def _cmd_up(args):
    from raftcache.cluster import run_local_cluster

    return run_local_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
