"""The wire format: the Thrift IDL loaded once, and conversions to and from the core's messages.

Both transports speak it: `thrift` as a Thrift service, `tcp-tls` as Thrift-binary structs in
its own frames. Decoding untrusted bytes raises `WireError`, never anything else.
"""

from __future__ import annotations

import os

import thriftpy2
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.utils import deserialize, serialize

from raftcache.core.messages import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MsgType,
    SnapshotMeta,
)

IDL_PATH = os.path.join(os.path.dirname(__file__), "raftcache.thrift")
idl = thriftpy2.load(IDL_PATH, module_name="raftcache_thrift")

Request = idl.Request
Response = idl.Response
GetResult = idl.GetResult
NodeStatus = idl.NodeStatus
RequestHeader = idl.RequestHeader
RaftBatch = idl.RaftBatch
RaftCacheService = idl.RaftCache

ERRORS = ("NotLeader", "Unauthorized", "InvalidRequest", "Unavailable", "OutcomeUnknown")
_PROTOCOL = TCyBinaryProtocolFactory()


class WireError(ValueError):
    """Bytes that are not a valid encoding of what was expected."""


def encode(obj) -> bytes:
    return serialize(obj, _PROTOCOL)


def decode(cls, data: bytes):
    """Decode `data` as a `cls` (e.g. wire.Request); WireError on garbage."""
    try:
        return deserialize(cls(), data, _PROTOCOL)
    except Exception as exc:  # the Cython decoder raises many kinds on bad input
        raise WireError(f"cannot decode {cls.__name__}: {exc}") from None


# ---- Raft messages ------------------------------------------------------------------------------
def _conf_to_wire(c: ConfState):
    return idl.ConfState(sorted(c.voters), sorted(c.voters_outgoing), sorted(c.learners))


def _conf_from_wire(c) -> ConfState:
    return ConfState(frozenset(c.voters or ()), frozenset(c.voters_outgoing or ()),
                     frozenset(c.learners or ()))


def message_to_wire(m: Message):
    meta = None
    if m.snapshot_meta is not None:
        sm = m.snapshot_meta
        meta = idl.SnapshotMeta(sm.index, sm.term, _conf_to_wire(sm.conf_state))
    return idl.RaftMessage(
        int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
        [idl.Entry(e.term, e.index, int(e.type), e.data) for e in m.entries],
        m.commit, m.reject, m.reject_hint, m.context, meta, m.offset, m.data, m.done, m.tick,
    )


def message_from_wire(w) -> Message:
    """Convert a decoded RaftMessage; WireError when a field is missing or out of range."""
    try:
        meta = None
        if w.snapshot_meta is not None:
            sm = w.snapshot_meta
            meta = SnapshotMeta(sm.index, sm.term, _conf_from_wire(sm.conf_state))
        return Message(
            MsgType(w.type), w.to, w.frm, w.term, w.log_term or 0, w.index or 0,
            tuple(Entry(e.term, e.index, EntryType(e.type), e.data or b"")
                  for e in (w.entries or ())),
            w.commit or 0, bool(w.reject), w.reject_hint or 0, w.context or b"", meta,
            w.offset or 0, w.data or b"", bool(w.done), w.tick or 0,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"bad raft message: {exc}") from None


def batch_to_wire(messages, cluster_id: int = 0):
    return RaftBatch(cluster_id, [message_to_wire(m) for m in messages])


def batch_from_wire(batch) -> list[Message]:
    return [message_from_wire(w) for w in (batch.messages or ())]


# ---- responses ----------------------------------------------------------------------------------
def error_response(error: str, reason: str = "", leader_hint: str = ""):
    assert error in ERRORS, error
    return Response(error=error, reason=reason, leader_hint=leader_hint or None)
