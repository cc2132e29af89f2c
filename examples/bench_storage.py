"""Durable appends/s of a storage plugin: group commit vs one fsync per entry.

    python examples/bench_storage.py [--runs 5] [--seconds 1.5] [--producers 64] [--dir DIR]
                                     [--storage file-wal ...]

Group commit, as the node does it: `--producers` greenlets each propose an entry and wait until
it is durable (like clients of a leader); one writer greenlet hands whatever queued meanwhile to
one `save(..., sync=True)` in the gevent threadpool. The baseline calls `save(sync=True)` once
per entry. Each figure is the median of `--runs` runs of `--seconds` s on a fresh data dir; the
ratio is the median of the runs' ratios. Issue 4 wants group commit at >= 10x the
one-fsync-per-entry rate. Other processes' CPU and disk use make the figures noisy; the group
commit figure suffers most (it is bound by Python, the baseline by fsync).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import attrs
import gevent
import gevent.event
from gevent import get_hub

from raftcache.core.raft.messages import Entry, HardState

VALUE = b"v" * 100  # about a small cache write


@attrs.frozen
class Row:
    storage: str
    mode: str
    rates: list  # entries/s of each run
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def per_entry_rate(storage, seconds: float) -> float:
    """One save(sync=True), so one fsync, per entry; called directly (its best case)."""
    storage.load()
    index = 0
    t0 = time.perf_counter()
    stop = t0 + seconds
    while time.perf_counter() < stop:
        index += 1
        storage.save(HardState(1, 1, index - 1), [Entry(1, index, data=VALUE)], None, True)
    return index / (time.perf_counter() - t0)


def group_commit_rate(storage, seconds: float, producers: int) -> tuple[float, float]:
    """(entries/s, mean entries per save) with `producers` greenlets feeding one writer."""
    storage.load()
    # Every proposal waits for the fsync of the batch it joined (one event per batch).
    batch = {"count": 0, "durable": gevent.event.Event()}
    wake = gevent.event.Event()
    state = {"index": 0, "saves": 0}
    stop = time.perf_counter() + seconds

    def producer():
        while time.perf_counter() < stop:
            batch["count"] += 1
            wake.set()
            batch["durable"].wait()

    def writer():
        pool = get_hub().threadpool
        while True:
            wake.wait()
            wake.clear()
            count, durable = batch["count"], batch["durable"]
            if not count:
                continue
            batch.update(count=0, durable=gevent.event.Event())
            first = state["index"] + 1
            entries = [Entry(1, i, data=VALUE) for i in range(first, first + count)]
            pool.apply(storage.save, (HardState(1, 1, first - 1), entries, None, True))
            state["index"] += count
            state["saves"] += 1
            durable.set()

    t0 = time.perf_counter()
    w = gevent.spawn(writer)
    gevent.joinall([gevent.spawn(producer) for _ in range(producers)])
    elapsed = time.perf_counter() - t0
    w.kill()
    return state["index"] / elapsed, state["index"] / max(1, state["saves"])


def bench_pair(name: str, make: Callable[[str], object], args) -> list[Row]:
    """Both modes for one storage; `make(data_dir)` returns a fresh storage."""
    single, group, batches = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="raftcache-bench-", dir=args.dir) as d:
            storage = make(d + "/single")
            single.append(per_entry_rate(storage, args.seconds))
            storage.close()
            storage = make(d + "/group")
            rate, batch = group_commit_rate(storage, args.seconds, args.producers)
            storage.close()
            group.append(rate)
            batches.append(batch)
    return [
        Row(name, "one fsync per entry", single),
        Row(name, f"group commit, {args.producers} producers", group,
            f"~{statistics.median(batches):.0f} entries per fsync"),
    ]


def bench_file_wal(args) -> list[Row]:
    from raftcache.plugins.storage.file_wal import FileWALStorage

    return bench_pair("file-wal", lambda d: FileWALStorage(1, d, {}), args)


def bench_redis_aof(args) -> list[Row]:
    """A redis-server of its own (appendonly yes, appendfsync always) per run."""
    from raftcache.plugins.storage.redis_aof import RedisAofStorage
    from raftcache.servers import RedisServer

    servers = []

    def make(d):
        server = RedisServer(d + "-redis")
        server.start()
        servers.append(server)
        return RedisAofStorage(1, d, {"url": server.url})

    try:
        return bench_pair("redis-aof", make, args)
    finally:
        for server in servers:
            server.stop()


BENCHES = {"file-wal": bench_file_wal, "redis-aof": bench_redis_aof}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--producers", type=int, default=64)
    p.add_argument("--dir", default=None, help="where the data dirs go (default: $TMPDIR)")
    p.add_argument("--storage", action="append", choices=sorted(BENCHES),
                   help="benchmark only these (repeatable; default: all)")
    args = p.parse_args()
    print(f"durable appends of {len(VALUE)}-byte entries, median of {args.runs} runs of "
          f"{args.seconds:g} s\n")
    print(f"{'storage':10} {'mode':32} {'entries/s':>10}  {'runs':44} note")
    for name in args.storage or sorted(BENCHES):
        rows = BENCHES[name](args)
        for r in rows:
            runs = " ".join(f"{x:,.0f}" for x in r.rates)
            print(f"{r.storage:10} {r.mode:32} {r.median:10,.0f}  {runs:44} {r.note}")
        # Each run measures both modes back to back: the ratio of a pair is less noisy.
        ratios = [g / s for s, g in zip(rows[0].rates, rows[1].rates, strict=True)]
        ratio = statistics.median(ratios)
        runs = " ".join(f"{x:.1f}x" for x in ratios)
        verdict = "ok" if ratio >= 10 else "BELOW the 10x issue 4 wants"
        print(f"{name:10} {'group commit / one per entry':32} {ratio:9.1f}x  {runs:44} "
              f"{verdict}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
