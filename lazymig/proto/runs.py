"""Runs of pages, ``(vaddr, nr_pages)``, sorted and disjoint, found by address.

The one lookup behind every table of page runs (:class:`Runs`). Fixed tables are
:class:`PageRuns`: a pagemap's entries with data
(:class:`~lazymig.proto.images.PageIndex`), a dump's lazy ranges and the page
server's bookkeeping of what it never served, the page pipes' index; they keep
what they attach to each run in lists of their own, by index. The daemon's
lazy-page states (:mod:`lazymig.uffd.ranges`) are :class:`Runs` too, but edited in
place on every fault: split, merged with their neighbours, linked to a second
address space, so they keep their own edits and share only the lookup.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SIZE

__all__ = ["PageRuns", "Runs"]

_Item = TypeVar("_Item", bound=tuple[int, ...])


class Runs(Generic[_Item]):
    """Sorted, disjoint runs ``[start, end)`` of integers, found by bisection: the
    lookup shared by the fixed tables (:class:`PageRuns`, by address) and the
    changing ones (the lazy-page states of :mod:`lazymig.uffd.ranges`, by page
    number, edited in place on every fault).

    ``items[i]`` is run ``i`` as a tuple whose first two fields are its start and
    end (a table attaches more after them); ``starts[i]`` is ``items[i][0]``, kept
    apart for bisect. A subclass fills both and keeps them sorted and disjoint.
    """

    __slots__ = ("items", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.items: list[_Item] = []

    def __len__(self) -> int:
        return len(self.items)

    def find(self, x: int) -> int:
        """The index of the run holding ``x``, or -1."""
        i = bisect.bisect_right(self.starts, x) - 1
        return i if i >= 0 and x < self.items[i][1] else -1

    def overlapping(self, lo: int, hi: int) -> range:
        """The indexes of the runs that overlap ``[lo, hi)``."""
        i = bisect.bisect_right(self.starts, lo) - 1
        if i < 0 or self.items[i][1] <= lo:
            i += 1
        return range(i, max(i, bisect.bisect_left(self.starts, hi)))


class PageRuns(Runs[tuple[int, int]]):
    """Sorted, disjoint page runs given as ``(vaddr, nr_pages)``; lookups by address
    are ``O(log n)``; ``items`` holds each run's ``(start, end)`` in bytes.

    Raises:
        ConfigurationError: the runs are not sorted, overlap, or one is empty.
    """

    __slots__ = ("pages",)

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        super().__init__()
        end = -1
        for vaddr, nr_pages in runs:
            if nr_pages < 1 or vaddr % PAGE_SIZE:
                raise ConfigurationError(f"bad page run {vaddr:#x} x {nr_pages}")
            if vaddr < end:
                raise ConfigurationError(f"page runs overlap or are not sorted at {vaddr:#x}")
            end = vaddr + nr_pages * PAGE_SIZE
            self.starts.append(vaddr)
            self.items.append((vaddr, end))
        self.pages = sum(e - s for s, e in self.items) // PAGE_SIZE
        """Pages in all the runs."""

    @classmethod
    def merged(cls, runs: Iterable[tuple[int, int]]) -> PageRuns:
        """The runs sorted, with neighbours that continue each other joined into one (a
        region split over many page pipes or pagemap entries is one run to a reader)."""
        out: list[tuple[int, int]] = []
        for vaddr, nr_pages in sorted(runs):
            if out and out[-1][0] + out[-1][1] * PAGE_SIZE == vaddr:
                out[-1] = (out[-1][0], out[-1][1] + nr_pages)
            else:
                out.append((vaddr, nr_pages))
        return cls(out)

    def __getitem__(self, i: int) -> tuple[int, int]:
        start, end = self.items[i]
        return start, (end - start) // PAGE_SIZE

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((s, (e - s) // PAGE_SIZE) for s, e in self.items)

    def start(self, i: int) -> int:
        return self.starts[i]

    def end(self, i: int) -> int:
        """One past the last byte of run ``i``."""
        return self.items[i][1]

    def pages_from(self, vaddr: int) -> int:
        """Pages from page-aligned ``vaddr`` to the end of its run (0 outside every run)."""
        i = self.find(vaddr)
        return 0 if i < 0 or vaddr % PAGE_SIZE else (self.items[i][1] - vaddr) // PAGE_SIZE

    def contiguous_from(self, i: int, end: int) -> bool:
        """Whether runs ``i``, ``i + 1``, ... follow each other without a gap up to
        ``end``."""
        items = self.items
        for j in itertools.count(i):
            if items[j][1] >= end:
                return True
            if j + 1 == len(items) or items[j + 1][0] != items[j][1]:
                return False
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        return f"<PageRuns {len(self)} runs, {self.pages} pages>"
