"""`raftcache bench`: the load generator of `raftcache.bench.run`, as a command.

Contract: its arguments and behaviour are `raftcache.bench.run`'s; importing this module
imports nothing of the bench (that waits for the parser to be built, after `main` patched
the standard library).
"""

from __future__ import annotations


def add_bench_command(sub) -> None:
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
