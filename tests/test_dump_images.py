"""The images of a frozen process and the LazyDump/dump API, on real processes.

Image contents are checked against what the frozen process really has (its
registers, xstate, VMAs, /proc, its memory through /proc/PID/mem); the API
tests drive a real page server with test_page_server's independent client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MiniClient, proc_state, runs_unchanged

from lazymig.dump import DumpResult, LazyDump, SourceFate, dump
from lazymig.dump.freeze import FrozenProcess
from lazymig.dump.images import (
    decode_fpregs,
    pagemap_entries,
    read_lazymig_entry,
    write_images,
)
from lazymig.dump.scan import PageRun
from lazymig.errors import ClosedResourceError, ConfigurationError, ImageError, LazyMigOSError
from lazymig.linux.cpuid import _cpuid_by_code, _cpuid_by_device, xstate_layout
from lazymig.linux.syscalls import SYS_CLOCK_NANOSLEEP
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images import ImagesDir, PagemapEntry
from lazymig.proto.wire import WireVersion
from lazymig.testing.workload import Workload, expected_page

MiB = 1 << 20
SIGUSR2_BIT = 1 << (signal.SIGUSR2 - 1)
SS_DISABLE = 2
REGS = {"bp": "rbp", "bx": "rbx", "ax": "rax", "cx": "rcx", "dx": "rdx", "si": "rsi",
        "di": "rdi", "orig_ax": "orig_rax", "ip": "rip", "flags": "eflags", "sp": "rsp"}
GPREGS = ["r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx",
          "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss", "fs_base", "gs_base", "ds",
          "es", "fs", "gs"]

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="ptrace of arbitrary processes needs root")


@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "4", "--locked-kib", "64",
                   "--interval-ms", "50"]) as w:
        yield w


def read_maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def inode(path: Path) -> int:
    return path.stat().st_ino


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def read_at(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(PAGE_SIZE)


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {v + i * PAGE_SIZE for v, n in ranges for i in range(n)}


async def fetch_all(port: int, w: Workload, images: ImagesDir) -> None:
    """Every PE_LAZY page over the wire, checked against the pattern or the frozen memory."""
    client = await MiniClient.connect(port, WireVersion.V2)
    for e in images.pagemap(w.pid).entries:
        vaddr = e.vaddr
        while PE.LAZY in e.flags and vaddr < e.end:
            got, data = await client.get(w.pid, vaddr, (e.end - vaddr) // PAGE_SIZE)
            region = w.ready.addr <= vaddr < w.ready.addr + w.ready.size
            assert data == (b"".join(expected_page(vaddr + i * PAGE_SIZE, w.ready.seed)
                                     for i in range(got)) if region
                            else read_memory(w.pid, vaddr, got * PAGE_SIZE))
            vaddr += got * PAGE_SIZE
    assert await client.close() == 0


# -- pure parts -----------------------------------------------------------------------


def test_pagemap_entries_keep_byte_order_and_refuse_disorder() -> None:
    present = [PageRun(0x1000, 2, False), PageRun(0x9000, 1, False)]
    lazy = [PageRun(0x3000, 4, True), PageRun(0x20000, 1, True)]
    assert pagemap_entries(present, lazy) == [
        PagemapEntry(0x1000, 2, PE.PRESENT), PagemapEntry(0x3000, 4, PE.LAZY),
        PagemapEntry(0x9000, 1, PE.PRESENT), PagemapEntry(0x20000, 1, PE.LAZY)]
    with pytest.raises(ImageError, match="address order"):
        pagemap_entries(present[::-1], lazy)
    with pytest.raises(ImageError, match="overlap"):
        pagemap_entries(present, [PageRun(0x2000, 1, True)])


def synthetic_xstate(xcr0: int) -> bytes:
    area = bytearray(2688)
    struct.pack_into("<HHHHQQII", area, 0, 0x37F, 1, 2, 3, 0x1111, 0x2222, 0x1F80, 0xFFFF)
    struct.pack_into("<32I", area, 32, *range(32))
    struct.pack_into("<64I", area, 160, *range(100, 164))
    struct.pack_into("<Q", area, 464, xcr0)
    struct.pack_into("<Q", area, 512, 0x27)
    struct.pack_into("<64I", area, 576, *range(200, 264))
    struct.pack_into("<8Q", area, 1088, *range(300, 308))
    return bytes(area)


def test_decode_fpregs_follows_the_layout_and_xcr0() -> None:
    layout = {2: (576, 256), 5: (1088, 64), 9: (4000, 8)}
    fp = decode_fpregs(synthetic_xstate(0b100111), layout)
    assert (fp.cwd, fp.swd, fp.twd, fp.fop, fp.rip, fp.rdp, fp.mxcsr, fp.mxcsr_mask) == (
        0x37F, 1, 2, 3, 0x1111, 0x2222, 0x1F80, 0xFFFF)
    assert list(fp.st_space) == list(range(32))
    assert list(fp.xmm_space) == list(range(100, 164))
    assert fp.xsave.xstate_bv == 0x27
    assert list(fp.xsave.ymmh_space) == list(range(200, 264))
    assert list(fp.xsave.opmask_reg) == list(range(300, 308))
    assert not fp.xsave.pkru  # beyond the area
    without_opmask = decode_fpregs(synthetic_xstate(0b000111), layout)
    assert not without_opmask.xsave.opmask_reg and without_opmask.xsave.ymmh_space
    legacy_only = decode_fpregs(synthetic_xstate(0b111)[:512], layout)
    assert legacy_only.mxcsr == 0x1F80 and not legacy_only.HasField("xsave")


def test_xstate_layout_is_cpuid_leaf_0xd() -> None:
    layout = xstate_layout()
    assert layout[2] == (576, 256)  # AVX follows the legacy area and header everywhere
    if Path("/dev/cpu/0/cpuid").exists() and os.access("/dev/cpu/0/cpuid", os.R_OK):
        queries = [(0, 0), (0xD, 0), (0xD, 2), (0xD, 5)]
        assert _cpuid_by_code(queries) == _cpuid_by_device(queries)


# -- images of a real frozen process --------------------------------------------------------


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_images_match_the_frozen_process(tmp_path: Path, workload: Workload,
                                               c_workload: Path) -> None:
    pid = workload.pid
    before = workload.next_check()
    maps_before = read_maps(pid)
    images = ImagesDir(tmp_path)
    async with await FrozenProcess.freeze(pid) as fp:
        scan = await fp.scan()
        with await fp.collect_pages(scan, pipe_size=MiB) as pipes:
            written = await asyncio.to_thread(write_images, images, fp.state, scan, pipes,
                                              lazy_pages=True)
            lazy_runs = pipes.lazy_runs()
        state = fp.state
        (thread,) = state.threads

        # pagemap: PE_PRESENT pages are in pages-1.img, in order, as the process has them;
        # PE_LAZY are the scan's lazy runs (the pages the page pipes hold), one entry
        # per run however many pipes hold it; together they are the scan.
        pagemap = images.pagemap(pid)
        present = [e for e in pagemap.entries if e.flags == PE.PRESENT]
        lazy = [e for e in pagemap.entries if e.flags == PE.LAZY]
        assert len(present) + len(lazy) == len(pagemap.entries)
        assert [(e.vaddr, e.nr_pages) for e in lazy] == sorted(
            (r.vaddr, r.nr_pages) for r in scan.runs if r.lazy)
        assert pages_of([(e.vaddr, e.nr_pages) for e in lazy]) == pages_of(
            [(r.vaddr, r.nr_pages) for r in lazy_runs])
        assert len(lazy) < len(lazy_runs)  # 1 MiB pipes split the 4 MiB region, entries do not
        data = images.pages_path(1).read_bytes()
        assert len(data) == sum(e.nr_pages for e in present) * PAGE_SIZE
        offset = 0
        for e in present:
            assert data[offset: offset + e.nr_pages * PAGE_SIZE] == read_memory(
                pid, e.vaddr, e.nr_pages * PAGE_SIZE)
            offset += e.nr_pages * PAGE_SIZE
        assert pages_of([(e.vaddr, e.nr_pages) for e in pagemap.entries]) == pages_of(
            [(r.vaddr, r.nr_pages) for r in scan.runs])
        assert (written.lazy_pages, written.nonlazy_pages) == (scan.lazy_pages,
                                                               scan.nonlazy_pages)
        assert any(e.vaddr == workload.ready.locked for e in present)  # MAP_LOCKED: not lazy

    # pstree and core
    (entry,) = images.pstree()
    assert (entry.pid, entry.ppid, entry.pgid, entry.sid, list(entry.threads)) == (
        pid, 0, os.getpgid(pid), os.getsid(pid), [pid])
    core = images.core(pid)
    regs = thread.regs.with_syscall_restart()
    gp = core.thread_info.gpregs
    assert {n: getattr(gp, n) for n in GPREGS} == {n: getattr(regs, REGS.get(n, n))
                                                   for n in GPREGS}
    if thread.regs.orig_rax == SYS_CLOCK_NANOSLEEP:  # frozen in its sleep (not mid-check)
        assert gp.ip == thread.regs.rip - 2  # the sleep is restarted on restore
    fp_regs = core.thread_info.fpregs
    assert fp_regs.mxcsr == struct.unpack_from("<I", thread.xstate, 24)[0]
    assert fp_regs.xsave.xstate_bv == struct.unpack_from("<Q", thread.xstate, 512)[0]
    assert list(fp_regs.xsave.ymmh_space) == list(struct.unpack_from("<64I", thread.xstate, 576))
    assert core.thread_info.clear_tid_addr != 0  # glibc's set_tid_address
    tc, tcore = core.tc, core.thread_core
    assert (tc.task_state, tc.comm, tc.blk_sigset) == (1, "pattern", SIGUSR2_BIT)
    assert [(s.sigaction, s.flags, s.restorer, s.mask) for s in tc.sigactions] == [
        (a.handler, a.flags, a.restorer, a.mask) for a in state.sigactions]
    nofile = tc.rlimits.rlimits[resource.RLIMIT_NOFILE]
    assert (nofile.cur, nofile.max) == resource.prlimit(pid, resource.RLIMIT_NOFILE)
    assert tcore.blk_sigset == SIGUSR2_BIT and tcore.sas.ss_flags == SS_DISABLE
    assert tcore.futex_rla != 0 and tcore.futex_rla_len == 24  # glibc's robust list
    assert tcore.creds.uid == os.getuid() and tcore.comm == "pattern"
    if thread.rseq is not None and thread.rseq.rseq_abi_pointer:
        assert tcore.rseq_entry.rseq_abi_pointer == thread.rseq.rseq_abi_pointer
        assert tcore.rseq_entry.signature == thread.rseq.signature

    # mm and lazymig's own image
    mm = images.mm(pid)
    assert (mm.mm_brk, mm.mm_start_brk, list(mm.mm_saved_auxv)) == (
        state.mm.brk, state.mm.start_brk, list(state.mm.auxv))
    assert [(v.start, v.end, v.pgoff, v.prot, v.flags, v.status) for v in mm.vmas] == [
        (v.start, v.end, v.pgoff, v.prot, v.flags, v.status) for v in scan.vmas]
    own = read_lazymig_entry(images, pid)
    files = {f.id: f for f in own.files}
    assert files[mm.exe_file_id].path == str(c_workload)
    assert files[mm.exe_file_id].inode == inode(c_workload)
    assert {files[v.shmid].path for v in mm.vmas if v.shmid} >= {str(c_workload)}
    assert [(t.tid, t.xstate) for t in own.threads] == [(pid, thread.xstate)]
    assert own.lazy_pages and not own.job_stopped and own.cwd == str(Path.cwd())
    assert {c.feature: (c.offset, c.size) for c in own.xstate_layout} == xstate_layout()

    # The injected calls left nothing behind, and the process runs on.
    runs_unchanged(workload, before.sum)
    assert read_maps(pid) == maps_before


# -- the high-level API ------------------------------------------------------------------


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_lazy_dump_run_serves_then_kills(tmp_path: Path, workload: Workload,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lazymig")
    lazy_dump = LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0,
                         progress_interval=0.01)
    running = asyncio.create_task(lazy_dump.run())
    port = await lazy_dump.ready
    assert port == lazy_dump.port != 0
    assert lazy_dump.stats is not None and lazy_dump.stats.pages_unserved > 0
    await asyncio.sleep(0.03)  # a progress line or two
    await fetch_all(port, workload, ImagesDir(tmp_path))
    result = await running
    assert isinstance(result, DumpResult) and result.source is SourceFate.KILLED
    assert result.lazy_pages == lazy_dump.stats.lazy_pages > workload.ready.size // PAGE_SIZE - 1
    assert result.pages_sent == result.lazy_pages and lazy_dump.stats.pages_unserved == 0
    assert result.nonlazy_pages > 0 and result.bytes_per_second > 0
    # Killed (this process is the tracer and the parent: its tracer thread reaped it).
    workload.proc.wait(timeout=5)
    assert not pid_exists(workload.pid)
    assert "lazy pages served (" in caplog.text and f"pid {workload.pid} migrated" in caplog.text
    with pytest.raises(ClosedResourceError):
        await lazy_dump.serve()


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_cancelled_transfer_leaves_the_source_stopped(
        tmp_path: Path, workload: Workload, caplog: pytest.LogCaptureFixture) -> None:
    before = workload.next_check()
    async with LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0) as lazy_dump:
        serving = asyncio.create_task(lazy_dump.serve())
        client = await MiniClient.connect(lazy_dump.port, WireVersion.V2)
        await client.get(workload.pid, workload.ready.addr, 4)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        client.writer.close()
    assert proc_state(workload.pid) == ("T", 0)
    assert f"pid {workload.pid} left stopped with its memory intact" in caplog.text
    assert read_memory(workload.pid, workload.ready.addr, PAGE_SIZE) == expected_page(
        workload.ready.addr, workload.ready.seed)
    os.kill(workload.pid, signal.SIGCONT)
    runs_unchanged(workload, before.sum)


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_leaving_the_block_unserved_also_stops_the_source(
        tmp_path: Path, workload: Workload) -> None:
    with pytest.raises(RuntimeError, match="orchestrator"):
        async with LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0):
            raise RuntimeError("the orchestrator gave up")
    assert proc_state(workload.pid) == ("T", 0)
    os.kill(workload.pid, signal.SIGCONT)
    workload.drain()
    assert workload.next_check().bad == 0


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_failures_before_serving_resume_and_leave_no_images(
        tmp_path: Path, workload: Workload) -> None:
    before = workload.next_check()
    # An image that cannot be written (pstree.img is a directory): the images
    # written before it are removed and the process runs on.
    (tmp_path / "pstree.img").mkdir()
    lazy_dump = LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0)
    ready = lazy_dump.ready
    with pytest.raises(LazyMigOSError, match=r"pstree\.img"):
        await lazy_dump.start()
    assert isinstance(ready.exception(), LazyMigOSError)
    assert listing(tmp_path) == ["pstree.img"]
    runs_unchanged(workload, before.sum)

    # A port that is taken: refused before the process is touched.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigurationError, match="cannot listen"):
            await LazyDump(workload.pid, tmp_path, address="127.0.0.1",
                           port=busy.getsockname()[1]).start()
    with pytest.raises(ConfigurationError, match="does not exist"):
        await dump(workload.pid, tmp_path / "missing")
    runs_unchanged(workload, before.sum)


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_plain_dump_leave_running(tmp_path: Path, workload: Workload) -> None:
    before = workload.next_check()
    result = await dump(workload.pid, tmp_path, leave_running=True)
    assert result.source is SourceFate.RUNNING and result.lazy_pages == 0
    images = ImagesDir(tmp_path)
    entries = images.pagemap(workload.pid).entries
    assert all(PE.PRESENT in e.flags for e in entries)
    assert result.nonlazy_pages * PAGE_SIZE == images.pages_path(1).stat().st_size
    assert not read_lazymig_entry(images, workload.pid).lazy_pages
    found = images.find_pages(workload.pid, workload.ready.addr + 5 * PAGE_SIZE)
    assert found is not None
    assert read_at(found[0], found[1]) == expected_page(workload.ready.addr + 5 * PAGE_SIZE,
                                                        workload.ready.seed)
    runs_unchanged(workload, before.sum)


@pytest.mark.root
@needs_root
@pytest.mark.asyncio
async def test_cancelling_start_anywhere_resumes_the_source(tmp_path: Path,
                                                            workload: Workload) -> None:
    before = workload.next_check()
    cancelled = 0
    for delay in (0.0, 0.001, 0.003, 0.006, 0.01, 0.02):
        lazy_dump = LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0)
        starting = asyncio.create_task(lazy_dump.start())
        await asyncio.sleep(delay)
        starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            cancelled += 1
            assert lazy_dump.ready.cancelled()
            assert listing(tmp_path) == []  # nothing half-written is left
            runs_unchanged(workload, before.sum)
        else:  # too late to cancel the start: abort the transfer instead
            await lazy_dump.aclose()
            assert proc_state(workload.pid) == ("T", 0)
            os.kill(workload.pid, signal.SIGCONT)
            runs_unchanged(workload, before.sum)
    assert cancelled
