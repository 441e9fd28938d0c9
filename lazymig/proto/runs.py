"""Runs of pages, ``(vaddr, nr_pages)``, sorted and disjoint, found by address.

The one lookup behind every fixed table of page runs: a pagemap's entries with
data (:class:`~lazymig.proto.images.PageIndex`), a dump's lazy ranges and the
page server's bookkeeping of what it never served, the page pipes' index. The
tables keep what they attach to each run in lists of their own, by index.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SIZE

__all__ = ["PageRuns"]


class PageRuns:
    """Sorted, disjoint page runs; lookups are ``O(log n)``.

    Raises:
        ConfigurationError: the runs are not sorted, overlap, or one is empty.
    """

    __slots__ = ("_ends", "_starts", "pages")

    def __init__(self, runs: Iterable[tuple[int, int]]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        end = -1
        for vaddr, nr_pages in runs:
            if nr_pages < 1 or vaddr % PAGE_SIZE:
                raise ConfigurationError(f"bad page run {vaddr:#x} x {nr_pages}")
            if vaddr < end:
                raise ConfigurationError(f"page runs overlap or are not sorted at {vaddr:#x}")
            end = vaddr + nr_pages * PAGE_SIZE
            self._starts.append(vaddr)
            self._ends.append(end)
        self.pages = sum(e - s for s, e in zip(self._starts, self._ends, strict=True)
                         ) // PAGE_SIZE
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

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self._starts[i], (self._ends[i] - self._starts[i]) // PAGE_SIZE

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((s, (e - s) // PAGE_SIZE) for s, e in zip(self._starts, self._ends, strict=True))

    def start(self, i: int) -> int:
        return self._starts[i]

    def end(self, i: int) -> int:
        """One past the last byte of run ``i``."""
        return self._ends[i]

    def find(self, vaddr: int) -> int:
        """The index of the run holding ``vaddr``, or -1."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        return i if i >= 0 and vaddr < self._ends[i] else -1

    def pages_from(self, vaddr: int) -> int:
        """Pages from page-aligned ``vaddr`` to the end of its run (0 outside every run)."""
        i = self.find(vaddr)
        return 0 if i < 0 or vaddr % PAGE_SIZE else (self._ends[i] - vaddr) // PAGE_SIZE

    def overlapping(self, vaddr: int, end: int) -> range:
        """The indexes of the runs that overlap ``[vaddr, end)``."""
        first = bisect.bisect_right(self._ends, vaddr)
        return range(first, max(first, bisect.bisect_left(self._starts, end)))

    def contiguous_from(self, i: int, end: int) -> bool:
        """Whether runs ``i``, ``i + 1``, ... follow each other without a gap up to
        ``end``."""
        for j in itertools.count(i):
            if self._ends[j] >= end:
                return True
            if j + 1 == len(self._starts) or self._starts[j + 1] != self._ends[j]:
                return False
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        return f"<PageRuns {len(self)} runs, {self.pages} pages>"
