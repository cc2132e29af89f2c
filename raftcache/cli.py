"""The `raftcache` command: up, serve, set, get, delete, status, member, transfer-leader,
certs init."""

from __future__ import annotations

import argparse
import sys

from raftcache.core.operations import OPERATIONS


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
    up.add_argument("--backend", default="memory")
    up.add_argument("--config", help="a TOML file whose settings every node shares")
    up.add_argument("--insecure", action="store_true",
                    help="let peers talk without proving they are nodes of this cluster (no "
                         "cluster secret on plaintext transports); logs a warning")
    up.set_defaults(func=_cmd_up)

    serve = sub.add_parser("serve", help="run one node in the foreground")
    serve.add_argument("--config", required=True)
    serve.set_defaults(func=_cmd_serve)


def _client_command(sub, name: str, help: str, func, *positional: str):
    """A subcommand that talks to a cluster: its positional arguments and the client options."""
    sp = sub.add_parser(name, help=help)
    for arg in positional:
        sp.add_argument(arg)
    sp.add_argument("--endpoints", default=None,
                    help="host:port,... (default: $RAFTCACHE_ENDPOINTS or 127.0.0.1:7400-7402)")
    sp.add_argument("--token", default=None)
    sp.add_argument("--transport", default="thrift")
    sp.add_argument("--ca", help="CA certificate (PEM) for TLS")
    sp.add_argument("--cert", help="client certificate (PEM) for TLS")
    sp.add_argument("--key", dest="tls_key", help="client key (PEM) for TLS")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=func)
    return sp


def _add_client_commands(sub) -> None:
    s = _client_command(sub, "set", OPERATIONS["put"].doc, _cmd_set, "key", "value")
    s.add_argument("--ttl", type=float, default=None, help="seconds")
    g = _client_command(sub, "get", OPERATIONS["get"].doc + " (exit 1 when missing)",
                        _cmd_get, "key")
    g.add_argument("--consistency", default="linearizable",
                   choices=["linearizable", "lease", "stale"])
    _client_command(sub, "delete", OPERATIONS["remove"].doc, _cmd_delete, "key")
    _client_command(sub, "append", OPERATIONS["append"].doc, _cmd_append, "key", "value")
    _client_command(sub, "status", "a table of the nodes: " + OPERATIONS["status"].doc,
                    _cmd_status)
    m = _client_command(sub, "member", "change membership (nodes listed in cluster.peers)",
                        _cmd_member)
    m.add_argument("action", choices=["add", "remove", "promote"],
                   help="add a voter (--learner: a learner), remove a node, promote a learner")
    m.add_argument("node", type=int)
    m.add_argument("--learner", action="store_true")
    t = _client_command(sub, "transfer-leader", OPERATIONS["transfer_leader"].doc,
                        _cmd_transfer_leader)
    t.add_argument("node", type=int)


def _add_certs_commands(sub) -> None:
    certs = sub.add_parser("certs", help="certificates for mutual TLS")
    certs_sub = certs.add_subparsers(required=True, metavar="ACTION")
    ci = certs_sub.add_parser("init", help="create a CA, node and client certificates")
    ci.add_argument("--dir", required=True)
    ci.add_argument("--nodes", type=int, default=3)
    ci.add_argument("--force", action="store_true",
                    help="replace an existing CA (every certificate it signed stops working)")
    ci.set_defaults(func=_cmd_certs_init)


# -- client commands ----------------------------------------------------------------------------
def _client(args):
    from raftcache.client import Client
    from raftcache.core.hookspecs import TLSConfig

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
    except errors.RaftCacheError as exc:
        print(f"raftcache: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _cmd_set(args):
    def go():
        with _client(args) as c:
            print(c.set(args.key, args.value, ttl=args.ttl))
    return _run_client(go)


def _cmd_get(args):
    def go():
        with _client(args) as c:
            value = c.get(args.key, consistency=args.consistency)
        if value is None:
            return 1
        sys.stdout.buffer.write(value + b"\n")
        return 0
    return _run_client(go)


def _cmd_append(args):
    def go():
        with _client(args) as c:
            print(c.append(args.key, args.value))
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
            else:
                status = c.add_member(args.node, learner=args.learner and args.action == "add")
            print(_describe(status))
    return _run_client(go)


def _cmd_transfer_leader(args):
    def go():
        with _client(args) as c:
            print(_describe(c.transfer_leader(args.node)))
    return _run_client(go)


def _cmd_status(args):
    from raftcache import errors

    with _client(args) as c:
        rows = []
        for endpoint in c.endpoints:
            try:
                s = c.status(endpoint)
                rows.append((str(s.id), endpoint, s.role, str(s.term), str(s.commit),
                             str(s.applied), str(s.leader or "-")))
            except (errors.RaftCacheError, OSError, TimeoutError) as exc:
                rows.append(("?", endpoint, f"unreachable ({type(exc).__name__})", "", "", "",
                             ""))
    header = ("NODE", "ADDRESS", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0 if any(r[0] != "?" for r in rows) else 2


def _cmd_certs_init(args):
    from raftcache.certs import init_certs

    try:
        paths = init_certs(args.dir, nodes=args.nodes, overwrite=args.force)
    except FileExistsError as exc:
        print(f"raftcache: {exc} (pass --force to replace the CA)", file=sys.stderr)
        return 2
    print(f"wrote certificates to {args.dir}:")
    for name in sorted(paths):
        print(f"  {name}: {paths[name]}")
    return 0


# -- servers ------------------------------------------------------------------------------------
def _cmd_serve(args):
    return serve(args.config)


def serve(config_path: str, plugins=(), core=None, prepare=None) -> int:
    """Run the node `config_path` describes until SIGTERM/SIGINT; the exit code.

    `plugins` are registered beside the entry-point plugins, `core` replaces the Raft core
    class and `prepare(node)` runs before the node starts: what `raftcache.testing.node` hands
    in to run test-only plugins and deliberately broken nodes. `raftcache serve` passes none.
    """
    import logging
    import signal

    import gevent

    from raftcache.core import config as config_mod
    from raftcache.core.node import Node
    from raftcache.core.plugins import make_manager
    from raftcache.core.raft import RawNode

    try:
        config = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
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
    except config_mod.ConfigError as exc:
        print(f"raftcache: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # storage refusing to start (corruption, weak durability, ...)
        print(f"raftcache: cannot start node {config.node.id}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    node.start()
    gevent.signal_handler(signal.SIGTERM, node.stop)
    gevent.signal_handler(signal.SIGINT, node.stop)
    node.wait()
    return 0


def _cmd_up(args):
    from raftcache.cluster import run_local_cluster

    return run_local_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
