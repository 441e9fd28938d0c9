"""The fault-latency histogram: percentiles within 1% of the exact ones, in bounded memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lazymig.uffd.latency import LatencyHistogram

durations = st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=300)
quantiles = st.sampled_from([0.0, 0.25, 0.5, 0.9, 0.99, 1.0])


def exact(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@given(durations, quantiles)
def test_percentiles_are_within_one_percent(samples: list[float], q: float) -> None:
    histogram = LatencyHistogram()
    for seconds in samples:
        histogram.add(seconds)
    assert len(histogram) == len(samples)
    got = histogram.percentile(q)
    assert got is not None
    assert abs(got - exact(samples, q)) <= 0.01 * exact(samples, q)


@given(durations, durations, quantiles)
def test_merging_equals_counting_together(a: list[float], b: list[float], q: float) -> None:
    left, right, together = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for seconds in a:
        left.add(seconds)
        together.add(seconds)
    for seconds in b:
        right.add(seconds)
        together.add(seconds)
    left.merge(right)
    assert len(left) == len(together)
    assert left.percentile(q) == together.percentile(q)


def test_empty_and_memory_bound() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(0.5) is None
    for i in range(200_000):  # 10 us to 1 ms: a 100x spread is at most log(100)/log(1.01)
        histogram.add(1e-5 + (i % 1000) * 1e-6)
    assert len(histogram) == 200_000
    assert len(histogram._counts) <= 464
    assert (fastest := histogram.percentile(0.0)) is not None and fastest < 1.01e-5
