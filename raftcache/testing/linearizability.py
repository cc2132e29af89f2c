"""A linearizability checker for raftcache histories (Wing & Gong / Lowe, as in porcupine).

Linearizability is compositional, so the history is split per key and each key's operations are
checked on their own against a sequential model (a versioned register by default):

1. A quick, independent pre-check: a version is one Raft log entry, so it has one value. Two
   different values reported for one version is an anomaly however the operations are ordered.
2. The Wing & Gong search with Lowe's memoization: walk a list of call/return entries sorted by
   time, linearize any call whose model step is legal, backtrack when the earliest remaining
   return belongs to an operation that could not be placed, and never revisit a (set of
   linearized operations, model state) configuration. The search is iterative.

Indeterminate (``info``) operations may be linearized anywhere after their invocation, or never:
the search succeeds as soon as every determinate operation is placed. ``fail`` operations, and
``info`` reads, are dropped. Info ops are what makes checking hard (each may or may not have
happened, at any later time), so the search works to tame them: interchangeable info ops are
only tried in one order, configurations that used more of them than one already tried are
pruned, an info write whose value a read returned must take effect before that read returns,
and a key whose search runs long is also checked as a cheaper, weaker history (info ops may
take effect more than once) whose failure is just as much a proof. A ``budget`` bounds each search; a key
that exhausts it is reported "undecided", never passed.

For a key that fails, the evidence is shrunk to a *window*: the shortest run of that key's
operations (in invocation order) that still cannot be linearized when it starts from an unknown
register state and every operation outside it is relaxed (may or may not have happened, result
unknown, but still not after it returned). Relaxing only removes constraints, so a failing
window proves the whole history is not linearizable: the table from :func:`format_anomaly` is
all one needs to read.
"""

from __future__ import annotations

import bisect
import enum
import math
import sys
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import attrs

from raftcache.testing.history import History, Kind, Operation, Status

__all__ = [
    "ABSENT",
    "ANY",
    "CheckResult",
    "KeyAnomaly",
    "Model",
    "RegisterModel",
    "check",
    "format_anomaly",
    "version_conflicts",
]

State = Hashable


class _Special(enum.Enum):
    ABSENT = "absent"
    ANY = "any"
    UNREAD = "unread"

    def __repr__(self) -> str:
        return self.value


ABSENT = _Special.ABSENT  # the key does not exist
ANY = _Special.ANY  # could be any state: where a window of the history starts
_UNREAD = _Special.UNREAD  # stands for any value written by an info op that no read returned


class Model:
    """A sequential specification. States must be hashable (the search memoizes on them).

    ``step`` returns the state after ``op``, or ``None`` if ``op`` (with its result) is impossible
    in ``state``. An ``info`` op has no result: ``step`` applies it as if it took effect, and
    returns ``None`` if taking effect is impossible or indistinguishable from not happening (the
    search also considers never applying it). ``step`` may look only at the op's kind, value,
    expected, result and status: the search treats ops equal in those as interchangeable.
    """

    def init(self) -> State:
        raise NotImplementedError

    def unknown(self) -> State:
        """A state standing for every state; windows after the first operation start here."""
        raise NotImplementedError

    def step(self, state: State, op: Operation) -> State | None:
        raise NotImplementedError

    def simplify(
        self, ops: list[Operation], initial: State, deadlines: Mapping[int, float]
    ) -> tuple[list[Operation], Mapping[int, float]]:
        """Rewrite a search problem into an easier one with the same verdict.

        ``deadlines`` maps ids of optional (info) ops to the time by which they must be
        linearized, if at all; the others may be linearized any time after their invocation.
        Returns the ops to search and the deadlines, either possibly tightened. Default: as is.
        """
        return ops, deadlines

    def describe(self, state: State) -> str:
        return repr(state)


class RegisterModel(Model):
    """A versioned register: ``ABSENT``, ``ANY`` or ``(value, version)``; version None = unknown."""

    def init(self) -> State:
        return ABSENT

    def unknown(self) -> State:
        return ANY

    def step(self, state: State, op: Operation) -> State | None:
        kind = op.kind
        if kind is Kind.READ:
            result = op.result
            if result is None:
                return ABSENT if state is ABSENT or state is ANY else None
            if state is ANY:
                return result
            if state is ABSENT or state[0] != result[0]:
                return None
            known, seen = state[1], result[1]
            if known is None:
                return result  # a read may refine an unknown version
            return state if seen is None or seen == known else None
        if kind is Kind.WRITE:
            return (op.value, op.result if op.status is Status.OK else None)
        if kind is Kind.DELETE:
            if op.status is Status.OK and op.result is not None and state is not ANY:
                if op.result != (state is not ABSENT):
                    return None
            return ABSENT
        # cas. A swap against an unknown version is accepted as if the version matched.
        swaps = state is ANY or (
            state is not ABSENT and (state[1] is None or state[1] == op.expected)
        )
        if op.status is not Status.OK:
            # A failed swap changes nothing, which is the same as never linearizing it.
            return (op.value, None) if swaps else None
        swapped, new_version = op.result
        if swapped:
            return (op.value, new_version) if swaps else None
        if state is ANY or state is ABSENT or state[1] != op.expected:
            return state
        return None

    def simplify(
        self, ops: list[Operation], initial: State, deadlines: Mapping[int, float]
    ) -> tuple[list[Operation], Mapping[int, float]]:
        def deadline(op: Operation) -> float:
            if op.status is Status.INFO:
                return deadlines.get(op.id, math.inf)
            return op.complete_time

        # An info read constrains nothing. An info write of a value nobody read can only make
        # later reads fail, unless a cas, or a delete that found the key, might come after it:
        # those can need the key merely present. Then it has to stay.
        first_read: dict[Any, float] = {}  # value -> earliest return of a read that saw it
        late_guard = -math.inf  # latest moment a delete/cas could still be linearized
        for op in ops:
            if op.kind is Kind.READ and op.status is Status.OK and op.result is not None:
                value = op.result[0]
                first_read[value] = min(first_read.get(value, math.inf), op.complete_time)
            elif op.kind is Kind.CAS or (op.kind is Kind.DELETE and op.result is True):
                late_guard = max(late_guard, deadline(op))
        out = []
        for op in ops:
            if op.status is Status.INFO:
                if op.kind is Kind.READ:
                    continue
                if op.kind is not Kind.DELETE and op.value not in first_read:
                    if op.kind is Kind.WRITE and op.invoke_time > late_guard:
                        continue
                    # Registers holding unread values with unknown versions all behave alike;
                    # one shared placeholder value lets the memo see that.
                    op = attrs.evolve(op, value=_UNREAD)
            out.append(op)
        if initial is ANY:
            return out, deadlines

        # From a known start, a value can only come from an op writing it. If one info op is
        # the only writer of a value some read returned, it must take effect before that read
        # returns: that is its deadline (it stops being "may happen at any time").
        writers = Counter(op.value for op in out if op.kind is Kind.WRITE or op.kind is Kind.CAS)
        if initial is not ABSENT:
            writers[initial[0]] += 1  # the initial state is a writer too
        tightened = dict(deadlines)
        kept = []
        for op in out:
            if op.status is Status.INFO and op.kind is not Kind.DELETE:
                seen_by = first_read.get(op.value, math.inf)
                if seen_by < math.inf and writers[op.value] == 1:
                    if seen_by < op.invoke_time:
                        continue  # too late to explain the read, which fails regardless
                    tightened[op.id] = min(seen_by, deadline(op))
            kept.append(op)
        return kept, tightened

    def describe(self, state: State) -> str:
        if state is ABSENT:
            return "absent"
        if state is ANY:
            return "unknown"
        value, version = state
        shown = "a value no read returned" if value is _UNREAD else repr(value)
        return f"{shown} @ version {'?' if version is None else version}"


@attrs.frozen
class KeyAnomaly:
    """Evidence that one key's operations are not linearizable, or that it could not be told.

    ``kind`` is one of:

    * ``"version-conflict"``: ``window`` holds the two operations that disagree;
    * ``"not-linearizable"``: ``window`` is the shrunk run of operations (see the module doc);
    * ``"undecided"``: the search gave up (see ``check``'s ``budget``); ``window`` is empty.
    """

    key: Any
    kind: str
    message: str
    window: tuple[Operation, ...]


@attrs.frozen
class CheckResult:
    ok: bool
    anomalies: tuple[KeyAnomaly, ...]
    keys_checked: int
    operations_checked: int  # operations that reached the search (no fails, no info reads, ...)


def check(
    history: History | Iterable[Operation],
    model: Model | None = None,
    *,
    shrink: bool = True,
    budget: int | None = None,
) -> CheckResult:
    """Check a history (or its operations) for linearizability, key by key.

    ``budget`` caps the configurations one search may visit (roughly 100,000 a second); by
    default 1,000,000 plus 50 per operation of the key. A linearizable history needs one to a
    few dozen per operation (more with more concurrency on the key); the cap matters when a
    key with many info operations is *not* linearizable, where the exact search is
    exponential. A key given up on is reported as an ``"undecided"`` anomaly: ``ok`` is only
    ever true for a proof.
    """
    model = RegisterModel() if model is None else model
    ops = history.operations() if isinstance(history, History) else list(history)
    by_key: dict[Any, list[Operation]] = {}
    for op in ops:
        if op.kind is Kind.INCR and isinstance(model, RegisterModel):
            raise ValueError(f"{op.describe()} on {op.key!r}: a counter, not a register (leave "
                             "counter keys out; raftcache.testing.jepsen checks them)")
        by_key.setdefault(op.key, []).append(op)

    anomalies: list[KeyAnomaly] = []
    checked = 0
    for key, key_ops in by_key.items():
        live = [op for op in key_ops if op.status is not Status.FAIL]
        live.sort(key=lambda op: (op.invoke_time, op.id))
        if isinstance(model, RegisterModel):
            anomalies.extend(version_conflicts(key, live))
        original = {op.id: op for op in live}  # simplify() may rewrite ops; report the real ones
        initial = model.init()
        live, deadlines = model.simplify(live, initial, {})
        checked += len(live)
        key_budget = 1_000_000 + 50 * len(live) if budget is None else budget
        outcome, weaker_budget = _decide(model, live, initial, deadlines, key_budget)
        if outcome.ok:
            continue
        if outcome.ok is None:
            anomalies.append(
                KeyAnomaly(
                    key=key,
                    kind="undecided",
                    message=f"gave up on {len(live)} operations after {key_budget} configurations",
                    window=(),
                )
            )
            continue
        s, e = 0, len(live) - 1
        if shrink:
            s, e, initial, outcome = _shrink(model, live, outcome, key_budget, weaker_budget)
        window = tuple(original[op.id] for op in live[s : e + 1])
        anomalies.append(
            KeyAnomaly(
                key=key,
                kind="not-linearizable",
                message=_message(model, window, initial, outcome),
                window=window,
            )
        )
    return CheckResult(
        ok=not anomalies,
        anomalies=tuple(anomalies),
        keys_checked=len(by_key),
        operations_checked=checked,
    )


def version_conflicts(key: Any, ops: Iterable[Operation]) -> list[KeyAnomaly]:
    """Anomalies for versions reported with two different values (one per version)."""
    first: dict[int, tuple[Any, Operation]] = {}
    reported: set[int] = set()
    out = []
    for op in ops:
        if op.status is not Status.OK or op.result is None:
            continue
        if op.kind is Kind.READ:
            value, version = op.result
        elif op.kind is Kind.WRITE:
            value, version = op.value, op.result
        elif op.kind is Kind.CAS and op.result[0]:
            value, version = op.value, op.result[1]
        else:
            continue
        if version is None:
            continue
        seen = first.setdefault(version, (value, op))
        if seen[0] != value and version not in reported:
            reported.add(version)
            pair = tuple(sorted((seen[1], op), key=lambda o: (o.invoke_time, o.id)))
            out.append(
                KeyAnomaly(
                    key=key,
                    kind="version-conflict",
                    message=f"version {version} seen with values {seen[0]!r} and {value!r}",
                    window=pair,
                )
            )
    return out


def format_anomaly(anomaly: KeyAnomaly) -> str:
    """A readable report: the message and a table of the window's operations."""
    header = ("id", "process", "kind", "args", "result", "status", "invoke", "complete")
    rows = [header]
    for op in anomaly.window:
        if op.kind is Kind.WRITE:
            args = _short(op.value)
        elif op.kind is Kind.CAS:
            args = f"{op.expected} -> {_short(op.value)}"
        else:
            args = ""
        result = _short(op.result) if op.status is Status.OK else ""
        complete = "-" if op.complete_time is None else f"{op.complete_time:g}"
        rows.append(
            (
                str(op.id),
                str(op.process),
                str(op.kind),
                args,
                result,
                str(op.status),
                f"{op.invoke_time:g}",
                complete,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"key {anomaly.key!r}: {anomaly.kind}: {anomaly.message}"]
    for row in rows if anomaly.window else ():
        lines.append(
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(lines)


def _short(x: Any, limit: int = 40) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the search -------------------------------------------------------------------------------


def _return_time(op: Operation) -> float:
    if op.status is Status.INFO or op.complete_time is None:
        return math.inf
    return op.complete_time


@attrs.frozen
class _Outcome:
    ok: bool | None  # None: gave up
    # Where the deepest attempts got stuck: how many determinate ops they had placed, the op
    # whose return came before it could be placed, and (some of) the model states they were in.
    placed: int = -1
    stuck: Operation | None = None
    states: tuple[State, ...] = ()


_MAX_STATES = 4
_MAX_TWINS = 8  # how many better twins of an optional op the search looks at (any number is sound)


def _search(
    model: Model,
    ops: list[Operation],
    initial: State,
    deadlines: Mapping[int, float],
    budget: int,
    reusable: bool = False,
) -> _Outcome:
    """Wing & Gong / Lowe search. Optional (info) ops may be linearized or not; those with a
    deadline only before it (it acts as their return time).

    Gives up (``ok=None``) after ``budget`` configurations. With ``reusable``, it checks a
    weaker history instead, where info ops without a deadline may take effect any number of
    times: faster, and a failure still proves the real history is not linearizable.
    """
    required = [op.status is not Status.INFO for op in ops]
    if not any(required):
        return _Outcome(ok=True)
    return _Search(model, ops, required, deadlines, reusable).run(initial, budget)


class _Search:
    """One search: tables built once, by op or by entry position, and the depth-first walk.

    Entries (each op's call and return, sorted by time) sit at positions 1.., between sentinels
    0 (head) and ``len(nxt) - 1`` (tail); ``nxt`` and ``prv`` link those still in play.

    A configuration is the model ``state``, the linearized ops (determinate ones as ``base``
    and ``rest``, optional ones as ``opt``: see :func:`_number_ops`), the count of determinate
    ops ``remaining``, and the ``frontier``, the last call position among the linearized ops: a
    bounded op returning before it can no longer be linearized (it would have to precede an op
    invoked after it returned). Its expansion tries floating ops from queue ``q`` (while ``e``
    is -1; queues come first), then the ops called at entry ``e`` and after, all before
    ``block``, the earliest remaining return of a determinate op: ops invoked after it cannot
    come next.

    Frames on ``stack``: ``[q, e, state, base, rest, opt, frontier, block, remaining,
    unlinked]``, the configuration a step was taken from and where its expansion was, then
    the entries unlinked below it: the call taken, if any, and relaxed ops found dead.
    """

    def __init__(
        self,
        model: Model,
        ops: list[Operation],
        required: list[bool],
        deadlines: Mapping[int, float],
        reusable: bool,
    ) -> None:
        self.step = model.step
        self.ops = ops
        self.required = required  # per op: determinate, so it must be linearized
        self.reusable = reusable
        returns = [
            op.complete_time if required[i] else deadlines.get(op.id, math.inf)
            for i, op in enumerate(ops)
        ]
        # Optional ops without a deadline "float": once invoked they stay available for good.
        self.floating = floating = [r == math.inf for r in returns]
        self.entry_op, self.is_call, self.match, self.call_at = _entries(ops, returns, floating)
        self.nxt, self.prv = _linked_list(self.entry_op, floating)
        self.bit, bounded, self.queues = _number_ops(ops, required, floating, returns, self.call_at)
        self.bounded_returns = [self.match[self.call_at[i]] for i in bounded]
        self.twins = _twins(ops, bounded, returns, self.call_at, self.match, self.bit)
        self.used = [0] * len(self.queues)  # how much of each queue is used (reusable: stays 0)
        self.tried: dict[tuple[int, int, State], list[tuple[int, int]]] = {}  # see _is_new
        self.stack: list[list[Any]] = []

    def run(self, initial: State, budget: int) -> _Outcome:
        """Take the first fresh step again and again; at a dead end, backtrack to the next."""
        step, ops, queues, used, stack = self.step, self.ops, self.queues, self.used, self.stack
        required, entry_op, is_call, tried = self.required, self.entry_op, self.is_call, self.tried
        bounded_returns, call_at, nxt, bit = self.bounded_returns, self.call_at, self.nxt, self.bit
        total = remaining = sum(required)
        deepest = _Outcome(ok=False)
        state, base, rest, opt, frontier, q, e = initial, 0, 0, 0, 0, 0, -1
        block = _earliest_return(nxt, is_call, required, entry_op)
        while True:
            if e < 0:
                if q == len(queues):
                    e = nxt[0]
                    continue
                queue = queues[q]
                if used[q] == len(queue) or call_at[queue[used[q]]] > block:
                    q += 1
                    continue
                i = queue[used[q]]
            else:
                i = entry_op[e]
                if not is_call[e]:
                    if not required[i]:
                        e = nxt[e]  # a bounded op need not happen before its return
                        continue
                    # The earliest remaining return: its op should have been linearized by now.
                    deepest = _deeper(deepest, total - remaining, ops[i], state)
                    if not stack:
                        return deepest
                    q, e, state, base, rest, opt, frontier, block, remaining, _ = self._backtrack()
                    continue
                if not required[i] and (after := self._skip(e, i, opt, frontier)) != e:
                    e = after
                    continue
            new_state = step(state, ops[i])  # try op i next
            if new_state is not None:
                if required[i]:
                    new_opt, memo = opt, _with_determinate(base, rest, bit[i], new_state)
                else:
                    new_opt = opt if self.reusable and self.floating[i] else opt | (1 << bit[i])
                    memo = (base, rest, new_state)
                new_frontier = max(frontier, call_at[i])
                if _is_new(tried, memo, bisect.bisect_left(bounded_returns, new_frontier), new_opt):
                    budget -= 1
                    if budget < 0:
                        return _Outcome(ok=None)
                    stack.append([q, e, state, base, rest, opt, frontier, block, remaining, []])
                    if e >= 0:
                        self._unlink(e)
                    elif not self.reusable:
                        used[q] += 1
                    (base, rest, state), opt, frontier = memo, new_opt, new_frontier
                    if required[i]:
                        remaining -= 1
                        if remaining == 0:
                            return _Outcome(ok=True)
                    q, e, block = 0, -1, _earliest_return(nxt, is_call, required, entry_op)
                    continue
            if e < 0:
                q += 1
            else:
                e = nxt[e]

    def _skip(self, e: int, i: int, opt: int, frontier: int) -> int:
        """Where to look next instead of at call ``e`` of bounded op ``i``: ``e`` if it is
        worth trying, else an entry after it."""
        if self.match[e] < frontier:
            # Dead for good below this frame: unlink it there, so scans skip it.
            return self._unlink(e)
        if any(not opt & m and r > frontier for m, r in self.twins[i]):
            return self.nxt[e]  # a better twin is usable (see _twins)
        return e

    def _unlink(self, c: int) -> int:
        """Take call entry ``c`` and its return out of the list below the top frame, which
        relinks them when it is popped; returns the entry that followed ``c``."""
        nxt, prv, r = self.nxt, self.prv, self.match[c]
        self.stack[-1][9].append(c)
        after = nxt[r] if nxt[c] == r else nxt[c]
        nxt[prv[c]] = nxt[c]
        prv[nxt[c]] = prv[c]
        nxt[prv[r]] = nxt[r]
        prv[nxt[r]] = prv[r]
        return after

    def _backtrack(self) -> list[Any]:
        """Undo the last step: pop its frame, relink what it unlinked, and return it moved on
        to the step's next sibling."""
        frame = self.stack.pop()
        nxt, prv, match = self.nxt, self.prv, self.match
        for c in reversed(frame[9]):  # relink, in the reverse order of unlinking
            r = match[c]
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            nxt[prv[c]] = c
            prv[nxt[c]] = c
        q, e = frame[0], frame[1]
        if e >= 0:
            frame[1] = nxt[e]
        else:
            frame[0] = q + 1
            if not self.reusable:
                self.used[q] -= 1
        return frame


def _entries(
    ops: list[Operation], returns: list[float], floating: list[bool]
) -> tuple[list[int], list[bool], list[int], list[int]]:
    """The call and return entries: (op of each position, whether it is a call, the return
    position of each call position, the call position of each op)."""
    n = len(ops)
    # Entries sorted by time; at equal times calls come first, i.e. such ops count as concurrent.
    # Floating ops have no return entry, and stay out of the linked list (see _linked_list).
    entries = [(op.invoke_time, 0, i) for i, op in enumerate(ops)]
    entries += [(returns[i], 1, i) for i in range(n) if not floating[i]]
    entries.sort()
    size = len(entries) + 2  # positions 1.., with sentinels 0 (head) and size - 1 (tail)
    entry_op = [0] * size
    is_call = [False] * size
    match = [0] * size
    call_at = [0] * n
    for pos, (_, is_return, i) in enumerate(entries, 1):
        entry_op[pos] = i
        if is_return:
            match[call_at[i]] = pos
        else:
            call_at[i] = pos
            is_call[pos] = True
    return entry_op, is_call, match, call_at


def _linked_list(entry_op: list[int], floating: list[bool]) -> tuple[list[int], list[int]]:
    """(nxt, prv): a doubly linked list of the entries of the ops that do not float."""
    size = len(entry_op)
    nxt = [0] * size
    prv = [0] * size
    last = 0
    for pos in range(1, size):
        if pos == size - 1 or not floating[entry_op[pos]]:
            nxt[last] = pos
            prv[pos] = last
            last = pos
    return nxt, prv


def _number_ops(
    ops: list[Operation],
    required: list[bool],
    floating: list[bool],
    returns: list[float],
    call_at: list[int],
) -> tuple[list[int], list[int], list[list[int]]]:
    """Bits of the linearized set: (bit of each op, bounded optional ops in bit order, queues
    of floating ops with one effect, each in invocation order)."""
    n = len(ops)
    # Determinate ops are numbered by return time, so the set is mostly a solid run of low bits:
    # it is kept as (length of that run, the bits above it), which keeps memo keys small on long
    # histories. Optional ops get a separate, small bitset, also numbered by return, so the ones
    # dead at any moment are its low bits.
    bit = [0] * n
    order = sorted((i for i in range(n) if required[i]), key=lambda i: (returns[i], i))
    for b, i in enumerate(order):
        bit[i] = b
    bounded = sorted(
        (i for i in range(n) if not required[i] and not floating[i]), key=lambda i: returns[i]
    )
    for b, i in enumerate(bounded):
        bit[i] = b
    # Optional ops with the same effect are interchangeable, except for how long each stays
    # available: of those invoked, using the one with the earliest return first is never
    # worse. Without this, k twins multiply the search by up to k! orderings. So floating ops
    # wait in one queue per kind, used in invocation order (bounded ones: see _twins).
    by_effect: dict[tuple[Any, ...], list[int]] = {}
    for i in sorted((i for i in range(n) if floating[i]), key=call_at.__getitem__):
        by_effect.setdefault((ops[i].kind, ops[i].value, ops[i].expected), []).append(i)
    queues = sorted(by_effect.values(), key=lambda queue: call_at[queue[0]])
    for b, i in enumerate((i for queue in queues for i in queue), len(bounded)):
        bit[i] = b
    return bit, bounded, queues


def _twins(
    ops: list[Operation],
    bounded: list[int],
    returns: list[float],
    call_at: list[int],
    match: list[int],
    bit: list[int],
) -> list[tuple[tuple[int, int], ...]]:
    """For each bounded optional op, the (bit mask, return position) of its better twins: it
    is skipped while a twin invoked earlier, expiring no later, is usable (see _number_ops)."""
    twins: list[tuple[tuple[int, int], ...]] = [()] * len(ops)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in sorted(bounded, key=call_at.__getitem__):
        group = groups.setdefault((ops[i].kind, ops[i].value, ops[i].expected), [])
        better = [j for j in group if returns[j] <= returns[i]][-_MAX_TWINS:]
        twins[i] = tuple((1 << bit[j], match[call_at[j]]) for j in better)
        group.append(i)
    return twins


def _earliest_return(
    nxt: list[int], is_call: list[bool], required: list[bool], entry_op: list[int]
) -> int:
    """The position of the earliest return of a determinate op still in the list."""
    block = nxt[0]
    while is_call[block] or not required[entry_op[block]]:
        block = nxt[block]
    return block


def _with_determinate(base: int, rest: int, b: int, state: State) -> tuple[int, int, State]:
    """The memo key (base, rest, state) of the determinate set (base, rest) plus bit ``b``."""
    rest |= 1 << (b - base)
    if rest & 1:
        run = (~rest & (rest + 1)).bit_length() - 1
        return base + run, rest >> run, state
    return base, rest, state


def _is_new(
    tried: dict[tuple[int, int, State], list[tuple[int, int]]],
    memo: tuple[int, int, State],
    dead: int,
    opt: int,
) -> bool:
    """Whether configuration ``memo``, with its first ``dead`` bounded ops dead and optional
    set ``opt``, is worth exploring; if it is, it is recorded in ``tried``.

    ``tried`` maps (determinate set, state) to the (dead, optional set) pairs tried with it.
    Having more optional ops still usable can only help, so a configuration is pruned when
    one tried before (and failed, or being tried by an ancestor) had no more dead ops and used
    no more of the live ones; not only when it is identical.
    """
    others = tried.get(memo)
    if others is None:
        tried[memo] = [(dead, opt)]
        return True
    for other_dead, other_opt in others:
        if other_dead <= dead and not (other_opt & ~opt) >> dead:
            return False
    others.append((dead, opt))
    return True


def _deeper(deepest: _Outcome, placed: int, stuck: Operation, state: State) -> _Outcome:
    """``deepest`` updated with a dead end: ``placed`` ops placed, no place for ``stuck``."""
    if placed > deepest.placed:
        return _Outcome(False, placed, stuck, (state,))
    if (
        placed == deepest.placed
        and stuck is deepest.stuck
        and len(deepest.states) < _MAX_STATES
        and state not in deepest.states
    ):
        return attrs.evolve(deepest, states=(*deepest.states, state))
    return deepest


def _relax(op: Operation) -> Operation:
    return op if op.status is Status.INFO else attrs.evolve(op, status=Status.INFO, result=None)


def _relaxed(
    model: Model, ops: list[Operation], s: int, e: int
) -> tuple[list[Operation], State, Mapping[int, float]]:
    """Window ops[s..e] with everything else relaxed: (ops, initial state, deadlines).

    Other determinate ops become optional but keep their return time, and lose their result
    (info ops stay info); a window after the first op starts from an unknown state. Each of
    these only removes constraints, so a failing window proves the history is not linearizable,
    and the further a window reaches, the more constrained it is: failure is monotone in both
    ends. Ops that cannot matter are left out (see below).
    """
    window = ops[s : e + 1]
    end = max((_return_time(op) for op in window if op.status is not Status.INFO), default=-1)
    # Ops invoked after every determinate op of the window returned can only be linearized
    # after all of those: they are dropped.
    after = [op for op in ops[e + 1 :] if op.invoke_time <= end]
    before = ops[:s]
    if s == 0:
        initial = model.init()
    else:
        initial = model.unknown()
        # Ops that returned before the window starts are dropped: in any linearization, the
        # state after the last of them is covered by the unknown initial state, and whatever
        # was placed before it is optional here anyway.
        start = window[0].invoke_time
        before = [op for op in before if _return_time(op) >= start]
    deadlines = {op.id: op.complete_time for op in before + after if op.status is Status.OK}
    before = [_relax(op) for op in before]
    after = [_relax(op) for op in after]
    relaxed, deadlines = model.simplify(before + window + after, initial, deadlines)
    return relaxed, initial, deadlines


def _decide(
    model: Model,
    ops: list[Operation],
    initial: State,
    deadlines: Mapping[int, float],
    budget: int,
    weaker_budget: int = 0,
) -> tuple[_Outcome, int]:
    """Search; returns the outcome and a ``weaker_budget`` to start from on a similar search.

    A linearizable history needs at most a few configurations per op, so the exact search
    gets that much first. If it needs more, the history is probably not linearizable, which
    with many info ops can take exponentially many; so next comes the weaker history where info
    ops are reusable, with growing budgets: far cheaper, and its failure is a proof too (its
    success proves nothing). Only then the exact search in full.
    """
    outcome = _search(model, ops, initial, deadlines, min(budget, 10_000 + 20 * len(ops)))
    if outcome.ok is not None:
        return outcome, weaker_budget
    weaker_budget = min(budget, max(weaker_budget, 10_000 + 20 * len(ops)))
    while True:
        weaker = _search(model, ops, initial, deadlines, weaker_budget, reusable=True)
        if weaker.ok is False:
            return weaker, weaker_budget
        if weaker.ok or weaker_budget == budget:
            break
        weaker_budget = min(budget, weaker_budget * 4)
    return _search(model, ops, initial, deadlines, budget), weaker_budget


def _least(lo: int, hi: int, guess: int, holds: Callable[[int], bool]) -> int:
    """The least x in [lo, hi] where the monotone ``holds`` is true, given it holds at ``hi``.

    Gallops from ``guess`` towards the answer, then bisects: when probes near the answer are
    cheap and far ones dear, a good guess saves nearly all the cost.
    """
    below, at = lo - 1, hi  # holds(below) is false (or out of range), holds(at) is true
    x = min(max(guess, lo), hi)
    step = 1
    if x == hi or holds(x):
        at = x
        while at - step > below:
            if not holds(at - step):
                below = at - step
                break
            at -= step
            step *= 2
    else:
        below = x
        while below + step < at:
            if holds(below + step):
                at = below + step
                break
            below += step
            step *= 2
    while at - below > 1:
        mid = (below + at) // 2
        if holds(mid):
            at = mid
        else:
            below = mid
    return at


def _shrink(
    model: Model, ops: list[Operation], outcome: _Outcome, budget: int, weaker_budget: int
) -> tuple[int, int, State, _Outcome]:
    """The shortest failing prefix, then its latest failing start: (s, e, initial state, and
    the failed search of ops[s..e]).

    Failure is monotone in both ends, so these are two thresholds. Failing searches are the
    dear ones (they are exhaustive), so the end is sought from the op the search got stuck on,
    and the start from the end. A window the search gives up on counts as passing, which can
    only make the result longer.
    """
    failures = {(0, len(ops) - 1): (model.init(), outcome)}

    def fails(s: int, e: int) -> bool:
        nonlocal weaker_budget
        relaxed, initial, deadlines = _relaxed(model, ops, s, e)
        result, weaker_budget = _decide(model, relaxed, initial, deadlines, budget, weaker_budget)
        if result.ok is False:
            failures[s, e] = (initial, result)
        return result.ok is False

    last = len(ops) - 1
    stuck = next((i for i, op in enumerate(ops) if op is outcome.stuck), last)
    end = _least(0, last, stuck, lambda e: fails(0, e))
    start = -_least(-end, 0, -end, lambda s: fails(-s, end))  # the greatest failing start
    return (start, end, *failures[start, end])


def _message(model: Model, window: tuple[Operation, ...], initial: State, outcome: _Outcome) -> str:
    start = "an empty key" if initial == model.init() else "an unknown state"
    text = f"{len(window)} operation(s) admit no linearization, starting from {start}"
    if outcome.stuck is not None:
        states = " or ".join(model.describe(state) for state in outcome.states)
        more = ", ..." if len(outcome.states) == _MAX_STATES else ""
        text += (
            f"; the deepest attempts placed {outcome.placed} and then found no place for "
            f"{outcome.stuck.describe()} (state: {states}{more})"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m raftcache.testing.linearizability HISTORY.jsonl``: check a saved history."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(main.__doc__, file=sys.stderr)
        return 2
    ops = History.load(args[0]).operations()
    counters = {op.key for op in ops if op.kind is Kind.INCR}
    if counters:  # the fault suite's counters have their own check (raftcache.testing.jepsen)
        print(f"leaving out {len(counters)} counter key(s): {sorted(map(repr, counters))[:5]}")
    result = check([op for op in ops if op.key not in counters])
    for anomaly in result.anomalies:
        print(format_anomaly(anomaly), end="\n\n")
    kinds = Counter(anomaly.kind for anomaly in result.anomalies)
    verdict = "linearizable" if result.ok else ", ".join(f"{n} {k}" for k, n in kinds.items())
    print(f"{verdict}: {result.operations_checked} operations on {result.keys_checked} keys")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
