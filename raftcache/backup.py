"""Backups: `raftcache snapshot save FILE` and `raftcache snapshot restore FILE`.

A backup file is::

    b"RCBACKUP" | u8 format version | u32 header length | header (JSON) | image

The header holds the image's log index and term, its size and SHA-256, and when it was taken;
the image is a state machine snapshot (`raftcache.core.cache.statemachine`, versioned itself). A
reader refuses a format version newer than it knows, and an image whose checksum differs.

`save` reads the image from the leader a part at a time (the `snapshot` operation): the leader
takes it once it has applied everything committed before the call, so the backup holds every
write acknowledged before `save` started. `restore` seeds the data directories of a new
cluster of `nodes` nodes (ids 1..nodes, as `raftcache up --nodes N` runs them) with the image
as their Raft snapshot: the new cluster starts at the backup's index and term, its membership
from its own configs (the image's member addresses are dropped: they were the old cluster's).
Values encrypted at rest stay sealed with the old cluster's keys: the new one needs its
keyring (`--keyring` copies it to DATA_DIR/keyring, where `raftcache up` looks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable

MAGIC = b"RCBACKUP"
VERSION = 1
_HEADER_LIMIT = 1 << 20


class BackupError(Exception):
    """The file is not a backup this build can restore, or a restore cannot go ahead."""


def save(client, path: str, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a backup of the cluster `client` reaches to `path` (via a temporary file, then
    renamed); its header. `on_progress(done, size)` after each part."""
    part = client.snapshot_part()
    chunks, done = [part.data], len(part.data)
    if on_progress is not None:
        on_progress(done, part.size)
    while done < part.size:
        more = client.snapshot_part(index=part.index, offset=done)
        if not more.data:
            raise BackupError(f"the leader sent no data at offset {done} of {part.size}")
        chunks.append(more.data)
        done += len(more.data)
        if on_progress is not None:
            on_progress(done, part.size)
    image = b"".join(chunks)
    if hashlib.sha256(image).hexdigest() != part.sha256:
        raise BackupError("the image read does not match the leader's checksum; try again")
    header = {"index": part.index, "term": part.term, "size": part.size, "sha256": part.sha256,
              "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    blob = json.dumps(header, sort_keys=True).encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + bytes([VERSION]) + struct.pack(">I", len(blob)) + blob)
        f.write(image)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header


def read(path: str) -> tuple[dict, bytes]:
    """(header, image) of the backup at `path`; BackupError when it is not one."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 5:
        raise BackupError(f"{path}: not a raftcache backup")
    version = data[len(MAGIC)]
    if version > VERSION:
        raise BackupError(f"{path}: backup format {version} is newer than this build reads "
                          f"({VERSION}); restore it with a newer raftcache")
    (length,) = struct.unpack_from(">I", data, len(MAGIC) + 1)
    start = len(MAGIC) + 5
    if length > _HEADER_LIMIT or start + length > len(data):
        raise BackupError(f"{path}: truncated or corrupt header")
    try:
        header = json.loads(data[start:start + length])
        index, term, size, digest = (header["index"], header["term"], header["size"],
                                     header["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{path}: corrupt header: {exc}") from None
    image = data[start + length:]
    if len(image) != size or hashlib.sha256(image).hexdigest() != digest:
        raise BackupError(f"{path}: the image is damaged (size or SHA-256 differ from the "
                          "header's)")
    if not (isinstance(index, int) and isinstance(term, int) and index > 0 and term > 0):
        raise BackupError(f"{path}: index {index!r} / term {term!r} out of range")
    return header, image


def restore(path: str, data_dir: str, nodes: int, keyring: str | None = None,
            storage: str = "file-wal",
            on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Seed DATA_DIR/node1..nodeN with the backup, in the `storage` plugin's format (one that
    keeps its log in the data directory); its header. Refuses a data directory that already
    holds a node's state."""
    from raftcache.core.cache.statemachine import SnapshotError, StateMachine
    from raftcache.core.raft.messages import ConfState, HardState, Snapshot, SnapshotMeta
    from raftcache.node.config import private_dir
    from raftcache.pluginapi.manager import PluginError, PluginSet, make_manager

    header, image = read(path)
    if nodes < 1:
        raise BackupError("--nodes must be at least 1")
    targets = [os.path.join(data_dir, f"node{i}") for i in range(1, nodes + 1)]
    for target in targets:
        if os.path.exists(target) and os.listdir(target):
            raise BackupError(f"{target} is not empty: restore seeds a new cluster only")
    plugins = PluginSet(make_manager())
    try:
        storage_provider = plugins.get("storage", storage)
        backend = plugins.get("backend", "memory").factory(0, {})
    except PluginError as exc:
        raise BackupError(str(exc)) from None
    # The old cluster's member addresses and joins do not describe the new one.
    sm = StateMachine(backend)
    try:
        sm.restore(image)
    except SnapshotError as exc:
        raise BackupError(f"{path}: {exc}") from None
    sm.members.clear()
    sm.joined.clear()
    image = sm.snapshot()
    private_dir(data_dir)
    conf = ConfState(voters=frozenset(range(1, nodes + 1)))
    snapshot = Snapshot(SnapshotMeta(header["index"], header["term"], conf), image)
    for n, target in enumerate(targets, 1):
        raft_log = storage_provider.factory(n, target, {})
        raft_log.load()
        raft_log.save(HardState(term=header["term"], commit=header["index"]), [], snapshot, True)
        raft_log.close()
        if on_progress is not None:
            on_progress(n, nodes)
    if keyring:
        destination = os.path.join(data_dir, "keyring")
        shutil.copyfile(keyring, destination)
        os.chmod(destination, 0o600)
    return header
