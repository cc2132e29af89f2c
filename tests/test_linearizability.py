"""Tests for the history recorder and the linearizability checker: they must have teeth."""

from __future__ import annotations

import itertools
import random
import time

import attrs
import pytest

from raftcache.testing import linearizability as lz
from raftcache.testing.history import History, Kind, Operation, Status
from raftcache.testing.linearizability import (
    ABSENT,
    ANY,
    RegisterModel,
    check,
    format_anomaly,
    main,
)

# -- helpers ----------------------------------------------------------------------------------


def record(h, process, kind, start, end, result=None, status="ok", *, key="k", **kw):
    """Invoke and complete one operation at once (times are explicit, so order is free)."""
    op = h.invoke(process, kind, key, time=start, **kw)
    if status == "ok":
        h.ok(op, result, time=end)
    elif status == "fail":
        h.fail(op, time=end)
    elif status == "info":
        h.info(op, time=end)
    return op


def assert_bad(h, kind="not-linearizable"):
    result = check(h)
    assert not result.ok
    assert kind in {a.kind for a in result.anomalies}
    for anomaly in result.anomalies:
        assert format_anomaly(anomaly)  # renders without blowing up
    return result


def assert_good(h):
    result = check(h)
    assert result.ok, "\n\n".join(format_anomaly(a) for a in result.anomalies)
    return result


# -- known-bad histories ----------------------------------------------------------------------


def test_stale_read():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 1, "write", 2, 3, 2, value="b")
    record(h, 2, "read", 4, 5, ("a", 1))
    result = assert_bad(h)
    (anomaly,) = result.anomalies
    assert [op.kind for op in anomaly.window] == [Kind.WRITE, Kind.READ]
    assert "read" in anomaly.message and "'b'" in anomaly.message


def test_lost_acknowledged_write_reads_previous_value():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "write", 2, 3, 2, value="b")
    record(h, 3, "read", 10, 11, ("a", 1))
    assert_bad(h)


def test_lost_acknowledged_write_reads_absent():
    h = History()
    record(h, 1, "write", 0, 1, 7, value="a")
    record(h, 2, "read", 2, 3, None)
    result = assert_bad(h)
    assert len(result.anomalies[0].window) == 2


def test_read_of_value_never_written():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "read", 0.5, 3, ("zzz", 1))
    assert_bad(h)


def test_read_of_value_never_written_on_empty_key():
    h = History()
    record(h, 1, "read", 0, 1, (b"ghost", 3))
    result = assert_bad(h)
    assert len(result.anomalies[0].window) == 1


def test_two_values_for_one_version():
    # Both reads are individually fine orderings of a register (value-wise), yet version 5
    # cannot be two log entries: the pre-check must catch it.
    h = History()
    record(h, 1, "write", 0, 10, 5, value="a")
    record(h, 2, "write", 0, 10, None, value="b")
    record(h, 3, "read", 1, 9, ("a", 5))
    record(h, 4, "read", 2, 8, ("b", 5))
    result = assert_bad(h, kind="version-conflict")
    conflict = next(a for a in result.anomalies if a.kind == "version-conflict")
    assert conflict.message == "version 5 seen with values 'a' and 'b'"
    assert {op.process for op in conflict.window} == {1, 4}


def test_two_writes_acknowledged_with_one_version():
    h = History()
    record(h, 1, "write", 0, 1, 5, value=b"a")
    record(h, 2, "write", 2, 3, 5, value=b"b")
    assert_bad(h, kind="version-conflict")


def test_cas_succeeds_against_wrong_version():
    h = History()
    record(h, 1, "write", 0, 1, 5, value="a")
    record(h, 1, "cas", 2, 3, (True, 6), value="b", expected=3)
    result = assert_bad(h)
    assert len(result.anomalies[0].window) <= 2


def test_cas_fails_although_version_matched():
    h = History()
    record(h, 1, "write", 0, 1, 5, value="a")
    record(h, 1, "cas", 2, 3, (False, None), value="b", expected=5)
    assert_bad(h)


def test_cas_succeeds_on_absent_key():
    h = History()
    record(h, 1, "cas", 0, 1, (True, 2), value="b", expected=1)
    assert_bad(h)


def test_delete_reports_existing_key_that_cannot_exist():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 1, "delete", 2, 3, True)
    record(h, 2, "delete", 4, 5, True)  # the key is certainly gone by now
    assert_bad(h)


def test_delete_reports_existing_key_never_written():
    h = History()
    record(h, 1, "delete", 0, 1, True)
    assert_bad(h)


def test_delete_reports_missing_key_that_exists():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "delete", 2, 3, False)
    assert_bad(h)


def test_read_sees_deleted_key():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 1, "delete", 2, 3, True)
    record(h, 2, "read", 4, 5, ("a", 1))
    assert_bad(h)


def test_read_version_disagrees_with_write():
    h = History()
    record(h, 1, "write", 0, 1, 4, value="a")
    record(h, 2, "read", 2, 3, ("a", 3))
    assert_bad(h)


def test_non_monotonic_reads_across_processes():
    # A concurrent write may be seen or not, but once one read saw it, a later read can't miss it.
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 1, "write", 2, 20, 2, value="b")
    record(h, 2, "read", 3, 4, ("b", 2))
    record(h, 3, "read", 5, 6, ("a", 1))
    assert_bad(h)


def test_info_write_cannot_explain_read_before_its_invocation():
    h = History()
    record(h, 1, "read", 0, 1, ("a", None))
    record(h, 2, "write", 2, 3, status="info", value="a")
    assert_bad(h)


def test_failed_write_is_never_visible():
    h = History()
    record(h, 1, "write", 0, 1, status="fail", value="a")
    record(h, 2, "read", 2, 3, ("a", None))
    assert_bad(h)


# -- known-good histories ---------------------------------------------------------------------


def test_sequential():
    h = History()
    record(h, 1, "read", 0, 1, None)
    record(h, 1, "write", 2, 3, 1, value="a")
    record(h, 2, "read", 4, 5, ("a", 1))
    record(h, 2, "cas", 6, 7, (True, 3), value="b", expected=1)
    record(h, 1, "cas", 8, 9, (False, None), value="c", expected=1)
    record(h, 1, "read", 10, 11, ("b", 3))
    record(h, 2, "delete", 12, 13, True)
    record(h, 2, "delete", 14, 15, False)
    record(h, 1, "read", 16, 17, None)
    result = assert_good(h)
    assert result.operations_checked == 9 and result.keys_checked == 1


@pytest.mark.parametrize("seen", ["a", "b"])
def test_concurrent_writes_and_reads_in_either_order(seen):
    h = History()
    record(h, 1, "write", 0, 10, 1, value="a")
    record(h, 2, "write", 0, 10, 2, value="b")
    version = {"a": 1, "b": 2}[seen]
    record(h, 3, "read", 1, 9, (seen, version))
    record(h, 4, "read", 11, 12, (seen, version))
    assert_good(h)


def test_read_concurrent_with_write_sees_old_or_new():
    for result in [("a", 1), ("b", 2)]:
        h = History()
        record(h, 1, "write", 0, 1, 1, value="a")
        record(h, 1, "write", 2, 6, 2, value="b")
        record(h, 2, "read", 3, 4, result)
        assert_good(h)


def test_equal_times_count_as_concurrent():
    h = History()
    record(h, 1, "write", 0, 5, 1, value="a")
    record(h, 2, "read", 5, 6, None)  # invoked exactly when the write returned
    assert_good(h)


def test_info_write_takes_effect_late():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "write", 2, 3, status="info", value="b")
    record(h, 1, "read", 4, 5, ("a", 1))
    record(h, 1, "read", 100, 101, ("a", 1))
    record(h, 1, "read", 1000, 1001, ("b", 9))  # long after the info write "completed"
    record(h, 3, "read", 1002, 1003, ("b", 9))
    assert_good(h)


def test_info_write_never_takes_effect():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "write", 2, 3, status="info", value="b")
    record(h, 1, "read", 1000, 1001, ("a", 1))
    assert_good(h)


def test_pending_write_at_end_counts_as_info():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    h.invoke(2, "write", "k", "b", time=2)  # never completes
    record(h, 1, "read", 50, 51, ("b", 4))
    assert h.pending() == (1,)
    assert_good(h)


def test_info_cas_may_or_may_not_apply():
    for final in [("a", 1), ("b", 7)]:
        h = History()
        record(h, 1, "write", 0, 1, 1, value="a")
        record(h, 2, "cas", 2, 3, status="info", value="b", expected=1)
        record(h, 1, "read", 10, 11, final)
        assert_good(h)


def test_info_cas_cannot_apply_to_wrong_version():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "cas", 2, 3, status="info", value="b", expected=99)
    record(h, 1, "read", 10, 11, ("b", 7))
    assert_bad(h)


def test_failed_write_never_visible():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "write", 2, 3, status="fail", value="b")
    record(h, 1, "read", 4, 5, ("a", 1))
    record(h, 1, "read", 1000, 1001, ("a", 1))
    result = assert_good(h)
    assert result.operations_checked == 3


def test_unknown_versions_are_refined_by_reads():
    h = History()
    record(h, 1, "write", 0, 1, None, value="a")  # ok, version unknown
    record(h, 2, "read", 2, 3, ("a", 8))
    record(h, 2, "cas", 4, 5, (True, 9), value="b", expected=8)
    record(h, 3, "read", 6, 7, ("b", 9))
    assert_good(h)
    h2 = History()
    record(h2, 1, "write", 0, 1, None, value="a")
    record(h2, 2, "read", 2, 3, ("a", 8))
    record(h2, 3, "read", 4, 5, ("a", 6))  # contradicts the refinement
    assert_bad(h2)


def test_info_and_fail_reads_are_ignored():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "read", 2, 3, status="info")
    record(h, 3, "read", 4, 5, status="fail")
    assert assert_good(h).operations_checked == 1


def test_keys_are_independent():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a", key="x")
    record(h, 2, "read", 2, 3, None, key="y")
    record(h, 2, "read", 4, 5, ("a", 1), key="x")
    assert assert_good(h).keys_checked == 2


# -- model ------------------------------------------------------------------------------------


def _op(kind, result=None, status="ok", **kw):
    return Operation(
        id=0,
        process=1,
        kind=kind,
        key="k",
        result=result,
        status=status,
        invoke_time=0,
        complete_time=1,
        **kw,
    )


def test_register_model_steps():
    m = RegisterModel()
    assert m.step(ABSENT, _op("read")) is ABSENT
    assert m.step(("a", 1), _op("read")) is None
    assert m.step(ANY, _op("read", ("a", 1))) == ("a", 1)
    assert m.step(("a", None), _op("read", ("a", 4))) == ("a", 4)
    assert m.step(("a", 3), _op("read", ("a", 4))) is None
    assert m.step(ABSENT, _op("write", 5, value="x")) == ("x", 5)
    assert m.step(ABSENT, _op("write", status="info", value="x")) == ("x", None)
    assert m.step(("a", 1), _op("delete", False)) is None
    assert m.step(("a", 1), _op("delete", None)) is ABSENT
    assert m.step(("a", None), _op("cas", (True, 9), value="b", expected=4)) == ("b", 9)
    assert m.step(("a", 3), _op("cas", (False, None), value="b", expected=4)) == ("a", 3)
    assert m.step(ABSENT, _op("cas", status="info", value="b", expected=4)) is None


# -- against brute force ----------------------------------------------------------------------


def _random_small_history(rng, n):
    """Arbitrary (mostly non-linearizable) histories over few values, versions and times."""
    ops = []
    for i in range(n):
        kind = rng.choice(["read", "read", "write", "write", "delete", "cas"])
        status = rng.choice(["ok", "ok", "ok", "info", "fail"])
        start = rng.randint(0, 8)
        value = rng.choice("abc") if kind in ("write", "cas") else None
        expected = rng.randint(1, 3) if kind == "cas" else None
        version = rng.choice([1, 2, 3, None])
        result = None
        if status == "ok":
            result = {
                "read": rng.choice([None, (rng.choice("abc"), version)]),
                "write": version,
                "delete": rng.choice([True, False, None]),
                "cas": rng.choice([(True, version), (False, None)]),
            }[kind]
        ops.append(
            Operation(
                id=i,
                process=i,
                kind=kind,
                key="k",
                value=value,
                expected=expected,
                result=result,
                status=status,
                invoke_time=start,
                complete_time=start + rng.randint(0, 4),
            )
        )
    return ops


def _brute_force_linearizable(ops, initial=ABSENT, deadlines=None):
    """Try every subset of the info ops and every order: the definition, nothing clever.
    An info op may take effect any time after its invocation, or by its deadline if it has one.
    """
    model = RegisterModel()
    deadlines = deadlines or {}
    ops = [op for op in ops if op.status is not Status.FAIL]
    required = [op for op in ops if op.status is Status.OK]
    optional = [op for op in ops if op.status is Status.INFO]

    def returns(op):
        if op.status is Status.INFO:
            return deadlines.get(op.id, float("inf"))
        return op.complete_time

    for k in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, k):
            for order in itertools.permutations(required + list(chosen)):
                if any(
                    returns(later) < earlier.invoke_time
                    for i, earlier in enumerate(order)
                    for later in order[i + 1 :]
                ):
                    continue
                state = initial
                for op in order:
                    state = model.step(state, op)
                    if state is None:
                        break
                else:
                    return True
    return False


def test_agrees_with_brute_force_on_small_histories():
    rng = random.Random(5)
    verdicts = set()
    for _ in range(1500):
        ops = _random_small_history(rng, rng.randint(1, 6))
        want = _brute_force_linearizable(ops)
        verdicts.add(want)
        for budget in (10**6, 3):  # 3: forces the weaker search and giving up
            kinds = {a.kind for a in check(ops, budget=budget).anomalies}
            if want:
                assert "not-linearizable" not in kinds, ops
            elif budget > 3:
                assert "not-linearizable" in kinds, ops
    assert verdicts == {True, False}


def test_windows_are_sound_and_monotone_against_brute_force():
    # White box: every window the shrinker may test is checked against brute force on the
    # relaxed history it stands for; a failing window must mean a failing history, and failure
    # must be monotone in both ends (the shrinker's binary searches rely on it).
    rng = random.Random(11)
    model = RegisterModel()
    for _ in range(1000):
        ops = _random_small_history(rng, rng.randint(2, 6))
        live = sorted(
            (op for op in ops if op.status is not Status.FAIL),
            key=lambda op: (op.invoke_time, op.id),
        )
        live, _ = model.simplify(live, model.init(), {})
        whole = _brute_force_linearizable(live)
        fails = {}
        for s, e in itertools.combinations_with_replacement(range(len(live)), 2):
            relaxed, initial, deadlines = lz._relaxed(model, live, s, e)
            got = lz._search(model, relaxed, initial, deadlines, 10**6).ok
            assert got == _brute_force_linearizable(relaxed, initial, deadlines), (s, e, ops)
            assert got or not whole, (s, e, ops)
            fails[s, e] = not got
        for (s, e), failed in fails.items():
            for (s2, e2), failed2 in fails.items():
                if failed and s2 <= s and e <= e2:
                    assert failed2, ((s, e), (s2, e2), ops)


def _reference_linearizable(ops, initial, deadlines):
    """A plain memoized search over sets of placed ops, for histories too long for brute force."""
    model = RegisterModel()
    returns = [
        deadlines.get(op.id, float("inf")) if op.status is Status.INFO else op.complete_time
        for op in ops
    ]
    required = [op.status is Status.OK for op in ops]
    everything = sum(1 << i for i in range(len(ops)) if required[i])
    seen = set()
    stack = [(0, initial, float("-inf"))]
    while stack:
        placed, state, latest_invoke = stack.pop()
        if placed & everything == everything:
            return True
        if (placed, state) in seen:
            continue
        seen.add((placed, state))
        for i, op in enumerate(ops):
            if placed >> i & 1 or returns[i] < latest_invoke:
                continue  # placed already, or too late: something invoked after it returned
            if any(
                required[j] and not placed >> j & 1 and j != i and returns[j] < op.invoke_time
                for j in range(len(ops))
            ):
                continue  # a pending op returned before this one was invoked
            new_state = model.step(state, op)
            if new_state is not None:
                stack.append((placed | 1 << i, new_state, max(latest_invoke, op.invoke_time)))
    return False


def test_agrees_with_a_plain_search_on_medium_histories():
    # Longer histories, random relaxations and starting states: exercises the pruning (twins,
    # subsumption, dead relaxed ops, reusable info ops) that tiny histories barely reach.
    rng = random.Random(3)
    model = RegisterModel()
    for _ in range(1500):
        ops = sorted(
            (op for op in _random_small_history(rng, rng.randint(6, 12)) if op.status != "fail"),
            key=lambda op: (op.invoke_time, op.id),
        )
        deadlines = {
            op.id: op.complete_time for op in ops if op.status == "ok" and rng.random() < 0.5
        }
        ops = [lz._relax(op) if op.id in deadlines else op for op in ops]
        initial = rng.choice([ABSENT, ANY, ("a", 1), ("b", None)])
        want = _reference_linearizable(ops, initial, deadlines)
        simplified, tightened = model.simplify(ops, initial, deadlines)
        assert lz._search(model, simplified, initial, tightened, 10**7).ok == want, ops
        weaker = lz._search(model, simplified, initial, tightened, 10**7, reusable=True).ok
        assert weaker or not want, ops


# -- recorder ---------------------------------------------------------------------------------


def test_history_validation():
    h = History()
    with pytest.raises(ValueError):
        h.invoke(1, "write", "k")  # no value
    with pytest.raises(ValueError):
        h.invoke(1, "cas", "k", "v")  # no expected version
    with pytest.raises(ValueError):
        h.invoke(1, "frobnicate", "k")
    op = h.invoke(1, "read", "k", time=5)
    with pytest.raises(ValueError):
        h.invoke(1, "read", "k", time=6)  # process 1 is busy
    with pytest.raises(ValueError):
        h.ok(op, ("a", 1), time=4)  # before its invocation
    with pytest.raises(ValueError):
        h.ok(op, "not a pair", time=6)
    h.ok(op, ["a", 1], time=6)  # lists (from JSON) become tuples
    assert h.operations()[0].result == ("a", 1)
    with pytest.raises(ValueError):
        h.fail(op, time=7)  # already completed
    cas = h.invoke(1, "cas", "k", "v", 3, time=8)
    with pytest.raises(ValueError):
        h.ok(cas, (False, 4), time=9)


def test_operations_record():
    h = History(clock=iter(range(100)).__next__)
    op = h.invoke("p1", Kind.WRITE, b"key", bytearray(b"v"))
    h.ok(op, 3)
    (rec,) = h.operations()
    assert rec == Operation(
        id=0,
        process="p1",
        kind=Kind.WRITE,
        key=b"key",
        value=b"v",
        expected=None,
        result=3,
        status=Status.OK,
        invoke_time=0,
        complete_time=1,
    )
    assert rec.describe() == "#0 pp1 write(b'v') -> ok 3"


def test_save_load_round_trip(tmp_path):
    h = History()
    record(h, 1, "write", 0, 1.5, 1, value=b"\x00\xffbin", key=b"\xfe")
    record(h, 2, "write", 0.25, 2, None, value="text", key="k")
    record(h, 3, "read", 3, 4, (b"\x00\xffbin", 1), key=b"\xfe")
    record(h, 3, "read", 5, 6, None, key="other")
    record(h, 1, "cas", 7, 8, (True, 9), value="c", expected=1, key="k")
    record(h, 1, "cas", 9, 10, (False, None), value="d", expected=1, key="k")
    record(h, 2, "delete", 11, 12, True, key="k")
    record(h, 2, "delete", 13, 14, None, key="k")
    record(h, 4, "write", 15, 16, status="info", value=b"maybe", key="k")
    record(h, 5, "write", 17, 18, status="fail", value="no", key="k")
    h.invoke(6, "read", "k", time=19)  # left pending
    path = tmp_path / "history.jsonl"
    h.dump(path)
    loaded = History.load(path)
    assert loaded == h
    assert loaded.operations() == h.operations()
    assert loaded.pending() == (10,)
    assert check(loaded) == check(h)


# -- randomized: a real linearizable register -------------------------------------------------


@attrs.define
class _Planned:
    process: int
    kind: str
    key: str
    value: object
    invoke: float
    apply: float
    complete: float
    outcome: str  # "ok", "fail", "info-applied", "info-lost", "pending"
    expected: int | None = None
    result: object = None


def generate(
    rng,
    *,
    n_ops,
    keys,
    processes,
    info_rate=0.03,
    fail_rate=0.01,
    latency=1.0,
):
    """A history of a register that applies each op atomically between invoke and complete."""
    per_process = n_ops // processes
    plans = []
    counter = 0
    for p in range(processes):
        t = rng.random()
        process = p
        for _ in range(per_process):
            r = rng.random()
            kind = "read" if r < 0.5 else "write" if r < 0.85 else "cas" if r < 0.95 else "delete"
            value = None
            if kind in ("write", "cas"):
                counter += 1
                value = f"v{counter}" if counter % 2 else f"v{counter}".encode()
            invoke = t + rng.random() * latency
            apply = invoke + rng.random() * latency
            complete = apply + rng.random() * latency
            r = rng.random()
            if r < fail_rate:
                outcome = "fail"
            elif r < fail_rate + info_rate:
                outcome = rng.choice(["info-applied", "info-lost", "pending"])
            else:
                outcome = "ok"
            plans.append(
                _Planned(process, kind, rng.choice(keys), value, invoke, apply, complete, outcome)
            )
            if outcome == "pending":
                process += processes  # Jepsen-style: a hung process is replaced by a new one
            t = complete

    register: dict[str, tuple[object, int]] = {}
    log_index = 0
    for plan in sorted(plans, key=lambda pl: pl.apply):
        applies = plan.outcome in ("ok", "info-applied")
        current = register.get(plan.key)
        if plan.kind == "cas":
            # Aim at the current version most of the time, so swaps do happen.
            if current is not None and rng.random() < 0.6:
                plan.expected = current[1]
            else:
                plan.expected = rng.randrange(1, log_index + 2)
        if not applies:
            continue
        if plan.kind == "read":
            plan.result = current
        elif plan.kind == "write":
            log_index += 1
            register[plan.key] = (plan.value, log_index)
            plan.result = log_index
        elif plan.kind == "delete":
            log_index += 1
            plan.result = register.pop(plan.key, None) is not None
        else:
            log_index += 1
            if current is not None and current[1] == plan.expected:
                register[plan.key] = (plan.value, log_index)
                plan.result = (True, log_index)
            else:
                plan.result = (False, None)

    events = []
    for n, plan in enumerate(plans):
        events.append((plan.invoke, 0, n))
        if plan.outcome != "pending":
            events.append((plan.complete, 1, n))
    events.sort()
    h = History()
    ids = {}
    for t, is_completion, n in events:
        plan = plans[n]
        if not is_completion:
            ids[n] = h.invoke(plan.process, plan.kind, plan.key, plan.value, plan.expected, time=t)
        elif plan.outcome == "ok":
            h.ok(ids[n], plan.result, time=t)
        elif plan.outcome == "fail":
            h.fail(ids[n], time=t)
        else:
            h.info(ids[n], time=t)
    return h


def _corrupt_one_read(rng, ops):
    reads = [
        i
        for i, op in enumerate(ops)
        if op.kind is Kind.READ and op.status is Status.OK and op.result is not None
    ]
    i = rng.choice(reads)
    bad = attrs.evolve(ops[i], result=(b"never written", ops[i].result[1]))
    return ops[:i] + [bad] + ops[i + 1 :], bad


@pytest.mark.parametrize("seed", range(12))
def test_random_linearizable_histories_pass_and_corruptions_fail(seed):
    rng = random.Random(seed)
    # From one hot key with lots of overlap to many keys with little.
    keys = [f"k{i}" for i in range([1, 2, 5, 20][seed % 4])]
    h = generate(rng, n_ops=rng.choice([200, 600, 1500]), keys=keys, processes=rng.randint(2, 8))
    assert_good(h)
    ops, bad = _corrupt_one_read(rng, h.operations())
    result = check(ops)
    assert not result.ok
    flagged = {op.id for a in result.anomalies for op in a.window}
    assert bad.id in flagged
    linear = [a for a in result.anomalies if a.kind == "not-linearizable"]
    assert len(linear) == 1 and linear[0].window[-1].id == bad.id


def test_window_is_small_for_stale_read_in_long_history():
    rng = random.Random(42)
    h = generate(rng, n_ops=3000, keys=["hot"], processes=4, info_rate=0.0, fail_rate=0.0)
    ops = h.operations()
    # Make a read in the middle return the value of a write that was overwritten (by a write
    # that completed) before the read began: a stale read.
    writes = [op for op in ops if op.kind is Kind.WRITE and op.status is Status.OK]
    reads = [op for op in ops if op.kind is Kind.READ and op.status is Status.OK]
    target = reads[len(reads) // 2]
    newer = [w for w in writes if w.complete_time < target.invoke_time]
    newest = newer[-1]
    stale = next(w for w in reversed(newer) if w.complete_time < newest.invoke_time)
    bad = attrs.evolve(target, result=(stale.value, stale.result))
    ops = [bad if op.id == bad.id else op for op in ops]

    result = check(ops)
    assert not result.ok
    (anomaly,) = result.anomalies
    print("\n" + format_anomaly(anomaly))
    assert anomaly.window[-1].id == bad.id
    assert len(anomaly.window) <= 6
    assert 0 < len(anomaly.window) < len(ops) // 100


def test_exhausted_budget_is_undecided_not_passed():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 2, "read", 2, 3, ("a", 1))
    result = check(h, budget=1)
    assert not result.ok
    (anomaly,) = result.anomalies
    assert anomaly.kind == "undecided" and anomaly.window == ()
    assert "gave up" in format_anomaly(anomaly)
    assert check(h).ok


def test_hard_non_linearizable_key_is_still_decided():
    # One hot key, ten clients, many info ops, and a read of a value never written: the exact
    # search alone is exponential here; the weaker search must find the proof quickly.
    rng = random.Random(136)
    h = generate(rng, n_ops=600, keys=["hot"], processes=10, info_rate=0.1)
    assert_good(h)
    ops, bad = _corrupt_one_read(rng, h.operations())
    result = check(ops)
    linear = [a for a in result.anomalies if a.kind == "not-linearizable"]
    assert len(linear) == 1 and linear[0].window[-1].id == bad.id
    assert len(linear[0].window) <= 12


def test_command_line(tmp_path, capsys):
    good, bad = History(), History()
    for h in (good, bad):
        record(h, 1, "write", 0, 1, 1, value="a")
    record(good, 2, "read", 2, 3, ("a", 1))
    record(bad, 2, "read", 2, 3, None)
    good.dump(tmp_path / "good.jsonl")
    bad.dump(tmp_path / "bad.jsonl")
    assert main([str(tmp_path / "good.jsonl")]) == 0
    assert "linearizable: 2 operations on 1 keys" in capsys.readouterr().out
    assert main([str(tmp_path / "bad.jsonl")]) == 1
    assert "1 not-linearizable" in capsys.readouterr().out


def test_window_check_without_shrinking_reports_everything():
    h = History()
    record(h, 1, "write", 0, 1, 1, value="a")
    record(h, 1, "write", 2, 3, 2, value="b")
    record(h, 2, "read", 4, 5, ("a", 1))
    (anomaly,) = check(h, shrink=False).anomalies
    assert len(anomaly.window) == 3


def test_many_info_writes_on_one_key_still_fast_enough():
    rng = random.Random(7)
    h = generate(rng, n_ops=2000, keys=["hot"], processes=10, info_rate=0.1)
    assert_good(h)


def test_benchmark_100k_ops():
    rng = random.Random(2024)
    keys = [f"key-{i}" for i in range(1000)]
    h = generate(rng, n_ops=100_000, keys=keys, processes=10, info_rate=0.03)
    ops = h.operations()
    assert len(ops) > 95_000
    start = time.perf_counter()
    result = check(ops)
    elapsed = time.perf_counter() - start
    print(
        f"\nchecked {len(ops)} ops ({result.operations_checked} searched) on "
        f"{result.keys_checked} keys in {elapsed:.2f}s"
    )
    assert result.ok
    assert result.keys_checked == 1000
