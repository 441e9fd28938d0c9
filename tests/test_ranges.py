"""lazymig.uffd.ranges: examples, then a stateful hypothesis test against a per-page model."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import PAGE_SIZE as P
from lazymig.uffd.ranges import CopyRange, LazyRanges, PageState, Request

GiB_PAGES = (1 << 30) // P


def test_fault_background_complete() -> None:
    r = LazyRanges([(0x10000, 8)])
    assert (r.pages_total, r.pages_pending, r.pages_in_flight, r.done) == (8, 8, 0, False)
    assert r.is_lazy(0x10000) and not r.is_lazy(0x10000 + 8 * P) and not r.is_lazy(0)
    req = r.take_fault(0x10000 + 2 * P + 123)
    assert req == Request(vaddr=0x12000, dst=0x12000, nr_pages=1)
    assert req.length == P
    assert r.take_fault(0x12000) is None  # already in flight
    assert r.is_lazy(0x12000) and r.in_flight(0x12000)
    assert r.state(0x12000) is PageState.IN_FLIGHT
    assert r.take_background(4) == Request(0x10000, 0x10000, 2)  # stops at the hole
    assert r.take_background(100) == Request(0x13000, 0x13000, 5)
    assert r.take_background(1) is None
    assert r.pages_pending == 0 and not r.done
    assert r.complete(0x12000, 1) == [CopyRange(0x12000, 0x12000, 1, 0)]
    assert r.complete(0x10000, 2) == [CopyRange(0x10000, 0x10000, 2, 0)]
    assert not r.done
    assert r.complete(0x13000, 5) == [CopyRange(0x13000, 0x13000, 5, 0)]
    assert r.done and r.pages_copied == 8
    assert r.state(0x12000) is PageState.COPIED and not r.is_lazy(0x12000)
    assert r.complete(0x13000, 5) == []  # a duplicate reply copies nothing
    r.check()


def test_prefetch_takes_an_aligned_block_within_the_pending_interval() -> None:
    r = LazyRanges([(3 * P, 13)], prefetch=4)  # pages 3..15
    assert r.take_fault(5 * P) == Request(4 * P, 4 * P, 4)  # block 4..7
    assert r.take_fault(3 * P) == Request(3 * P, 3 * P, 1)  # block 0..3 clipped at 3
    assert r.take_fault(14 * P) == Request(12 * P, 12 * P, 4)
    assert r.take_fault(9 * P) == Request(8 * P, 8 * P, 4)
    assert r.done is False and r.pages_pending == 0


def test_a_fault_may_ask_for_its_page_alone_or_another_block_size() -> None:
    r = LazyRanges([(0, 16)], prefetch=4)
    assert r.take_fault(5 * P, prefetch=1) == Request(5 * P, 5 * P, 1)
    assert r.take_fault(6 * P) == Request(6 * P, 6 * P, 2)  # block 4..7, 5 in flight
    assert r.take_fault(9 * P, prefetch=8) == Request(8 * P, 8 * P, 8)
    assert r.pages_pending == 5  # pages 0..4


def test_requests_never_cross_range_boundaries() -> None:
    # two adjacent ranges (two VMAs): never one request across them
    r = LazyRanges([(0, 4), (4 * P, 4)], prefetch=8)
    assert r.take_fault(2 * P) == Request(0, 0, 4)
    assert r.take_background(100) == Request(4 * P, 4 * P, 4)
    r2 = LazyRanges([(0, 4), (4 * P, 4)])
    assert r2.take_background(100) == Request(0, 0, 4)
    assert len(r2.pending_ranges()) == 1


def test_complete_clamps_to_what_is_still_in_flight() -> None:
    r = LazyRanges([(0, 16)])
    req = r.take_background(8)
    assert req == Request(0, 0, 8)
    r.remove(2 * P, 4 * P)  # DONTNEED while the GET is out
    r.unmap(6 * P, 7 * P)
    assert r.pages_dropped == 3
    copies = r.complete(0, 8)
    assert copies == [CopyRange(0, 0, 2, 0), CopyRange(4 * P, 4 * P, 2, 4 * P),
                      CopyRange(7 * P, 7 * P, 1, 7 * P)]
    assert r.state(2 * P) is PageState.NOT_LAZY
    assert r.take_fault(2 * P) is None and not r.is_lazy(2 * P)  # -> UFFDIO_ZEROPAGE


def test_failed_copy_is_requeued_but_never_after_a_remove() -> None:
    r = LazyRanges([(0, 8)])
    r.take_background(8)
    (copy,) = r.complete(0, 8)
    assert r.pages_copied == 8
    # UFFDIO_COPY did 3 pages then said EAGAIN (a REMOVE is queued): requeue the rest
    assert r.requeue(copy.vaddr + 3 * P, 5) == 5
    assert r.pages_copied == 3 and r.pages_pending == 5
    assert r.take_fault(4 * P) == Request(4 * P, 4 * P, 1)
    r.remove(3 * P, 6 * P)  # the REMOVE: pages 3..5 must never be filled now
    assert r.complete(4 * P, 1) == []
    assert r.take_background(10) == Request(6 * P, 6 * P, 2)
    assert r.complete(6 * P, 2) == [CopyRange(6 * P, 6 * P, 2, 0)]
    # a copy that failed, with the REMOVE handled before its requeue: still forgotten
    r2 = LazyRanges([(0, 4)])
    r2.take_background(4)
    r2.complete(0, 4)
    r2.remove(0, 4 * P)
    assert r2.requeue(0, 4) == 0
    assert r2.done
    r.check()
    r2.check()


def test_remap_keeps_the_dump_time_address() -> None:
    r = LazyRanges([(0x100000, 16)])
    old, new = 0x100000, 0x900000
    in_flight = r.take_fault(old + 1 * P)
    assert in_flight == Request(old + P, old + P, 1)
    r.remap(old, new, 4 * P)
    assert not r.is_lazy(old) and r.is_lazy(new)
    assert r.in_flight(new + P)
    # the GET still asks for the dump-time address, the copy goes to the new one
    assert r.take_fault(new + 2 * P) == Request(vaddr=old + 2 * P, dst=new + 2 * P, nr_pages=1)
    assert r.complete(old + P, 1) == [CopyRange(old + P, new + P, 1, 0)]
    # the moved pages are their own VMA now: background stops at its end
    assert r.take_background(100) == Request(old + 4 * P, old + 4 * P, 12)
    assert r.take_background(100) == Request(old, new, 1)
    assert r.take_background(100) == Request(old + 3 * P, new + 3 * P, 1)
    assert r.pages_dropped == 0
    r.check()


def test_complete_whole_is_complete_for_a_reply_inside_one_interval() -> None:
    # The fault path's complete: adjacent requests merge in flight, so the second
    # reply starts inside an interval; after a remap its pages go to the new address.
    r = LazyRanges([(0x100000, 16)])
    old, new = 0x100000, 0x900000
    r.take_fault(old + P)
    r.take_fault(old + 2 * P)
    r.take_fault(old + 3 * P)
    r.remap(old, new, 8 * P)
    assert r.complete_whole(old + 2 * P, 1) == new + 2 * P
    assert r.state(new + 2 * P) is PageState.COPIED and r.pages_copied == 1
    assert r.complete_whole(old + 2 * P, 1) == -1  # not in flight any more: nothing changed
    assert r.complete_whole(old + P, 3) == -1  # across a hole: complete() splits it
    assert r.complete(old + P, 3) == [CopyRange(old + P, new + P, 1, 0),
                                      CopyRange(old + 3 * P, new + 3 * P, 1, 2 * P)]
    assert r.complete_whole(old + 1, 1) == -1  # unaligned
    r.check()


def test_pages_moved_back_stay_a_separate_segment() -> None:
    # mremap out and back: the kernel may or may not merge the VMAs again, so
    # a request must not span the old boundary.
    r = LazyRanges([(0, 8)])
    r.remap(4 * P, 20 * P, 4 * P)
    r.remap(20 * P, 4 * P, 4 * P)
    assert r.pending_ranges() == [Request(0, 0, 4), Request(4 * P, 4 * P, 4)]
    assert r.take_background(100) == Request(0, 0, 4)
    r.check()


def test_fork_copy_takes_pending_and_in_flight() -> None:
    r = LazyRanges([(0, 8)], prefetch=2)
    r.take_fault(0)
    r.take_background(2)
    r.complete(0, 2)
    child = r.fork_copy()
    assert child.pages_total == 6 and child.pages_pending == 6 and child.pages_copied == 0
    assert child.pending_ranges() == [Request(2 * P, 2 * P, 6)]
    assert child.prefetch == 2
    assert r.in_flight_ranges() == [Request(2 * P, 2 * P, 2)]
    child.check()


def test_constructor_checks() -> None:
    with pytest.raises(ConfigurationError):
        LazyRanges([(1, 1)])
    with pytest.raises(ConfigurationError):
        LazyRanges([(0, 0)])
    with pytest.raises(ConfigurationError):
        LazyRanges([(0, 4), (2 * P, 4)])
    with pytest.raises(ConfigurationError):
        LazyRanges([], prefetch=0)
    with pytest.raises(ConfigurationError):
        LazyRanges([(0, 1)]).take_background(0)
    with pytest.raises(ConfigurationError):
        LazyRanges([(0, 1)]).complete(5, 1)
    empty = LazyRanges([])
    assert empty.done and empty.take_background(1) is None and empty.take_fault(0) is None


def test_one_gib_stays_a_handful_of_intervals() -> None:
    base = 0x7F0000000000
    r = LazyRanges([(base, GiB_PAGES)], prefetch=4)
    assert len(r.pending_ranges()) == 1
    rng = random.Random(1)
    outstanding: list[Request] = []
    for _ in range(2000):  # random faults, each served at once or later
        req = r.take_fault(base + rng.randrange(GiB_PAGES) * P)
        if req is not None:
            outstanding.append(req)
        if outstanding and rng.random() < 0.7:
            done = outstanding.pop(rng.randrange(len(outstanding)))
            assert sum(c.nr_pages for c in r.complete(done.vaddr, done.nr_pages)) == \
                done.nr_pages
    while (req := r.take_background(1024)) is not None:
        r.complete(req.vaddr, req.nr_pages)
    for req in outstanding:
        r.complete(req.vaddr, req.nr_pages)
    assert r.done and r.pages_copied == GiB_PAGES == r.pages_total
    # completing adds no interval: the known pages are still one
    assert len(r._known.by_dst.items) == 1 and not r.pending_ranges()
    r.check()


# ----------------------------------------------------------------------------- the model


class Model:
    """The same semantics, one dict entry per page: dst page -> [state, src page, segment]."""

    def __init__(self, ranges: list[tuple[int, int]], prefetch: int) -> None:
        self.pages: dict[int, list[Any]] = {}
        for seg, (start, n) in enumerate(sorted(ranges)):
            for p in range(start, start + n):
                self.pages[p] = ["P", p, seg]
        self.prefetch = prefetch
        self.total = len(self.pages)
        self.copied = self.dropped = self.remaps = 0

    def _joins(self, a: int, b: int, state: str) -> bool:
        ea, eb = self.pages.get(a), self.pages.get(b)
        return (ea is not None and eb is not None and ea[0] == eb[0] == state
                and ea[2] == eb[2] and ea[1] + 1 == eb[1])

    def _take(self, lo: int, hi: int) -> tuple[int, int, int]:
        for p in range(lo, hi):
            self.pages[p][0] = "F"
        return self.pages[lo][1], lo, hi - lo

    def take_fault(self, page: int) -> tuple[int, int, int] | None:
        entry = self.pages.get(page)
        if entry is None or entry[0] != "P":
            return None
        block = page - page % self.prefetch
        lo, hi = page, page + 1
        while lo > block and self._joins(lo - 1, lo, "P"):
            lo -= 1
        while hi < block + self.prefetch and self._joins(hi - 1, hi, "P"):
            hi += 1
        return self._take(lo, hi)

    def take_background(self, max_pages: int) -> tuple[int, int, int] | None:
        pending = sorted(p for p, e in self.pages.items() if e[0] == "P")
        if not pending:
            return None
        lo = hi = pending[0]
        hi += 1
        while hi - lo < max_pages and self._joins(hi - 1, hi, "P"):
            hi += 1
        return self._take(lo, hi)

    def complete(self, v: int, n: int) -> list[tuple[int, int, int, int]]:
        hits = sorted((e[1], d, e[2]) for d, e in self.pages.items()
                      if e[0] == "F" and v <= e[1] < v + n)
        out: list[list[int]] = []
        for src, dst, seg in hits:
            if out and out[-1][0] + out[-1][2] == src and out[-1][1] + out[-1][2] == dst \
                    and out[-1][3] == seg:
                out[-1][2] += 1
            else:
                out.append([src, dst, 1, seg])
            self.pages[dst][0] = "C"
            self.copied += 1
        return [(s, d, k, s - v) for s, d, k, _ in out]

    def requeue(self, v: int, n: int) -> int:
        count = 0
        for e in self.pages.values():
            if e[0] in "FC" and v <= e[1] < v + n:
                if e[0] == "C":
                    self.copied -= 1
                e[0] = "P"
                count += 1
        return count

    def drop(self, lo: int, hi: int) -> None:
        for p in range(lo, hi):
            e = self.pages.pop(p, None)
            if e is not None and e[0] in "PF":
                self.dropped += 1

    def remap(self, f: int, t: int, n: int) -> None:
        if f == t:
            return
        moved = {d: self.pages.pop(d) for d in range(f, f + n) if d in self.pages}
        self.drop(t, t + n)
        self.remaps += 1
        for d, (state, src, seg) in moved.items():
            self.pages[d + t - f] = [state, src, (self.remaps, seg)]

    def fork(self) -> Model:
        child = Model([], self.prefetch)
        child.pages = {d: ["P", e[1], e[2]] for d, e in self.pages.items() if e[0] in "PF"}
        child.total = len(child.pages)
        child.remaps = self.remaps
        return child

    def runs(self, state: str) -> list[Request]:
        out: list[Request] = []
        for d in sorted(p for p, e in self.pages.items() if e[0] == state):
            if out and self._joins(d - 1, d, state) and out[-1].dst // P + out[-1].nr_pages == d:
                last = out[-1]
                out[-1] = Request(last.vaddr, last.dst, last.nr_pages + 1)
            else:
                out.append(Request(self.pages[d][1] * P, d * P, 1))
        return out


UNIVERSE = 48
PAGE = st.integers(0, UNIVERSE - 1)
COUNT = st.integers(1, 10)
RANGES = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 8)), max_size=6)
STATES = {"P": PageState.PENDING, "F": PageState.IN_FLIGHT, "C": PageState.COPIED}


def _as_tuple(r: Request | None) -> tuple[int, int, int] | None:
    return None if r is None else (r.vaddr // P, r.dst // P, r.nr_pages)


class RangesMachine(RuleBasedStateMachine):
    impl: LazyRanges
    model: Model

    @initialize(layout=RANGES, prefetch=st.integers(1, 6))
    def init(self, layout: list[tuple[int, int]], prefetch: int) -> None:
        ranges, end = [], 0
        for gap, n in layout:
            ranges.append((end + gap, n))
            end += gap + n
        self.impl = LazyRanges([(s * P, n) for s, n in ranges], prefetch=prefetch)
        self.model = Model(ranges, prefetch)
        self.requests: list[Request] = []

    @rule(page=PAGE, offset=st.integers(0, P - 1))
    def fault(self, page: int, offset: int) -> None:
        got = self.impl.take_fault(page * P + offset)
        assert _as_tuple(got) == self.model.take_fault(page)
        if got is not None:
            self.requests.append(got)

    @rule(max_pages=COUNT)
    def background(self, max_pages: int) -> None:
        got = self.impl.take_background(max_pages)
        assert _as_tuple(got) == self.model.take_background(max_pages)
        if got is not None:
            self.requests.append(got)

    def _complete(self, vaddr: int, n: int) -> list[CopyRange]:
        got = self.impl.complete(vaddr * P, n)
        assert [(c.vaddr // P, c.dst // P, c.nr_pages, c.offset // P) for c in got] == \
            self.model.complete(vaddr, n)
        return got

    @rule(data=st.data())
    def serve_request(self, data: st.DataObject) -> None:
        if not self.requests:
            return
        req = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
        copies = self._complete(req.vaddr // P, req.nr_pages)
        for copy in copies:  # some copies fail part-way: requeue the rest
            done = data.draw(st.integers(0, copy.nr_pages))
            if done < copy.nr_pages:
                self._requeue(copy.vaddr // P + done, copy.nr_pages - done)

    @rule(vaddr=PAGE, n=COUNT)
    def complete_any(self, vaddr: int, n: int) -> None:
        self._complete(vaddr, n)

    @rule(data=st.data(), whole=st.booleans())
    def serve_request_on_the_fault_path(self, data: st.DataObject, whole: bool) -> None:
        # The daemon's way: complete_whole, and complete only when it says -1.
        if self.requests:
            req = self.requests.pop(data.draw(st.integers(0, len(self.requests) - 1)))
            vaddr, n = req.vaddr // P, req.nr_pages
        else:
            vaddr, n = data.draw(PAGE), data.draw(COUNT)
        if not whole:  # a part of it only, or past it
            n = data.draw(st.integers(1, n + 2))
        dst = self.impl.complete_whole(vaddr * P, n)
        if dst < 0:
            self._complete(vaddr, n)
        else:
            assert self.model.complete(vaddr, n) == [(vaddr, dst // P, n, 0)]

    def _requeue(self, vaddr: int, n: int) -> None:
        assert self.impl.requeue(vaddr * P, n) == self.model.requeue(vaddr, n)

    @rule(vaddr=PAGE, n=COUNT)
    def requeue_any(self, vaddr: int, n: int) -> None:
        self._requeue(vaddr, n)

    @rule(start=PAGE, n=COUNT, unmap=st.booleans())
    def drop(self, start: int, n: int, unmap: bool) -> None:
        (self.impl.unmap if unmap else self.impl.remove)(start * P, (start + n) * P)
        self.model.drop(start, start + n)

    @rule(f=PAGE, t=PAGE, n=COUNT)
    def remap(self, f: int, t: int, n: int) -> None:
        assume(f + n <= t or t + n <= f or f == t)  # mremap never overlaps old and new
        self.impl.remap(f * P, t * P, n * P)
        self.model.remap(f, t, n)

    @rule()
    def fork(self) -> None:
        self.impl = self.impl.fork_copy()
        self.model = self.model.fork()
        self.requests = []

    @invariant()
    def agrees(self) -> None:
        impl, model = self.impl, self.model
        impl.check()
        for page in range(-1, 2 * UNIVERSE):
            entry = model.pages.get(page)
            want = PageState.NOT_LAZY if entry is None else STATES[entry[0]]
            assert impl.state(page * P) is want, page
            assert impl.is_lazy(page * P) == (want in (PageState.PENDING, PageState.IN_FLIGHT))
            assert impl.in_flight(page * P) == (want is PageState.IN_FLIGHT)
        counts = {s: sum(1 for e in model.pages.values() if e[0] == s) for s in "PF"}
        assert impl.pages_pending == counts["P"]
        assert impl.pages_in_flight == counts["F"]
        assert impl.pages_copied == model.copied
        assert impl.pages_dropped == model.dropped
        assert impl.pages_total == model.total
        assert impl.pages_total == (impl.pages_pending + impl.pages_in_flight
                                    + impl.pages_copied + impl.pages_dropped)
        assert impl.done == (counts["P"] == counts["F"] == 0)
        assert impl.pending_ranges() == model.runs("P")
        assert impl.in_flight_ranges() == model.runs("F")


RangesMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40,
                                           deadline=None)
test_ranges_against_per_page_model = RangesMachine.TestCase


def test_background_starts_near_the_last_fault_and_wraps_around() -> None:
    base = 0x10000000
    ranges = LazyRanges([(base, 64), (base + 0x100000, 16)])
    # Past a fault at page 40: the chunk starts there, and stops at the range's end.
    request = ranges.take_background(100, near=base + 40 * 4096)
    assert request is not None
    assert (request.vaddr, request.nr_pages) == (base + 40 * 4096, 24)
    # Between two ranges: the next range.
    request = ranges.take_background(4, near=base + 0x80000)
    assert request is not None
    assert request.vaddr == base + 0x100000
    # Past everything: back to the first pending page.
    request = ranges.take_background(8, near=base + 0x200000)
    assert request is not None
    assert request.vaddr == base
    ranges.check()
