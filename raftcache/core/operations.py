"""Every operation a client can ask of a node, named once.

The table `OPERATIONS` is what the rest reads: the transports build their method tables from
it (the Thrift method's arguments are `fields`, its return value is the `result` field), the
node dispatches on `kind` and builds a write's state-machine command with `command`, the client
decides from `command` whether a call needs an exactly-once session and from `mutates` whether
a call whose fate is unknown is `OutcomeUnknown` or merely `Unavailable`.

Adding a write: its method in raftcache.thrift, an `Operation` here (request fields, the command
it proposes, the answer its result becomes), the command class (`commands.py`: tag, fields,
what it writes) and its `_apply_<name>` method (`statemachine.py`), and the client/CLI surface.
Access control follows from the command's declaration (`commands.Writes`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs

from .api import Request
from .cache import commands


class BadRequest(Exception):
    """A request that can never succeed as it is: answered InvalidRequest(reason)."""


Encode = Callable[[bytes, bytes], bytes]  # a value as the value codecs store it


class SizeLimits(Protocol):
    """What `Operation.check_sizes` reads: the node's config section (`config.NodeSection`)."""

    max_key_bytes: int
    max_value_bytes: int


@attrs.frozen(kw_only=True)
class Operation:
    # Request.op, the Thrift method, the metrics label, and the `name` of the command a write
    # proposes: one name through the layers
    name: str
    # What the Python client's method and the CLI's command are called, when not `name`: they
    # say set/delete, the wire put/remove (`set` and `delete` are reserved words in some of
    # Thrift's generator targets). This is the one place that maps the two.
    client_name: str = attrs.field()
    fields: tuple[str, ...]  # the Request fields it takes, in the Thrift method's argument order
    result: str | None  # the Response field that holds its answer (the method's return value)
    kind: str  # "write": proposes `command`; "read": get/mget; "node": the node answers itself
    mutates: bool  # may change state: a call of unknown fate is OutcomeUnknown, not Unavailable
    # write: (request, encode, max_batch_keys) -> the command to propose; BadRequest if invalid
    command: Callable[[Request, Encode, int], commands.Command] | None = None
    # write: the state machine's result -> the Response fields that carry it
    answer: Callable[[object], dict] | None = None
    doc: str = ""

    @client_name.default
    def _client_name(self) -> str:
        return self.name

    def check_sizes(self, request: Request, limits: SizeLimits) -> None:
        """Refuse (BadRequest) a request with a key or value over the node's limits, before
        anything is read or proposed: node.max_key_bytes bounds keys and invalidate's prefix,
        node.max_value_bytes the values of put, cas, append and mset."""
        keys = [request.key or b""] if "key" in self.fields else []
        values = [request.value or b""] if "value" in self.fields else []
        if "keys" in self.fields:
            keys += request.keys or ()
        if "items" in self.fields:
            items = request.items or {}
            keys += items.keys()
            values += items.values()
        what = "prefix" if self.name == "invalidate" else "key"
        _within(keys, limits.max_key_bytes, what, "node.max_key_bytes")
        _within(values, limits.max_value_bytes, "value", "node.max_value_bytes")


# ---- checks shared by the operations ------------------------------------------------------------
def key(value) -> bytes:
    if not value:
        raise BadRequest("a key is required")
    return value  # its size: Operation.check_sizes


def _within(blobs, limit: int, what: str, setting: str) -> None:
    longest = max(map(len, blobs), default=0)
    if longest > limit:
        raise BadRequest(f"a {what} of {longest} bytes; {setting} is {limit}")


def batch(items, limit: int, op: str):
    if not items:
        raise BadRequest(f"{op} needs at least one key")
    if len(items) > limit:
        raise BadRequest(f"{op} of {len(items)} keys; node.max_batch_keys is {limit}")
    return items


def ttl(request: Request) -> int | None:
    value = request.ttl_ms
    if value is None or value == 0:
        return None
    if not 0 < value <= commands.MAX_TTL_MS:
        raise BadRequest(f"ttl_ms must be between 1 and {commands.MAX_TTL_MS} (ten years)")
    return value


def _value(request: Request, op: str) -> bytes:
    if request.value is None:
        raise BadRequest(f"{op} needs a value")
    return request.value


# ---- the writes' commands -------------------------------------------------------------------------
def _put(r: Request, encode: Encode, _limit: int):
    k = key(r.key)
    return commands.Put(k, encode(k, _value(r, "put")), ttl(r))


def _incr(r: Request, encode: Encode, _limit: int):
    delta = 1 if r.delta is None else r.delta
    if type(delta) is not int or not -(1 << 63) <= delta < (1 << 63):
        raise BadRequest("delta must be a 64-bit signed integer")
    k = key(r.key)
    return commands.SealedIncr(k, encode(k, b"%d" % delta))  # sealed like a value


def _cas(r: Request, encode: Encode, _limit: int):
    if r.expected_version is None:
        raise BadRequest("cas needs expected_version and value")
    if r.expected_version < 0:
        raise BadRequest("expected_version must not be negative (0: the key is missing)")
    k = key(r.key)
    return commands.Cas(k, r.expected_version, encode(k, _value(r, "cas")), ttl(r))


def _mset(r: Request, encode: Encode, limit: int):
    items = batch(r.items, limit, "mset")
    return commands.MSet(tuple((key(k), encode(k, v)) for k, v in sorted(items.items())),
                         ttl(r))


def _cas_answer(result) -> dict:
    swapped, version = result
    return {"ok": swapped, "number": version}


# ---- the table --------------------------------------------------------------------------------------
OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation(name="put", client_name="set", fields=("key", "value", "ttl_ms", "header"),
              result="number", kind="write", mutates=True, command=_put,
              answer=lambda version: {"number": version},
              doc="store a value; answers its version"),
    Operation(name="remove", client_name="delete", fields=("key", "header"), result="ok",
              kind="write", mutates=True,
              command=lambda r, _e, _l: commands.Remove(key(r.key)),
              answer=lambda existed: {"ok": bool(existed)},
              doc="delete a key; answers whether it existed"),
    Operation(name="cas", fields=("key", "expected_version", "value", "ttl_ms", "header"),
              result="ok", kind="write", mutates=True, command=_cas, answer=_cas_answer,
              doc="store a value if the key's version is expected_version (0: missing)"),
    Operation(name="incr", fields=("key", "delta", "header"), result="number", kind="write",
              mutates=True,
              command=_incr,
              answer=lambda value: {"number": value},
              doc="add delta to a decimal integer (missing: 0); answers the new value"),
    Operation(name="invalidate", fields=("key", "header"),  # the IDL calls the key `prefix`
              result="number", kind="write", mutates=True,
              command=lambda r, _e, _l: commands.Invalidate(r.key or b""),
              answer=lambda count: {"number": count},
              doc="delete every key with a prefix; answers how many"),
    Operation(name="mset", fields=("items", "ttl_ms", "header"), result="versions",
              kind="write", mutates=True, command=_mset,
              answer=lambda versions: {"versions": list(versions)},
              doc="store several values at once; answers their versions"),
    Operation(name="append", fields=("key", "value", "header"), result="number", kind="write",
              mutates=True,
              command=lambda r, encode, _l: commands.Append(key(r.key),
                                                            encode(r.key, _value(r, "append"))),
              answer=lambda length: {"number": length},
              doc="append bytes to a value (missing: empty); answers the new length"),
    Operation(name="get", fields=("key", "consistency", "header"), result="result",
              kind="read", mutates=False, doc="a value and its version"),
    Operation(name="mget", fields=("keys", "consistency", "header"), result="results",
              kind="read", mutates=False, doc="several values, read at one point"),
    Operation(name="status", fields=(), result="status", kind="node", mutates=False,
              doc="this node's view of the cluster"),
    Operation(name="transfer_leader", fields=("node_id", "header"), result="status",
              kind="node", mutates=False,
              doc="hand leadership to node_id; answers the leader's status"),
    Operation(name="change_member", fields=("change", "node_id", "header", "address"),
              result="status", kind="node", mutates=True,
              doc="add-voter, add-learner, remove or update-address of node_id (at address: "
                  "the log carries it to every node); answers the leader's status"),
    Operation(name="snapshot", fields=("offset", "index", "header"), result="part",
              kind="node", mutates=False,
              doc="a backup of the whole cache from the leader, a part at a time"),
    Operation(name="admin", fields=("action", "arguments", "header"), result="text",
              kind="node", mutates=True,
              doc="an admin action of a security plugin (revoke, keys-rotate, ...); "
                  "answers a JSON object"),
)}

# The Python client's and the CLI's name -> the operation (`Operation.client_name`).
BY_CLIENT_NAME: dict[str, Operation] = {op.client_name: op for op in OPERATIONS.values()}


def needs_session(op: str) -> bool:
    """Whether a client tags `op` with (client id, seq): writes that become state-machine
    commands are applied exactly once."""
    operation = OPERATIONS.get(op)
    return operation is not None and operation.command is not None


def mutates(op: str) -> bool:
    operation = OPERATIONS.get(op)
    return operation is not None and operation.mutates
