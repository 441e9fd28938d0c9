"""Per-process lazy-page bookkeeping: what is still lazy, what is in flight.

This is CRIU's ``lazy_pages_info`` (criu/uffd.c: ``iovs`` still lazy, ``reqs``
in flight) as a pure object: no I/O, no kernel, no asyncio. The daemon feeds it
faults and uffd events and asks it what to fetch and where to copy.

Every page of a lazy range is in one of these states::

                take_fault / take_background          complete
    PENDING ───────────────────────────────► IN_FLIGHT ─────────► COPIED
       ▲                                          │                  │
       └────────────────── requeue ───────────────┴──────────────────┘
    remove / unmap (DONTNEED, munmap): any state ──► forgotten (never filled)

Two addresses are tracked for every page: ``vaddr``, its address at dump time
(what the page server knows it by, used in GET requests and their replies) and
``dst``, its address in the restored process now (where UFFDIO_COPY must go).
They differ once the process has mremap()ed the page (a REMAP event).

Representation: each state is a sorted list of disjoint page intervals, each
with a linear link to the other address space and a *segment* id; bisect
(:class:`lazymig.proto.runs.Runs`, the lookup of every page-run table) finds
an interval in O(log n) of the number of intervals, never per page, so a
1 GiB range is one interval. Intervals merge only when they are adjacent,
linked contiguously, and of the same segment. A segment is one lazy range given
to the constructor (ranges are cut at VMA boundaries, and a UFFDIO_COPY must not
cross a VMA), or one piece moved by a remap; requests never cross segments.

COPIED is what is left of the lazy pages (the *known* set, moved by remaps and
cut by drops) once PENDING and IN_FLIGHT are taken out: completing a request
only removes intervals, it adds none (on a random reader's path the copied
pages would be one interval per fault). So a copy that failed can be put back
with :meth:`LazyRanges.requeue` by its ``vaddr`` alone, and a REMOVE or UNMAP
that arrives before that requeue still forgets those pages: pages dropped by
the process are never filled with stale data.
"""

from __future__ import annotations

import enum
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.runs import Runs

__all__ = ["CopyRange", "LazyRanges", "PageState", "Request"]

_MASK: Final = PAGE_SIZE - 1

# An interval: (start page, end page, linked start page, segment id).
_Iv = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Request:
    """Pages to fetch: ``nr_pages`` from ``vaddr`` (dump-time address, for the
    GET) that belong at ``dst`` (current address, for the UFFDIO_COPY)."""

    vaddr: int
    dst: int
    nr_pages: int

    @property
    def length(self) -> int:
        """``nr_pages`` in bytes."""
        return self.nr_pages << PAGE_SHIFT


@dataclass(frozen=True, slots=True)
class CopyRange:
    """Part of arrived data to UFFDIO_COPY: ``nr_pages`` pages that were fetched
    from ``vaddr`` go to ``dst``; they start ``offset`` bytes into the data
    passed to :meth:`LazyRanges.complete`."""

    vaddr: int
    dst: int
    nr_pages: int
    offset: int

    @property
    def length(self) -> int:
        """``nr_pages`` in bytes."""
        return self.nr_pages << PAGE_SHIFT


class PageState(enum.Enum):
    """Where a page stands (see the module docstring)."""

    NOT_LAZY = "not lazy"  # never was, or dropped by REMOVE/UNMAP: answer with ZEROPAGE
    PENDING = "pending"
    IN_FLIGHT = "in flight"
    COPIED = "copied"


class _Spans(Runs[_Iv]):
    """Sorted disjoint page intervals ``[start, end)``, each linked linearly to
    another address space (``link`` is where ``start`` maps) and tagged with a
    segment. Adjacent intervals that continue each other are kept merged.

    The lookup (``find``, ``overlapping``) is :class:`~lazymig.proto.runs.Runs`',
    shared with the dump's fixed page tables; the edits are this class's own: a
    fixed table is built once, these intervals are split, merged and moved on
    every fault and uffd event, in place.
    """

    __slots__ = ("pages",)

    def __init__(self) -> None:
        super().__init__()
        self.pages = 0

    def clipped(self, lo: int, hi: int) -> list[_Iv]:
        """What lies in ``[lo, hi)``, clipped, in order (left in place)."""
        items = self.items
        out: list[_Iv] = []
        for i in self.overlapping(lo, hi):
            start, end, link, seg = items[i]
            a = max(start, lo)
            out.append((a, min(end, hi), link + a - start, seg))
        return out

    def cut(self, lo: int, hi: int) -> list[_Iv]:
        """Remove ``[lo, hi)`` and return what was there, clipped, in order."""
        items = self.items
        i = bisect_right(self.starts, lo) - 1
        if i >= 0 and hi <= items[i][1] and lo < hi:
            return [self.cut_inside(i, lo, hi)]
        if i < 0 or items[i][1] <= lo:
            i += 1
        j = i
        removed: list[_Iv] = []
        keep: list[_Iv] = []
        n = len(items)
        while j < n and items[j][0] < hi:
            start, end, link, seg = items[j]
            if start < lo:
                keep.append((start, lo, link, seg))
            a, b = max(start, lo), min(end, hi)
            removed.append((a, b, link + a - start, seg))
            self.pages -= b - a
            if end > hi:
                keep.append((hi, end, link + hi - start, seg))
            j += 1
        if removed:
            items[i:j] = keep
            self.starts[i:j] = [iv[0] for iv in keep]
        return removed

    def cut_inside(self, i: int, lo: int, hi: int) -> _Iv:
        """:meth:`cut` of ``[lo, hi)`` lying inside interval ``i`` (a fault's or a
        reply's usual case), without building lists: it is on every fault's path."""
        items, starts = self.items, self.starts
        start, end, link, seg = items[i]
        self.pages -= hi - lo
        if lo > start:
            items[i] = (start, lo, link, seg)
            if hi < end:
                items.insert(i + 1, (hi, end, link + hi - start, seg))
                starts.insert(i + 1, hi)
        elif hi < end:
            items[i] = (hi, end, link + hi - start, seg)
            starts[i] = hi
        else:
            del items[i], starts[i]
        return (lo, hi, link + lo - start, seg)

    def add(self, start: int, end: int, link: int, seg: int) -> None:
        """Insert ``[start, end)``, which must not overlap anything, merging it
        with neighbours that continue it."""
        items, starts = self.items, self.starts
        i = bisect_right(starts, start)
        if (i > 0 and items[i - 1][1] > start) or (i < len(items) and items[i][0] < end):
            raise AssertionError(f"lazymig bug: interval [{start}, {end}) overlaps")
        self.pages += end - start
        if i > 0:
            ls, le, ll, lg = items[i - 1]
            if le == start and lg == seg and ll + (le - ls) == link:
                start, link = ls, ll
                i -= 1
                del items[i], starts[i]
        if i < len(items):
            rs, re, rl, rg = items[i]
            if rs == end and rg == seg and link + (end - start) == rl:
                end = re
                del items[i], starts[i]
        items.insert(i, (start, end, link, seg))
        starts.insert(i, start)

    def check(self) -> None:
        """Assert the representation invariants (for tests)."""
        assert self.starts == [iv[0] for iv in self.items]
        assert self.pages == sum(e - s for s, e, _, _ in self.items)
        for (s1, e1, l1, g1), (s2, _, l2, g2) in zip(self.items, self.items[1:], strict=False):
            assert s1 < e1 <= s2
            assert not (e1 == s2 and g1 == g2 and l1 + (e1 - s1) == l2), "unmerged"
        if self.items:
            assert self.items[-1][0] < self.items[-1][1]


class _Linked:
    """Intervals indexed both by current address (``by_dst``, linked to vaddr)
    and by dump-time address (``by_src``, linked to dst)."""

    __slots__ = ("by_dst", "by_src")

    def __init__(self) -> None:
        self.by_dst = _Spans()
        self.by_src = _Spans()

    def add(self, dst: int, end: int, src: int, seg: int) -> None:
        self.by_dst.add(dst, end, src, seg)
        self.by_src.add(src, src + end - dst, dst, seg)

    def cut_dst(self, lo: int, hi: int) -> list[_Iv]:
        """Remove current pages ``[lo, hi)``; returns ``(dst, end, src, seg)``."""
        pieces = self.by_dst.cut(lo, hi)
        for dst, end, src, _ in pieces:
            self.by_src.cut(src, src + end - dst)
        return pieces

    def cut_src(self, lo: int, hi: int) -> list[_Iv]:
        """Remove dump-time pages ``[lo, hi)``; returns ``(src, end, dst, seg)``."""
        pieces = self.by_src.cut(lo, hi)
        for src, end, dst, _ in pieces:
            self.by_dst.cut(dst, dst + end - src)
        return pieces

    @property
    def pages(self) -> int:
        return self.by_dst.pages

    def check(self) -> None:
        self.by_dst.check()
        self.by_src.check()
        mirrored = sorted((s, s + e - d, d, g) for d, e, s, g in self.by_dst.items)
        assert _coalesce(mirrored) == _coalesce(self.by_src.items)


def _coalesce(ivs: Iterable[_Iv]) -> list[_Iv]:
    out: list[_Iv] = []
    for s, e, link, g in ivs:
        if out and out[-1][1] == s and out[-1][3] == g and out[-1][2] + s - out[-1][0] == link:
            ps, _, pl, _ = out[-1]
            out[-1] = (ps, e, pl, g)
        else:
            out.append((s, e, link, g))
    return out


def _page(addr: int, what: str) -> int:
    if addr < 0 or addr & _MASK:
        raise ConfigurationError(f"{what}: address {addr:#x} is not page-aligned")
    return addr >> PAGE_SHIFT


def _span(start: int, end: int) -> tuple[int, int]:
    """Pages touching byte range ``[start, end)`` (rounded outwards)."""
    return start >> PAGE_SHIFT, (end + _MASK) >> PAGE_SHIFT


class LazyRanges:
    """The lazy pages of one process and where each stands.

    Args:
        ranges: ``(vaddr, nr_pages)`` lazy ranges, page-aligned, disjoint, each
            inside one VMA (adjacent ranges are never merged: they may be two VMAs).
        prefetch: pages a fault asks for: the aligned block of ``prefetch``
            pages around the faulting page, clipped to its pending interval.

    Addresses are bytes; everything is O(log n) in the number of intervals.
    """

    __slots__ = ("_in_flight", "_known", "_next_seg", "_pending", "claimed_dst", "claimed_vaddr",
                 "pages_copied", "pages_dropped", "pages_total", "prefetch")

    def __init__(self, ranges: Iterable[tuple[int, int]], *, prefetch: int = 1) -> None:
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1 page, not {prefetch}")
        self.prefetch = prefetch
        self._pending = _Spans()
        self._in_flight = _Linked()
        self._known = _Linked()  # pending, in flight or copied: every page still lazy once
        seg = -1
        for seg, (vaddr, nr_pages) in enumerate(sorted(ranges)):
            start = _page(vaddr, "lazy range")
            if nr_pages <= 0:
                raise ConfigurationError(f"lazy range at {vaddr:#x} has {nr_pages} pages")
            if self._pending.items and self._pending.items[-1][1] > start:
                raise ConfigurationError(f"lazy range at {vaddr:#x} overlaps the previous one")
            self._pending.add(start, start + nr_pages, start, seg)
            self._known.add(start, start + nr_pages, start, seg)
        self._next_seg = seg + 1
        self.pages_total = self._pending.pages
        """Pages that were lazy at the start (not corrected by REMOVE/UNMAP, as CRIU)."""
        self.pages_copied = 0
        """Pages handed out by :meth:`complete` for copying, less those requeued."""
        self.pages_dropped = 0
        """Pending or in-flight pages forgotten because of REMOVE, UNMAP or a remap."""
        self.claimed_vaddr = 0
        """The dump-time address of what the last :meth:`claim_fault` marked in flight."""
        self.claimed_dst = 0
        """Its current address."""

    # ------------------------------------------------------------------ queries

    @property
    def pages_pending(self) -> int:
        """Pages still lazy and not requested."""
        return self._pending.pages

    @property
    def pages_in_flight(self) -> int:
        """Pages requested and not completed."""
        return self._in_flight.pages

    @property
    def done(self) -> bool:
        """Nothing pending and nothing in flight: this process needs nothing more."""
        return self._pending.pages == 0 and self._in_flight.pages == 0

    def state(self, addr: int) -> PageState:
        """The state of the page holding ``addr`` (current address)."""
        page = addr >> PAGE_SHIFT
        if self._pending.find(page) >= 0:
            return PageState.PENDING
        if self._in_flight.by_dst.find(page) >= 0:
            return PageState.IN_FLIGHT
        if self._known.by_dst.find(page) >= 0:
            return PageState.COPIED
        return PageState.NOT_LAZY

    def is_lazy(self, addr: int) -> bool:
        """True if the page holding ``addr`` is pending or in flight: its content
        will come from the source. False means a fault there gets UFFDIO_ZEROPAGE."""
        page = addr >> PAGE_SHIFT
        return self._pending.find(page) >= 0 or self._in_flight.by_dst.find(page) >= 0

    def in_flight(self, addr: int) -> bool:
        """True if the page holding ``addr`` (current address) is in flight."""
        return self._in_flight.by_dst.find(addr >> PAGE_SHIFT) >= 0

    def pending_ranges(self) -> list[Request]:
        """The pending intervals by current address (a snapshot, for logs and tests)."""
        return [Request(link << PAGE_SHIFT, start << PAGE_SHIFT, end - start)
                for start, end, link, _ in self._pending.items]

    def in_flight_ranges(self) -> list[Request]:
        """The in-flight intervals by current address (a snapshot)."""
        return [Request(link << PAGE_SHIFT, start << PAGE_SHIFT, end - start)
                for start, end, link, _ in self._in_flight.by_dst.items]

    # ------------------------------------------------------------------ requests

    def _take(self, index: int, lo: int, hi: int) -> Request:
        start, _, link, seg = self._pending.items[index]
        src = link + lo - start
        self._pending.cut_inside(index, lo, hi)  # [lo, hi) lies inside that interval
        self._in_flight.add(lo, hi, src, seg)
        return Request(src << PAGE_SHIFT, lo << PAGE_SHIFT, hi - lo)

    def take_fault(self, addr: int, prefetch: int | None = None) -> Request | None:
        """A fault at ``addr`` (current address): mark its page, and up to
        ``prefetch`` pages around it (default :attr:`prefetch`; 1: the page alone)
        in the same pending interval, in flight.

        Returns:
            What to fetch, or None when the page is already in flight or not lazy
            (tell the two apart with :meth:`is_lazy`).
        """
        nr_pages = self.claim_fault(addr, self.prefetch if prefetch is None else prefetch)
        return Request(self.claimed_vaddr, self.claimed_dst, nr_pages) if nr_pages else None

    def claim_fault(self, addr: int, prefetch: int) -> int:
        """:meth:`take_fault` for the fault path, with no :class:`Request`: returns how
        many pages it marked in flight (0 where take_fault returns None) and leaves
        their addresses in :attr:`claimed_vaddr` (dump-time, for the GET) and
        :attr:`claimed_dst` (current, for the UFFDIO_COPY)."""
        page = addr >> PAGE_SHIFT
        pending = self._pending
        i = bisect_right(pending.starts, page) - 1
        if i < 0:
            return 0
        start, end, link, seg = pending.items[i]
        if page >= end:
            return 0
        block = page - page % prefetch
        lo, hi = max(start, block), min(end, block + prefetch)
        pending.cut_inside(i, lo, hi)
        src = link + lo - start
        self._in_flight.add(lo, hi, src, seg)
        self.claimed_vaddr, self.claimed_dst = src << PAGE_SHIFT, lo << PAGE_SHIFT
        return hi - lo

    def take_background(self, max_pages: int, near: int | None = None) -> Request | None:
        """The next background chunk: up to ``max_pages`` pending pages, never across
        a range or VMA boundary, marked in flight. None when nothing is pending.

        It starts at the first pending page at or after ``near`` (a current
        address, e.g. just past the last fault: spatial locality, as QEMU's
        postcopy moves its scan to the requested page), wrapping around to the
        first pending interval; without ``near``, at the first pending interval.
        """
        if max_pages < 1:
            raise ConfigurationError(f"max_pages must be positive, not {max_pages}")
        items = self._pending.items
        if not items:
            return None
        index, lo = 0, items[0][0]
        if near is not None:
            page = near >> PAGE_SHIFT
            i = bisect_right(self._pending.starts, page) - 1
            if i >= 0 and page < items[i][1]:
                index, lo = i, page
            elif i + 1 < len(items):
                index, lo = i + 1, items[i + 1][0]
        _, end, _, _ = items[index]
        return self._take(index, lo, min(end, lo + max_pages))

    def complete(self, vaddr: int, nr_pages: int) -> list[CopyRange]:
        """Data for ``nr_pages`` from dump-time address ``vaddr`` arrived.

        Returns the parts still in flight (REMOVE, UNMAP or a remap may have
        dropped some meanwhile) with their current addresses, in ``vaddr``
        order; they become COPIED (by leaving IN_FLIGHT). UFFDIO_COPY each one; if a copy fails
        (recoverably, or short), :meth:`requeue` what was not copied, before
        handling the next fault, so that it is fetched again.
        """
        lo = _page(vaddr, "complete")
        pieces = self._in_flight.cut_src(lo, lo + max(nr_pages, 0))
        out = []
        for src, end, dst, _ in pieces:
            n = end - src
            self.pages_copied += n
            out.append(CopyRange(src << PAGE_SHIFT, dst << PAGE_SHIFT, n,
                                 (src - lo) << PAGE_SHIFT))
        return out

    def complete_whole(self, vaddr: int, nr_pages: int) -> int:
        """:meth:`complete` for the usual reply, whose pages lie in one in-flight
        interval: they become COPIED and their current address is returned (copy
        ``nr_pages`` there, from the start of the reply). Returns -1, changing
        nothing, for any other reply: call :meth:`complete` then. The fault path's
        version: no list, no :class:`CopyRange`."""
        if vaddr & _MASK or nr_pages <= 0:
            return -1
        lo = vaddr >> PAGE_SHIFT
        by_src, by_dst = self._in_flight.by_src, self._in_flight.by_dst
        i = by_src.find(lo)
        if i < 0:
            return -1
        start, end, link, _ = by_src.items[i]
        if lo + nr_pages > end:
            return -1
        dst = link + lo - start
        j = by_dst.find(dst)
        if j < 0 or dst + nr_pages > by_dst.items[j][1]:
            return -1
        by_src.cut_inside(i, lo, lo + nr_pages)
        by_dst.cut_inside(j, dst, dst + nr_pages)
        self.pages_copied += nr_pages
        return dst << PAGE_SHIFT

    def requeue(self, vaddr: int, nr_pages: int) -> int:
        """Put dump-time pages ``[vaddr, +nr_pages)`` back to pending, if they are
        in flight (the GET failed) or copied (the UFFDIO_COPY failed). Pages in
        another state are left alone: after a REMOVE or UNMAP they stay forgotten.

        Returns:
            The number of pages requeued.
        """
        lo = _page(vaddr, "requeue")
        hi = lo + max(nr_pages, 0)
        count = 0
        for src, end, dst, seg in self._in_flight.cut_src(lo, hi):
            self._pending.add(dst, dst + end - src, src, seg)
            count += end - src
        for src, end, dst, seg in self._known.by_src.clipped(lo, hi):
            for a, b in self._copied_runs(dst, dst + end - src):
                self._pending.add(a, b, src + a - dst, seg)
                count += b - a
                self.pages_copied -= b - a
        return count

    def _copied_runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The runs of known pages ``[lo, hi)`` (current addresses) that are neither
        pending nor in flight: copied."""
        taken = sorted(self._pending.clipped(lo, hi)
                       + self._in_flight.by_dst.clipped(lo, hi))
        runs, at = [], lo
        for start, end, _, _ in taken:
            if start > at:
                runs.append((at, start))
            at = end
        if at < hi:
            runs.append((at, hi))
        return runs

    # ------------------------------------------------------------------ memory map changes

    def _drop(self, lo: int, hi: int) -> None:
        dropped = sum(e - s for s, e, _, _ in self._pending.cut(lo, hi))
        dropped += sum(e - s for s, e, _, _ in self._in_flight.cut_dst(lo, hi))
        self._known.cut_dst(lo, hi)
        self.pages_dropped += dropped

    def remove(self, start: int, end: int) -> None:
        """A REMOVE event (madvise DONTNEED/REMOVE of ``[start, end)``): forget
        those pages in every state. They read as zeros from now on; data still
        in flight for them will be clamped out by :meth:`complete`."""
        self._drop(*_span(start, end))

    def unmap(self, start: int, end: int) -> None:
        """An UNMAP event (munmap of ``[start, end)``): forget those pages."""
        self._drop(*_span(start, end))

    def remap(self, from_: int, to: int, length: int) -> None:
        """A REMAP event: ``length`` bytes moved from ``from_`` to ``to``.

        Pages there keep their dump-time ``vaddr`` and state and get new current
        addresses; whatever was tracked at the destination was unmapped. The
        moved pages form new segments (a new VMA): nothing merges across.
        """
        lo, hi = _span(from_, from_ + length)
        delta = (to >> PAGE_SHIFT) - lo
        if delta == 0:
            return
        moved_pending = self._pending.cut(lo, hi)
        moved_in_flight = self._in_flight.cut_dst(lo, hi)
        moved_known = self._known.cut_dst(lo, hi)
        self._drop(lo + delta, hi + delta)
        segs: dict[int, int] = {}

        def new_seg(old: int) -> int:
            seg = segs.get(old)
            if seg is None:
                seg = segs[old] = self._next_seg
                self._next_seg += 1
            return seg

        for dst, end, src, seg in moved_pending:
            self._pending.add(dst + delta, end + delta, src, new_seg(seg))
        for dst, end, src, seg in moved_in_flight:
            self._in_flight.add(dst + delta, end + delta, src, new_seg(seg))
        for dst, end, src, seg in moved_known:
            self._known.add(dst + delta, end + delta, src, new_seg(seg))

    def fork_copy(self) -> LazyRanges:
        """Bookkeeping for a FORK event's child: its pending pages are ours,
        pending or in flight (data in flight is for our copy, the child needs
        its own). Requests for it still use dump-time addresses."""
        child = LazyRanges((), prefetch=self.prefetch)
        for start, end, link, seg in self._pending.items + self._in_flight.by_dst.items:
            child._pending.add(start, end, link, seg)
            child._known.add(start, end, link, seg)
        child._next_seg = self._next_seg
        child.pages_total = child._pending.pages
        return child

    def check(self) -> None:
        """Assert internal invariants (for tests; O(n))."""
        self._pending.check()
        self._in_flight.check()
        self._known.check()
        assert self.pages_copied >= 0
        for start, end, link, _ in self._pending.items + self._in_flight.by_dst.items:
            pieces = self._known.by_dst.clipped(start, end)
            assert sum(b - a for a, b, _, _ in pieces) == end - start, "a lazy page is unknown"
            assert all(src == link + a - start for a, _, src, _ in pieces), "linked elsewhere"

    def __repr__(self) -> str:
        return (f"<LazyRanges total={self.pages_total} pending={self.pages_pending} "
                f"in_flight={self.pages_in_flight} copied={self.pages_copied} "
                f"dropped={self.pages_dropped}>")
