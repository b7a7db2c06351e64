"""Percentiles and latency summaries for the benchmark (pure Python, no numpy needed).

``percentile`` uses linear interpolation between closest ranks (numpy's default ``"linear"`` method,
R type 7): for sorted samples ``x[0..n-1]`` the q-th percentile is ``x[h]`` interpolated at
``h = (n - 1) * q / 100``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation; NaN for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{n, p50, p95, p99, min, max, mean}`` of ``values`` (NaN figures when empty)."""
    xs = [float(v) for v in values]
    if not xs:
        nan = math.nan
        return {"n": 0, "p50": nan, "p95": nan, "p99": nan, "min": nan, "max": nan, "mean": nan}
    return {
        "n": len(xs),
        "p50": percentile(xs, 50),
        "p95": percentile(xs, 95),
        "p99": percentile(xs, 99),
        "min": min(xs),
        "max": max(xs),
        "mean": sum(xs) / len(xs),
    }


def median_index(values: Sequence[float]) -> int:
    """Index of the sample closest to the median (the "median call" a waterfall chart shows)."""
    if not values:
        raise ValueError("no values")
    med = percentile(values, 50)
    return min(range(len(values)), key=lambda i: (abs(values[i] - med), i))


__all__ = ["median_index", "percentile", "summarize"]
