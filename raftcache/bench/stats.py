"""The figures `raftcache bench` reports: latency percentiles (nearest rank) and, over
repetitions, the median and the spread (min-max)."""

from __future__ import annotations

import math
import statistics

# The percentiles reported per operation: name -> fraction.
QUANTILES = (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))


def percentile(sorted_values: list, q: float):
    """The nearest-rank percentile: the smallest value with at least a fraction `q` of the
    values at or below it (`sorted_values` ascending and not empty; 0 < q <= 1)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_us: list[int]) -> dict:
    """{"count", "p50_ms", "p99_ms", "p999_ms"} of latencies in µs (0.0 when there are none)."""
    ordered = sorted(latencies_us)
    out = {"count": len(ordered)}
    for name, q in QUANTILES:
        out[f"{name}_ms"] = round(percentile(ordered, q) / 1000, 3) if ordered else 0.0
    return out


def spread(values: list[float]) -> dict:
    """{"median", "min", "max"} of one figure over repetitions."""
    if not values:
        raise ValueError("no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
