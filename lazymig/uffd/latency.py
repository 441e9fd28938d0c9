"""Fault round trips kept as a histogram: percentiles in memory that does not grow.

A daemon serving a random-access workload sees a fault per page or so; a list of
every round trip would grow with the region (millions of floats) and sorting it
for each progress snapshot would cost more the longer the migration runs.
Log-spaced buckets 1% wide keep any percentile within 1% of the exact value.
"""

from __future__ import annotations

import math

__all__ = ["LatencyHistogram"]

_GROWTH = 1.01
_FLOOR = 1e-7  # 0.1 us: anything faster lands in the first bucket
_LOG_GROWTH = math.log(_GROWTH)


class LatencyHistogram:
    """Durations in seconds, counted in buckets 1% wide.

    >>> h = LatencyHistogram()
    >>> for us in (100, 200, 300):
    ...     h.add(us * 1e-6)
    >>> abs(h.percentile(0.5) - 200e-6) < 2e-6
    True
    """

    __slots__ = ("_counts", "_total")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._total = 0

    def add(self, seconds: float) -> None:
        """Count one duration."""
        bucket = 0 if seconds <= _FLOOR else int(math.log(seconds / _FLOOR) / _LOG_GROWTH)
        self._counts[bucket] = self._counts.get(bucket, 0) + 1
        self._total += 1

    def merge(self, other: LatencyHistogram) -> None:
        """Add every duration counted by ``other``."""
        for bucket, count in other._counts.items():
            self._counts[bucket] = self._counts.get(bucket, 0) + count
        self._total += other._total

    def __len__(self) -> int:
        return self._total

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) in seconds (the middle of its bucket); None if empty."""
        if not self._total:
            return None
        rank = min(self._total - 1, int(q * self._total))
        seen = 0
        for bucket in sorted(self._counts):
            seen += self._counts[bucket]
            if seen > rank:
                return float(_FLOOR * _GROWTH ** (bucket + 0.5))
        raise AssertionError("unreachable: the counts add up to the total")
