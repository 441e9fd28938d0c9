"""Freezing real processes with real ptrace: state, scan, page pipes, and the
promise that a failed or abandoned dump leaves the target running unchanged."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import proc_state, runs_unchanged, serve_all_lazy
from lazydump import PipeServer

from lazymig.dump.freeze import (
    AlreadyTracedError,
    FrozenProcess,
    TargetGoneError,
    TargetLayout,
    _read_status,
    inspect_target_frozen,
)
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.errors import ClosedResourceError, LazyMigOSError
from lazymig.linux.ptrace import Tracee, TracerThread
from lazymig.linux.syscalls import SYS_GETPID
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import MAP_LOCKED, PAGE_SIZE, VmaStatus
from lazymig.testing.workload import (
    Workload,
    expected_page,
    python_workload_argv,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root"),
]

MiB = 1 << 20
SA_RESTART = 0x10000000


@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "8", "--locked-kib", "64",
                   "--interval-ms", "50"]) as w:
        yield w


def real_python() -> str:
    return os.path.realpath(sys.executable)


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def reaped_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


def wait_for_state(pid: int, states: str) -> None:
    deadline = time.monotonic() + 5
    while proc_state(pid)[0] not in states and time.monotonic() < deadline:
        time.sleep(0.01)


def spawn_tracer(pid: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", TRACER, str(pid)], stdout=subprocess.PIPE,
                            text=True)


def current_syscall(pid: int) -> str:
    """The syscall ``pid`` is blocked in, as /proc/PID/syscall gives it ("running" if none)."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0]


async def freeze_in_sleep(pid: int, attempts: int = 20) -> FrozenProcess:
    """Freeze ``pid`` while it sleeps in clock_nanosleep (230).

    On a loaded machine the workload may be caught printing or computing; such a
    freeze is undone (the target resumes) and tried again once it sleeps.
    """
    for _ in range(attempts):
        deadline = time.monotonic() + 5
        while current_syscall(pid) != "230":
            assert time.monotonic() < deadline, "the workload never slept"
            await asyncio.sleep(0.001)
        fp = await FrozenProcess.freeze(pid)
        if fp.state.threads[0].regs.orig_rax == 230:
            return fp
        await fp.resume()
    raise AssertionError(f"never caught {pid} in clock_nanosleep in {attempts} freezes")


@pytest.mark.asyncio
async def test_freeze_scan_pipes_and_resume(workload: Workload, c_workload: Path) -> None:
    ready = workload.ready
    before = workload.next_check()
    fp = await freeze_in_sleep(workload.pid)
    async with fp:
        assert proc_state(workload.pid)[0] == "t"
        assert workload.quiet_for(0.2)
        state = fp.state
        assert state.pid == workload.pid and state.comm == "pattern" and not state.was_stopped
        assert state.mm.exe == str(c_workload)
        (thread,) = state.threads
        assert thread.tid == workload.pid
        assert thread.regs.fs_base != 0  # TLS
        assert thread.sigmask == 1 << (signal.SIGUSR2 - 1)
        assert len(thread.xstate) >= 576
        assert thread.rseq is None or thread.rseq.rseq_abi_size in (0, 20, 32)
        # Stopped in clock_nanosleep: the image gets the restarting registers.
        assert thread.regs.orig_rax == 230
        restart = thread.regs.with_syscall_restart()
        assert restart.rip == thread.regs.rip - 2 and restart.rax == 230
        # Signal dispositions, read by injected rt_sigaction calls.
        acts = {a.signo: a for a in state.sigactions}
        assert len(acts) == 62 and signal.SIGKILL not in acts
        usr1 = acts[signal.SIGUSR1]
        assert usr1.handler > 1 and usr1.flags & SA_RESTART and usr1.restorer
        assert usr1.mask == 1 << (signal.SIGUSR2 - 1)
        assert acts[signal.SIGUSR2].handler == 0
        assert acts[signal.SIGPIPE].handler == 0
        # mm: brk from an injected brk(0) is the [heap] end; auxv has AT_PAGESZ.
        auxv = dict(zip(state.mm.auxv[::2], state.mm.auxv[1::2], strict=True))
        assert auxv[6] == PAGE_SIZE and state.mm.auxv[-2:] == (0, 0)
        assert state.mm.start_code < state.mm.end_code <= state.mm.start_data
        assert state.mm.arg_start < state.mm.arg_end <= state.mm.env_start < state.mm.env_end
        assert await fp.inject_syscall(SYS_GETPID) == workload.pid

        scan = await fp.scan()
        heap = next(v for v in scan.vmas if v.status & VmaStatus.HEAP)
        assert state.mm.brk == heap.end and heap.start == state.mm.start_brk
        region = (ready.addr, ready.addr + ready.size)
        lazy_in_region = [r for r in scan.runs if region[0] <= r.vaddr < region[1]]
        assert all(r.lazy for r in lazy_in_region)
        assert sum(r.nr_pages for r in lazy_in_region) == ready.size // PAGE_SIZE
        locked = [r for r in scan.runs if ready.locked <= r.vaddr < ready.locked + 64 * 1024]
        assert locked == [PageRun(ready.locked, 16, False)]
        sp_page = thread.regs.rsp & ~(PAGE_SIZE - 1)
        assert any(not r.lazy and r.vaddr <= sp_page < r.end for r in scan.runs)

        with await fp.collect_pages(scan, pipe_size=MiB) as pipes, PipeServer(pipes) as reader:
            seen = serve_all_lazy(reader, scan, workload.pid, seed=ready.seed, region=region)
            assert seen == scan.lazy_pages
            with tempfile.TemporaryFile() as f:
                written = pipes.drain_nonlazy(f.fileno())
                f.seek(0)
                data = f.read()
            assert sum(r.nr_pages for r in written) == scan.nonlazy_pages
            off = 0
            for run in written:
                chunk = data[off: off + run.nr_pages * PAGE_SIZE]
                assert chunk == read_memory(workload.pid, run.vaddr, run.nr_pages * PAGE_SIZE)
                if run.vaddr == ready.locked:
                    assert chunk == b"".join(expected_page(ready.locked + i * PAGE_SIZE,
                                                           ready.seed) for i in range(16))
                off += len(chunk)
        await fp.resume()
        assert fp.released
    runs_unchanged(workload, before.sum)
    with pytest.raises(ClosedResourceError):
        await fp.scan()


@pytest.mark.asyncio
async def test_python_workload(tmp_path: Path) -> None:
    with Workload(python_workload_argv("--mib", "2", "--interval-ms", "50")) as w:
        before = w.next_check()
        async with await FrozenProcess.freeze(w.pid) as fp:
            assert fp.state.mm.exe == real_python()
            scan = await fp.scan()
            with await fp.collect_pages(scan, pipe_size=MiB) as pipes, \
                    PipeServer(pipes) as reader:
                region = (w.ready.addr, w.ready.addr + w.ready.size)
                serve_all_lazy(reader, scan, w.pid, seed=w.ready.seed, region=region)
        runs_unchanged(w, before.sum)


@pytest.mark.asyncio
async def test_release_kill(workload: Workload) -> None:
    fp = await FrozenProcess.freeze(workload.pid)
    await fp.release(kill=True)
    await fp.release(kill=True)  # idempotent
    assert workload.proc.wait(timeout=5) is not None
    assert not pid_exists(workload.pid)


@pytest.mark.asyncio
async def test_exception_inside_resumes_the_target(workload: Workload) -> None:
    before = workload.next_check()
    fds = sum(1 for _ in os.scandir("/proc/self/fd"))
    with pytest.raises(LazyMigOSError):
        async with await FrozenProcess.freeze(workload.pid) as fp:
            scan = await fp.scan()
            # A run over unmapped memory: collecting fails half-way through.
            bogus = MemoryScan(scan.pid, scan.vmas, (*scan.runs, PageRun(0x1000, 1, True)))
            await fp.collect_pages(bogus, pipe_size=MiB)
    assert sum(1 for _ in os.scandir("/proc/self/fd")) == fds  # every pipe closed
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_target_exits_during_dump(workload: Workload) -> None:
    fp = await FrozenProcess.freeze(workload.pid)
    os.kill(workload.pid, signal.SIGKILL)
    wait_for_state(workload.pid, "ZX")
    with pytest.raises(TargetGoneError) as info:
        await fp.scan()
    assert info.value.errno == errno.ESRCH and info.value.pid == workload.pid
    with pytest.raises(TargetGoneError):
        await fp.inject_syscall(SYS_GETPID)
    await fp.resume()  # nothing left to detach: not an error


@pytest.mark.asyncio
async def test_signals_sent_while_frozen_are_not_lost(workload: Workload) -> None:
    before = workload.next_check()
    assert before.usr1 == 0
    async with await FrozenProcess.freeze(workload.pid) as fp:
        os.kill(workload.pid, signal.SIGUSR1)  # pending while frozen and while injecting
        assert await fp.inject_syscall(SYS_GETPID) == workload.pid
    workload.drain()
    after = workload.next_check()
    assert (after.sum, after.bad, after.usr1) == (before.sum, 0, 1)


@pytest.mark.asyncio
async def test_a_stopped_target_stays_stopped(workload: Workload) -> None:
    before = workload.next_check()
    os.kill(workload.pid, signal.SIGSTOP)
    wait_for_state(workload.pid, "T")
    async with await FrozenProcess.freeze(workload.pid) as fp:
        assert fp.state.was_stopped and len(fp.state.sigactions) == 62
    assert workload.quiet_for(0.2) and proc_state(workload.pid)[0] == "T"
    os.kill(workload.pid, signal.SIGCONT)
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_missing_pid() -> None:
    dead = reaped_pid()
    with pytest.raises(TargetGoneError) as info:
        await FrozenProcess.freeze(dead)
    assert info.value.errno == errno.ESRCH and str(dead) in str(info.value)


def _tids(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())


def _stat_state(pid: int, tid: int) -> str:
    raw = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2:][:1].decode()


@pytest.mark.asyncio
async def test_freezes_every_thread(c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--threads", "3",
                   "--interval-ms", "50"]) as w:
        before = w.next_check()
        tids = _tids(w.pid)
        async with await FrozenProcess.freeze(w.pid) as fp:
            threads = fp.state.threads
            assert threads[0].tid == w.pid and sorted(t.tid for t in threads) == tids
            for t in threads:  # each is in its ptrace-stop, its own state read
                assert _stat_state(w.pid, t.tid) == "t"
                assert t.regs.fs_base and t.clear_tid_addr and t.robust_list[0]
            assert len({t.regs.fs_base for t in threads}) == 3  # a TLS block each
            assert len({t.regs.rsp >> 12 for t in threads}) == 3
        runs_unchanged(w, before.sum)


@pytest.mark.asyncio
async def test_shared_memory_is_frozen_not_refused(c_workload: Path) -> None:
    """Shared anonymous memory is migrated (tests/test_shmem.py): no refusal."""
    with Workload([str(c_workload), "--mib", "1", "--shared-kib", "64",
                   "--interval-ms", "50"]) as w:
        before = w.next_check()
        fp = await FrozenProcess.freeze(w.pid)
        await fp.resume()
        assert proc_state(w.pid)[1] == 0
        runs_unchanged(w, before.sum)


TRACER = textwrap.dedent("""
    import ctypes, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE
        print("seize failed", ctypes.get_errno(), flush=True)
        sys.exit(1)
    print("traced", flush=True)
    time.sleep(60)
""")


@pytest.mark.asyncio
async def test_refuses_an_already_traced_target(workload: Workload) -> None:
    before = workload.next_check()
    tracer = spawn_tracer(workload.pid)
    try:
        assert tracer.stdout is not None and tracer.stdout.readline() == "traced\n"
        with pytest.raises(AlreadyTracedError) as info:
            await FrozenProcess.freeze(workload.pid)
        assert info.value.tracer == tracer.pid and str(tracer.pid) in str(info.value)
        # Still running (the other tracer only seized it) and still intact.
        workload.drain()
        assert workload.next_check().sum == before.sum
    finally:
        tracer.kill()
        tracer.wait()
        assert tracer.stdout is not None
        tracer.stdout.close()
    runs_unchanged(workload, before.sum)


@pytest.mark.asyncio
async def test_refuses_itself() -> None:
    with pytest.raises(ValueError, match="itself"):
        await FrozenProcess.freeze(os.getpid())


@pytest.mark.asyncio
async def test_256_mib_with_one_fd_per_mib(c_workload: Path) -> None:
    """A 256 MiB dump in 1 MiB pipes: about one fd per MiB, far from RLIMIT_NOFILE."""
    with Workload([str(c_workload), "--mib", "256", "--interval-ms", "5000"]) as w:
        async with await FrozenProcess.freeze(w.pid) as fp:
            scan = await fp.scan()
            assert scan.lazy_pages >= 256 * MiB // PAGE_SIZE
            fds = sum(1 for _ in os.scandir("/proc/self/fd"))
            with await fp.collect_pages(scan, pipe_size=MiB) as pipes:
                held = sum(1 for _ in os.scandir("/proc/self/fd")) - fds
                total_mib = (scan.lazy_pages + scan.nonlazy_pages) * PAGE_SIZE / MiB
                assert held == pipes.nr_fds <= total_mib + 8
                # Spot-check pages across the region.
                with PipeServer(pipes) as reader:
                    for i in range(0, w.ready.size // PAGE_SIZE, 4099):
                        vaddr = w.ready.addr + i * PAGE_SIZE
                        assert reader.serve(vaddr, 1) == (1, expected_page(vaddr, w.ready.seed))
            await fp.release(kill=True)


def test_tracee_refuses_calls_from_another_thread(workload: Workload) -> None:
    tracer = TracerThread()
    try:
        tracee = tracer.call(Tracee.seize, workload.pid)
        with pytest.raises(RuntimeError, match="other than its tracer"):
            tracee.get_regs()
        assert tracer.call(tracee.inject_syscall, SYS_GETPID) == workload.pid
        tracer.call(tracee.detach)
    finally:
        tracer.close()
    assert proc_state(workload.pid)[1] == 0


_LAYOUT_CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    region = mmap.mmap(-1, 1 << 20, flags=private)
    region[0] = 1
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "lock":
            assert libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(1 << 20)) == 0
        else:
            more = mmap.mmap(-1, 1 << 20, flags=private)
        print("done", flush=True)
""")


def test_the_vmas_read_before_the_seize_are_reused_only_if_nothing_changed() -> None:
    """A frozen target's VMAs come from the smaps read made before it was seized
    unless its maps lines or its locked size changed since (then smaps is read again)."""
    child = subprocess.Popen([sys.executable, "-c", _LAYOUT_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        pid = child.pid
        layout = TargetLayout.read(pid, _read_status(pid))
        assert layout.unchanged(pid, _read_status(pid))
        assert inspect_target_frozen(pid, 1, layout) is layout.vmas
        for change in ("lock", "map"):  # VmLck changes; then a VMA appears
            child.stdin.write(change + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            assert not layout.unchanged(pid, _read_status(pid))
            fresh = inspect_target_frozen(pid, 1, layout)
            assert fresh is not layout.vmas
            layout = TargetLayout.read(pid, _read_status(pid))
            assert fresh == layout.vmas
        assert any(v.flags & MAP_LOCKED for v in layout.vmas)
    finally:
        child.kill()
        child.wait()
