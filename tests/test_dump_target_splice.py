"""A frozen target vmsplices its own pages into the page pipes (real ptrace, real
SCM_RIGHTS, real vmsplice): the pipes hold its pages, not copies, and the target
is left exactly as it was (fds, mappings, registers, signal mask, memory)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import runs_unchanged, serve_all_lazy
from lazydump import PipeServer

from lazymig.dump.freeze import FrozenProcess
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.dump.target_splice import SCM_MAX_FD, TargetSplicer, sigreturn_frame
from lazymig.errors import LazyMigOSError
from lazymig.linux.ptrace import Tracee, UserRegs
from lazymig.linux.vm import read_memory, write_memory
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.workload import Workload, expected_page

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root"),
]

SMALL_PIPE = 4 * PAGE_SIZE  # 8 MiB in pipes of 4 pages: 512 pipes, three batches
SYS_MPROTECT = 10
PROT_NONE, PROT_RW = 0, 3



@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "50"]) as w:
        yield w


def target_view(pid: int) -> tuple[dict[str, str], str]:
    """The target's fd table (number -> what it is) and its memory map."""
    fds = {p.name: str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir()}
    return fds, Path(f"/proc/{pid}/maps").read_text()


def open_fds() -> int:
    return sum(1 for _ in os.scandir("/proc/self/fd"))


@pytest.mark.asyncio
async def test_target_splices_its_own_pages_and_is_left_as_it_was(workload: Workload) -> None:
    ready, before = workload.ready, workload.next_check()
    async with await FrozenProcess.freeze(workload.pid) as fp:
        view, regs = target_view(workload.pid), fp.state.threads[0].regs
        mask = await fp.run(fp.main_thread.get_sigmask)
        scan = await fp.scan()
        region = (ready.addr, ready.addr + ready.size)
        with await fp.collect_pages(scan, pipe_size=SMALL_PIPE) as pipes, \
                PipeServer(pipes) as reader:
            assert target_view(workload.pid) == view  # no fd, no mapping left behind
            assert await fp.run(fp.main_thread.get_regs) == regs
            assert await fp.run(fp.main_thread.get_sigmask) == mask
            assert pipes.nr_fds == len(pipes.buffers)  # one read end each
            assert len(pipes.buffers) > 2 * SCM_MAX_FD  # several SCM_RIGHTS batches
            seen = serve_all_lazy(reader, scan, workload.pid, seed=ready.seed, region=region)
            assert seen == scan.lazy_pages
            # The pipes reference the target's pages: a write into the frozen target
            # shows in them. That is why they are closed before it may run again.
            original = read_memory(workload.pid, ready.addr, PAGE_SIZE)
            write_memory(workload.pid, ready.addr, b"\xab" * PAGE_SIZE)
            assert reader.serve(ready.addr, 1) == (1, b"\xab" * PAGE_SIZE)
            write_memory(workload.pid, ready.addr, original)
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_pages_the_target_cannot_vmsplice_are_copied(
        workload: Workload, caplog: pytest.LogCaptureFixture) -> None:
    """A present page in a PROT_NONE mapping: vmsplice gets EFAULT, the rest of
    that pipe is copied (through /proc/PID/mem) and the log says so."""
    ready, before = workload.ready, workload.next_check()
    hidden = ready.addr + 5 * PAGE_SIZE
    async with await FrozenProcess.freeze(workload.pid) as fp:
        assert await fp.inject_syscall(SYS_MPROTECT, hidden, PAGE_SIZE, PROT_NONE) == 0
        try:
            scan = await fp.scan()
            with caplog.at_level(logging.INFO, logger="lazymig.dump.pagepipe"), \
                    await fp.collect_pages(scan, pipe_size=SMALL_PIPE) as pipes, \
                    PipeServer(pipes) as reader:
                region = (ready.addr, ready.addr + ready.size)
                serve_all_lazy(reader, scan, workload.pid, seed=ready.seed, region=region)
        finally:
            assert await fp.inject_syscall(SYS_MPROTECT, hidden, PAGE_SIZE, PROT_RW) == 0
    assert f"could not vmsplice the page at {hidden:#x} (" in caplog.text
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_a_target_short_of_fds_takes_smaller_batches_or_none(
        workload: Workload, caplog: pytest.LogCaptureFixture) -> None:
    ready, before = workload.ready, workload.next_check()
    in_use = max(int(e.name) for e in os.scandir(f"/proc/{workload.pid}/fd")) + 1
    _, hard = resource.prlimit(workload.pid, resource.RLIMIT_NOFILE)
    region = (ready.addr, ready.addr + ready.size)
    # Room for the socketpair and 10 pipes: the kernel drops the rest of a batch
    # (MSG_CTRUNC) and the next batches are that small.
    resource.prlimit(workload.pid, resource.RLIMIT_NOFILE, (in_use + 12, hard))
    async with await FrozenProcess.freeze(workload.pid) as fp:
        scan = await fp.scan()
        with await fp.collect_pages(scan, pipe_size=SMALL_PIPE) as pipes, \
                PipeServer(pipes) as reader:
            serve_all_lazy(reader, scan, workload.pid, seed=ready.seed, region=region)
    # No free fd at all: the pages are copied, with a warning.
    resource.prlimit(workload.pid, resource.RLIMIT_NOFILE, (in_use, hard))
    async with await FrozenProcess.freeze(workload.pid) as fp:
        scan = await fp.scan()
        with caplog.at_level(logging.WARNING, logger="lazymig.dump.freeze"), \
                await fp.collect_pages(scan, pipe_size=SMALL_PIPE) as pipes, \
                PipeServer(pipes) as reader:
            serve_all_lazy(reader, scan, workload.pid, seed=ready.seed, region=region)
    assert "copying its pages into the page pipes" in caplog.text
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_failure_half_way_leaves_no_trace_in_the_target(workload: Workload) -> None:
    before, fds = workload.next_check(), open_fds()
    with pytest.raises(LazyMigOSError):
        async with await FrozenProcess.freeze(workload.pid) as fp:
            view = target_view(workload.pid)
            scan = await fp.scan()
            # Unmapped memory after two batches' worth: the target vmsplices the
            # first pipes, then neither it nor the copy can read this run.
            bogus = MemoryScan(scan.pid, scan.vmas, (*scan.runs, PageRun(0x1000, 1, True)))
            try:
                await fp.collect_pages(bogus, pipe_size=SMALL_PIPE)
            finally:
                assert target_view(workload.pid) == view
    assert open_fds() == fds  # every pipe and the socket closed
    runs_unchanged(workload, before.sum)
    page = read_memory(workload.pid, workload.ready.addr, PAGE_SIZE)
    assert page == expected_page(workload.ready.addr, workload.ready.seed)


def _pending(pid: int) -> tuple[bool, bool]:
    """SIGPIPE pending for the main thread itself, and for the process."""
    fields = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    bit = 1 << (signal.SIGPIPE - 1)
    return bool(int(fields["SigPnd"], 16) & bit), bool(int(fields["ShdPnd"], 16) & bit)


def _splice_into_a_broken_pipe(pid: int, main: Tracee, address: int) -> list[int]:
    """Have the target vmsplice a page into a pipe whose reader is gone (as the
    dumper's pipes are once it died); run on the tracer thread."""
    with main.syscalls() as session:
        splicer = TargetSplicer(pid, session)
    r, w = os.pipe()
    os.close(r)
    try:
        with main.syscalls(at=splicer.syscall_ip) as session:
            splicer.use(session)
            [fd] = splicer.receive([w])
            results = splicer.vmsplice([(fd, [(address, PAGE_SIZE)])])
            splicer.close_fds([fd])
    finally:
        os.close(w)
        with main.syscalls() as session:
            splicer.use(session)
            splicer.close()
    return results


@pytest.mark.asyncio
async def test_the_sigpipe_of_a_broken_page_pipe_is_drained(workload: Workload) -> None:
    """A vmsplice into a pipe without reader queues a SIGPIPE for the target (it
    would kill it): the loop's tail takes it back, unless the target had one
    pending itself (signals do not queue; a process-wide one is left alone)."""
    ready, before = workload.ready, workload.next_check()
    async with await FrozenProcess.freeze(workload.pid) as fp:
        results = await fp.run(_splice_into_a_broken_pipe, workload.pid, fp.main_thread,
                               ready.addr)
        assert results == [-errno.EPIPE]
        assert _pending(workload.pid) == (False, False)
        mask = await fp.run(fp.main_thread.get_sigmask)
        await fp.run(fp.main_thread.set_sigmask, mask | 1 << (signal.SIGPIPE - 1))
        os.kill(workload.pid, signal.SIGPIPE)  # the process's own, pending (and blocked)
        await fp.run(_splice_into_a_broken_pipe, workload.pid, fp.main_thread, ready.addr)
        assert _pending(workload.pid) == (False, True)
    # It runs on with SIGPIPE blocked and pending, as it was before the splice.
    runs_unchanged(workload, before.sum)


def test_sigreturn_frame_layout() -> None:
    """The frame as arch/x86 rt_sigreturn reads it: uc_flags, uc_stack, the
    sigcontext's rsp/rip/fpstate, uc_sigmask; the xstate area marked with both
    FP_XSTATE magics; an interrupted syscall set up to restart."""
    names = UserRegs.__dataclass_fields__
    regs = UserRegs(**{name: i + 1 for i, name in enumerate(names)})
    interrupted = dataclasses.replace(regs, orig_rax=7, rax=(-512) & ((1 << 64) - 1),
                                      rip=0x401002)
    xstate = bytes(512) + (0b111).to_bytes(8, "little") + bytes(0x300 - 520)
    frame, area = sigreturn_frame(interrupted, 0x800, b"S" * 24, xstate, 0x10000)
    assert len(frame) == 440
    uc_flags, = struct.unpack_from("<Q", frame, 8)
    assert uc_flags == 0x7
    assert frame[24:48] == b"S" * 24
    rsp, rip = struct.unpack_from("<QQ", frame, 48 + 15 * 8)
    assert (rsp, rip) == (regs.rsp, 0x401000)
    assert struct.unpack_from("<Q", frame, 48 + 13 * 8)[0] == 7  # rax = orig_rax
    assert struct.unpack_from("<Q", frame, 48 + 184)[0] == 0x10000  # fpstate
    assert struct.unpack_from("<Q", frame, 304)[0] == 0x800  # uc_sigmask
    magic1, extended, features, size = struct.unpack_from("<IIQI", area, 464)
    assert (magic1, extended, features, size) == (0x46505853, 0x304, 0b111, 0x300)
    assert area[0x300:] == struct.pack("<I", 0x46505845) and len(area) == 0x304
    with pytest.raises(ValueError, match="aligned"):
        sigreturn_frame(regs, 0, bytes(24), xstate, 0x10020)
