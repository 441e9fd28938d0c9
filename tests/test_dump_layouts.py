"""Memory layouts lazymig's other tests do not make: fragmented mappings, thousands of
runs in one VMA, split and moved VMAs, THP, written private file mappings.

* ``pagemap_scan`` (PAGEMAP_SCAN) against the pagemap read entry by entry, on
  mappings of this process, for output vectors of every size from 1 range up,
  including vectors that the ranges fill exactly (the kernel's ``walk_end`` then
  lies behind what it returned: issue 14).
* A real child process (tests/workloads/layout.c) builds a layout drawn by
  hypothesis: anonymous and private file mappings, random fills from single
  pages to thousands of runs, MADV_DONTNEED, MADV_HUGEPAGE on and off,
  mprotect splits, mremap. It is migrated lazily (``lazymig.migrate``), with
  either scan path (PAGEMAP_SCAN, or the pagemap read of kernels before 6.7),
  and the restored process's memory is compared page by page with a model of
  what the child wrote.
* The fragmented mappings of issue 14: 64 MiB with every 16th page dropped
  (1,024 runs), and 1 GiB with 8 pages in 128 written (2,048 runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lazymig
from lazymig.dump import scan
from lazymig.dump.scan import (
    PageRun,
    plan_pages,
    read_pagemap,
    scan_process,
    should_dump_vma,
    zero_page_pfn,
)
from lazymig.errors import LazyMigOSError
from lazymig.linux.vm import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    AnonMapping,
    pagemap_scan,
)
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE, VmaStatus
from lazymig.testing import assert_memory_equal

WORKLOADS = Path(__file__).resolve().parent / "workloads"

root = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_DONTNEED = 4
MADV_NOHUGEPAGE = 15
SKIP = PAGE_IS_FILE | PAGE_IS_PFNZERO
ANY = PAGE_IS_PRESENT | PAGE_IS_SWAPPED


# -- PAGEMAP_SCAN on this process ------------------------------------------------------------


def present_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The present-or-swapped ranges of [start, end), from the pagemap entry by entry."""
    raw = read_pagemap(fd, start, end)
    out: list[tuple[int, int]] = []
    for i, top in enumerate(raw[7::8]):
        if not top & 0xC0:
            continue
        addr = start + (i << PAGE_SHIFT)
        if out and out[-1][1] == addr:
            out[-1] = (out[-1][0], addr + PAGE_SIZE)
        else:
            out.append((addr, addr + PAGE_SIZE))
    return out


@contextlib.contextmanager
def pages_written(pattern: list[bool]) -> Iterator[int]:
    """A private anonymous mapping of ``len(pattern)`` pages (no THP) in this process,
    page i written if ``pattern[i]``; yields its address."""
    with AnonMapping(len(pattern) * PAGE_SIZE) as region:
        assert _libc.madvise(region.address, region.length, MADV_NOHUGEPAGE) == 0
        for i, write in enumerate(pattern):
            if write:
                ctypes.c_char.from_address(region.address + i * PAGE_SIZE).value = b"\x01"
        yield region.address


def check_every_vector_size(pattern: list[bool], sizes: list[int]) -> None:
    with pages_written(pattern) as addr, open("/proc/self/pagemap", "rb") as f:
        end = addr + len(pattern) * PAGE_SIZE
        want = present_ranges(f.fileno(), addr, end)
        starts = sum(1 for i, w in enumerate(pattern) if w and not (i and pattern[i - 1]))
        assert len(want) == starts
        for vec_len in sizes:
            got = pagemap_scan(f.fileno(), addr, end, inverted=SKIP, required=SKIP, anyof=ANY,
                               vec_len=vec_len)
            assert got == want, f"vec_len {vec_len}: {len(got)} ranges, want {len(want)}"


def every_nth_dropped(n_pages: int, nth: int) -> list[bool]:
    return [i % nth != 0 for i in range(n_pages)]


def test_a_vector_that_fills_exactly_resumes_after_its_last_range() -> None:
    """1,024 runs (a 64 MiB mapping with every 16th page dropped, issue 14) and the
    sizes around the kernel's 512-region bounce buffer: before the fix, a vector the
    ranges filled exactly resumed at a stale ``walk_end`` and returned 1,536 ranges."""
    pattern = every_nth_dropped(16 * 1024, 16)
    check_every_vector_size(pattern, [1, 2, 3, 7, 511, 512, 513, 1023, 1024, 1025, 4096])


def test_every_run_count_around_the_vector_size() -> None:
    """Exactly k runs for k around 1, 2, 3, 512 and 1,024, scanned with vectors of the
    same sizes: the vector fills exactly, one short or one over."""
    for runs in (1, 2, 3, 4, 511, 512, 513, 1023, 1024, 1025):
        pattern = [i % 2 == 0 for i in range(2 * runs - 1)]
        check_every_vector_size(pattern, [1, 2, 3, 4, 511, 512, 513, 1023, 1024, 1025])


@settings(max_examples=40, deadline=None)
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=3000),
       vec_len=st.integers(1, 40))
def test_pagemap_scan_equals_the_pagemap_for_any_pattern(pattern: list[bool],
                                                         vec_len: int) -> None:
    check_every_vector_size(pattern, [vec_len, 1024])


def test_pagemap_scan_refuses_an_empty_vector() -> None:
    with open("/proc/self/pagemap", "rb") as f, pytest.raises(ValueError, match="vec_len"):
        pagemap_scan(f.fileno(), 0, PAGE_SIZE, vec_len=0)


# -- the layout child --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) for tests/workloads/layout.c")
    out = tmp_path_factory.mktemp("layout") / "layout"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(WORKLOADS / "layout.c")],
                   check=True, capture_output=True, timeout=120)
    return out


_INDEX = int.from_bytes(b"".join(i.to_bytes(8, "little") for i in range(PAGE_SIZE // 8)),
                        "little")
_REPEAT = int.from_bytes((1).to_bytes(8, "little") * (PAGE_SIZE // 8), "little")
_ZERO = bytes(PAGE_SIZE)
FILE_TAG = 0x5A << 56


def page_of(tag: int) -> bytes:
    """What layout.c writes into a page with ``tag``: word i is ``tag ^ i``."""
    return (_INDEX ^ tag * _REPEAT).to_bytes(PAGE_SIZE, "little")


@dataclasses.dataclass
class Region:
    """One mapping of the child, as the model sees it: per page 0 (zero), -1 (the file's
    page) or the tag written there."""

    ident: int
    npages: int
    file: Path | None
    pages: list[int]
    address: int = 0
    huge: bool = False


class Layout:
    """The script for layout.c and a model of the memory it leaves: every command
    updates both."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.regions: dict[int, Region] = {}
        self.lines: list[str] = []
        self._file: Path | None = None
        self._file_pages = 0

    def _file_for(self, npages: int) -> Path:
        """One file for every file mapping, page k holding ``page_of(FILE_TAG | k)``."""
        if self._file is None or self._file_pages < npages:
            self._file = self.directory / f"mapped-{npages}"
            self._file.write_bytes(b"".join(page_of(FILE_TAG | k) for k in range(npages)))
            self._file_pages = npages
        return self._file

    def anon(self, npages: int) -> int:
        ident = len(self.regions)
        self.regions[ident] = Region(ident, npages, None, [0] * npages)
        self.lines.append(f"anon {ident} {npages}")
        return ident

    def file(self, npages: int) -> int:
        ident = len(self.regions)
        path = self._file_for(npages)
        self.regions[ident] = Region(ident, npages, path, [-1] * npages)
        self.lines.append(f"file {ident} {npages} {path}")
        return ident

    def fill(self, ident: int, first: int, n: int, stride: int = 1, run: int = 1,
             gen: int = 1) -> None:
        pages = self.regions[ident].pages
        for p in range(first, first + n):
            if (p - first) % stride < run:
                pages[p] = 1 << 63 | ident << 40 | p << 8 | gen
        self.lines.append(f"fill {ident} {first} {n} {stride} {run} {gen}")

    def dontneed(self, ident: int, first: int, n: int) -> None:
        region = self.regions[ident]
        region.pages[first:first + n] = [0 if region.file is None else -1] * n
        self.lines.append(f"dontneed {ident} {first} {n}")

    def huge(self, ident: int, first: int, n: int, on: bool) -> None:
        self.regions[ident].huge |= on
        self.lines.append(f"huge {ident} {first} {n} {int(on)}")

    def protect(self, ident: int, first: int, n: int, writable: bool) -> None:
        self.lines.append(f"protect {ident} {first} {n} {3 if writable else 1}")

    def move(self, ident: int) -> None:
        self.lines.append(f"move {ident}")

    @property
    def runs(self) -> int:
        """Runs of written (or copied-on-write) pages, over every region."""
        return sum(1 for r in self.regions.values() for i, t in enumerate(r.pages)
                   if t > 0 and (i == 0 or r.pages[i - 1] <= 0))

    # ExpectedMemory (lazymig.testing.memory)

    @property
    def expected_regions(self) -> list[tuple[int, int]]:
        return [(r.address, r.npages * PAGE_SIZE) for r in self.regions.values()]

    def content(self, address: int, length: int) -> bytes:
        for r in self.regions.values():
            if r.address <= address < r.address + r.npages * PAGE_SIZE:
                first = (address - r.address) >> PAGE_SHIFT
                out = bytearray(length)  # zeros unless written or the file's
                for i, tag in enumerate(r.pages[first:first + (length >> PAGE_SHIFT)]):
                    if tag:
                        page = page_of(FILE_TAG | first + i if tag < 0 else tag)
                        out[i << PAGE_SHIFT:(i + 1) << PAGE_SHIFT] = page
                return bytes(out)
        raise KeyError(f"{address:#x} is in no region of the layout")


class Expected:
    """A :class:`Layout` as lazymig.testing's ExpectedMemory."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @property
    def regions(self) -> list[tuple[int, int]]:
        return self.layout.expected_regions

    def content(self, address: int, length: int) -> bytes:
        return self.layout.content(address, length)


@contextlib.contextmanager
def running(exe: Path, layout: Layout) -> Iterator[subprocess.Popen[bytes]]:
    """layout.c built ``layout`` (addresses noted in the model); killed at the end."""
    script = layout.directory / "layout.script"
    script.write_text("\n".join(layout.lines) + "\n")
    proc = subprocess.Popen([str(exe), str(script)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            words = line.split()
            if words == [b"READY"]:
                break
            if words[:1] == [b"AT"]:
                layout.regions[int(words[1])].address = int(words[2], 16)
        else:
            assert proc.stderr is not None
            raise AssertionError(f"layout.c failed: {proc.stderr.read().decode()}")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def stopped(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "the child did not stop"
        time.sleep(0.005)


def check_the_scan(pid: int, layout: Layout) -> None:
    """Both scan paths plan the same runs, none overlapping, every written page in one."""
    stopped(pid)
    try:
        by_scan = scan_process(pid)
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            pagemaps = [read_pagemap(f.fileno(), v.start, v.end)
                        if should_dump_vma(v) and not v.status & VmaStatus.VDSO else b""
                        for v in by_scan.vmas]
    finally:
        os.kill(pid, signal.SIGCONT)
    by_entries = plan_pages(by_scan.vmas, pagemaps, zero_pfn=zero_page_pfn())
    assert list(by_scan.runs) == by_entries
    for a, b in zip(by_scan.runs, by_scan.runs[1:], strict=False):
        assert a.end <= b.vaddr, f"runs overlap: {a} and {b}"
    dumped = _pages_of(by_scan.runs)
    for r in layout.regions.values():
        written = {r.address + (i << PAGE_SHIFT) for i, t in enumerate(r.pages) if t > 0}
        assert written <= dumped, f"region {r.ident}: {len(written - dumped)} written pages " \
                                  "not dumped"


def _pages_of(runs: tuple[PageRun, ...]) -> set[int]:
    return {run.vaddr + (i << PAGE_SHIFT) for run in runs for i in range(run.nr_pages)}


def _no_pagemap_scan(*args: object, **kwargs: object) -> list[tuple[int, int]]:
    raise LazyMigOSError(25, "PAGEMAP_SCAN")  # ENOTTY: what a kernel before 6.7 answers


@contextlib.contextmanager
def scan_path(path: str) -> Iterator[None]:
    """``"pagemap_scan"``: as the kernel allows; ``"pagemap_read"``: the path of kernels
    before 6.7 (PAGEMAP_SCAN answers ENOTTY)."""
    if path == "pagemap_scan":
        yield
        return
    real = getattr(scan, "pagemap_scan")  # noqa: B009 - not in scan's __all__
    setattr(scan, "pagemap_scan", _no_pagemap_scan)  # noqa: B010
    try:
        yield
    finally:
        setattr(scan, "pagemap_scan", real)  # noqa: B010


async def migrate_and_compare(pid: int, layout: Layout) -> None:
    """Migrate ``pid`` lazily over loopback; the restored memory must be the model's."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        result = await asyncio.wait_for(lazymig.migrate(pid, stdio=(devnull, devnull, devnull)),
                                        120)
    finally:
        os.close(devnull)
    try:
        await assert_memory_equal(result.restored.pid, Expected(layout))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(result.restored.pid, signal.SIGKILL)


def run_on(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a new asyncio or uvloop event loop."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


# -- layouts drawn by hypothesis ----------------------------------------------------------------

_SIZES = st.one_of(st.integers(1, 40), st.integers(41, 1100), st.sampled_from([512, 1024, 2048]))


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[object, ...]]:
    """A list of commands for :class:`Layout`: mappings, then fills, DONTNEED and THP
    advice in any order, then mprotect splits and moves."""
    commands: list[tuple[object, ...]] = []
    sizes = draw(st.lists(st.tuples(st.sampled_from(["anon", "anon", "anon", "file"]), _SIZES),
                          min_size=1, max_size=5))
    for kind, npages in sizes:
        commands.append((kind, npages))

    def span(npages: int) -> tuple[int, int]:
        first = draw(st.integers(0, npages - 1))
        return first, draw(st.integers(1, npages - first))

    for _ in range(draw(st.integers(1, 12))):
        ident = draw(st.integers(0, len(sizes) - 1))
        npages = sizes[ident][1]
        first, n = span(npages)
        op = draw(st.sampled_from(["fill", "fill", "fill", "dontneed", "huge"]))
        if op == "fill":
            stride = draw(st.sampled_from([1, 2, 3, 16, draw(st.integers(1, 64))]))
            commands.append(("fill", ident, first, n, stride, draw(st.integers(1, stride)),
                             draw(st.integers(1, 255))))
        elif op == "dontneed":
            commands.append(("dontneed", ident, first, n))
        else:
            commands.append(("huge", ident, first, n, draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        ident = draw(st.integers(0, len(sizes) - 1))
        commands.append(("protect", ident, *span(sizes[ident][1]), draw(st.booleans())))
    for ident in draw(st.lists(st.integers(0, len(sizes) - 1), max_size=2, unique=True)):
        commands.append(("move", ident))
    return commands


def build(directory: Path, commands: list[tuple[object, ...]]) -> Layout:
    layout = Layout(directory)
    for name, *args in commands:
        getattr(layout, str(name))(*args)
    return layout


#: More than 10,000 runs in one VMA: 10,240 single pages with a hole after each. (Both
#: scan paths plan it in check_the_scan; the migration takes the pagemap read.)
MANY_RUNS: list[tuple[object, ...]] = [("anon", 20_480), ("fill", 0, 0, 20_480, 2, 1, 7),
                                       ("file", 300), ("fill", 1, 0, 300, 3, 1, 9)]

#: Every kind of command at once: THP on then off, splits, a moved written file mapping.
EVERYTHING: list[tuple[object, ...]] = [
    ("anon", 2048), ("huge", 0, 0, 2048, True), ("fill", 0, 0, 1500, 5, 3, 1),
    ("dontneed", 0, 700, 40), ("huge", 0, 1024, 1024, False), ("fill", 0, 1600, 400, 1, 1, 2),
    ("file", 600), ("fill", 1, 10, 500, 7, 2, 3), ("dontneed", 1, 100, 50),
    ("anon", 5), ("fill", 2, 0, 5, 1, 1, 4),
    ("protect", 0, 100, 10, False), ("protect", 1, 300, 20, False),
    ("move", 1), ("move", 2)]


@root
@settings(max_examples=4, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@example(commands=MANY_RUNS, path="pagemap_read", loop="uvloop")
@example(commands=EVERYTHING, path="pagemap_read", loop="uvloop")
@example(commands=EVERYTHING, path="pagemap_scan", loop="asyncio")
@given(commands=layouts(), path=st.sampled_from(["pagemap_scan", "pagemap_read"]),
       loop=st.sampled_from(["asyncio", "uvloop"]))
def test_a_random_layout_comes_back_page_by_page(layout_exe: Path, tmp_path: Path,
                                                 commands: list[tuple[object, ...]],
                                                 path: str, loop: str) -> None:
    """Drawn by hypothesis: the layout, the scan path and the event loop (asyncio or
    uvloop; each example runs on one of them)."""
    layout = build(Path(tempfile.mkdtemp(dir=tmp_path)), commands)  # tmp_path: per test
    with running(layout_exe, layout) as child:
        check_the_scan(child.pid, layout)
        with scan_path(path):
            run_on(loop, migrate_and_compare(child.pid, layout))


# -- the fragmented mappings of issue 14 -----------------------------------------------------


@root
@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["pagemap_scan", "pagemap_read"])
async def test_64_mib_with_every_16th_page_dropped(layout_exe: Path, tmp_path: Path,
                                                   path: str) -> None:
    """1,024 runs in one VMA: ``lazy page runs overlap`` before the fix."""
    layout = Layout(tmp_path)
    ident = layout.anon(16 * 1024)
    layout.huge(ident, 0, 16 * 1024, False)
    layout.fill(ident, 0, 16 * 1024)
    for first in range(0, 16 * 1024, 16):
        layout.dontneed(ident, first, 1)
    assert layout.runs == 1024
    with running(layout_exe, layout) as child:
        await asyncio.to_thread(check_the_scan, child.pid, layout)
        with scan_path(path):
            await migrate_and_compare(child.pid, layout)


@root
@pytest.mark.asyncio
async def test_1_gib_in_2048_runs(layout_exe: Path, tmp_path: Path) -> None:
    """1 GiB, sparse: 8 pages written in every 128 (2,048 runs, 64 MiB resident)."""
    layout = Layout(tmp_path)
    ident = layout.anon(256 * 1024)
    layout.huge(ident, 0, 256 * 1024, False)
    layout.fill(ident, 0, 256 * 1024, 128, 8)
    assert layout.runs == 2048
    with running(layout_exe, layout) as child:
        await asyncio.to_thread(check_the_scan, child.pid, layout)
        await migrate_and_compare(child.pid, layout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
