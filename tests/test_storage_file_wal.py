"""The `file-wal` storage: round trips across restarts, truncation, atomic files, compaction,
torn tails, corruption, and a kill -9 crash test with a real child process."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from raftcache.core.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
)
from raftcache.pluginapi.manager import PluginSet, make_manager
from raftcache.plugins.storage import file_wal
from raftcache.plugins.storage.file_wal import FileWALStorage, WALCorruption

CONF = ConfState(voters=frozenset({1, 2, 3}), learners=frozenset({4}))


def entries(first, last, term=1, tag=b""):
    return [Entry(term, i, data=b"%d:%d%s" % (i, term, tag)) for i in range(first, last + 1)]


def snap(index, term=1, data=b"image"):
    return Snapshot(SnapshotMeta(index=index, term=term, conf_state=CONF), data)


def reopen(path, **options):
    store = FileWALStorage(1, str(path), options)
    return store, store.load()


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def segments(path):
    wal = os.path.join(path, "wal")
    return sorted(os.path.join(wal, n) for n in os.listdir(wal) if n.endswith(".seg"))


@pytest.fixture
def d(tmp_path):
    return tmp_path / "node1"


def test_registered_by_entry_point():
    provider = PluginSet(make_manager()).get("storage", "file-wal")
    assert provider.factory is FileWALStorage


def test_unknown_option_lists_accepted_ones(d):
    with pytest.raises(ValueError, match=r"storage.options.segment_size: unknown key "
                                         r"\(accepted: fsync, repair, segment_bytes, sync_thread\)"):
        FileWALStorage(1, str(d), {"segment_size": 10})
    with pytest.raises(ValueError, match="storage.options.segment_bytes: expected an integer"):
        FileWALStorage(1, str(d), {"segment_bytes": "big"})
    with pytest.raises(ValueError, match="storage.options.segment_bytes: must be at least 1024"):
        FileWALStorage(1, str(d), {"segment_bytes": 10})
    with pytest.raises(ValueError, match="storage.options.repair: expected true or false"):
        FileWALStorage(1, str(d), {"repair": "maybe"})


def test_new_node_is_empty_and_dir_is_created(d):
    store, loaded = reopen(d)
    assert loaded == (HardState(), None, [])
    assert os.path.isdir(d / "wal")


def test_round_trip_across_restart(d):
    store, _ = reopen(d)
    log = entries(1, 50) + [Entry(1, 51, EntryType.CONF_CHANGE, b"[[0, 4]]"), Entry(2, 52)]
    store.save(HardState(2, 3, 40), log[:30], None, True)
    store.save(None, log[30:], None, True)
    store.save(HardState(2, 3, 52), [], None, True)
    store.close()
    store, (hs, snapshot, got) = reopen(d)
    assert hs == HardState(2, 3, 52)
    assert snapshot is None
    assert got == log
    # Appending after a restart continues the same log.
    store.save(HardState(2, 3, 53), [Entry(2, 53, data=b"more")], None, True)
    store.close()
    _, (hs, _, got) = reopen(d)
    assert got == log + [Entry(2, 53, data=b"more")] and hs.commit == 53


def test_one_write_and_one_fsync_per_save(d, monkeypatch):
    store, _ = reopen(d)
    store.save(HardState(1, 1, 0), entries(1, 1), None, True)  # the first creates files
    calls = {"write": 0, "fsync": 0}
    real_write, real_fsync = os.write, os.fsync

    def write(fd, data):
        calls["write"] += 1
        return real_write(fd, data)

    def fsync(fd):
        calls["fsync"] += 1
        return real_fsync(fd)

    monkeypatch.setattr(file_wal.os, "write", write)
    monkeypatch.setattr(file_wal.os, "fsync", fsync)
    store.save(HardState(1, 1, 1), entries(2, 500), None, True)
    assert calls == {"write": 1, "fsync": 1}
    store.save(HardState(1, 1, 2), entries(501, 600), None, False)
    assert calls == {"write": 2, "fsync": 1}  # sync=False: no fsync


def test_truncating_a_conflicting_suffix_survives_restart(d):
    store, _ = reopen(d, segment_bytes=2048)
    for first in range(1, 200, 10):  # one write never spans segments: write in batches
        store.save(HardState(1, 1, 10), entries(first, first + 9), None, True)
    store.save(None, entries(150, 220, term=2), None, True)
    assert len(segments(d)) > 3
    # The conflict reaches back across several segments.
    store.save(HardState(3, 2, 10), entries(15, 30, term=3), None, True)
    store.close()
    store, (hs, _, got) = reopen(d, segment_bytes=2048)
    assert got == entries(1, 14) + entries(15, 30, term=3)
    assert hs == HardState(3, 2, 10)
    # A conflict in the last segment only, then a restart.
    store.save(None, entries(28, 29, term=4), None, True)
    store.close()
    _, (_, _, got) = reopen(d, segment_bytes=2048)
    assert got == entries(1, 14) + entries(15, 27, term=3) + entries(28, 29, term=4)


def test_truncation_then_crash_before_new_entries_keeps_term_and_vote(d):
    store, _ = reopen(d)
    store.save(HardState(1, 1, 5), entries(1, 10), None, True)
    store.save(HardState(2, 3, 5), [], None, True)
    store.save(HardState(2, 3, 6), [], None, True)  # the commit is only in the WAL
    store.save(None, entries(8, 9, term=2), None, True)  # cuts the hard state records away too
    store.close()
    _, (hs, _, got) = reopen(d)
    assert hs == HardState(2, 3, 6)
    assert got == entries(1, 7) + entries(8, 9, term=2)


def test_gap_is_refused(d):
    store, _ = reopen(d)
    store.save(None, entries(1, 5), None, True)
    with pytest.raises(ValueError, match="gap"):
        store.save(None, entries(7, 8), None, True)
    store.save(None, entries(6, 6), None, True)  # still usable: nothing was written


def test_hard_state_and_snapshot_files_are_atomic(d):
    store, _ = reopen(d)
    store.save(HardState(4, 2, 9), entries(1, 20), None, True)
    store.compact(snap(9, data=b"image-9"))
    store.close()
    # A crash mid-replacement leaves temp files with half-written content: they are ignored.
    (d / "hardstate.tmp").write_bytes(b"RCHS\x00garbage")
    (d / "snapshot.tmp").write_bytes(b"RCSNAP01 partial")
    store, (hs, snapshot, got) = reopen(d)
    assert hs == HardState(4, 2, 9)
    assert snapshot == snap(9, data=b"image-9")
    assert got == entries(10, 20)
    assert not (d / "hardstate.tmp").exists() and not (d / "snapshot.tmp").exists()


def test_files_are_replaced_through_fresh_temporary_names(d, tmp_path):
    """Nothing planted at a predictable temporary name (a symlink to another file) is
    written through when the hard state or the snapshot is replaced."""
    store, _ = reopen(d)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    for name in ("hardstate.tmp", "snapshot.tmp", ".hardstate.tmp", ".snapshot.tmp"):
        os.symlink(victim, d / name)
    store.save(HardState(4, 2, 9), entries(1, 20), None, True)
    store.compact(snap(9, data=b"image-9"))
    store.close()
    assert victim.read_bytes() == b"untouched"
    assert (os.stat(d / "hardstate").st_mode & 0o777) == 0o600
    assert (os.stat(d / "snapshot").st_mode & 0o777) == 0o600
    store, (hs, snapshot, _) = reopen(d)
    assert hs == HardState(4, 2, 9) and snapshot == snap(9, data=b"image-9")
    store.close()


def test_damaged_snapshot_or_hard_state_file_stops_start_up(d):
    store, _ = reopen(d)
    store.save(HardState(4, 2, 9), entries(1, 20), None, True)
    store.compact(snap(9))
    store.close()
    blob = bytearray((d / "snapshot").read_bytes())
    blob[-1] ^= 0xFF
    (d / "snapshot").write_bytes(bytes(blob))
    with pytest.raises(WALCorruption, match="snapshot"):
        reopen(d)


def test_snapshot_from_leader_replaces_the_log(d):
    store, _ = reopen(d)
    store.save(HardState(1, 1, 5), entries(1, 30), None, True)
    # A received snapshot, with the entries that follow it in the same save.
    store.save(HardState(3, 0, 100), entries(101, 105, term=3), snap(100, term=3), True)
    store.close()
    store, (hs, snapshot, got) = reopen(d)
    assert snapshot.meta.index == 100 and got == entries(101, 105, term=3)
    assert hs == HardState(3, 0, 100)
    assert store.segment_paths() == segments(d) and len(segments(d)) == 1


def test_crash_during_snapshot_install_drops_a_log_that_does_not_continue_it(d):
    store, _ = reopen(d)
    store.save(HardState(2, 1, 5), entries(1, 30, term=2), None, True)
    store.close()
    # As if the snapshot file was replaced and the crash came before the old log was dropped.
    other = FileWALStorage(1, str(d))
    other._write_atomic("snapshot", file_wal._encode_snapshot(snap(20, term=3)))
    store, (_, snapshot, got) = reopen(d)
    assert snapshot.meta.index == 20 and got == []
    store.save(None, entries(21, 22, term=3), None, True)
    store.close()
    _, (_, _, got) = reopen(d)
    assert got == entries(21, 22, term=3)


def test_segments_roll_and_reload(d):
    store, _ = reopen(d, segment_bytes=4096)
    for first in range(1, 2001, 10):
        store.save(HardState(1, 1, first), entries(first, first + 9), None, first % 100 == 1)
    paths = segments(d)
    assert len(paths) > 10
    # Rolled at the first durable save past the limit (every 10th save here).
    assert all(os.path.getsize(p) < 4096 + 10 * 500 for p in paths)
    assert os.path.basename(paths[0]) == "00000000000000000001.seg"
    store.close()
    _, (hs, _, got) = reopen(d, segment_bytes=4096)
    assert got == entries(1, 2000) and hs.commit == 1991


@pytest.mark.parametrize("segment_bytes", [64 * 1024, file_wal.DEFAULT_SEGMENT_BYTES])
def test_compaction_bounds_disk_usage(d, segment_bytes):
    store, _ = reopen(d, segment_bytes=segment_bytes)
    peak = 0
    n = 50_000
    for first in range(1, n + 1, 50):
        store.save(HardState(1, 1, first + 49), entries(first, first + 49), None, True)
        if (first + 49) % 2000 == 0:
            # Like the node: a snapshot at the applied index, keeping recent entries too.
            store.compact(snap(first + 49 - 500, data=b"s" * 1000))
        peak = max(peak, dir_size(d))
    written = n * 40
    # About two snapshot intervals of log (2 x 2,000 entries of ~42 bytes), whatever the
    # segment size: far less than the 2 MB written.
    assert peak < 200_000 <= written / 10, (peak, written)
    assert len(segments(d)) <= 3
    store.close()
    _, (_, snapshot, got) = reopen(d, segment_bytes=segment_bytes)
    assert snapshot.meta.index == n - 500
    assert got == entries(n - 499, n)


def test_compaction_of_everything_rolls_the_segment(d):
    store, _ = reopen(d)
    store.save(HardState(1, 1, 100), entries(1, 100), None, True)
    store.compact(snap(100))
    paths = segments(d)
    assert len(paths) == 1 and os.path.getsize(paths[0]) < 100  # only the hard state
    store.save(None, entries(101, 102), None, True)
    store.close()
    _, (hs, snapshot, got) = reopen(d)
    assert hs == HardState(1, 1, 100) and snapshot.meta.index == 100
    assert got == entries(101, 102)


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_match_the_memory_storage(tmp_path, seed):
    """Appends, conflicting suffixes, compactions, installed snapshots and restarts, checked
    against the reference in-memory storage after every restart."""
    from raftcache.plugins.storage.memory import MemoryStorage

    rng = random.Random(seed)
    options = {"segment_bytes": rng.choice([1024, 4096, 1 << 20]), "fsync": False}
    store, _ = reopen(tmp_path / "n", **options)
    model = MemoryStorage()
    term, last, base, commit = 1, 0, 0, 0
    for step in range(300):
        r = rng.random()
        if r < 0.1 and last > base:
            index = rng.randint(base + 1, last)
            meta_term = next(e.term for e in model.entries if e.index == index)
            s = snap(index, meta_term, data=b"s%d" % step)
            store.compact(s)
            model.compact(s)
            base = index
        elif r < 0.14:
            term += 1
            base = last = max(base, last) + rng.randint(-3, 5) if last > base + 3 else last + 1
            s = snap(base, term, data=b"i%d" % step)
            log = entries(base + 1, base + rng.randint(0, 3), term)
            commit = max(commit, base)
            hs = HardState(term, 0, commit)
            store.save(hs, log, s, True)
            model.save(hs, log, s, True)
            last = log[-1].index if log else base
        elif r < 0.2:
            store.close()
            store, got = reopen(tmp_path / "n", **options)
            assert got == model.load(), step
        else:
            if r < 0.3 and last > base:
                term += 1
                first = rng.randint(base + 1, last)
            else:
                first = last + 1
            log = entries(first, first + rng.randint(0, 8), term, tag=b"-%d" % step)
            # As in Raft: commit never decreases, a vote is cast once per term.
            commit = max(commit, rng.randint(0, first - 1))
            hs = HardState(term, term % 3 + 1, commit) if r < 0.6 else None
            sync = rng.random() < 0.5
            store.save(hs, log, None, sync)
            model.save(hs, log, None, sync)
            last = log[-1].index
    store.close()
    _, got = reopen(tmp_path / "n", **options)
    assert got == model.load()


def write_batches(d, count=40, per=5, **options):
    store, _ = reopen(d, **options)
    for b in range(count):
        first = b * per + 1
        store.save(HardState(1, 1, first), entries(first, first + per - 1), None, True)
    store.close()
    return count * per


def test_torn_tail_is_cut_and_the_node_starts(d, caplog):
    n = write_batches(d)
    seg = segments(d)[-1]
    good_size = os.path.getsize(seg)
    half = file_wal._frame(file_wal.ENTRY.pack(1, 999, 1, n + 1, 0) + b"lost")[:15]
    with open(seg, "ab") as f:
        f.write(random.Random(1).randbytes(300) + half)
    with caplog.at_level(logging.WARNING, logger="raftcache.storage.file_wal"):
        store, (hs, _, got) = reopen(d)
    assert "torn tail" in caplog.text and f"offset {good_size}" in caplog.text
    assert got == entries(1, n) and hs.commit == n - 4
    assert os.path.getsize(seg) == good_size
    # New saves after the cut are readable after another restart.
    store.save(HardState(1, 1, n), entries(n + 1, n + 3, tag=b"new"), None, True)
    store.close()
    _, (hs, _, got) = reopen(d)
    assert got == entries(1, n) + entries(n + 1, n + 3, tag=b"new") and hs.commit == n


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_half_written_last_record_is_cut(d, cut):
    n = write_batches(d)
    seg = segments(d)[-1]
    size = os.path.getsize(seg)
    with open(seg, "r+b") as f:
        f.truncate(size + cut if cut < 0 else size - 60 + cut)  # into the last write
    store, (_, _, got) = reopen(d)
    assert got == entries(1, n)[: len(got)] and len(got) >= n - 5


def test_hole_inside_the_last_write_is_a_torn_write(d):
    # Power loss can persist a write's later blocks and not its earlier ones.
    n = write_batches(d, per=50)
    store, _ = reopen(d)
    seg = store.segment_paths()[-1]
    last_write = store._segs[-1].offsets[-50]  # where entry n - 49 starts
    store.close()
    blob = bytearray(open(seg, "rb").read())
    blob[last_write + 100: last_write + 200] = bytes(100)
    open(seg, "wb").write(bytes(blob))
    _, (_, _, got) = reopen(d)
    assert got == entries(1, n)[: len(got)] and n - 50 <= len(got) < n


def flip_middle_byte(d):
    seg = segments(d)[0]
    blob = bytearray(open(seg, "rb").read())
    middle = len(blob) // 2
    blob[middle] ^= 0x5A
    open(seg, "wb").write(bytes(blob))
    return seg


def test_corruption_followed_by_valid_records_stops_start_up(d):
    n = write_batches(d)
    seg = flip_middle_byte(d)
    with pytest.raises(WALCorruption) as info:
        reopen(d)
    msg = str(info.value)
    assert f"wal/{os.path.basename(seg)}: corrupt record at offset " in msg
    assert "followed by valid records" in msg and "repair = true" in msg
    offset = int(msg.split("offset ")[1].split()[0])
    assert 0 < offset < os.path.getsize(seg) // 2 + 1
    # Refusing changed nothing on disk.
    with pytest.raises(WALCorruption):
        reopen(d)
    assert n == 200 and os.path.getsize(seg) > offset


def test_corruption_with_repair_keeps_the_prefix(d, caplog):
    n = write_batches(d, segment_bytes=2048)
    assert len(segments(d)) > 2
    flip_middle_byte(d)
    with caplog.at_level(logging.WARNING, logger="raftcache.storage.file_wal"):
        store, (_, _, got) = reopen(d, segment_bytes=2048, repair=True)
    assert "REPAIR" in caplog.text
    assert 0 < len(got) < n and got == entries(1, len(got))
    assert len(segments(d)) == 1
    last = len(got)
    store.save(None, entries(last + 1, last + 2, term=2), None, True)
    store.close()
    _, (_, _, got) = reopen(d)
    assert got == entries(1, last) + entries(last + 1, last + 2, term=2)


def test_corruption_in_an_earlier_segment_stops_start_up(d):
    write_batches(d, segment_bytes=2048)
    first = segments(d)[0]
    blob = bytearray(open(first, "rb").read())
    blob[-10] ^= 0x01  # the end of a full segment, with newer segments after it
    open(first, "wb").write(bytes(blob))
    with pytest.raises(WALCorruption, match=os.path.basename(first)):
        reopen(d, segment_bytes=2048)


def test_damage_in_the_part_a_snapshot_covers_is_skipped(d, caplog):
    store, _ = reopen(d)
    for first in range(1, 200, 10):
        store.save(HardState(1, 1, first), entries(first, first + 9), None, True)
    store.compact(snap(50))  # less than half of the segment is dead: it stays as it is
    store.close()
    seg = segments(d)[0]
    blob = bytearray(open(seg, "rb").read())
    blob[300] ^= 0xFF  # in the records of entries 1..50
    open(seg, "wb").write(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="raftcache.storage.file_wal"):
        store, (_, snapshot, got) = reopen(d)
    assert "covers: skipped" in caplog.text
    assert snapshot.meta.index == 50 and got == entries(51, 200)
    # Truncation and appends still find their offsets.
    store.save(None, entries(150, 151, term=2), None, True)
    store.close()
    _, (_, _, got) = reopen(d)
    assert got == entries(51, 149) + entries(150, 151, term=2)


def test_a_compaction_cut_short_by_a_crash_leaves_a_log_that_loads(d):
    # Compaction deletes the segments a snapshot covers. Whatever subset a crash leaves behind
    # (here: the newest covered segment gone, older ones still there), the node must start.
    n = write_batches(d, segment_bytes=2048)
    store, _ = reopen(d, segment_bytes=2048)
    store._write_atomic("snapshot", file_wal._encode_snapshot(snap(n - 20)))  # compaction's 1st step
    store.close()
    covered = [p for p in segments(d) if _last_index(p) <= n - 20]
    assert len(covered) >= 3
    os.unlink(covered[-2])  # a gap inside the covered prefix
    store, (_, snapshot, got) = reopen(d, segment_bytes=2048)
    assert snapshot.meta.index == n - 20 and got == entries(n - 19, n)
    store.compact(snap(n - 10))  # and compacting again removes what was left
    store.close()
    assert all(_last_index(p) > n - 10 for p in segments(d)[:-1])


def test_compaction_deletes_the_oldest_segment_first(d, monkeypatch):
    n = write_batches(d, segment_bytes=2048)
    store, _ = reopen(d, segment_bytes=2048)
    order = []
    real_unlink = os.unlink
    monkeypatch.setattr(file_wal.os, "unlink",
                        lambda p: (order.append(p), real_unlink(p))[1])
    store.compact(snap(n - 20))
    store.close()
    wal = [p for p in order if p.endswith(".seg")]
    assert len(wal) >= 2 and wal == sorted(wal)


def _last_index(path):
    blob = open(path, "rb").read()
    mv, pos, last = memoryview(blob), 0, 0
    while not isinstance(rec := file_wal._parse(mv, pos), str):
        kind, start, end = rec
        if kind & ~file_wal.END_OF_WRITE == file_wal.KIND_ENTRY:
            last = file_wal.ENTRY.unpack_from(mv, start)[3]
        pos = end
    return last


# ------------------------------------------------------------------------------------------------
# kill -9 of a process that saves with sync=True
# ------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import random, sys
    from raftcache.core.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
    from raftcache.plugins.storage.file_wal import FileWALStorage

    rng = random.Random(int(sys.argv[2]))
    store = FileWALStorage(1, sys.argv[1], {"segment_bytes": 32768})
    hs, snapshot, log = store.load()
    term = hs.term or 1
    base = snapshot.meta.index if snapshot else 0
    last = log[-1].index if log else base
    terms = {e.index: e.term for e in log}
    while True:
        r = rng.random()
        if r < 0.01 and last - base > 200:  # snapshot, keeping some entries
            index = last - 100
            print("WC", index, flush=True)
            meta = SnapshotMeta(index, terms[index], ConfState(frozenset({1})))
            store.compact(Snapshot(meta, b"img"))
            base = index
            print("C", index, flush=True)
            continue
        if r < 0.03 and last - base > 20:  # a new leader replaces a suffix
            term += 1
            first = last - rng.randrange(1, 10)
        else:
            first = last + 1
        last = first + rng.randrange(0, 20)
        # Printed before the save: the test then knows what a save cut by the kill may leave.
        print("W", first, last, term, flush=True)
        batch = [Entry(term, i, data=b"%d:%d" % (i, term)) for i in range(first, last + 1)]
        store.save(HardState(term, 1, first - 1), batch, None, True)
        terms.update((e.index, term) for e in batch)
        print("S", first, last, term, flush=True)
""")


def replay(lines):
    """The acknowledged log (index -> term), the save in flight if any, the snapshot index."""
    acked: dict[int, int] = {}
    inflight = None
    compacted = 0
    for line in lines:
        kind, *nums = line.split()
        nums = [int(x) for x in nums]
        if kind == "W":
            inflight = nums
        elif kind == "S":
            first, last, term = nums
            for i in [i for i in acked if i >= first]:
                del acked[i]
            acked.update({i: term for i in range(first, last + 1)})
            inflight = None
        elif kind == "C":
            compacted = nums[0]
    return acked, inflight, compacted


@pytest.mark.fault  # a crash test: kill -9 of child processes
@pytest.mark.slow
def test_kill_9_never_loses_an_acknowledged_entry(tmp_path):
    d = tmp_path / "node"
    rng = random.Random(4)
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for rnd in range(10):
        assert time.monotonic() < deadline, "the crash test ran out of time"
        out_path = tmp_path / f"round{rnd}.out"  # a file, not a pipe: the child never blocks
        with open(out_path, "w") as out:
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(rnd)], stdout=out)
        try:
            while "\nS " not in out_path.read_text():  # started and saving
                assert child.poll() is None and time.monotonic() < deadline, \
                    out_path.read_text()[-500:]
                time.sleep(0.01)
            time.sleep(rng.random() * 0.7)
        finally:
            child.kill()  # SIGKILL
            child.wait()
        out = out_path.read_text()
        done = out.splitlines()
        if done and not out.endswith("\n"):
            done = done[:-1]  # a line cut by the kill
        lines += done
        acked, inflight, compacted = replay(lines)
        store, (hs, snapshot, log) = reopen(d)
        store.close()
        base = snapshot.meta.index if snapshot else 0
        assert base >= compacted
        got = {e.index: e for e in log}
        assert list(got) == list(range(base + 1, base + 1 + len(log)))
        cut_from = inflight[0] if inflight else None
        for index, term in acked.items():
            if index <= base:
                continue
            if cut_from is not None and index >= cut_from:
                # The save in flight may have replaced it, or cut it before writing.
                assert index not in got or got[index].term in (term, inflight[2])
                continue
            assert index in got, f"round {rnd}: acknowledged entry {index} is lost"
            assert got[index].term == term and got[index].data == b"%d:%d" % (index, term)
        assert hs.term >= max(acked.values(), default=0)
        # The next round starts from what was loaded (a save in flight may have landed).
        lines = [f"C {base}"] + [f"S {e.index} {e.index} {e.term}" for e in log]


# ------------------------------------------------------------------------------------------------
# In a node
# ------------------------------------------------------------------------------------------------
def test_a_node_on_file_wal_keeps_its_data_across_a_restart(tmp_path):
    import gevent

    from raftcache.cluster import free_port_block
    from raftcache.core import api
    from raftcache.node import Node, config

    address = f"127.0.0.1:{free_port_block(1)}"
    cfg = config.parse({
        "node": {"id": 1, "address": address, "data_dir": str(tmp_path / "n1")},
        "cluster": {"peers": {"1": address}},
        "raft": {"tick_ms": 5, "snapshot_entries": 20, "snapshot_keep_entries": 5},
        "storage": {"plugin": "file-wal", "options": {"segment_bytes": 4096}},
    }, "test.toml")

    def call(node, **fields):
        for _ in range(50):  # like a client: retry what the node says to retry
            got = node.handle_request(api.Request(header=api.RequestHeader(), **fields))
            if got.error != "Unavailable":
                break
            gevent.sleep(0.01)
        return got

    def started():
        node = Node(cfg)
        node.start()
        with gevent.Timeout(5):
            while node.replica.raw.role.name != "LEADER":
                gevent.sleep(0.01)
        return node

    node = started()
    for i in range(100):
        assert call(node, op="put", key=b"k%d" % i, value=b"v%d" % i).error is None
    node.stop()
    node = started()
    try:
        for i in range(100):
            got = call(node, op="get", key=b"k%d" % i)
            assert got.error is None and got.result.value == b"v%d" % i, (i, got)
        assert node.replica.raw.raft_log.offset > 0  # it restarted from a snapshot
    finally:
        node.stop()
    assert len(segments(tmp_path / "n1")) <= 3


def test_a_data_dir_from_a_newer_format_is_refused_and_an_unmarked_one_is_adopted(tmp_path):
    from raftcache.plugins.storage.file_wal import FORMAT_VERSION, FileWALStorage, WALCorruption

    fresh = tmp_path / "fresh"
    FileWALStorage(1, str(fresh))
    assert (fresh / "FORMAT").read_text() == f"raftcache-file-wal {FORMAT_VERSION}\n"
    (fresh / "FORMAT").unlink()  # as the releases before the mark left it
    FileWALStorage(1, str(fresh)).load()
    assert (fresh / "FORMAT").read_text() == f"raftcache-file-wal {FORMAT_VERSION}\n"
    (fresh / "FORMAT").write_text(f"raftcache-file-wal {FORMAT_VERSION + 1}\n")
    with pytest.raises(WALCorruption, match=f"written by a newer raftcache .file-wal format "
                                            f"{FORMAT_VERSION + 1}; this build reads up to "
                                            f"{FORMAT_VERSION}"):
        FileWALStorage(1, str(fresh))
