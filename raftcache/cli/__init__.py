"""The `raftcache` command: up and serve run nodes; a command for every client operation (set,
get, mget, mset, delete, cas, incr, append, invalidate, status, member, transfer-leader); certs
init; keys init, rotate and status (encryption at rest); bench (load, latency and throughput,
with --compare beside Redis, Memcached and PySyncObj).

Exit codes of the client commands: 0 done; 1 not done: a key is missing (get, mget) or cas
found another version; 2 an error, printed as one line `raftcache: <Kind>: <reason>` (or a
usage error); 3 refused: Unauthorized (printed the same way). Any command whose reader
closed the pipe early (`| head -1`) exits 141, quietly, like the shell's tools.

The commands live in the modules of this package: `server_commands` (up, serve),
`client_commands` and `member` (the client operations), `snapshot`, `security` (certs,
token, role, auth, keys), `bench`; `cluster_calls` holds what every client command shares and
`progress` the progress display. None of them imports gevent, sockets or the client at import
time: `main` patches the standard library before anything else imports it.
"""

from __future__ import annotations

import argparse
import os
import sys

from raftcache.cli.bench import add_bench_command
from raftcache.cli.client_commands import add_client_commands
from raftcache.cli.cluster_calls import (
    EXIT_BROKEN_PIPE,
    EXIT_CAS_FAILED,
    EXIT_ERROR,
    EXIT_MISSING,
    EXIT_UNAUTHORIZED,
)
from raftcache.cli.security import add_auth_commands, add_certs_commands, add_keys_commands
from raftcache.cli.server_commands import add_server_commands, serve
from raftcache.cli.snapshot import add_snapshot_commands

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_CAS_FAILED", "EXIT_ERROR", "EXIT_MISSING", "EXIT_UNAUTHORIZED",
           "build_parser", "main", "serve"]


def main(argv=None) -> int:
    # gevent must patch the standard library before anything else imports it: thriftpy2's
    # TLS module binds ssl names at import time and would keep the blocking ones.
    from gevent import monkey

    monkey.patch_all()
    try:
        try:
            args = build_parser().parse_args(argv)  # --help prints here
            try:
                return args.func(args) or 0
            except KeyboardInterrupt:
                return 130
        finally:
            # Output still buffered would otherwise meet a closed pipe at interpreter exit,
            # where Python can only print "Exception ignored ... BrokenPipeError".
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`raftcache status --json | head -1`): stop quietly, as cat
        # and git do. Point stdout at /dev/null so the final flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftcache", description="A strongly consistent cache.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    add_server_commands(sub)
    add_client_commands(sub)
    add_certs_commands(sub)
    add_auth_commands(sub)
    add_keys_commands(sub)
    add_snapshot_commands(sub)
    add_bench_command(sub)
    return p

