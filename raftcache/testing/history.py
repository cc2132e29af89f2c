"""Jepsen-style operation histories, as recorded by test runners and the simulator.

Every client operation is recorded twice: when it is invoked and when it completes. A completion
carries one of three statuses:

* ``ok``: the operation happened, and ``result`` is what the system answered;
* ``fail``: the operation certainly did not take effect (the system said so before doing anything);
* ``info``: indeterminate (a timeout, a lost connection). The operation may take effect at any
  time after its invocation, or never; the checker treats its completion time as +infinity.

An operation still pending when the history ends counts as ``info``.

Operations act on one register per key, or, for ``incr``, on one counter per key (a key is
one or the other):

============  =====================  ====================================================
kind          arguments              result on ``ok``
============  =====================  ====================================================
``read``      --                     ``(value, version)``, or ``None`` if the key is absent
``write``     ``value``              the new version (int), or ``None`` if unknown
``delete``    --                     whether the key existed (bool), or ``None`` if unknown
``cas``       ``expected``, value    ``(True, new_version)`` or ``(False, None)``
``incr``      ``value``: the delta   the new value (int)
============  =====================  ====================================================

A read of a counter returns ``(value, version)`` too, with the value as an int.

Values are ``bytes`` or ``str`` and are treated opaquely. Versions are assigned by the system (the
Raft log index of the write). Times come from a single monotonic clock, the runner's or the
simulator's step counter; ints and floats both work.

A history saves as JSON lines, one event per line, in the order they were recorded.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import threading
import time as _time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import attrs

__all__ = ["Event", "History", "Kind", "Operation", "Status"]


class Kind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    DELETE = "delete"
    CAS = "cas"
    INCR = "incr"


class Status(enum.StrEnum):
    OK = "ok"
    FAIL = "fail"
    INFO = "info"


def _opaque(value: Any) -> Any:
    # bytearray/memoryview compare equal to bytes but are unhashable; the checker hashes values.
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


@attrs.frozen(kw_only=True)
class Operation:
    """One completed (or, at the end of a history, abandoned) operation."""

    id: int
    process: Hashable
    kind: Kind = attrs.field(converter=Kind)
    key: Hashable
    value: Any = None
    expected: int | None = None
    result: Any = None
    status: Status = attrs.field(converter=Status)
    invoke_time: float
    complete_time: float | None  # as recorded; None if never completed. `info` acts as +inf.

    def describe(self) -> str:
        """A one-line summary, e.g. ``#12 p3 cas(5 -> 'b') -> ok (True, 9)``."""
        if self.kind is Kind.WRITE:
            call = f"write({self.value!r})"
        elif self.kind is Kind.CAS:
            call = f"cas({self.expected} -> {self.value!r})"
        elif self.kind is Kind.INCR:
            call = f"incr({self.value:+d})"
        else:
            call = str(self.kind)
        outcome = f"ok {self.result!r}" if self.status is Status.OK else str(self.status)
        return f"#{self.id} p{self.process} {call} -> {outcome}"


@attrs.frozen(kw_only=True)
class Event:
    """One line of a history: an invocation (``type="invoke"``) or a completion."""

    type: str  # "invoke", or a Status value
    id: int
    time: float
    process: Hashable = None
    kind: Kind | None = None
    key: Hashable = None
    value: Any = None
    expected: int | None = None
    result: Any = None


def _normalize_result(kind: Kind, result: Any) -> Any:
    """Check an ``ok`` result has the shape its kind promises; lists become tuples (JSON)."""
    if kind is Kind.READ:
        if result is None:
            return None
        value, version = result
        if version is not None and not isinstance(version, int):
            raise ValueError(f"read version must be an int or None, got {version!r}")
        return (_opaque(value), version)
    if kind is Kind.WRITE:
        if result is not None and (isinstance(result, bool) or not isinstance(result, int)):
            raise ValueError(f"write result must be the new version (int) or None, got {result!r}")
        return result
    if kind is Kind.INCR:
        if isinstance(result, bool) or not isinstance(result, int):
            raise ValueError(f"incr result must be the new value (int), got {result!r}")
        return result
    if kind is Kind.DELETE:
        if result is not None and not isinstance(result, bool):
            raise ValueError(f"delete result must be a bool or None, got {result!r}")
        return result
    # cas: an ok cas knows whether it swapped; an unknown outcome is an `info` completion.
    if result is None:
        raise ValueError("cas result must be (True, new_version) or (False, None); use info()")
    swapped, version = result
    if not isinstance(swapped, bool) or (not swapped and version is not None):
        raise ValueError(f"cas result must be (True, new_version) or (False, None), got {result!r}")
    if version is not None and not isinstance(version, int):
        raise ValueError(f"cas new version must be an int or None, got {version!r}")
    return (swapped, version)


@attrs.define
class History:
    """Records invocations and completions; safe to use from several threads or greenlets.

    ``clock`` supplies the time when a call does not pass ``time=`` explicitly; do not mix the
    two styles unless the explicit times come from the same clock.
    """

    clock: Callable[[], float] = attrs.field(default=_time.monotonic, eq=False, repr=False)
    _events: list[Event] = attrs.field(factory=list, init=False)
    _invocations: list[Event] = attrs.field(factory=list, init=False, eq=False, repr=False)
    _completions: dict[int, Event] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    _busy: dict[Hashable, int] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, eq=False, repr=False)

    def __len__(self) -> int:
        return len(self._invocations)

    def invoke(
        self,
        process: Hashable,
        kind: Kind | str,
        key: Hashable,
        value: Any = None,
        expected: int | None = None,
        *,
        time: float | None = None,
    ) -> int:
        """Record an invocation and return the operation's id, to pass to ok/fail/info."""
        kind = Kind(kind)
        value = _opaque(value)
        if kind in (Kind.WRITE, Kind.CAS) and value is None:
            raise ValueError(f"{kind} needs a value")
        if kind is Kind.INCR and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"incr needs an int delta, got {value!r}")
        if kind in (Kind.READ, Kind.DELETE) and value is not None:
            raise ValueError(f"{kind} takes no value")
        if (kind is Kind.CAS) != (expected is not None):
            raise ValueError("expected (a version) is required for cas, and only for cas")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
            raise ValueError(f"expected must be an int version, got {expected!r}")
        with self._lock:
            t = self.clock() if time is None else time
            # Histories are Jepsen-style: a process does one thing at a time.
            if process in self._busy:
                raise ValueError(
                    f"process {process!r} invoked while op #{self._busy[process]} is pending"
                )
            op_id = len(self._invocations)
            event = Event(
                type="invoke",
                id=op_id,
                time=t,
                process=process,
                kind=kind,
                key=_opaque(key),
                value=value,
                expected=expected,
            )
            self._invocations.append(event)
            self._events.append(event)
            self._busy[process] = op_id
            return op_id

    def ok(self, op: int, result: Any = None, *, time: float | None = None) -> None:
        """The operation happened and the system answered ``result``."""
        self._complete(op, Status.OK, result, time)

    def fail(self, op: int, *, time: float | None = None) -> None:
        """The operation certainly did not take effect."""
        self._complete(op, Status.FAIL, None, time)

    def info(self, op: int, *, time: float | None = None) -> None:
        """The outcome is unknown: it may take effect at any later time, or never."""
        self._complete(op, Status.INFO, None, time)

    def _complete(self, op: int, status: Status, result: Any, time: float | None) -> None:
        with self._lock:
            if not 0 <= op < len(self._invocations):
                raise ValueError(f"no operation #{op}")
            if op in self._completions:
                raise ValueError(f"operation #{op} already completed")
            invocation = self._invocations[op]
            if status is Status.OK:
                result = _normalize_result(invocation.kind, result)
            t = self.clock() if time is None else time
            if t < invocation.time:
                raise ValueError(f"operation #{op} completes at {t}, before its invocation")
            event = Event(type=str(status), id=op, time=t, result=result)
            self._completions[op] = event
            self._events.append(event)
            del self._busy[invocation.process]

    def pending(self) -> tuple[int, ...]:
        """Ids of operations invoked but not (yet) completed."""
        with self._lock:
            return tuple(sorted(self._busy.values()))

    def events(self) -> tuple[Event, ...]:
        with self._lock:
            return tuple(self._events)

    def operations(self) -> list[Operation]:
        """Every operation, in invocation order; the still pending ones as ``info``."""
        with self._lock:
            ops = []
            for inv in self._invocations:
                done = self._completions.get(inv.id)
                ops.append(
                    Operation(
                        id=inv.id,
                        process=inv.process,
                        kind=inv.kind,
                        key=inv.key,
                        value=inv.value,
                        expected=inv.expected,
                        result=None if done is None else done.result,
                        status=Status.INFO if done is None else done.type,
                        invoke_time=inv.time,
                        complete_time=None if done is None else done.time,
                    )
                )
            return ops

    # -- persistence ------------------------------------------------------------------------

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON lines (bytes survive the trip, as tagged base64)."""
        with open(path, "w", encoding="utf-8") as f:
            for event in self.events():
                f.write(json.dumps(_event_to_json(event), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        with open(path, encoding="utf-8") as f:
            return cls.from_json_lines(f)

    @classmethod
    def from_json_lines(cls, lines: Iterable[str]) -> History:
        """Replay dumped events; the replay re-validates them and reassigns the same ids."""
        history = cls()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            raw = json.loads(line)
            data = {k: _decode(v) for k, v in raw.items()}
            if data["type"] == "invoke":
                op = history.invoke(
                    data["process"],
                    data["kind"],
                    data["key"],
                    data.get("value"),
                    data.get("expected"),
                    time=data["time"],
                )
                if op != data["id"]:
                    raise ValueError(f"line {lineno}: invocation #{data['id']} out of order")
            else:
                history._complete(
                    data["id"], Status(data["type"]), data.get("result"), data["time"]
                )
        return history


def _event_to_json(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"type": event.type, "id": event.id, "time": event.time}
    if event.type == "invoke":
        out["process"] = _encode(event.process)
        out["kind"] = str(event.kind)
        out["key"] = _encode(event.key)
        if event.value is not None:
            out["value"] = _encode(event.value)
        if event.expected is not None:
            out["expected"] = event.expected
    elif event.result is not None:
        out["result"] = _encode(event.result)
    return out


def _encode(x: Any) -> Any:
    # JSON has no bytes and no tuples: bytes become {"b64": ...}, tuples become lists, and
    # histories never hold lists or dicts of their own, so decoding is unambiguous.
    if isinstance(x, bytes):
        return {"b64": base64.b64encode(x).decode("ascii")}
    if isinstance(x, tuple):
        return [_encode(item) for item in x]
    if x is None or isinstance(x, str | int | float):
        return x
    raise TypeError(f"cannot save {type(x).__name__} in a history: {x!r}")


def _decode(x: Any) -> Any:
    if isinstance(x, dict):
        return base64.b64decode(x["b64"])
    if isinstance(x, list):
        return tuple(_decode(item) for item in x)
    return x
