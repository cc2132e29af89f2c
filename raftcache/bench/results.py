"""The figures of `raftcache bench`: repetitions merged, summarized, compared, as JSON.

Contract: pure functions of what the targets returned. `merge_rep` makes one repetition of a
step out of its client processes' results; an `Outcome` holds one target's repetitions of one
step of one scenario; `ratios` compares raftcache with every other target that ran the same
step; `to_json` is the `--json` file (schema `SCHEMA`): raw latencies (keys starting with "_")
stay out of it.
"""

from __future__ import annotations

import os
import platform

import attrs

from raftcache.bench.scenarios import Options, Step
from raftcache.bench.stats import latency_summary, spread

SCHEMA = "raftcache-bench/1"


def merge_rep(results: list[dict], step: Step, seconds: float) -> dict:
    """One repetition, every client process together: ops/s and percentiles per operation,
    completions per second, errors; and the raw latencies (µs) for the plot."""
    rep = {"ops_per_s": 0.0, "ops": {}, "errors": 0, "misses": 0, "late": False,
           "last_error": "", "per_second": []}
    raw = {}
    for op in step.ops:
        lat = [us for r in results for us in r["latencies_us"][op]]
        raw[op] = lat
        rep["ops"][op] = latency_summary(lat) | {"ops_per_s": len(lat) / seconds}
        rep["ops_per_s"] += len(lat) / seconds
    width = max(len(r["per_second"]) for r in results)
    rep["per_second"] = [sum(r["per_second"][i] for r in results if i < len(r["per_second"]))
                         for i in range(width)]
    rep["errors"] = sum(r["errors"] for r in results)
    rep["misses"] = sum(r["misses"] for r in results)
    rep["late"] = any(r["late"] for r in results)
    rep["last_error"] = next((r["last_error"] for r in results if r["last_error"]), "")
    faults = [r["fault"] for r in results if r.get("fault")]
    if faults:
        rep["fault"] = faults[0]
    if "cluster" in results[0]:
        rep["cluster"] = results[0]["cluster"]
    if any("offered" in r for r in results):  # an open loop
        rep["offered_per_s"] = sum(r["offered"] for r in results) / seconds
        rep["shed"] = sum(r["shed"] for r in results)
        kinds: dict[str, int] = {}
        for r in results:
            for kind, n in r["error_kinds"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        rep["error_kinds"] = kinds
        for key in ("peak_ops_per_s", "elections"):
            if key in results[0]:
                rep[key] = results[0][key]
    return rep | {"_raw": raw}


def summarize(reps: list[dict], step: Step) -> dict:
    """Median and spread (min-max) over repetitions of ops/s and of each op's figures."""
    out = {"ops_per_s": spread([r["ops_per_s"] for r in reps]), "ops": {}}
    for op in step.ops:
        out["ops"][op] = {f: spread([r["ops"][op][f] for r in reps])
                          for f in ("ops_per_s", "p50_ms", "p99_ms", "p999_ms")}
    return out


@attrs.define
class Outcome:
    """One target's figures for one step of one scenario."""

    scenario: str
    step: Step  # as the target ran it
    target: str
    kind: str
    reps: list = attrs.Factory(list)

    def summary(self) -> dict:
        return summarize(self.reps, self.step)


def compared(ours: Outcome, other: Outcome) -> bool:
    """Whether `other` ran `ours`'s step as its target runs it (Redis: one get for every read
    level, one set for every cluster size), in the same scenario."""
    return (other.kind != "raftcache" and other.scenario == ours.scenario
            and ours.step.for_target(other.kind) == other.step)


def ratios(outcomes: list[Outcome]) -> list[dict]:
    """raftcache / each other target, per scenario, raftcache step and op: ops/s (above 1:
    raftcache does more) and p50 latency (above 1: raftcache is slower), from the medians."""
    out = []
    for ours in (o for o in outcomes if o.kind == "raftcache"):
        for other in outcomes:
            if not compared(ours, other):
                continue
            a, b = ours.summary()["ops"], other.summary()["ops"]
            for op in ours.step.ops:
                if op not in b:
                    continue
                ops_b, p50_b = b[op]["ops_per_s"]["median"], b[op]["p50_ms"]["median"]
                out.append({
                    "scenario": ours.scenario, "step": ours.step.name, "op": op,
                    "raftcache": ours.target, "against": other.target,
                    "ops_per_s": a[op]["ops_per_s"]["median"] / ops_b if ops_b else None,
                    "p50_ms": a[op]["p50_ms"]["median"] / p50_b if p50_b else None,
                })
    return out


def to_json(outcomes: list[Outcome], options: Options, meta: dict) -> dict:
    return {
        "schema": SCHEMA,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "options": attrs.asdict(options) | {"key_prefixes": list(options.key_prefixes)},
        **meta,
        "results": [{"scenario": o.scenario, "step": o.step.name, "target": o.target,
                     "kind": o.kind, "processes": o.step.processes, "clients": o.step.clients,
                     "read_ratio": o.step.read_ratio, "consistency": o.step.consistency,
                     "value_size": o.step.value_size or options.value_size,
                     "nodes": o.step.nodes, "backend": o.step.backend,
                     "secure": o.step.secure,
                     "summary": o.summary(),
                     "reps": [{k: v for k, v in r.items() if not k.startswith("_")}
                              for r in o.reps]}
                    for o in outcomes],
        "ratios": ratios(outcomes),
    }


def security_cost(outcomes: list[Outcome]) -> dict[str, float]:
    """The security scenario's throughput with auth and encryption on / off, per op."""
    by = {(o.step.secure, o.step.kind.split()[0]): o.summary()["ops_per_s"]["median"]
          for o in outcomes if o.scenario == "security" and o.kind == "raftcache"}
    return {op: by[(True, op)] / by[(False, op)] for op in ("set", "get")
            if by.get((False, op)) and (True, op) in by}
