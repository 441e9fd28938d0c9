"""Freezing a target process with ptrace; resuming, killing or leaving it stopped.

:meth:`FrozenProcess.freeze` checks the target first, without touching it
(it exists, nobody traces it, no shared/SysV/hugetlb/device mappings); then
seizes and interrupts every thread (PTRACE_SEIZE + PTRACE_INTERRUPT), listing
the threads again until no new one appears (a thread created while the
others were being seized is caught, as CRIU's ``seize_threads`` does), checks
again now that it cannot change, and reads the state of every thread and of
the process in one pass (:func:`lazymig.dump.state.read_state`).

Every ptrace request runs on one dedicated thread (:class:`TracerThread`);
the async methods await it and never block the event loop.

**Failure leaves the target as it was.** Any error inside :meth:`freeze`
detaches what was seized before it propagates. ``async with`` on a
:class:`FrozenProcess` resumes the target if the block raises or ends without
:meth:`release`. Injected syscalls restore registers and signal mask; the
scratch area they use is unmapped again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Final, ParamSpec, Protocol, TypeVar

from lazymig.dump.pagepipe import PagePipes, PipeBuffer
from lazymig.dump.scan import (
    MemoryScan,
    Vma,
    parse_smaps_and_lines,
    scan_process,
    unsupported_mappings,
)
from lazymig.dump.shmem import DELETED, carried_deleted_files, mark_deleted_files
from lazymig.dump.state import (
    MmState,
    ProcessState,
    SigAction,
    ThreadState,
    read_stat_fields,
    read_state,
)
from lazymig.dump.target_splice import TargetSplicer, free_fd_slots
from lazymig.errors import (
    ClosedResourceError,
    ConfigurationError,
    LazyMigError,
    LazyMigOSError,
    UnsupportedTargetError,
)
from lazymig.linux.procfs import read_maps, read_smaps, read_stat, read_status
from lazymig.linux.procfs import threads as tids_of
from lazymig.linux.ptrace import (
    PTRACE_O_SUSPEND_SECCOMP,
    AlreadyTracedError,
    TargetGoneError,
    Tracee,
    TracerThread,
    park,
    process_alive,
)
from lazymig.proto.constants import VmaStatus

__all__ = [
    "AlreadyTracedError",
    "FrozenProcess",
    "MmState",
    "ProcessState",
    "SigAction",
    "TargetGoneError",
    "TargetLayout",
    "ThreadState",
    "UnsupportedTargetError",
    "inspect_target",
    "inspect_target_frozen",
    "park",
    "read_stat_fields",
]

log = logging.getLogger(__name__)

_PF_KTHREAD: Final = 0x00200000
"""A kernel thread, in ``/proc/PID/stat``'s flags (field 9)."""

P = ParamSpec("P")
T = TypeVar("T")


# -- checks that do not touch the target ------------------------------------------


def _read_status(pid: int) -> dict[str, str]:
    try:
        return read_status(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise TargetGoneError(pid, f"process {pid} does not exist") from exc


def _read_proc(pid: int, read: Callable[[int], str]) -> str:
    try:
        return read(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise TargetGoneError(pid, f"process {pid} does not exist") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class TargetLayout:
    """A process's VMAs (from smaps) and what tells whether they changed since:
    the maps lines and the locked size (what :func:`inspect_target` read, which
    :meth:`FrozenProcess.freeze` takes so as not to read smaps again)."""

    vmas: list[Vma]
    maps: list[str]
    locked: str

    @classmethod
    def read(cls, pid: int, status: dict[str, str]) -> TargetLayout:
        text = _read_proc(pid, read_smaps)
        vmas, lines = parse_smaps_and_lines(text)
        if any(v.status & (VmaStatus.FILE_SHARED | VmaStatus.FILE_PRIVATE)
               and v.path.endswith(DELETED) for v in vmas):
            try:
                vmas = mark_deleted_files(vmas, carried_deleted_files(pid, vmas))
            except (FileNotFoundError, ProcessLookupError) as exc:
                raise TargetGoneError(pid, f"process {pid} does not exist") from exc
        return cls(vmas, lines, status.get("VmLck", ""))

    def unchanged(self, pid: int, status: dict[str, str]) -> bool:
        """True if /proc/PID/maps and VmLck are what they were. Neither walks the
        page tables, as smaps does (~50 ms for 4 GiB here), so a frozen target's
        VMAs are taken from this read made before it was seized when they match.
        What this cannot see is madvise advice given to whole VMAs in the
        milliseconds between the two reads (MADV_DONTDUMP, MADV_HUGEPAGE...): it
        would be restored as it was just before."""
        return (status.get("VmLck", "") == self.locked
                and _read_proc(pid, read_maps).splitlines() == self.maps)


def inspect_target(pid: int) -> TargetLayout:
    """Refuse what cannot be frozen or migrated, reading only /proc.

    Raises :class:`TargetGoneError` (no such process, or a zombie),
    :class:`AlreadyTracedError`, :class:`UnsupportedTargetError` (shared/SysV/
    hugetlb/device mappings, a kernel thread) or
    :class:`~lazymig.errors.ConfigurationError` (our own process). Returns the
    VMAs read (``.vmas``), for :meth:`FrozenProcess.freeze`.
    """
    return _inspect(pid)


def _inspect(pid: int, layout: TargetLayout | None = None) -> TargetLayout:
    if pid <= 0:
        raise ConfigurationError(f"invalid pid {pid}")
    status = _read_status(pid)
    if int(status.get("Tgid", pid)) == os.getpid():
        raise ConfigurationError(f"pid {pid} is this process; it cannot freeze itself")
    if int(status.get("Tgid", pid)) != pid:
        raise ConfigurationError(f"{pid} is a thread of process {status['Tgid']}; "
                                 "give the process id")
    state = status.get("State", "?")[:1]
    if state in ("Z", "X"):
        raise TargetGoneError(pid, f"process {pid} is a zombie")
    tracer = int(status.get("TracerPid", "0") or 0)
    if tracer:
        raise AlreadyTracedError(pid, tracer)
    reasons = []
    checked = layout is not None  # by the inspect_target that read it
    if layout is None:
        layout = TargetLayout.read(pid, status)
    if not layout.vmas:
        if not read_stat(pid)[1][9] & _PF_KTHREAD:
            # Released its memory in exit(), a zombie the next moment (a child that
            # ran a moment, as a shell's `sleep`): dumped as one then.
            raise TargetGoneError(pid, f"process {pid} is exiting")
        reasons.append("it is a kernel thread")
    if not checked:
        reasons += unsupported_mappings(layout.vmas)
    if reasons:
        raise UnsupportedTargetError(pid, reasons)
    return layout


# -- the frozen process --------------------------------------------------------------


class FrozenProcess:
    """A target held in ptrace-stops, with its state read.

    Get one with ``await FrozenProcess.freeze(pid)``. End it with
    :meth:`resume` (detach: the target runs on as if nothing happened),
    :meth:`release` (``kill=True`` after a successful migration) or
    :meth:`leave_stopped` (an aborted migration). Use it as an async context
    manager so that an exception resumes the target.
    """

    def __init__(self, pid: int, tracer: TracerThread, tracees: list[Tracee],
                 state: ProcessState, vmas: list[Vma]) -> None:
        self.pid = pid
        self.state = state
        # Read once the target was seized: a frozen target cannot change them (what
        # lazymig maps in it for injected syscalls is unmapped again), so the scan
        # reuses them instead of walking its page tables for smaps again.
        self._vmas = vmas
        self._tracer = tracer
        self._tracees = tracees
        self._released = False

    # -- freezing --------------------------------------------------------------------

    @classmethod
    async def freeze(cls, pid: int, *, stop_timeout: float = 10.0,
                     layout: TargetLayout | None = None) -> FrozenProcess:
        """Check, seize and stop every thread of ``pid`` and read its state.

        Raises :class:`TargetGoneError`, :class:`AlreadyTracedError`,
        :class:`UnsupportedTargetError`, or :class:`~lazymig.errors.LazyMigOSError`;
        in every case the target is left running as before. ``stop_timeout``
        bounds the wait for each thread's stop (a thread in uninterruptible sleep
        never stops). ``layout``: what :func:`inspect_target` read just before
        (smaps is then not read again before the seize: 0.1 s for 5,000 VMAs).
        """
        tracer = TracerThread(name=f"lazymig-ptrace-{pid}")
        try:
            tracees, state, vmas = await tracer.run(_freeze_sync, pid, stop_timeout, layout)
        except BaseException:
            tracer.close()
            raise
        return cls(pid, tracer, tracees, state, vmas)

    # -- working on the frozen target ----------------------------------------------------

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the tracer thread (where the tracees may be driven)."""
        self._check_frozen()
        return await self._tracer.run(fn, *args, **kwargs)

    @property
    def main_thread(self) -> Tracee:
        """The leader's :class:`Tracee` (use it only inside :meth:`run`)."""
        return self._tracees[0]

    async def inject_syscall(self, nr: int, *args: int) -> int:
        """Run syscall ``nr(*args)`` in the main thread; returns rax (``-errno`` on error)."""
        self._check_frozen()
        return await self._tracer.run(self._tracees[0].inject_syscall, nr, *args)

    async def scan(self, *, use_zero_pfn: bool = True) -> MemoryScan:
        """Read VMAs and pagemap and plan the page runs (stack-pointer pages non-lazy)."""
        self._check_frozen()
        sps = [t.regs.rsp for t in self.state.threads]
        result = await self._tracer.run(_scan_checked, self.pid, sps, use_zero_pfn, self._vmas)
        return result

    async def collect_pages(self, scan: MemoryScan, *, pipe_size: int | None = None,
                            defer_lazy: bool = False) -> PagePipes:
        """Put the pages of ``scan.runs`` into page pipes (off the event loop).

        The target vmsplices them itself through injected syscalls: the pipes
        hold its pages, not copies, so they are valid only while it stays
        frozen: close them before :meth:`resume` or :meth:`release`.
        With ``defer_lazy`` the lazy pages are only planned (see
        :meth:`~lazymig.dump.pagepipe.PagePipes.plan`): fill them with
        :meth:`fill_pages`."""
        self._check_frozen()
        return await self._tracer.run(_collect_checked, self.pid, self._tracees[0], scan,
                                      pipe_size, defer_lazy)

    async def fill_pages(self, pipes: PagePipes, schedule: FillSchedule) -> None:
        """Fill the planned buffers of ``pipes`` that ``schedule`` hands out, batch
        after batch, until it hands out none (see :mod:`lazymig.dump.late_fill`)."""
        self._check_frozen()
        await self._tracer.run(_fill_checked, self.pid, self._tracees[0], pipes, schedule)

    # -- ending ------------------------------------------------------------------------

    @property
    def released(self) -> bool:
        """True after :meth:`resume` or :meth:`release`."""
        return self._released

    async def resume(self) -> None:
        """Detach every thread: the target continues exactly where it was (idempotent)."""
        await self.release(kill=False)

    async def release(self, *, kill: bool) -> None:
        """End the freeze: ``kill=False`` detaches and lets the target run on,
        ``kill=True`` kills it (SIGKILL) and waits for it to die. Idempotent.

        A target that died meanwhile is not an error here.
        """
        if self._released:
            return
        self._released = True
        try:
            await self._tracer.run(_release_sync, self.pid, self._tracees, kill)
        finally:
            self._tracer.close()

    async def leave_stopped(self) -> None:
        """End the freeze but keep the target job-control stopped, memory intact.

        For an aborted migration: SIGSTOP is queued while the target is still in
        its ptrace-stop, then every thread is detached; the pending SIGSTOP is
        taken before any user instruction runs, so the target goes from the
        ptrace-stop straight into a group stop (state ``T``) and stays there,
        whatever becomes of this process, until someone sends SIGCONT.
        Idempotent (a no-op after :meth:`release`).
        """
        if self._released:
            return
        self._released = True
        try:
            await self._tracer.run(_leave_stopped_sync, self.pid, self._tracees)
        finally:
            self._tracer.close()

    def _check_frozen(self) -> None:
        if self._released:
            raise ClosedResourceError(f"process {self.pid} was already released")

    async def __aenter__(self) -> FrozenProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release(kill=False)

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            warnings.warn(f"FrozenProcess({self.pid}) was never released; its tracer thread "
                          "ends now and the kernel resumes it", ResourceWarning, stacklevel=2)
            self._tracer.close(wait=False)

    def __repr__(self) -> str:
        return f"<FrozenProcess pid={self.pid}{' released' if self._released else ''}>"


# -- the synchronous halves (run on the tracer thread) ----------------------------------


def _freeze_sync(pid: int, timeout: float, layout: TargetLayout | None
                 ) -> tuple[list[Tracee], ProcessState, list[Vma]]:
    before = _inspect(pid, layout)
    status = _read_status(pid)
    options = PTRACE_O_SUSPEND_SECCOMP if status.get("Seccomp", "0") not in ("0", "") else 0
    tracees: list[Tracee] = []
    try:
        _seize_all(pid, tracees, options, timeout)
        # Re-check now that nothing can change under us.
        vmas = inspect_target_frozen(pid, len(tracees), before)
        state = read_state(pid, tracees)
    except BaseException:
        for t in reversed(tracees):
            t.abandon()
        raise
    return tracees, state, vmas


def inspect_target_frozen(pid: int, nr_threads: int,
                          before: TargetLayout | None = None) -> list[Vma]:
    """The checks of :func:`inspect_target` again, for a seized target (on the VMAs
    read ``before`` it was seized if they did not change since)."""
    del nr_threads  # every thread is seized: threads are supported
    reasons = []
    status = _read_status(pid)
    if before is not None and before.unchanged(pid, status):
        return before.vmas  # checked when they were read
    vmas = TargetLayout.read(pid, status).vmas
    reasons += unsupported_mappings(vmas)
    if reasons:
        raise UnsupportedTargetError(pid, reasons)
    return vmas


def _list_threads(pid: int) -> list[int]:
    tids = tids_of(pid)
    if not tids:  # a process, a zombie too, lists its leader at least
        raise TargetGoneError(pid, f"process {pid} exited")
    return sorted(tids)


def _seize_all(pid: int, tracees: list[Tracee], options: int, timeout: float) -> None:
    """Seize every thread, again and again until no new one appears (CRIU seize_threads)."""
    done: set[int] = set()
    while True:
        fresh = [tid for tid in _list_threads(pid) if tid not in done]
        fresh.sort(key=lambda tid: tid != pid)  # the leader first
        if not fresh:
            return
        for tid in fresh:
            done.add(tid)
            try:
                tracees.append(Tracee.seize(tid, pid=pid, options=options, timeout=timeout))
            except TargetGoneError:
                if tid == pid or not process_alive(pid):
                    raise
                # A non-leader thread exited between listing and seizing: fine.
            except LazyMigOSError as exc:
                # The kernel refuses (EPERM) to attach to a thread already exiting.
                if tid == pid or exc.errno != errno.EPERM or not _thread_exited(pid, tid):
                    raise


def _thread_exited(pid: int, tid: int) -> bool:
    """True if thread ``tid`` of ``pid`` is gone or exiting (a zombie or dead)."""
    try:
        return read_stat(pid, tid)[0] in ("Z", "X", "x")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _scan_checked(pid: int, sps: list[int], use_zero_pfn: bool, vmas: list[Vma]) -> MemoryScan:
    if not process_alive(pid):
        raise TargetGoneError(pid, f"process {pid} exited")
    result = scan_process(pid, stack_pointers=sps, use_zero_pfn=use_zero_pfn, vmas=vmas)
    if not process_alive(pid) or not result.vmas:
        raise TargetGoneError(pid, f"process {pid} exited while being scanned")
    return result


class FillSchedule(Protocol):
    """Which planned buffers to fill next (:class:`~lazymig.dump.late_fill.LateFill`)."""

    def next_batch(self) -> list[PipeBuffer]:
        """The next buffers to fill; empty to stop."""
        ...

    def filled(self, bufs: list[PipeBuffer]) -> None:
        """``bufs`` are filled now."""
        ...


def _collect_checked(pid: int, main: Tracee, scan: MemoryScan, pipe_size: int | None,
                     defer_lazy: bool) -> PagePipes:
    if not process_alive(pid):
        raise TargetGoneError(pid, f"process {pid} exited")
    pipes = PagePipes.plan(scan.runs, pipe_size=pipe_size)
    try:
        now = pipes.unfilled(lazy=False if defer_lazy else None)
        if now and defer_lazy and scan.nonlazy_pages <= _COPY_NONLAZY_PAGES:
            pipes.fill(pid, now, None)  # copied: no splicer set up and torn down for them
        elif now:
            _fill_sync(pid, main, pipes, _Once(now))
        if not process_alive(pid):
            raise TargetGoneError(pid, f"process {pid} exited while its pages were collected")
    except BaseException:
        pipes.close()
        raise
    return pipes


class _Once:
    """A schedule that hands out ``bufs`` in one go."""

    def __init__(self, bufs: list[PipeBuffer]) -> None:
        self._bufs = bufs

    def next_batch(self) -> list[PipeBuffer]:
        bufs, self._bufs = self._bufs, []
        return bufs

    def filled(self, bufs: list[PipeBuffer]) -> None:
        pass


def _fill_checked(pid: int, main: Tracee, pipes: PagePipes, schedule: FillSchedule) -> None:
    if not process_alive(pid):
        raise TargetGoneError(pid, f"process {pid} exited")
    _fill_sync(pid, main, pipes, schedule)
    if not process_alive(pid):
        raise TargetGoneError(pid, f"process {pid} exited while its pages were collected")


#: Up to this many non-lazy pages (4 MiB) a lazy dump copies into their pipes before
#: it is ready: setting the target's splicer up and tearing it down (single-stepped
#: injected syscalls, each a round trip through the scheduler) costs more than the
#: copy, and those pages are drained into pages-1.img once anyway. The lazy pages the
#: late fill puts in its pipes afterwards are vmspliced by the target, never copied.
_COPY_NONLAZY_PAGES: Final = 1024

#: fds the target must have free to vmsplice its pages itself (a socketpair, one pipe).
_TARGET_FDS_NEEDED: Final = 3


def _fill_sync(pid: int, main: Tracee, pipes: PagePipes, schedule: FillSchedule) -> None:
    """Have the target vmsplice its pages into the page pipes (see
    :mod:`lazymig.dump.target_splice`), or copy them if it has no fd to spare,
    batch after batch as ``schedule`` hands them out."""
    free = free_fd_slots(pid)
    if free < _TARGET_FDS_NEEDED:
        log.warning("process %d has %d free file descriptors (RLIMIT_NOFILE): copying its "
                    "pages into the page pipes instead of having it vmsplice them, which "
                    "freezes it longer", pid, free)
        while bufs := schedule.next_batch():
            pipes.fill(pid, bufs, None)
            schedule.filled(bufs)
        return
    # One injection session per batch, each followed by park(): between batches the
    # target holds its own registers in an interrupt stop, so a dumper killed then
    # leaves it to run on. During a batch it runs the splicer's code page, whose
    # tail rt_sigreturns to its own state once the dumper is gone (the setup and
    # the teardown, single-stepped, are not covered: a dumper killed in one of
    # their steps leaves the target a SIGTRAP).
    with _parked(main), main.syscalls() as session:
        splicer = TargetSplicer(pid, session)
    try:
        while bufs := schedule.next_batch():
            with _parked(main), main.syscalls(at=splicer.syscall_ip) as session:
                splicer.use(session)
                pipes.fill(pid, bufs, splicer)
            schedule.filled(bufs)
    finally:
        if main.stopped:
            with _parked(main), main.syscalls() as session:
                splicer.close(session)


@contextlib.contextmanager
def _parked(main: Tracee) -> Iterator[None]:
    """park() the tracee after the block (if it is still in a ptrace-stop)."""
    try:
        yield
    finally:
        if main.stopped:
            park(main)


def _leave_stopped_sync(pid: int, tracees: list[Tracee], timeout: float = 2.0) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    _release_sync(pid, tracees, kill=False)
    # Detached, the target takes the SIGSTOP as soon as it is scheduled; wait
    # for the group stop so that callers can rely on it.
    deadline = time.monotonic() + timeout
    while _stat_state(pid) not in ("T", "Z", "X", "") and time.monotonic() < deadline:
        time.sleep(0.001)


def _stat_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" if the process is gone)."""
    try:
        return read_stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _release_sync(pid: int, tracees: list[Tracee], kill: bool) -> None:
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # The leader last: its exit is reported only once every other thread is reaped.
        for t in reversed(tracees):
            try:
                while True:  # until the exit is reported
                    t.wait(timeout=10.0)
                    t.cont()
            except TargetGoneError:
                pass
            except LazyMigOSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
        return
    errors: list[LazyMigError] = []
    for t in tracees:
        try:
            t.detach()
        except TargetGoneError:
            pass
        except LazyMigError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
