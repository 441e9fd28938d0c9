"""PageRuns, the one sorted page-run lookup, against a page-by-page model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.runs import PageRuns

BASE = 0x7F0000000000


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Sorted disjoint runs: gaps of 0 (neighbours that continue each other) or more."""
    runs, page = [], 0
    for _ in range(draw(st.integers(0, 12))):
        page += draw(st.sampled_from([0, 0, 1, 3]))
        nr = draw(st.integers(1, 5))
        runs.append((BASE + page * PAGE_SIZE, nr))
        page += nr
    return runs


def owner(runs: list[tuple[int, int]], page: int) -> int:
    for i, (vaddr, nr) in enumerate(runs):
        if vaddr <= BASE + page * PAGE_SIZE < vaddr + nr * PAGE_SIZE:
            return i
    return -1


@given(layouts(), st.integers(-2, 70), st.integers(1, 20))
def test_lookups_agree_with_the_model(runs: list[tuple[int, int]], page: int,
                                      length: int) -> None:
    table = PageRuns(runs)
    assert list(table) == runs and len(table) == len(runs)
    assert table.pages == sum(nr for _, nr in runs)
    vaddr, end = BASE + page * PAGE_SIZE, BASE + (page + length) * PAGE_SIZE
    i = owner(runs, page)
    assert table.find(vaddr) == i
    assert table.pages_from(vaddr) == (
        0 if i < 0 else (runs[i][0] + runs[i][1] * PAGE_SIZE - vaddr) // PAGE_SIZE)
    assert list(table.overlapping(vaddr, end)) == sorted(
        {owner(runs, p) for p in range(page, page + length)} - {-1})
    if i >= 0:
        covered = all(owner(runs, p) >= 0 for p in range(page, page + length))
        assert table.contiguous_from(i, end) == covered


@given(layouts())
def test_merged_joins_exactly_the_neighbours(runs: list[tuple[int, int]]) -> None:
    merged = PageRuns.merged(reversed(runs))
    pages = {v + k * PAGE_SIZE for v, n in runs for k in range(n)}
    assert {v + k * PAGE_SIZE for v, n in merged for k in range(n)} == pages
    assert all(a[0] + a[1] * PAGE_SIZE < b[0] for a, b in itertools.pairwise(merged))


@pytest.mark.parametrize("runs", [
    [(BASE, 2), (BASE + PAGE_SIZE, 1)],  # overlap
    [(BASE + PAGE_SIZE, 1), (BASE, 1)],  # not sorted
    [(BASE, 0)],
    [(BASE + 1, 1)],
])
def test_bad_tables_are_refused(runs: list[tuple[int, int]]) -> None:
    with pytest.raises(ConfigurationError):
        PageRuns(runs)
