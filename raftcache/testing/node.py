"""Run one node as `raftcache serve` does, with what only tests may load.

    python -m raftcache.testing.node --config node.toml [--plugin MODULE ...] [--mutant NAME]
                                     [--clock-offset-ms N]

`--clock-offset-ms` skews the node's wall clock (the stamps its writes carry and the time it
judges expiry by). `--plugin` registers a plugin module that ships with the tests rather than as an entry point
(the fault suite's `slow-disk` storage); `--mutant` runs a deliberately broken core or node from
`raftcache.testing.mutants`, so that the fault suite can prove it catches the bug. Neither can
come from a node's config: a production node never loads test code.
"""

from __future__ import annotations

if __name__ == "__main__":  # before anything imports socket, ssl or threading (see cli.main)
    from gevent import monkey

    monkey.patch_all()

import argparse
import importlib
import sys
import time


def main(argv=None) -> int:
    from raftcache import cli
    from raftcache.testing.mutants import MUTANTS, NODE_MUTANTS

    p = argparse.ArgumentParser(prog="python -m raftcache.testing.node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--plugin", action="append", default=[], help="a plugin module to register")
    p.add_argument("--mutant", choices=sorted(set(MUTANTS) | set(NODE_MUTANTS)))
    p.add_argument("--clock-offset-ms", type=int, default=0,
                   help="run the node's wall clock this far ahead (negative: behind)")
    args = p.parse_args(argv)
    plugins = [importlib.import_module(name) for name in args.plugin]

    def prepare(node) -> None:
        if args.clock_offset_ms:
            node.clock = lambda: time.time() + args.clock_offset_ms / 1000
        if args.mutant in NODE_MUTANTS:
            NODE_MUTANTS[args.mutant](node)
        if args.mutant:
            node.log.warning("TEST-ONLY: running the deliberately broken %r; this node is NOT "
                             "safe", args.mutant)

    return cli.serve(args.config, plugins=plugins, core=MUTANTS.get(args.mutant),
                     prepare=prepare)


if __name__ == "__main__":
    sys.exit(main())
