"""Pagemap entries and what follows from them: lazy ranges and page offsets.

``pagemap-<pid>.img`` holds a ``pagemap_head {pages_id}`` and then entries
sorted by address. The page count lives in two fields: field 2
(``compat_nr_pages``, u32, required; CRIU <= 4.1 called it ``nr_pages``) and
field 5 (``nr_pages``, u64, CRIU >= 4.2). lazymig writes both (field 2 is 0 when
the count does not fit in 32 bits) and reads field 5 when it is present and
non-zero, else field 2. Entries without ``flags`` follow CRIU's legacy rule:
``in_parent`` means PE_PARENT, anything else PE_PRESENT.

``pages-<pages_id>.img`` is the concatenation, in pagemap order, of the pages
of every entry that has PE_PRESENT and not PE_PARENT.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images._wire import Fields, scalar
from lazymig.proto.runs import PageRuns

if TYPE_CHECKING:
    from lazymig.proto.images import pagemap_pb2

__all__ = [
    "PageIndex",
    "PageRange",
    "PagemapEntry",
    "lazy_ranges",
]

_ADDR_LIMIT = 1 << 64
_U32_MAX = 0xFFFF_FFFF


@dataclasses.dataclass(frozen=True, slots=True)
class PagemapEntry:
    """One pagemap entry: *nr_pages* pages from *vaddr*, with PE flags.

    Raises:
        ConfigurationError: *vaddr* not page-aligned or negative, *nr_pages* < 1,
            or the range runs past the top of the 64-bit address space.
    """

    vaddr: int
    nr_pages: int
    flags: PE

    def __post_init__(self) -> None:
        if self.vaddr < 0 or self.vaddr % PAGE_SIZE:
            raise ConfigurationError(f"pagemap vaddr {self.vaddr:#x} is not a page address")
        if self.nr_pages < 1:
            raise ConfigurationError(f"pagemap entry at {self.vaddr:#x} has {self.nr_pages} pages")
        if self.vaddr + self.nr_pages * PAGE_SIZE > _ADDR_LIMIT:
            raise ConfigurationError(f"pagemap entry at {self.vaddr:#x} with {self.nr_pages} "
                                     "pages runs past the end of the address space")
        if not isinstance(self.flags, PE):
            object.__setattr__(self, "flags", PE(self.flags))

    @property
    def end(self) -> int:
        """The first address after the entry."""
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def has_data(self) -> bool:
        """True if the entry's pages are in this dump's pages image (PRESENT, not PARENT)."""
        return PE.PRESENT in self.flags and PE.PARENT not in self.flags

    @property
    def is_lazy(self) -> bool:
        """True if the pages may be delivered after restore (PE_LAZY)."""
        return PE.LAZY in self.flags

    @classmethod
    def from_fields(cls, pe: Fields) -> PagemapEntry:
        """One ``pagemap_entry`` from its wire fields (:mod:`._wire`), by CRIU's
        compatibility rules.

        Raises:
            ValueError: not a pagemap_entry (ConfigurationError: an impossible one).
        """
        vaddr = scalar(pe, 1, "vaddr")
        compat_nr_pages = scalar(pe, 2, "compat_nr_pages")
        nr_pages = scalar(pe, 5, "nr_pages", 0) or compat_nr_pages
        in_parent = bool(scalar(pe, 3, "in_parent", 0))
        if 4 in pe:
            flags = PE(scalar(pe, 4, "flags"))
            if in_parent:
                flags |= PE.PARENT
        else:
            flags = PE.PARENT if in_parent else PE.PRESENT
        return cls(vaddr, nr_pages, flags)

    def to_pb(self) -> pagemap_pb2.pagemap_entry:
        """Build the ``pagemap_entry`` lazymig writes (count in fields 2 and 5, flags set)."""
        from lazymig.proto.images import pagemap_pb2

        return pagemap_pb2.pagemap_entry(
            vaddr=self.vaddr,
            compat_nr_pages=self.nr_pages if self.nr_pages <= _U32_MAX else 0,
            flags=int(self.flags),
            nr_pages=self.nr_pages,
        )


class PageRange(NamedTuple):
    """A run of *nr_pages* pages from *vaddr* (a plain ``(vaddr, nr_pages)`` tuple)."""

    vaddr: int
    nr_pages: int

    @property
    def end(self) -> int:
        """The first address after the range."""
        return self.vaddr + self.nr_pages * PAGE_SIZE


def check_sorted(entries: Sequence[PagemapEntry]) -> None:
    """Raise ConfigurationError unless the entries are sorted and do not overlap."""
    for prev, cur in itertools.pairwise(entries):
        if cur.vaddr < prev.end:
            raise ConfigurationError(f"pagemap entry at {cur.vaddr:#x} overlaps or precedes "
                                     f"the one at {prev.vaddr:#x}")


def lazy_ranges(entries: Iterable[PagemapEntry],
                vmas: Iterable[tuple[int, int]]) -> list[PageRange]:
    """The lazy pages (PE_LAZY entries) cut at VMA boundaries, as CRIU's ``collect_iovs``.

    ``UFFDIO_COPY`` cannot cross a VMA, so each lazy entry is split where VMAs
    end; parts of an entry outside every VMA are dropped. Ranges come out in
    address order, one or more per lazy entry; adjacent ranges are not merged.

    Args:
        entries: pagemap entries sorted by address, not overlapping.
        vmas: ``(start, end)`` of each VMA, page-aligned, not overlapping
            (sorted here).

    Raises:
        ConfigurationError: unsorted entries, or a malformed or overlapping VMA.
    """
    spans = sorted(vmas)
    for start, end in spans:
        if start % PAGE_SIZE or end % PAGE_SIZE or start >= end:
            raise ConfigurationError(f"VMA {start:#x}-{end:#x} is empty or not page-aligned")
    for (_, prev_end), (start, _) in itertools.pairwise(spans):
        if start < prev_end:
            raise ConfigurationError(f"VMA at {start:#x} overlaps the one before it")
    lazy = [e for e in entries if e.is_lazy]
    check_sorted(lazy)

    out: list[PageRange] = []
    i = 0
    for entry in lazy:
        start, end = entry.vaddr, entry.end
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            lo = max(start, spans[j][0])
            hi = min(end, spans[j][1])
            out.append(PageRange(lo, (hi - lo) // PAGE_SIZE))
            if spans[j][1] >= end:
                break
            j += 1
    return out


class PageIndex:
    """Where each page with data lives in ``pages-<pages_id>.img``.

    Built from one pagemap's entries (sorted); entries with PE_PRESENT and not
    PE_PARENT own consecutive slices of the pages image in pagemap order.
    Lookups are ``O(log n)``.

    Raises:
        ConfigurationError: the entries are not sorted or overlap.
    """

    __slots__ = ("_entries", "_offsets", "_runs", "size")

    def __init__(self, entries: Iterable[PagemapEntry]) -> None:
        data = [e for e in entries if e.has_data]
        check_sorted(data)
        self._entries = data
        self._runs = PageRuns((e.vaddr, e.nr_pages) for e in data)
        self._offsets: list[int] = []
        offset = 0
        for e in data:
            self._offsets.append(offset)
            offset += e.nr_pages * PAGE_SIZE
        self.size = offset
        """The size the pages image must have, in bytes."""

    @property
    def nr_pages(self) -> int:
        """Pages with data, i.e. the pages image's size in pages."""
        return self.size // PAGE_SIZE

    def __iter__(self) -> Iterator[tuple[PagemapEntry, int]]:
        """Yield ``(entry, byte offset in the pages image)`` for each entry with data."""
        return iter(zip(self._entries, self._offsets, strict=True))

    def __len__(self) -> int:
        return len(self._entries)

    def offset(self, vaddr: int, nr_pages: int = 1) -> int | None:
        """Byte offset in the pages image of *nr_pages* pages from *vaddr*.

        Returns None unless every page of the run has data in the image. A run
        may span several entries if they are adjacent in memory (their data is
        then adjacent in the image too).

        Raises:
            ConfigurationError: *vaddr* not page-aligned or *nr_pages* < 1.
        """
        if vaddr < 0 or vaddr % PAGE_SIZE or nr_pages < 1:
            raise ConfigurationError(f"bad page run {vaddr:#x} x {nr_pages}")
        i = self._runs.find(vaddr)
        if i < 0 or not self._runs.contiguous_from(i, vaddr + nr_pages * PAGE_SIZE):
            return None
        return self._offsets[i] + (vaddr - self._runs.start(i))
