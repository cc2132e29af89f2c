"""Encodings the durable storages share: one codec, in the byte order each storage's format
fixed when it was first written (file-wal little-endian, redis-aof big-endian)."""

from __future__ import annotations

import struct

from raftcache.core.raft.messages import ConfState, SnapshotMeta


def encode_meta(meta: SnapshotMeta, order: str) -> bytes:
    """index and term as u64, then voters, outgoing voters and learners, each as a u32 count
    and that many u64 node ids, sorted."""
    parts = [struct.pack(f"{order}QQ", meta.index, meta.term)]
    cs = meta.conf_state
    for ids in (cs.voters, cs.voters_outgoing, cs.learners):
        parts.append(struct.pack(f"{order}I{len(ids)}Q", len(ids), *sorted(ids)))
    return b"".join(parts)


def decode_meta(blob, pos: int, order: str) -> tuple[SnapshotMeta, int]:
    """The meta at `blob[pos:]` and where it ends; struct.error when it is not one."""
    index, term = struct.unpack_from(f"{order}QQ", blob, pos)
    pos += 16
    lists = []
    for _ in range(3):
        (n,) = struct.unpack_from(f"{order}I", blob, pos)
        lists.append(frozenset(struct.unpack_from(f"{order}{n}Q", blob, pos + 4)))
        pos += 4 + 8 * n
    return SnapshotMeta(index=index, term=term, conf_state=ConfState(*lists)), pos
