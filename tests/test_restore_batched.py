"""Restore work that grows with the process's mappings runs in batches (issue 16).

* :class:`~lazymig.linux.ptrace.SyscallBatch` in a real process: a thousand
  syscalls run with one PTRACE_CONT and give their results in order; a call
  that fails stops the batch and is named; one allowed to fail does not.
* A process of 5,000 one-page mappings (``pattern.c --maps``: files mapped
  once each, one file mapped page by page, private and shared in turn,
  anonymous ones read-write, read-only and read-exec) dumped and restored
  (its mmaps take two batches): the restored process's /proc/PID/maps equals
  the source's mapping by mapping, and its memory the source's page by page.
* 4,096 one-page lazy runs in one VMA, migrated lazily (the VMA is registered
  whole, not run by run): the memory arrives equal, the holes between the
  runs included.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import lazymig
from lazymig.dump import dump
from lazymig.errors import ConfigurationError, LazyMigOSError
from lazymig.linux.ptrace import SyscallBatch, Tracee, TracerThread
from lazymig.linux.syscalls import SYS_CLOSE, SYS_GETPID, SYS_MMAP, SYS_MUNMAP
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE
from lazymig.proto.images import ImagesDir
from lazymig.restore import Restorer
from lazymig.testing import MemorySnapshot, Workload, assert_memory_equal

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

MAPS = 5000
RUNS = 4096
_UNREADABLE = ("[vvar]", "[vvar_vclock]", "[vsyscall]")  # process_vm_readv cannot read them



@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50"]) as w:
        yield w


def maps_of(pid: int) -> list[tuple[str, ...]]:
    """Each mapping's range, permissions, offset, device, inode and path."""
    with open(f"/proc/{pid}/maps") as f:
        return [tuple(line.rstrip().split(maxsplit=5)) for line in f]


def guard_page_below(span: str) -> str:
    start, end = (int(x, 16) for x in span.split("-"))
    return f"{start - PAGE_SIZE:x}-{end:x}"


def readable_regions(maps: list[tuple[str, ...]]) -> list[tuple[int, int]]:
    regions = []
    for fields in maps:
        if fields[1][0] != "r" or (len(fields) > 5 and fields[5] in _UNREADABLE):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        regions.append((start, end - start))
    return regions


def test_a_batch_runs_its_calls_in_order_and_names_the_one_that_failed(
        workload: Workload) -> None:
    tracer = TracerThread()
    try:
        tracee = tracer.call(Tracee.seize, workload.pid)

        def run() -> tuple[list[int], list[int], LazyMigOSError, bytes]:
            with tracee.syscalls() as session:
                area = session.syscall(SYS_MMAP, 0, 64 * PAGE_SIZE, 7,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                assert area > 0
                batch = SyscallBatch(area, 64 * PAGE_SIZE)
                for _ in range(999):
                    batch.add(SYS_GETPID, what="getpid")
                batch.add(SYS_CLOSE, -1, what="close(-1)", may_fail=True)
                got = session.run_batch(batch)
                at = batch.data(b"written by the batch")
                batch.add(SYS_MMAP, 0, PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0,
                          what="mmap")
                batch.add(SYS_CLOSE, -1, what="close(-1) that must not fail")
                batch.add(SYS_GETPID, what="getpid after the failure")
                with pytest.raises(LazyMigOSError) as failed:
                    session.run_batch(batch)
                data = read_memory(workload.pid, at, 20)
                assert session.syscall(SYS_MUNMAP, area, 64 * PAGE_SIZE) == 0
                return got, [len(batch)], failed.value, data

        got, left, failed, data = tracer.call(run)
        assert got == [workload.pid] * 999 + [-errno.EBADF]
        assert left == [0]  # the failed batch was emptied
        assert failed.errno == errno.EBADF and "close(-1) that must not fail" in str(failed)
        assert data == b"written by the batch"
        tracer.call(tracee.detach)
    finally:
        tracer.close()
    # It runs on after the batches, its pattern intact.
    assert workload.next_check(timeout=5).bad == 0


@pytest.mark.asyncio
async def test_5000_mappings_come_back_mapping_by_mapping(tmp_path: Path,
                                                         c_workload: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "images").mkdir()
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50", "--maps", str(MAPS),
                   "--maps-dir", str(tmp_path / "files")]) as w:
        # Stopped, it writes nothing more (its output buffer is in its heap); so
        # is the restored copy (a stopped process is restored stopped).
        os.kill(w.pid, signal.SIGSTOP)
        assert w.quiet_for(0.1)
        before = maps_of(w.pid)
        assert len(before) > MAPS
        source = MemorySnapshot.take(w.pid, readable_regions(before))
        await dump(w.pid, tmp_path / "images")
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            restored = await Restorer(tmp_path / "images",
                                      stdio=(devnull, devnull, devnull)).run()
        finally:
            os.close(devnull)
        try:
            # The dump counts the stack's guard page in (as CRIU).
            expected = [(guard_page_below(m[0]), *m[1:]) if m[-1] == "[stack]" else m
                        for m in before]
            after = maps_of(restored.pid)
            assert len(after) == len(expected)
            for was, now in zip(expected, after, strict=True):
                assert now == was, f"mapping {was} came back as {now}"
            # But the mapping of the rseq area, where the kernel writes the CPU it runs on.
            rseq = ImagesDir(tmp_path / "images").core(w.pid).thread_core.rseq_entry
            await assert_memory_equal(restored.pid, MemorySnapshot(source.pid, {
                start: data for start, data in source.data.items()
                if not start <= rseq.rseq_abi_pointer < start + len(data)}))
        finally:
            os.kill(restored.pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_4096_lazy_runs_in_one_vma_arrive_with_their_holes(c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "1000",
                   "--runs", str(RUNS)]) as w:
        # The runs' VMA (2 * RUNS pages), which nothing writes after READY.
        runs = [(start, size) for start, size in readable_regions(maps_of(w.pid))
                if size == 2 * RUNS * PAGE_SIZE]
        assert len(runs) == 1
        source = MemorySnapshot.take(w.pid, runs)
        result = await lazymig.migrate(w.pid, stdio=(0, 2, 2))
        restored = result.restored.pid
        try:
            assert result.restored.lazy_pages >= RUNS
            await assert_memory_equal(restored, source)
        finally:
            os.kill(restored, signal.SIGKILL)


def test_the_batch_area_refuses_what_does_not_fit() -> None:
    batch = SyscallBatch(0x10000, 4 * PAGE_SIZE)
    batch.data(b"x" * (2 * PAGE_SIZE))
    while batch.fits():
        batch.add(SYS_GETPID, what="getpid")
    assert 0 < len(batch) < PAGE_SIZE // 32
    with pytest.raises(ConfigurationError, match="full"):
        batch.add(SYS_GETPID, what="one too many")
    with pytest.raises(ConfigurationError, match="do not fit"):
        batch.data(b"y" * 64)
    table, image = batch.image()
    assert table % 8 == 0 and len(image) <= 4 * PAGE_SIZE
