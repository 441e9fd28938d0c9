"""Dirty tracking of live processes with userfaultfd async write-protect: real
processes writing memory non-stop, real ptrace, real PAGEMAP_SCAN."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.dump.track import DirtyRound, DirtyTracker
from lazymig.proto.constants import PAGE_SIZE

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root"),
]

PAGES = 2048

# Populates PAGES private pages, prints their address, then writes pages of the
# first half only, forever, each batch announced on stdout before it is written
# ("b" and its pages) and confirmed after ("d").
# With "own-uffd" it first registers the region with a userfaultfd of its own.
WRITER = textwrap.dedent("""
    import ctypes, mmap, os, random, sys, time
    n = int(sys.argv[1])
    m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(n):
        m[i * 4096] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if sys.argv[2] == "own-uffd":
        from lazymig.linux import uffd
        fd = uffd.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
        uffd.api(fd, 0)
        uffd.register(fd, addr, n * 4096, 1)
    os.write(1, f"{addr}\\n".encode())
    rng = random.Random(7)
    seq = 0
    while True:
        batch = rng.sample(range(n // 2), 8)
        os.write(1, ("b " + " ".join(map(str, batch)) + "\\n").encode())
        for i in batch:
            m[i * 4096 + 8] = seq & 0xFF
        os.write(1, b"d\\n")
        seq += 1
        time.sleep(0.001)
""")


class Writer:
    """The writer child: its region and the batches it reported."""

    def __init__(self, mode: str = "plain") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(PAGES), mode],
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self._out = self.proc.stdout
        self.base = int(self._out.readline())
        os.set_blocking(self._out.fileno(), False)
        self._tail = b""
        #: Each batch announced since the last :meth:`forget`: its pages, and
        #: whether it was written when the reports were last read.
        self.batches: list[tuple[set[int], bool]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def drain(self) -> set[int]:
        """Read every report so far; returns the pages of the batches written."""
        while True:
            try:
                chunk = os.read(self._out.fileno(), 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._tail += chunk
        *lines, self._tail = self._tail.split(b"\n")
        for line in lines:
            if line == b"d":
                # A batch whose "b" went before: into forget(), or into the buffer of
                # the readline() that read the address.
                if self.batches:
                    self.batches[-1] = (self.batches[-1][0], True)
            else:
                self.batches.append(({int(x) for x in line.split()[1:]}, False))
        return {p for pages, done in self.batches if done for p in pages}

    def forget(self) -> None:
        """Drop the batches read so far (and a half-read line's)."""
        self.drain()
        self.batches.clear()

    def stop(self) -> None:
        """SIGSTOP it and wait until it is stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        while True:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return
            time.sleep(0.001)

    def pages_in(self, ranges: tuple[tuple[int, int], ...]) -> set[int]:
        end = self.base + PAGES * PAGE_SIZE
        return {(a - self.base) // PAGE_SIZE for s, e in ranges
                for a in range(max(s, self.base), min(e, end), PAGE_SIZE)}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()


@pytest.fixture
def writer() -> Iterator[Writer]:
    w = Writer()
    try:
        yield w
    finally:
        w.close()


def fd_table(pid: int) -> dict[str, str]:
    return {fd.name: str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()}


def uffd_flags(pid: int) -> list[str]:
    """The smaps VmFlags lines that show a userfaultfd registration."""
    with open(f"/proc/{pid}/smaps") as f:
        return [line for line in f if line.startswith("VmFlags:")
                and {"um", "uw", "ui"} & set(line.split())]


def assert_untouched(w: Writer, fds_before: dict[str, str]) -> None:
    assert fd_table(w.pid) == fds_before
    assert not any("userfaultfd" in target for target in fd_table(w.pid).values())
    assert uffd_flags(w.pid) == []
    seen = len(w.batches)
    deadline = time.monotonic() + 10
    while w.drain() is not None and len(w.batches) == seen:  # it keeps running (and writing)
        assert w.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)


async def test_every_written_page_is_reported_and_clean_ones_are_not(writer: Writer) -> None:
    before = fd_table(writer.pid)
    async with await DirtyTracker.start(writer.pid) as tracker:
        assert fd_table(writer.pid) == before  # the uffd was taken out and closed there
        # Stopped for the first round, so that every batch read after it was
        # written after it.
        writer.stop()
        first = await tracker.collect()
        writer.forget()
        writer.proc.send_signal(signal.SIGCONT)
        assert writer.pages_in(first.ranges) == set(range(PAGES))  # every page present
        assert uffd_flags(writer.pid)  # registered for write-protect ("uw")
        dirty: set[int] = set()
        for _ in range(6):
            await asyncio.sleep(0.03)
            reported = writer.drain()  # written before this round began
            rnd = await tracker.collect()
            dirty |= writer.pages_in(rnd.ranges)
            assert reported <= dirty, f"written but never reported: {sorted(reported - dirty)}"
            # Only the first half is written after the start: the rest stays clean.
            assert max(writer.pages_in(rnd.ranges), default=0) < PAGES // 2
        assert dirty  # the rounds did see writes
    assert_untouched(writer, before)


async def test_close_after_start_leaves_the_source_as_it_was(writer: Writer) -> None:
    before = fd_table(writer.pid)
    tracker = await DirtyTracker.start(writer.pid)
    await tracker.close()
    await tracker.close()  # idempotent
    assert_untouched(writer, before)


async def test_an_error_inside_the_rounds_leaves_the_source_as_it_was(writer: Writer) -> None:
    before = fd_table(writer.pid)
    with pytest.raises(RuntimeError, match="abort"):
        async with await DirtyTracker.start(writer.pid) as tracker:
            await tracker.collect()
            await tracker.collect()
            raise RuntimeError("abort")
    assert_untouched(writer, before)


async def test_memory_registered_by_the_source_itself_is_refused() -> None:
    w = Writer("own-uffd")
    try:
        before = fd_table(w.pid)
        with pytest.raises(UnsupportedTargetError, match="userfaultfd of its own"):
            await DirtyTracker.start(w.pid)
        assert fd_table(w.pid) == before
        assert len(uffd_flags(w.pid)) == 1  # its own registration, untouched
    finally:
        w.close()


# Maps a region, writes it, and, told so (a line on stdin), replaces its first
# half by a new mapping at the same address and maps a second region, writing a
# page of each; then prints "done".
REMAPPER = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    def mmap(at, size, fixed=0):
        return libc.mmap(at, size, 3, 0x22 | fixed, -1, 0)
    size = 64 * 4096
    base = mmap(None, size)
    ctypes.memset(base, 1, size)
    print(base, flush=True)
    sys.stdin.readline()
    mmap(base, size // 2, 0x10)  # MAP_FIXED: a new mapping, not registered
    ctypes.memset(base + 4096, 2, 1)
    other = mmap(None, size)
    ctypes.memset(other + 3 * 4096, 3, 1)
    print(other, flush=True)
    sys.stdin.readline()
""")


def remapper() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", REMAPPER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


async def test_replaced_and_new_mappings_are_tracked_too() -> None:
    proc = remapper()
    assert proc.stdin is not None and proc.stdout is not None
    try:
        base = int(await asyncio.to_thread(proc.stdout.readline))
        async with await DirtyTracker.start(proc.pid) as tracker:
            await tracker.collect()
            assert not pages_of(await tracker.collect(), base, 64)  # nothing written
            proc.stdin.write("go\n")
            proc.stdin.flush()
            other = int(await asyncio.to_thread(proc.stdout.readline))
            rnd = await tracker.collect()
            # The replaced half: its page written (its other pages are not there);
            # the new region: its page written.
            assert pages_of(rnd, base, 64) == {1}
            assert pages_of(rnd, other, 64) == {3}
            assert not pages_of(await tracker.collect(), base, 64)
        assert uffd_flags(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()


def pages_of(rnd: DirtyRound, base: int, pages: int) -> set[int]:
    """The pages of ``[base, base + pages)`` in a round, as indexes."""
    end = base + pages * PAGE_SIZE
    return {(a - base) // PAGE_SIZE for s, e in rnd.ranges
            for a in range(max(s, base), min(e, end), PAGE_SIZE)}
