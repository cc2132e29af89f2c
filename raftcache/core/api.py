"""What a node is asked and what it answers, as plain values (like h11's events).

Transports turn their own wire format into a `Request` and a `Response` back into it
(`raftcache.wire` for the Thrift IDL both built-in transports speak); the node, the client and
the CLI deal only in these. Field names follow `raftcache.thrift` so that the conversion is a
copy. Every value here is frozen: a request handed to a node, or a response handed back, cannot
change under anyone's feet.
"""

from __future__ import annotations

import attrs

# The errors a call can end with; what each promises is in raftcache/errors.py.
ERRORS = ("NotLeader", "Unauthorized", "InvalidRequest", "Unavailable", "OutcomeUnknown")


@attrs.frozen
class RequestHeader:
    token: str | None = None  # signed RBAC token
    client_id: str | None = None  # exactly-once: (client_id, seq) names a write
    seq: int | None = None
    timeout_ms: int | None = None  # the caller's deadline for this call
    forwarded: bool | None = None  # proxied by a follower: the receiver must not forward again
    # Set by the node that forwards a call: the CN of its caller's client certificate.
    # Transports take it only from a node's connection (`tls.caller_certificate`).
    certificate: str | None = None


@attrs.frozen
class Request:
    """One call: `op` names an operation of `raftcache.core.operations.OPERATIONS`; which
    other fields it uses is that operation's `fields`."""

    op: str
    key: bytes | None = None
    value: bytes | None = None
    ttl_ms: int | None = None
    expected_version: int | None = None
    delta: int | None = None
    consistency: str | None = None
    keys: list | None = None
    items: dict | None = None
    header: RequestHeader | None = None
    node_id: int | None = None
    change: str | None = None
    action: str | None = None
    arguments: list | None = None
    address: str | None = None  # change_member: where peers reach node_id ("host:port")
    offset: int | None = None  # snapshot: the byte to read from
    index: int | None = None  # snapshot: the image being read (0: take a new one)


@attrs.frozen
class GetResult:
    found: bool
    value: bytes = b""
    version: int = 0  # the log index of the entry that last wrote the key


@attrs.frozen
class SnapshotPart:
    """Part of a backup: an image of the whole state machine at log `index` (committed, and
    at least everything acknowledged before it was asked for)."""

    index: int
    term: int  # of the entry at `index`
    size: int  # bytes of the whole image
    sha256: str  # of the whole image, hex
    offset: int = 0  # where `data` starts in it
    data: bytes = b""


@attrs.frozen
class NodeStatus:
    id: int
    address: str
    role: str
    term: int
    commit: int
    applied: int
    leader: int
    leader_address: str
    voters: list = attrs.Factory(list)
    learners: list = attrs.Factory(list)
    # node id -> the address peers reach it at, for this node's view of the members (where
    # the log places it; never this node's own `cluster.dial` routes)
    peer_addresses: dict = attrs.Factory(dict)
    # members that have joined (ran and hold the log): one of them with no Raft state, a
    # lost disk, is refused at start instead of voting twice
    joined: list = attrs.Factory(list)
    metrics_url: str | None = None  # its Prometheus endpoint, when node.metrics_address is set
    # its cluster time (ms): what it stamps writes and judges expiry by (docs/security.md)
    cluster_time_ms: int | None = None


@attrs.frozen
class Response:
    """An answer: `error` names one of ERRORS, or the fields of the operation's result are set
    (see `Operation.result`)."""

    error: str | None = None
    reason: str | None = None
    leader_hint: str | None = None
    result: GetResult | None = None  # get
    results: list | None = None  # mget: GetResults
    number: int | None = None  # put/cas: version; incr: value; invalidate: count; append: length
    ok: bool | None = None  # remove/cas
    status: NodeStatus | None = None
    versions: list | None = None  # mset
    text: str | None = None  # admin: a JSON object
    part: SnapshotPart | None = None  # snapshot


def error(kind: str, reason: str = "", leader_hint: str = "") -> Response:
    """A failed call's answer; `kind` is one of ERRORS."""
    assert kind in ERRORS, kind
    return Response(error=kind, reason=reason, leader_hint=leader_hint or None)
