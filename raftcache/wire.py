"""The wire format: the Thrift IDL loaded once, and conversions to and from the core's values
(Raft messages, and the node's requests and responses of `raftcache.core.api`).

Both transports speak it: `thrift` as a Thrift service, `tcp-tls` as Thrift-binary structs in
its own frames. Decoding untrusted bytes raises `WireError`, never anything else.
"""

from __future__ import annotations

import io
import os
import struct

import attrs
import thriftpy2
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.transport import TCyBufferedTransport
from thriftpy2.utils import serialize

from raftcache.core import api
from raftcache.core.raft.messages import (
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
SnapshotPart = idl.SnapshotPart
RequestHeader = idl.RequestHeader
RaftBatch = idl.RaftBatch
RaftCacheService = idl.RaftCache

_PROTOCOL = TCyBinaryProtocolFactory()


class WireError(ValueError):
    """Bytes that are not a valid encoding of what was expected."""


class TooManyItems(WireError):
    """A well-formed value with more list, set or map elements than the caller allows: an
    invalid request to answer, not a broken stream."""


def encode(obj) -> bytes:
    return serialize(obj, _PROTOCOL)


def decode(cls, data: bytes, max_items: int | None = None):
    """Decode `data` as a `cls` (e.g. wire.Request); WireError on anything but a valid encoding,
    TooManyItems when its containers hold more than `max_items` elements in all.

    thriftpy2's Cython decoder trusts the lengths and counts it reads: from an in-memory buffer
    a 12-byte payload claiming a 64 KiB string comes back padded with uninitialised heap, and a
    list claiming 2**31 items of an unknown type spins in C for seconds while the hub stands
    still. So `check_struct` first (bounds, types, counts), then decode over a buffered
    transport, which raises end-of-file instead of inventing bytes.
    """
    end = check_struct(data, 0, max_items)
    if end != len(data):
        raise WireError(f"{len(data) - end} stray bytes after the {cls.__name__}")
    try:
        trans = TCyBufferedTransport(io.BytesIO(data), buf_size=max(len(data), 1024))
        obj = cls()
        obj.read(_PROTOCOL.get_protocol(trans))
        return obj
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
        m.clock_ms,
    )


def _required(value, what: str) -> int:
    if type(value) is not int:
        raise WireError(f"bad raft message: {what} is missing")
    return value


def message_from_wire(w) -> Message:
    """Convert a decoded RaftMessage; WireError when a field is missing or out of range."""
    try:
        meta = None
        if w.snapshot_meta is not None:
            sm = w.snapshot_meta
            meta = SnapshotMeta(_required(sm.index, "snapshot index"),
                                _required(sm.term, "snapshot term"),
                                _conf_from_wire(sm.conf_state))
        return Message(
            MsgType(w.type), _required(w.to, "to"), _required(w.frm, "frm"),
            _required(w.term, "term"), w.log_term or 0, w.index or 0,
            tuple(Entry(_required(e.term, "entry term"), _required(e.index, "entry index"),
                        EntryType(e.type), e.data or b"") for e in (w.entries or ())),
            w.commit or 0, bool(w.reject), w.reject_hint or 0, w.context or b"", meta,
            w.offset or 0, w.data or b"", bool(w.done), w.tick or 0, w.clock_ms or 0,
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"bad raft message: {exc}") from None


def batch_to_wire(messages, cluster_id: int = 0):
    return RaftBatch(cluster_id, [message_to_wire(m) for m in messages])


def batch_from_wire(batch) -> list[Message]:
    return [message_from_wire(w) for w in (batch.messages or ())]


# ---- requests and responses ---------------------------------------------------------------------
# The IDL's structs and the core's values share their field names: a conversion is a copy.
def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in attrs.fields(cls))


_HEADER, _REQUEST = _fields(api.RequestHeader), _fields(api.Request)
_GET, _STATUS, _RESPONSE = _fields(api.GetResult), _fields(api.NodeStatus), _fields(api.Response)
_PART = _fields(api.SnapshotPart)


def header_from_wire(w) -> api.RequestHeader | None:
    return None if w is None else api.RequestHeader(*(getattr(w, f) for f in _HEADER))


def header_to_wire(h: api.RequestHeader | None):
    return None if h is None else RequestHeader(*(getattr(h, f) for f in _HEADER))


def request_from_wire(w) -> api.Request:
    fields = {f: getattr(w, f) for f in _REQUEST}
    fields["header"] = header_from_wire(w.header)
    return api.Request(**fields)


def request_to_wire(r: api.Request):
    fields = {f: getattr(r, f) for f in _REQUEST}
    fields["header"] = header_to_wire(r.header)
    return Request(**fields)


def _get_from_wire(w) -> api.GetResult:
    return api.GetResult(bool(w.found), w.value or b"", w.version or 0)


def value_from_wire(name: str, w):
    """A Response field's value (`name`) as the core has it."""
    if w is None:
        return None
    if name == "result":
        return _get_from_wire(w)
    if name == "results":
        return [_get_from_wire(g) for g in w]
    if name == "status":
        return api.NodeStatus(*(getattr(w, f) for f in _STATUS))
    if name == "part":
        return api.SnapshotPart(*(getattr(w, f) for f in _PART))
    return w


def value_to_wire(name: str, v):
    """A Response field's value (`name`) as the IDL has it."""
    if v is None:
        return None
    if name == "result":
        return GetResult(*(getattr(v, f) for f in _GET))
    if name == "results":
        return [GetResult(*(getattr(g, f) for f in _GET)) for g in v]
    if name == "status":
        return NodeStatus(*(getattr(v, f) for f in _STATUS))
    if name == "part":
        return SnapshotPart(*(getattr(v, f) for f in _PART))
    return v


def response_from_wire(w) -> api.Response:
    return api.Response(**{f: value_from_wire(f, getattr(w, f)) for f in _RESPONSE})


def response_to_wire(r: api.Response):
    return Response(**{f: value_to_wire(f, getattr(r, f)) for f in _RESPONSE})


# ---- checking untrusted bytes before thriftpy2 decodes them -------------------------------------
# thriftpy2's Cython decoder trusts the lengths it reads: from a memory buffer, a truncated
# string comes back padded with uninitialised memory, and a list of an unknown element type
# with a count of 2**31 spins in C for seconds (per list) while the hub stands still. Walking
# the bytes first, in Python, costs a few microseconds per request and rules both out.
_FIXED_WIDTH = {2: 1, 3: 1, 4: 8, 6: 2, 8: 4, 10: 8}  # bool, byte, double, i16, i32, i64
_STRING_TYPES = (11, 18)  # string/binary (thriftpy2 also knows 18)
_STRUCT, _MAP, _SET, _LIST = 12, 13, 14, 15
_VALUE_TYPES = frozenset(_FIXED_WIDTH) | {11, 18, _STRUCT, _MAP, _SET, _LIST}
_I32 = struct.Struct(">i")
MAX_DEPTH = 64  # thriftpy2's own nesting limit


def check_struct(data: bytes, pos: int = 0, max_items: int | None = None) -> int:
    """Check that a Thrift-binary struct starts at `data[pos]` and lies wholly inside `data`;
    return where it ends. WireError when it does not (truncated, unknown type, absurd count,
    nested deeper than MAX_DEPTH); TooManyItems when its containers announce more than
    `max_items` elements in all (checked at each container's header, before any element: a
    16 MiB list of empty structs would otherwise cost seconds of walking and decoding)."""
    budget = [len(data) if max_items is None else max_items]
    try:
        end = _walk(data, pos, _STRUCT, MAX_DEPTH, budget)
    except (IndexError, struct.error):
        raise WireError("truncated Thrift value") from None
    if end > len(data):
        raise WireError("truncated Thrift value")
    return end


def _walk(data: bytes, pos: int, ttype: int, depth: int, budget: list) -> int:
    width = _FIXED_WIDTH.get(ttype)
    if width is not None:
        return pos + width
    if ttype in _STRING_TYPES:
        (n,) = _I32.unpack_from(data, pos)
        if n < 0:
            raise WireError("negative string length")
        return pos + 4 + n
    if depth <= 0:
        raise WireError(f"Thrift value nested deeper than {MAX_DEPTH}")
    if ttype == _STRUCT:
        fixed, unpack = _FIXED_WIDTH.get, _I32.unpack_from
        while True:
            ftype = data[pos]
            if ftype == 0:
                return pos + 1
            pos += 3
            # Scalars and strings inline: most fields are, and a call per field was the cost.
            width = fixed(ftype)
            if width is not None:
                pos += width
            elif ftype in _STRING_TYPES:
                (n,) = unpack(data, pos)
                if n < 0:
                    raise WireError("negative string length")
                pos += 4 + n
            elif ftype in _VALUE_TYPES:
                pos = _walk(data, pos, ftype, depth - 1, budget)
            else:
                raise WireError(f"unknown Thrift type {ftype}")
    if ttype == _LIST or ttype == _SET:
        types = (data[pos],)
        (n,) = _I32.unpack_from(data, pos + 1)
        pos += 5
    elif ttype == _MAP:
        types = (data[pos], data[pos + 1])
        (n,) = _I32.unpack_from(data, pos + 2)
        pos += 6
    else:
        raise WireError(f"unknown Thrift type {ttype}")
    for t in types:
        if t not in _VALUE_TYPES:
            raise WireError(f"unknown Thrift element type {t}")
    if n < 0 or n > len(data) - pos:  # every element takes at least one byte
        raise WireError(f"container of {n} elements in {len(data) - pos} bytes")
    budget[0] -= n
    if budget[0] < 0:
        raise TooManyItems(f"more list, set or map elements than the {budget[0] + n} still "
                           "allowed in one request")
    if all(t in _FIXED_WIDTH for t in types):
        return pos + n * sum(_FIXED_WIDTH[t] for t in types)
    for _ in range(n):
        for t in types:
            pos = _walk(data, pos, t, depth - 1, budget)
    return pos
