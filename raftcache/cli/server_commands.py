"""Running nodes: `up` (a local cluster in the foreground) and `serve` (one node from its
config), and `serve()`, which `raftcache.testing.node` calls with test-only plugins.

Contract: `serve` runs the node until SIGTERM or SIGINT and returns the exit code: 0 after a
clean stop, 2 (one line on stderr) when the config is wrong or the node cannot start.
"""

from __future__ import annotations

import sys


def add_server_commands(sub) -> None:
    up = sub.add_parser("up", help="run a local cluster in the foreground")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=7400)
    up.add_argument("--data-dir", default="./raftcache-data")
    up.add_argument("--storage", default="file-wal",
                    help="file-wal (default), redis-aof, or memory (not durable)")
    up.add_argument("--transport", default=None,
                    help="thrift (default) or tcp-tls (mutual TLS, certificates made in "
                         "DATA_DIR/certs); with --auth, tcp-tls unless said otherwise: tokens "
                         "must not cross a readable wire")
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
                         "(0600, expires after 7 days, renewed at a start) beside the signing "
                         "key, and runs tcp-tls unless --transport says otherwise "
                         "(docs/security.md)")
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
    from raftcache.node.host import collect_less
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
    collect_less()
    gevent.signal_handler(signal.SIGTERM, node.stop)
    gevent.signal_handler(signal.SIGINT, node.stop)
    node.wait()
    return 0


def _cmd_up(args):
    from raftcache.cluster import run_local_cluster

    return run_local_cluster(args)
