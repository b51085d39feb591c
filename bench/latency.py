"""Latency percentiles as every bench reports them."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def p50_p99_ms(seconds: Iterable[float]) -> tuple[float, float]:
    """The p50 and p99 of latencies given in seconds, in milliseconds (inclusive quantiles)."""
    cuts = statistics.quantiles(sorted(s * 1000 for s in seconds), n=100, method="inclusive")
    return cuts[49], cuts[98]
