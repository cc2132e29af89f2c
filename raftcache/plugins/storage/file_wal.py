"""The `file-wal` storage: the Raft log in segmented, checksummed files on local disk; hard state
and snapshot in files replaced atomically. `save(..., sync=True)` returns once all is fsynced.

A node's data dir::

    FORMAT        "raftcache-file-wal <version>": what wrote the files. A build refuses, with
                  a clear message, a version newer than `FORMAT_VERSION` (a rolled-back
                  upgrade must not misread them); a data dir without it is version 1.
    hardstate     term, vote, commit; rewritten (temp file, fsync, rename, fsync dir) when the
                  term or vote changes. The commit index rides in the WAL (see below).
    snapshot      the newest snapshot: meta (index, term, conf state) and data, with a CRC32.
    wal/00000000000000000001.seg ...   append-only segments, numbered in creation order,
                  rolled at `segment_bytes`.

Every WAL record is ``"RCW1" | u32 payload length | u32 CRC32(payload) | payload``. The payload
starts with a kind byte (bit 0x80 marks the last record of one write()) and the u32 id of the
write() it was part of, then:

- an entry: u64 term, u64 index, u8 entry type, data;
- a hard state: u64 term, u64 vote, u64 commit. One ends every write that changes the hard
  state, so the commit index costs no extra fsync; the `hardstate` file holds term and vote for
  when those records are gone (truncated or compacted away).

One save() is one write() and, when `sync`, one fsync (plus, rarely, the directory's fsync when
a segment was created, and the hardstate file's atomic replacement when term or vote changed).
A save with `sync` false (the core's commit-only Readies) is a bare write(): no fsync, no roll.
Truncating a conflicting suffix cuts the segment file at the first replaced entry (offsets are
kept in memory) and fsyncs before the new entries go in. Compaction deletes whole segments
covered by the snapshot (the covered prefix of the first remaining one is skipped at load), and
rolls the last segment when the snapshot covers most of it, so that the disk holds about two
snapshot intervals of log whatever `segment_bytes` is.

Recovery (`load`): a bad record (short header, short payload, CRC mismatch) with nothing valid
after it, or only the rest of the same write (blocks of one write can reach the disk out of
order when power fails), is a write interrupted by a crash: it is cut off and the node starts.
Anything else is corruption: start-up stops naming the file and offset unless the storage
option ``repair = true`` is given, which truncates the log there.

Options: ``segment_bytes`` (default 64 MiB), ``repair`` (default false), ``fsync`` (default
true; false skips every fsync: UNSAFE, a crash of the machine loses acknowledged writes; for
benchmarks only), ``sync_thread`` (default false: see below).

Where the fsync runs: on the hub by default, like Redis' ``appendfsync always`` and etcd's
raft loop. The node has sent its appends before it saves, so the followers write in parallel,
and everything that arrives meanwhile goes into the next save. A thread hop per save cost more
CPU than the fsync itself (measured: 20% more per write, and fewer writes per fsync). With
``sync_thread = true`` durable saves run in the threadpool instead, so the node keeps serving
reads and heartbeats while a slow disk (one whose fsync takes many milliseconds) syncs.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
import zlib
from array import array
from collections.abc import Sequence

import attrs

from raftcache.core.raft.messages import Entry, EntryType, HardState, Snapshot
from raftcache.pluginapi import OptionError, StorageProvider, hookimpl, parse_options, private_dir
from raftcache.plugins.storage.records import decode_meta, encode_meta

log = logging.getLogger("raftcache.storage.file_wal")

FORMAT_VERSION = 1  # the data dir's layout and record formats, below
FORMAT_NAME = "raftcache-file-wal"
MAGIC = b"RCW1"
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
ENTRY = struct.Struct("<BIQQB")  # kind, write id, term, index, entry type; data follows
HARD = struct.Struct("<BIQQQ")  # kind, write id, term, vote, commit
KIND_ENTRY = 1
KIND_HARD_STATE = 2
END_OF_WRITE = 0x80
_WID_MASK = 0xFFFFFFFF
_ENTRY_TYPES = frozenset(int(t) for t in EntryType)
_MIN_PAYLOAD = {KIND_ENTRY: ENTRY.size, KIND_HARD_STATE: HARD.size}

SNAP_MAGIC = b"RCSNAP01"
SNAP_HEADER = struct.Struct("<8sIQ")  # magic, crc32(body), body length
HS_MAGIC = b"RCHS"
HS_FILE = struct.Struct("<4sIQQQ")  # magic, crc32(term, vote, commit), term, vote, commit
_HS_BODY = struct.Struct("<QQQ")

SEGMENT_RE = re.compile(r"(\d{20})\.seg")
DEFAULT_SEGMENT_BYTES = 64 << 20


class WALCorruption(Exception):
    """The stored log or state is damaged in a way a crash cannot explain."""


class StorageFailed(Exception):
    """An earlier write or fsync failed: what reached the disk is unknown, so stop the node."""


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def _frame(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _parse(mv: memoryview, pos: int) -> tuple[int, int, int] | str:
    """(kind byte, payload start, record end) of the record at `pos`, or why there is none."""
    size = len(mv)
    if size - pos < HEADER.size:
        return "short header"
    magic, length, crc = HEADER.unpack_from(mv, pos)
    if magic != MAGIC:
        return "bad magic"
    start = pos + HEADER.size
    end = start + length
    if end > size:
        return "short payload"
    if zlib.crc32(mv[start:end]) != crc:
        return "crc mismatch"
    if not length:
        return "empty record"
    kind = mv[start]
    need = _MIN_PAYLOAD.get(kind & ~END_OF_WRITE)
    if need is None or length < need:
        return "unknown record kind"
    return kind, start, end


def _encode_snapshot(snapshot: Snapshot) -> bytes:
    body = encode_meta(snapshot.meta, "<") + snapshot.data
    return SNAP_HEADER.pack(SNAP_MAGIC, zlib.crc32(body), len(body)) + body


def _decode_snapshot(blob: bytes, name: str) -> Snapshot:
    if len(blob) < SNAP_HEADER.size:
        raise WALCorruption(f"{name}: truncated snapshot file ({len(blob)} bytes)")
    magic, crc, length = SNAP_HEADER.unpack_from(blob)
    body = memoryview(blob)[SNAP_HEADER.size:]
    if magic != SNAP_MAGIC or length != len(body) or zlib.crc32(body) != crc:
        raise WALCorruption(f"{name}: damaged snapshot file (bad magic, length or crc); "
                            "refusing to start")
    try:
        meta, pos = decode_meta(body, 0, "<")
    except struct.error as exc:  # a checksum that matches, over a body that does not parse
        raise WALCorruption(f"{name}: malformed snapshot metadata ({exc}); refusing to start"
                            ) from None
    return Snapshot(meta, bytes(body[pos:]))


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
def _at_least_1024(_inst, attribute, value):
    if value < 1024:
        raise OptionError(attribute.name, f"must be at least 1024, got {value!r}")


@attrs.frozen
class Options:
    """``[storage] options`` of file-wal."""

    segment_bytes: int = attrs.field(default=DEFAULT_SEGMENT_BYTES, validator=_at_least_1024)
    repair: bool = False  # truncate the log at a corrupt record instead of refusing to start
    fsync: bool = True  # false: UNSAFE, benchmarks only
    sync_thread: bool = False  # durable saves in the threadpool, not on the hub

    @classmethod
    def parse(cls, options: dict | None) -> Options:
        return parse_options(cls, options, "storage.options")


# ------------------------------------------------------------------------------------------------
# The storage
# ------------------------------------------------------------------------------------------------
@attrs.define(eq=False)
class _Segment:
    seq: int
    path: str
    size: int = 0
    first: int = 0  # index of its first entry record; 0 while it holds none
    offsets: array = attrs.Factory(lambda: array("Q"))  # offsets[i]: entry first + i

    @property
    def last(self) -> int:
        return self.first + len(self.offsets) - 1 if self.offsets else 0


@attrs.define(eq=False)
class _Bad:
    segment: int  # position in the segment list
    offset: int
    reason: str
    logical: bool = False  # the record's CRC is fine but its content is impossible


class FileWALStorage:
    """See the module docstring. Not thread-safe: the node calls it one call at a time."""

    def __init__(self, node_id: int = 0, data_dir: str = "raftcache-data",
                 options: dict | None = None):
        self.node_id = node_id
        self.options = Options.parse(options)
        self.blocking = self.options.sync_thread  # see "Where the fsync runs"
        self.dir = os.path.abspath(data_dir)
        self.wal_dir = os.path.join(self.dir, "wal")
        self._segs: list[_Segment] = []
        self._fd = -1  # the last segment, open with O_APPEND
        self._dirty = False  # the last segment was written since its last fsync
        self._dir_dirty = False  # wal/ changed (segment created or deleted) since its last fsync
        self._fresh = True  # the last segment has no record of the current hard state yet
        self._hard_state = HardState()
        self._file_hs = (0, 0)  # (term, vote) in the hardstate file
        self._base = 0  # snapshot index: entries up to it are dead
        self._last = 0  # index of the last entry (the snapshot's when none follow it)
        self._wid = 0  # id of the last write()
        self._seq = 0  # number of the newest segment
        self._loaded = False
        self._failed: BaseException | None = None
        for d in (self.dir, self.wal_dir):
            if not os.path.isdir(d):
                private_dir(d)  # owner-only: it holds every value written
                self._fsync_dir(os.path.dirname(d))
        self._check_format()

    def _check_format(self) -> None:
        """Refuse a data dir written by a newer format; mark an unmarked one as ours."""
        path = os.path.join(self.dir, "FORMAT")
        try:
            with open(path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            self._write_atomic("FORMAT", f"{FORMAT_NAME} {FORMAT_VERSION}\n".encode())
            return
        name, _, version = text.partition(" ")
        if name != FORMAT_NAME or not version.isdigit():
            raise WALCorruption(f"{path}: {text[:80]!r} is not a file-wal format mark")
        if int(version) > FORMAT_VERSION:
            raise WALCorruption(f"{self.dir} was written by a newer raftcache (file-wal format "
                                f"{version}; this build reads up to {FORMAT_VERSION}): run "
                                "that version or a newer one")

    # -- the Storage protocol --------------------------------------------------------------------
    def load(self) -> tuple[HardState, Snapshot | None, list[Entry]]:
        self._check_usable()
        self._close_fd()
        for d in (self.dir, self.wal_dir):  # a crash mid-replacement leaves a temp file
            for name in os.listdir(d):
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(d, name))
        snapshot = self._read_snapshot()
        file_hs = self._read_hard_state_file()
        self._file_hs = (file_hs.term, file_hs.vote)
        self._base = snapshot.meta.index if snapshot else 0
        entries, wal_hs, term_at_base = self._recover_wal()
        if snapshot is not None and term_at_base not in (None, snapshot.meta.term):
            # A crash between persisting a received snapshot and dropping the old log.
            log.warning("%s: dropping %d log entries that do not continue snapshot %d (a crash "
                        "during a snapshot install)", self.wal_dir, len(entries), self._base)
            entries = []
            self._drop_all_segments()
        elif entries and entries[0].index != self._base + 1:
            msg = (f"{self.wal_dir}: the log starts at index {entries[0].index} but the snapshot "
                   f"covers only up to {self._base}; entries are missing")
            if not self.options.repair:
                raise WALCorruption(msg + "; refusing to start. Run with storage option "
                                    "repair = true to drop the log, keeping the snapshot")
            log.error("REPAIR: %s; dropping all %d log entries", msg, len(entries))
            entries = []
            self._drop_all_segments()
        self._last = entries[-1].index if entries else self._base
        self._hard_state = _newest(file_hs, wal_hs)
        if not self._segs:
            self._new_segment()
        else:
            self._fd = os.open(self._segs[-1].path, os.O_WRONLY | os.O_APPEND)
        self._fresh = True
        self._loaded = True
        return self._hard_state, snapshot, entries

    def save(self, hard_state: HardState | None, entries: Sequence[Entry],
             snapshot: Snapshot | None, sync: bool) -> None:
        self._check_usable()
        if not self._loaded:
            self.load()
        try:
            self._save(hard_state, entries, snapshot, sync and self.options.fsync)
        except OSError as exc:
            self._failed = exc
            raise

    def compact(self, snapshot: Snapshot) -> None:
        self._check_usable()
        if not self._loaded:
            self.load()
        try:
            self._compact(snapshot)
        except OSError as exc:
            self._failed = exc
            raise

    def close(self) -> None:
        self._close_fd()
        self._loaded = False

    # -- introspection (tests, metrics) -------------------------------------------------------------
    def segment_paths(self) -> list[str]:
        return [s.path for s in self._segs]

    # -- saving ------------------------------------------------------------------------------------
    def _save(self, hard_state, entries, snapshot, durable: bool) -> None:
        if snapshot is not None:
            self._install(snapshot)
        if entries and entries[0].index <= self._base:  # already covered by our snapshot
            entries = [e for e in entries if e.index > self._base]
        truncated = False
        if entries:
            first = entries[0].index
            if first <= self._last:
                self._truncate(first, durable)
                truncated = True
            elif first != self._last + 1:
                raise ValueError(f"file-wal: entries start at {first} but the log ends at "
                                 f"{self._last}: a gap")
        if hard_state is not None:
            self._hard_state = hard_state
        # The newest segment must always hold the newest hard state (commit rides only here).
        with_hs = hard_state is not None or truncated or self._fresh
        if entries or with_hs:
            self._append(entries, with_hs, durable)
        elif durable:
            self._sync()
        hs = self._hard_state
        if (hs.term, hs.vote) != self._file_hs:
            self._write_hard_state_file()

    def _append(self, entries: Sequence[Entry], with_hs: bool, durable: bool) -> None:
        seg = self._segs[-1]
        # Roll only in a durable save: the node runs the others (commit-only) on the hub,
        # where the fsync and directory fsync of a roll would stall every greenlet.
        if seg.size >= self.options.segment_bytes and (durable or not self.options.fsync):
            seg = self._roll()
            with_hs = True
        self._wid = wid = (self._wid + 1) & _WID_MASK
        parts = []
        pos = seg.size
        offsets = []
        pack, head, crc32, head_size = ENTRY.pack, HEADER.pack, zlib.crc32, HEADER.size
        for e in entries:
            payload = pack(KIND_ENTRY, wid, e.term, e.index, e.type) + e.data
            n = len(payload)
            parts.append(head(MAGIC, n, crc32(payload)))
            parts.append(payload)
            offsets.append(pos)
            pos += head_size + n
        if entries and not with_hs:  # the last record of the write says so
            e = entries[-1]
            payload = pack(KIND_ENTRY | END_OF_WRITE, wid, e.term, e.index, e.type) + e.data
            parts[-2:] = [head(MAGIC, len(payload), crc32(payload)), payload]
        if with_hs:
            hs = self._hard_state
            payload = HARD.pack(KIND_HARD_STATE | END_OF_WRITE, wid, hs.term, hs.vote, hs.commit)
            parts.append(_frame(payload))
        self._write_all(seg, b"".join(parts))
        if entries:
            if not seg.offsets:
                seg.first = entries[0].index
            seg.offsets.extend(offsets)
            self._last = entries[-1].index
        if with_hs:
            self._fresh = False
        if durable:
            self._sync()

    def _write_all(self, seg: _Segment, blob: bytes) -> None:
        view = memoryview(blob)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # Do not leave half a record for the next write to follow (best effort).
            try:
                os.ftruncate(self._fd, seg.size)
            except OSError:
                pass
            raise
        seg.size += len(blob)
        self._dirty = True

    def _sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        if self._dir_dirty:
            self._fsync_dir(self.wal_dir)
            self._dir_dirty = False

    def _truncate(self, index: int, durable: bool) -> None:
        """Drop entries `index` and later: later segments go, the holding one is cut."""
        k = next((k for k in range(len(self._segs) - 1, -1, -1)
                  if self._segs[k].offsets and self._segs[k].first <= index), None)
        if k is None:
            raise ValueError(f"file-wal: entry {index} to replace is not in the log")
        seg = self._segs[k]
        if len(self._segs) > k + 1:
            self._close_fd(sync=False)  # its records are about to go
            self._delete_segments(self._segs[k + 1:])
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        cut = seg.offsets[index - seg.first]
        os.ftruncate(self._fd, cut)
        del seg.offsets[index - seg.first:]
        if not seg.offsets:
            seg.first = 0
        seg.size = cut
        self._last = index - 1
        self._dirty = True
        # Cut before anything new goes in: otherwise a power failure could leave new records
        # followed by stale ones, which would read as corruption.
        if durable:
            self._sync()

    def _roll(self) -> _Segment:
        if self._dirty and self.options.fsync:
            os.fsync(self._fd)  # everything before a newer segment must be durable
            self._dirty = False
        self._close_fd()
        return self._new_segment()

    def _new_segment(self) -> _Segment:
        self._seq = seq = self._seq + 1  # names are never reused while we run
        seg = _Segment(seq, os.path.join(self.wal_dir, f"{seq:020d}.seg"))
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._segs.append(seg)
        self._dir_dirty = True
        self._fresh = True
        return seg

    def _delete_segments(self, segs: list[_Segment], oldest_first: bool = False) -> None:
        # A crash part-way must never leave a gap in the live log: a suffix goes newest first
        # (leaving a prefix), a compacted prefix oldest first (leaving a suffix).
        for seg in (segs if oldest_first else reversed(segs)):
            os.unlink(seg.path)
            self._segs.remove(seg)
        if segs:
            self._dir_dirty = True

    def _drop_all_segments(self) -> None:
        self._close_fd(sync=False)
        self._delete_segments(list(self._segs))
        if self.options.fsync:
            self._sync()

    # -- snapshots ---------------------------------------------------------------------------------
    def _install(self, snapshot: Snapshot) -> None:
        """A snapshot from the leader replaces the whole log, as in the core."""
        if snapshot.meta.index >= self._base:
            self._write_atomic("snapshot", _encode_snapshot(snapshot))
            self._base = snapshot.meta.index
        self._drop_all_segments()
        self._new_segment()
        self._last = self._base

    def _compact(self, snapshot: Snapshot) -> None:
        if snapshot.meta.index <= self._base:
            return
        # Durable before any entry it covers is deleted, whatever the save's sync flag.
        self._write_atomic("snapshot", _encode_snapshot(snapshot))
        self._base = snapshot.meta.index
        self._last = max(self._last, self._base)
        active = self._segs[-1]
        if active.offsets and active.first <= self._base:
            live = self._base + 1 - active.first
            dead = active.offsets[live] if live < len(active.offsets) else active.size
            if 2 * dead >= active.size:
                # Mostly covered: start a new segment so that this one goes at the next
                # compaction, instead of when it fills (the disk used stays near the live log).
                self._roll()
                self._append((), True, self.options.fsync)
        covered = []
        for seg in self._segs[:-1]:
            if seg.offsets and seg.last > self._base:
                break
            covered.append(seg)
        if covered:
            self._delete_segments(covered, oldest_first=True)
            if self.options.fsync:
                self._sync()

    # -- the small files ---------------------------------------------------------------------------
    def _write_atomic(self, name: str, blob: bytes) -> None:
        """Replace `name` as a whole: readers see the old file or the new, never a mix. The
        temporary file has a fresh random name (O_EXCL, 0600), so nothing planted at a
        predictable one is written through; `load` removes any a crash left."""
        path = os.path.join(self.dir, name)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            if self.options.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir(self.dir)

    def _write_hard_state_file(self) -> None:
        hs = self._hard_state
        body = _HS_BODY.pack(hs.term, hs.vote, hs.commit)
        self._write_atomic("hardstate", HS_FILE.pack(HS_MAGIC, zlib.crc32(body), hs.term,
                                                      hs.vote, hs.commit))
        self._file_hs = (hs.term, hs.vote)

    def _read_hard_state_file(self) -> HardState:
        path = os.path.join(self.dir, "hardstate")
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return HardState()
        if len(blob) == HS_FILE.size:
            magic, crc, term, vote, commit = HS_FILE.unpack(blob)
            if magic == HS_MAGIC and zlib.crc32(blob[8:]) == crc:
                return HardState(term=term, vote=vote, commit=commit)
        raise WALCorruption(f"{path}: damaged hard state file; refusing to start (the term and "
                            "vote it holds cannot be recovered safely)")

    def _read_snapshot(self) -> Snapshot | None:
        path = os.path.join(self.dir, "snapshot")
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        return _decode_snapshot(blob, path)

    # -- recovery ----------------------------------------------------------------------------------
    def _recover_wal(self) -> tuple[list[Entry], tuple | None, int | None]:
        """Scan every segment: (entries after the snapshot, newest hard state record, term of
        the entry at the snapshot index). Cuts a torn tail; raises on corruption."""
        seqs = sorted(int(m.group(1)) for n in os.listdir(self.wal_dir)
                      if (m := SEGMENT_RE.fullmatch(n)))
        segs = [_Segment(s, os.path.join(self.wal_dir, f"{s:020d}.seg")) for s in seqs]
        self._seq = max(seqs, default=self._seq)
        base = self._base
        entries: list[Entry] = []
        wal_hs = None
        term_at_base = None
        prev = None  # index of the last entry seen
        last_wid, last_end = None, True  # the last valid record's write id and end mark
        bad = None
        for k, seg in enumerate(segs):
            with open(seg.path, "rb") as f:
                buf = f.read()
            mv = memoryview(buf)
            pos, size = 0, len(buf)
            offsets = seg.offsets
            while pos < size:
                rec = _parse(mv, pos)
                if isinstance(rec, str):
                    resume = _past_covered_damage(buf, pos, base, prev)
                    if resume is None:
                        bad = _Bad(k, pos, rec)
                        break
                    log.warning("%s: damaged record at offset %d (%s) in the part of the log "
                                "that snapshot %d covers: skipped", os.path.relpath(
                                    seg.path, self.dir), pos, rec, base)
                    pos, prev = resume
                    seg.first, offsets[:] = 0, array("Q")
                    continue
                kind, start, end = rec
                if kind & ~END_OF_WRITE == KIND_ENTRY:
                    _, wid, term, index, etype = ENTRY.unpack_from(mv, start)
                    # A gap is corruption, unless the snapshot covers it (a compaction that
                    # a crash interrupted, in a version that deleted newest first).
                    if prev is not None and index != prev + 1 and not prev < index <= base + 1:
                        bad = _Bad(k, pos, f"entry {index} follows entry {prev}", logical=True)
                        break
                    if etype not in _ENTRY_TYPES:
                        bad = _Bad(k, pos, f"unknown entry type {etype}", logical=True)
                        break
                    prev = index
                    if not offsets:
                        seg.first = index
                    offsets.append(pos)
                    if index > base:
                        entries.append(Entry(term, index, EntryType(etype),
                                             bytes(mv[start + ENTRY.size:end])))
                    elif index == base:
                        term_at_base = term
                else:
                    _, wid, *hs = HARD.unpack_from(mv, start)
                    wal_hs = tuple(hs)
                last_wid = wid
                last_end = bool(kind & END_OF_WRITE)
                pos = end
            seg.size = pos
            if bad is not None:
                break
        self._segs = segs
        if bad is not None:
            self._recover_from(bad, last_wid, last_end)
        self._wid = last_wid or 0
        return entries, wal_hs, term_at_base

    def _recover_from(self, bad: _Bad, last_wid: int | None, last_end: bool) -> None:
        seg = self._segs[bad.segment]
        name = os.path.relpath(seg.path, self.dir)
        after = [] if bad.logical else self._records_after(bad)
        wids = {w for w, _ in after}
        torn = not bad.logical and (not after or (len(wids) == 1 and _same_write(
            wids.pop(), last_wid, last_end)))
        lost = sum(os.path.getsize(s.path) for s in self._segs[bad.segment:]) - bad.offset
        if torn:
            log.warning("%s: cutting a torn tail at offset %d (%s, %d bytes): a write "
                        "interrupted by a crash", name, bad.offset, bad.reason, lost)
        else:
            what = "impossible record" if bad.logical else "corrupt record"
            msg = (f"{name}: {what} at offset {bad.offset} ({bad.reason})"
                   + ("" if bad.logical else " followed by valid records"))
            if not self.options.repair:
                raise WALCorruption(msg + "; refusing to start. Run with storage option repair "
                                    "= true to truncate the log there, losing everything after it")
            log.error("REPAIR: %s; truncating the log there: %d bytes and %d later segment(s) "
                      "are lost", msg, lost, len(self._segs) - bad.segment - 1)
        self._delete_segments(self._segs[bad.segment + 1:])
        fd = os.open(seg.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, bad.offset)
            if self.options.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        seg.size = bad.offset
        if self.options.fsync:
            self._sync()

    def _records_after(self, bad: _Bad) -> list[tuple[int, bool]]:
        """(write id, end of write) of every valid record after the bad one, found by magic."""
        found = []
        for k in range(bad.segment, len(self._segs)):
            with open(self._segs[k].path, "rb") as f:
                buf = f.read()
            mv = memoryview(buf)
            pos = bad.offset + 1 if k == bad.segment else 0
            while (pos := buf.find(MAGIC, pos)) >= 0:
                rec = _parse(mv, pos)
                if isinstance(rec, str):
                    pos += 1
                    continue
                kind, start, end = rec
                found.append((struct.unpack_from("<I", mv, start + 1)[0],
                              bool(kind & END_OF_WRITE)))
                pos = end
        return found

    # -- plumbing ----------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageFailed(f"file-wal {self.dir}: an earlier write failed "
                                f"({self._failed!r}); restart the node") from self._failed

    def _close_fd(self, sync: bool = True) -> None:
        if self._fd >= 0:
            if sync and self._dirty and self.options.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._dirty = False

    def _fsync_dir(self, path: str) -> None:
        if not self.options.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _past_covered_damage(buf: bytes, pos: int, base: int,
                         prev: int | None) -> tuple[int, int] | None:
    """(offset to resume at, index before the next entry) when the damage at `pos` can only
    hide entries that the snapshot covers: the next valid entry is at most `base` + 1."""
    mv = memoryview(buf)
    p = pos + 1
    while (p := buf.find(MAGIC, p)) >= 0:
        if isinstance(_parse(mv, p), str):
            p += 1
            continue
        q = p
        while not isinstance(rec := _parse(mv, q), str):  # the next entry, past hard states
            kind, start, end = rec
            if kind & ~END_OF_WRITE == KIND_ENTRY:
                index = ENTRY.unpack_from(mv, start)[3]
                ok = index <= base + 1 and (prev is None or index > prev)
                return (p, index - 1) if ok else None
            q = end
        return None
    return None


def _same_write(wid: int, last_wid: int | None, last_end: bool) -> bool:
    """Is a record of write `wid` part of the write a bad record (after `last_wid`) was in?"""
    if last_wid is None:
        return True
    if last_end:
        return wid == (last_wid + 1) & _WID_MASK
    return wid == last_wid


def _newest(file_hs: HardState, wal_hs: tuple | None) -> HardState:
    """The hardstate file has the newest term and vote, except in the instant between a WAL
    write and the file's replacement; the WAL has the newest commit (commit only grows)."""
    if wal_hs is None:
        return file_hs
    term, vote, commit = wal_hs
    if file_hs.term > term:
        term, vote = file_hs.term, file_hs.vote
    elif file_hs.term == term and not vote:
        vote = file_hs.vote
    return HardState(term=term, vote=vote, commit=max(commit, file_hs.commit))


@hookimpl
def raftcache_storages():
    yield StorageProvider(
        "file-wal", FileWALStorage,
        "the Raft log in checksummed segment files with group-committed fsync (durable)")
