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
keyring (`--keyring` checks that it opens them and copies it, owner-only, to DATA_DIR/keyring,
where `raftcache up` looks). A backup holding sealed values is refused without one, naming
the data keys and master key it needs: a cluster started without it would answer Unavailable
for every such key.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable

from raftcache.pluginapi import write_private

MAGIC = b"RCBACKUP"
VERSION = 1
_HEADER_LIMIT = 1 << 20


class BackupError(Exception):
    """The file is not a backup this build can restore, or a restore cannot go ahead."""


def save(client, path: str, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a backup of the cluster `client` reaches to `path` (mode 0600, atomically:
    `write_private`); its header. `on_progress(done, size)` after each part."""
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
    # Owner-only from the first byte: the image holds every value (sealed or not).
    write_private(path, [MAGIC + bytes([VERSION]) + struct.pack(">I", len(blob)) + blob, image])
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


def _sealed_samples(sm) -> dict[int, tuple[bytes, bytes, int]]:
    """Data key id -> (cache key, stored value, version) of one value in the state machine
    `sm` that is sealed with it (`encryption.key_id_of`), for every data key that sealed any."""
    from raftcache.plugins.security.encryption import key_id_of

    samples: dict[int, tuple[bytes, bytes, int]] = {}
    for start in range(0, len(sm), 1000):
        keys = sm.keys_at(start, 1000)
        for key, got in zip(keys, sm.read_many(keys, 0), strict=True):  # 0: expired ones too
            key_id = None if got is None else key_id_of(got[0])
            if key_id is not None:
                samples.setdefault(key_id, (key, *got))
    return samples


def _check_keyring(path: str, sm, keyring: str | None, without_keyring: bool) -> bytes | None:
    """The keyring file's bytes when it opens a value of each data key in the backup. Refuses
    a backup with sealed values and no keyring (unless `without_keyring`), and a keyring that
    does not open them."""
    from raftcache.pluginapi import ValueCodecError
    from raftcache.plugins.security.encryption import (
        EncryptionCodec,
        KeyringError,
        master_ids,
        read_keyring,
    )

    samples = _sealed_samples(sm)
    if keyring is None:
        if samples and not without_keyring:
            masters = master_ids(sm.settings)
            which = (f"master key {', '.join(map(str, masters))}" if masters else
                     "the old cluster's master key (its id is not recorded before a "
                     "rotation; `raftcache up` makes id 1)")
            raise BackupError(
                f"{path} holds values sealed at rest with data key "
                f"{', '.join(map(str, sorted(samples)))}, which need {which}: pass the old "
                "cluster's keyring with --keyring FILE (restored without it, the cluster "
                "would answer Unavailable for every one of them), or --without-keyring if "
                "they are plaintext values that only look sealed")
        return None
    try:
        ring = read_keyring(keyring)
    except KeyringError as exc:
        raise BackupError(str(exc)) from None
    codec = EncryptionCodec(ring, lambda: sm.settings)
    for _key_id, (key, stored, version) in sorted(samples.items()):
        try:
            codec.open(key, codec.unbind(key, version, stored))
        except ValueCodecError as exc:
            raise BackupError(f"the keyring {keyring} (master key {ring.master_id}) does not "
                              f"open {path}'s values: {exc}") from None
    with open(keyring, "rb") as f:
        return f.read()


def restore(path: str, data_dir: str, nodes: int, keyring: str | None = None,
            storage: str = "file-wal",
            on_progress: Callable[[int, int], None] | None = None,
            without_keyring: bool = False) -> dict:
    """Seed DATA_DIR/node1..nodeN with the backup, in the `storage` plugin's format (one that
    keeps its log in the data directory); its header. Refuses a data directory that already
    holds a node's state, a backup with sealed values without `keyring` (unless
    `without_keyring`), and a keyring that does not open them."""
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
    ring = _check_keyring(path, sm, keyring, without_keyring)
    destination = os.path.join(data_dir, "keyring")
    if ring is not None and os.path.exists(destination):
        with open(destination, "rb") as f:
            if f.read() != ring:
                raise BackupError(f"{destination} exists and is another keyring: restore "
                                  "seeds a new cluster only")
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
    if ring is not None and not os.path.exists(destination):
        write_private(destination, ring, replace=False)  # never readable by others
    return header
