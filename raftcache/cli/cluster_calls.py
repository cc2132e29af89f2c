"""What every command that calls a cluster shares: its options (endpoints, token, transport,
TLS files, timeout), connecting, the exit codes, and turning a failed call into one line.

Contract: a client command's function returns `run_client(go)`; `go()` opens the client
with `connect(args)`. A refusal (Unauthorized) exits EXIT_UNAUTHORIZED, any other
RaftCacheError or a value refused before sending exits EXIT_ERROR, each printed as one line
`raftcache: <Kind>: <reason>` on stderr. Nothing here imports the client, gevent or sockets
at import time: `main` patches the standard library first.
"""

from __future__ import annotations

import os
import sys

from raftcache.core.operations import BY_CLIENT_NAME

EXIT_MISSING = 1  # get, mget: a key is missing
EXIT_CAS_FAILED = 1  # cas: the key is not at the expected version; nothing was written
EXIT_ERROR = 2  # the call failed (or a usage error: argparse exits 2 too)
EXIT_UNAUTHORIZED = 3  # the cluster refused the caller's token (or its lack of one)
# stdout's reader closed the pipe (`| head -1`): 128 + SIGPIPE, the status the shell reports
# for cat, git and the rest of the tools that SIGPIPE ends; 1 would read as "key missing".
EXIT_BROKEN_PIPE = 141


def client_command(sub, name: str, op: str, func, *positional: str, help: str = ""):
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
    sp.add_argument("--transport", default=os.environ.get("RAFTCACHE_TRANSPORT", "thrift"),
                    help="thrift or tcp-tls (default: $RAFTCACHE_TRANSPORT or thrift)")
    sp.add_argument("--ca", default=os.environ.get("RAFTCACHE_CA"),
                    help="CA certificate (PEM) for TLS (default: $RAFTCACHE_CA)")
    sp.add_argument("--cert", default=os.environ.get("RAFTCACHE_CERT"),
                    help="client certificate (PEM) for TLS (default: $RAFTCACHE_CERT)")
    sp.add_argument("--key", dest="tls_key", default=os.environ.get("RAFTCACHE_KEY"),
                    help="client key (PEM) for TLS (default: $RAFTCACHE_KEY)")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=func, operation=operation.name, usage_error=sp.error)
    return sp


def connect(args):
    from raftcache.client import Client
    from raftcache.pluginapi import TLSConfig

    tls = None
    if args.ca or args.cert or args.tls_key:
        if not (args.ca and args.cert and args.tls_key):
            sys.exit("raftcache: --ca, --cert and --key go together")
        tls = TLSConfig(args.ca, args.cert, args.tls_key)
    return Client(args.endpoints, token=args.token, tls=tls, timeout=args.timeout,
                  transport=args.transport)


def run_client(fn):
    from raftcache import errors

    try:
        return fn()
    except errors.Unauthorized as exc:
        return fail("Unauthorized", str(exc), EXIT_UNAUTHORIZED)
    except errors.RaftCacheError as exc:
        return fail(type(exc).__name__, str(exc))
    except ValueError as exc:  # refused before sending, e.g. a ttl out of range
        return fail("InvalidRequest", str(exc))


def fail(kind: str, reason: str, code: int = EXIT_ERROR) -> int:
    print(f"raftcache: {kind}: {reason}", file=sys.stderr)
    return code
