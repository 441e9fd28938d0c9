"""Reading a frozen process's state, every thread of it, in one pass.

:func:`read_state` runs on the tracer thread once every thread is seized and
returns a :class:`ProcessState`: all that the core, pstree, mm and lazymig
images hold besides memory and open files. It reads

* per thread, by ptrace: general registers (fs_base/gs_base, the TLS, among
  them), the raw NT_X86_XSTATE area, the blocked-signal mask, the rseq
  configuration, the thread's queued signals (PTRACE_PEEKSIGINFO);
* per thread, by syscalls injected into that thread (they answer only for the
  calling thread): the clear-child-tid address (``PR_GET_TID_ADDRESS``), the
  alternate signal stack, the parent-death signal;
* per thread, from here: /proc/PID/task/TID/status (creds, seccomp), comm,
  scheduling, the robust futex list (``get_robust_list``), the rseq_cs word;
* per process, by syscalls injected into the leader: ``brk(0)``, every signal's
  disposition, dumpable, THP-disable, securebits, child-subreaper, itimers;
* per process, from here: /proc/PID/stat, status, auxv, exe, cwd, root,
  personality, loginuid, oom_score_adj, rlimits, the process-wide signal queue.

CRIU asks its parasite for what has no /proc or ptrace interface; lazymig
injects syscalls instead (:meth:`~lazymig.linux.ptrace.Tracee.syscalls`). They
all write into one scratch page mmap-ed in the target by its leader and
unmapped again; every thread is parked afterwards (see
:func:`~lazymig.linux.ptrace.park`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import struct
from collections.abc import Sequence
from typing import Final

from lazymig.errors import LazyMigError, LazyMigOSError
from lazymig.linux.procfs import (
    ProcLink,
    ProcNumber,
    read_auxv,
    read_comm,
    read_int,
    read_link,
    read_stat,
    read_status,
)
from lazymig.linux.ptrace import (
    RseqConfiguration,
    SyscallBatch,
    TargetGoneError,
    Tracee,
    UserRegs,
    park,
    robust_list,
)
from lazymig.linux.syscalls import (
    SYS_BRK,
    SYS_GETITIMER,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_PRCTL,
    SYS_RT_SIGACTION,
    SYS_SIGALTSTACK,
)
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import (
    ACTION_SIGNALS,
    KSIGACTION,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)

__all__ = [
    "Creds",
    "MmState",
    "ProcessState",
    "SigAction",
    "ThreadState",
    "read_stat_fields",
    "read_state",
]

_U64: Final = (1 << 64) - 1
_RLIM_NLIMITS: Final = 16
_KSIGACTION: Final = struct.Struct(KSIGACTION)

# prctl options of the injected calls.
_PR_GET_PDEATHSIG: Final = 2
_PR_GET_DUMPABLE: Final = 3
_PR_GET_SECUREBITS: Final = 27
_PR_GET_CHILD_SUBREAPER: Final = 37
_PR_GET_TID_ADDRESS: Final = 40
_PR_GET_THP_DISABLE: Final = 42

# The scratch area: the leader's answers, then one slot per thread.
_AT_SIGACTIONS: Final = 0                      # 63 x struct kernel_sigaction
_AT_ITIMERS: Final = 2048                      # 3 x struct itimerval (4 x i64 each)
_AT_SUBREAPER: Final = _AT_ITIMERS + 3 * 32    # int
_AT_THREADS: Final = _AT_SUBREAPER + 16
_SLOT: Final = 48
_BATCH_SIZE: Final = 2 * PAGE_SIZE  # after the scratch area: the sigactions' batch
_PROT_RWX: Final = PROT_READ | PROT_WRITE | PROT_EXEC
_SLOT_TID_ADDRESS: Final = 0                   # u64
_SLOT_ALTSTACK: Final = 8                      # stack_t: void *ss_sp; int ss_flags; size_t ss_size
_SLOT_PDEATHSIG: Final = 32                    # int


@dataclasses.dataclass(frozen=True, slots=True)
class SigAction:
    """One signal's disposition (``struct kernel_sigaction`` on x86_64).

    ``handler`` is 0 for SIG_DFL and 1 for SIG_IGN; ``mask`` is the 64-bit
    sa_mask (bit ``n - 1`` is signal ``n``).
    """

    signo: int
    handler: int
    flags: int
    restorer: int
    mask: int


@dataclasses.dataclass(frozen=True, slots=True)
class Creds:
    """A thread's credentials (/proc/TID/status and PR_GET_SECUREBITS)."""

    uids: tuple[int, int, int, int]
    """Real, effective, saved and filesystem uid."""
    gids: tuple[int, int, int, int]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    secbits: int
    groups: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ThreadState:
    """What a restore needs of one thread (CRIU's ``thread_info`` and ``thread_core``).

    ``regs`` are exactly what the kernel reports; for a thread stopped inside a
    syscall use ``regs.with_syscall_restart()`` for the image.
    ``xstate`` is the raw NT_X86_XSTATE area (XSAVE layout).
    """

    tid: int
    regs: UserRegs
    xstate: bytes
    sigmask: int
    rseq: RseqConfiguration | None
    comm: str = ""
    clear_tid_addr: int = 0
    robust_list: tuple[int, int] = (0, 0)
    """``get_robust_list``: (head, len)."""
    sigaltstack: tuple[int, int, int] | None = None
    """(ss_sp, ss_size, ss_flags); None where the kernel would not say."""
    pdeath_sig: int = 0
    sched: tuple[int, int, int] = (0, 0, 0)
    """(nice, policy, priority)."""
    creds: Creds | None = None
    seccomp_mode: int = 0
    rseq_cs: int = 0
    """The ``rseq_cs`` word of the thread's registered rseq area (0: none)."""
    pending_signals: tuple[bytes, ...] = ()
    """Signals queued for this thread (raw ``siginfo_t``), oldest first."""


@dataclasses.dataclass(frozen=True, slots=True)
class MmState:
    """The mm fields CRIU's ``mm_entry`` has, from /proc/PID/stat, auxv and exe.

    ``brk`` is the current program break (from an injected ``brk(0)``), which
    /proc/PID/stat does not show. ``auxv`` is the flat array of (type, value)
    words, terminator included, like ``mm_entry.mm_saved_auxv``.
    """

    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_stack: int
    start_brk: int
    brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    auxv: tuple[int, ...]
    exe: str


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessState:
    """Everything read from the frozen process except its memory and files."""

    pid: int
    comm: str
    threads: tuple[ThreadState, ...]
    """The leader first."""
    mm: MmState
    sigactions: tuple[SigAction, ...]
    #: The target was job-control stopped (SIGSTOP & co) when seized; it stays so.
    was_stopped: bool
    ppid: int = 0
    pgid: int = 0
    sid: int = 0
    task_flags: int = 0
    """The PF_* flags of /proc/PID/stat (CRIU's ``tc.flags``)."""
    personality: int = 0
    umask: int | None = None
    loginuid: int | None = None
    oom_score_adj: int | None = None
    child_subreaper: bool = False
    dumpable: int | None = None
    thp_disabled: bool | None = None
    itimers: tuple[tuple[int, int, int, int], ...] = ((0, 0, 0, 0),) * 3
    """ITIMER_REAL, _VIRTUAL, _PROF as (interval s, interval µs, value s, value µs)."""
    rlimits: tuple[tuple[int, int], ...] = ()
    """(soft, hard) for the 16 RLIMIT_* in order; RLIM_INFINITY is 2**64 - 1."""
    cwd: str | None = None
    root: str | None = None
    shared_signals: tuple[bytes, ...] = ()
    """Signals queued for the whole process (raw ``siginfo_t``), oldest first."""


# -- the one pass ------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Leader:
    """What the syscalls injected into the leader told (None / 0 where refused)."""

    brk: int = 0
    dumpable: int | None = None
    thp_disabled: int | None = None
    secbits: int = 0
    subreaper: int = 0
    itimers: tuple[tuple[int, int, int, int], ...] = ((0, 0, 0, 0),) * 3
    sigactions: tuple[SigAction, ...] = ()


@dataclasses.dataclass(slots=True)
class _Own:
    """What the syscalls injected into one thread told about it."""

    tid_address: int = 0
    altstack: tuple[int, int, int] | None = None
    pdeath_sig: int = 0


def read_state(pid: int, tracees: Sequence[Tracee]) -> ProcessState:
    """Read the state of the frozen process whose seized threads are ``tracees``
    (the leader first). Run it on their tracer thread. Every thread is left
    parked (:func:`~lazymig.linux.ptrace.park`), even on failure."""
    main = tracees[0]
    stat = read_stat_fields(pid)
    status = _proc_status(pid)
    leader, own = _inject(main, tracees)
    threads = tuple(_thread_state(pid, t, own[t.tid], leader.secbits) for t in tracees)
    mm = MmState(
        start_code=stat[26], end_code=stat[27], start_stack=stat[28], start_data=stat[45],
        end_data=stat[46], start_brk=stat[47], brk=leader.brk, arg_start=stat[48],
        arg_end=stat[49], env_start=stat[50], env_end=stat[51], auxv=_read_auxv(pid),
        exe=_read_exe(pid))
    return ProcessState(
        pid=pid, comm=_read_comm(pid), threads=threads, mm=mm, sigactions=leader.sigactions,
        was_stopped=any(t.group_stopped for t in tracees),
        ppid=stat[4], pgid=stat[5], sid=stat[6], task_flags=stat[9],
        personality=_read_int(pid, "personality", 16) or 0,
        umask=int(status["Umask"], 8) if "Umask" in status else None,
        loginuid=_read_int(pid, "loginuid"),
        oom_score_adj=_read_int(pid, "oom_score_adj"),
        child_subreaper=bool(leader.subreaper), dumpable=leader.dumpable,
        thp_disabled=None if leader.thp_disabled is None else bool(leader.thp_disabled),
        itimers=leader.itimers, rlimits=tuple(_rlimit(pid, r) for r in range(_RLIM_NLIMITS)),
        cwd=_readlink(pid, "cwd"), root=_readlink(pid, "root"),
        shared_signals=tuple(main.pending_signals(shared=True)),
    )


def _inject(main: Tracee, tracees: Sequence[Tracee]) -> tuple[_Leader, dict[int, _Own]]:
    """Every injected query, the leader's and each thread's, through one scratch area:
    the leader's in one batch (one PTRACE_CONT), each other thread's in one of its own.
    A single-stepped syscall is a round trip through the scheduler: under load, each
    cost milliseconds of downtime, 13 for the leader and 3 for every other thread."""
    pid = main.pid
    leader = _Leader()
    sigs = ACTION_SIGNALS  # in core.sigactions order
    size = (_AT_THREADS + _SLOT * len(tracees) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    scratch = 0
    try:
        with main.syscalls() as session:
            scratch = session.syscall(SYS_MMAP, 0, size + _BATCH_SIZE, _PROT_RWX,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if scratch < 0:
                raise LazyMigOSError(-scratch, "injected mmap for a scratch area", pid=pid)
            batch = SyscallBatch(scratch + size, _BATCH_SIZE)
            batch.add(SYS_BRK, 0, what="injected brk(0)")
            for option in (_PR_GET_DUMPABLE, _PR_GET_THP_DISABLE, _PR_GET_SECUREBITS):
                batch.add(SYS_PRCTL, option, 0, 0, 0, 0, what=f"injected prctl({option})",
                          may_fail=True)
            for i, sig in enumerate(sigs):
                batch.add(SYS_RT_SIGACTION, sig, 0, scratch + _AT_SIGACTIONS
                          + i * _KSIGACTION.size, 8, what=f"injected rt_sigaction({sig})")
            batch.add(SYS_PRCTL, _PR_GET_CHILD_SUBREAPER, scratch + _AT_SUBREAPER, 0, 0, 0,
                      what="injected prctl(PR_GET_CHILD_SUBREAPER)", may_fail=True)
            for which in range(3):
                batch.add(SYS_GETITIMER, which, scratch + _AT_ITIMERS + 32 * which,
                          what=f"injected getitimer({which})", may_fail=True)
            _own_queries(batch, scratch + _AT_THREADS)
            results = session.run_batch(batch)
        brk, dumpable, thp_disabled, secbits = results[:4]
        leader.brk = brk
        if dumpable >= 0:
            leader.dumpable = dumpable
        if thp_disabled >= 0:
            leader.thp_disabled = thp_disabled
        if secbits >= 0:
            leader.secbits = secbits
        after = results[4 + len(sigs):]
        subreaper_ok = after[0] == 0
        timers_ok = all(r == 0 for r in after[1:4])
        oks = {main.tid: _own_oks(after[4:])}
        park(main)
        for i, t in enumerate(tracees[1:], 1):
            t.set_syscall_ip(main.syscall_ip)
            try:
                with t.syscalls() as session:
                    batch = SyscallBatch(scratch + size, _BATCH_SIZE)
                    _own_queries(batch, scratch + _AT_THREADS + i * _SLOT)
                    oks[t.tid] = _own_oks(session.run_batch(batch))
            finally:
                if t.stopped:
                    park(t)
        raw = read_memory(pid, scratch, size)
    finally:
        if main.stopped:
            try:
                if scratch > 0:
                    main.inject_syscall(SYS_MUNMAP, scratch, size + _BATCH_SIZE)
            finally:
                with contextlib.suppress(LazyMigError):
                    park(main)
    leader.sigactions = tuple(
        SigAction(sig, *_KSIGACTION.unpack_from(raw, _AT_SIGACTIONS + i * _KSIGACTION.size))
        for i, sig in enumerate(sigs))
    if subreaper_ok:
        (leader.subreaper,) = struct.unpack_from("<i", raw, _AT_SUBREAPER)
    if timers_ok:
        timers = [struct.unpack_from("<4q", raw, _AT_ITIMERS + 32 * w) for w in range(3)]
        leader.itimers = tuple((a, b, c, d) for a, b, c, d in timers)
    own = {t.tid: _own_answers(raw, _AT_THREADS + i * _SLOT, oks[t.tid])
           for i, t in enumerate(tracees)}
    return leader, own


def _own_queries(batch: SyscallBatch, slot: int) -> None:
    """The per-thread queries, into ``batch`` (run in the thread they are about)."""
    batch.add(SYS_PRCTL, _PR_GET_TID_ADDRESS, slot + _SLOT_TID_ADDRESS, 0, 0, 0,
              what="injected prctl(PR_GET_TID_ADDRESS)", may_fail=True)
    batch.add(SYS_SIGALTSTACK, 0, slot + _SLOT_ALTSTACK, what="injected sigaltstack",
              may_fail=True)
    batch.add(SYS_PRCTL, _PR_GET_PDEATHSIG, slot + _SLOT_PDEATHSIG, 0, 0, 0,
              what="injected prctl(PR_GET_PDEATHSIG)", may_fail=True)


def _own_oks(results: Sequence[int]) -> tuple[bool, bool, bool]:
    """Which of :func:`_own_queries`' three succeeded, from their results."""
    tid_ok, altstack_ok, pdeath_ok = (r == 0 for r in results[-3:])
    return tid_ok, altstack_ok, pdeath_ok


def _own_answers(raw: bytes, slot: int, oks: tuple[bool, bool, bool]) -> _Own:
    out = _Own()
    tid_ok, altstack_ok, pdeath_ok = oks
    if tid_ok:
        (out.tid_address,) = struct.unpack_from("<Q", raw, slot + _SLOT_TID_ADDRESS)
    if altstack_ok:
        sp, flags, size = struct.unpack_from("<Qi4xQ", raw, slot + _SLOT_ALTSTACK)
        out.altstack = (sp, size, flags)
    if pdeath_ok:
        (out.pdeath_sig,) = struct.unpack_from("<i", raw, slot + _SLOT_PDEATHSIG)
    return out


def _thread_state(pid: int, t: Tracee, own: _Own, secbits: int) -> ThreadState:
    tid = t.tid
    status = _proc_status(pid, tid)
    rseq = t.get_rseq_configuration()
    rseq_cs = 0
    if rseq is not None and rseq.rseq_abi_pointer:
        with contextlib.suppress(LazyMigOSError):
            (rseq_cs,) = struct.unpack("<Q", read_memory(pid, rseq.rseq_abi_pointer + 8, 8))
    try:
        policy = os.sched_getscheduler(tid)
        prio = os.sched_getparam(tid).sched_priority
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except ProcessLookupError as exc:
        raise TargetGoneError(pid, f"thread {tid} is gone") from exc
    return ThreadState(
        tid=tid, regs=t.get_regs(), xstate=t.get_xstate(), sigmask=t.get_sigmask(), rseq=rseq,
        comm=_thread_comm(pid, tid),
        clear_tid_addr=own.tid_address, robust_list=robust_list(pid, tid),
        sigaltstack=own.altstack, pdeath_sig=own.pdeath_sig, sched=(nice, policy, prio),
        creds=_creds(status, secbits), seccomp_mode=int(status.get("Seccomp", "0") or 0),
        rseq_cs=rseq_cs, pending_signals=tuple(t.pending_signals()))


# -- /proc and friends ----------------------------------------------------------------------


def read_stat_fields(pid: int) -> dict[int, int]:
    """/proc/PID/stat numeric fields by their proc(5) number (1-based), from 4 on."""
    try:
        return read_stat(pid)[1]
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, "read /proc/PID/stat") from exc


def _creds(status: dict[str, str], secbits: int) -> Creds:
    uids = tuple(int(x) for x in status["Uid"].split())
    gids = tuple(int(x) for x in status["Gid"].split())
    return Creds(
        uids=(uids[0], uids[1], uids[2], uids[3]), gids=(gids[0], gids[1], gids[2], gids[3]),
        cap_inh=int(status["CapInh"], 16), cap_prm=int(status["CapPrm"], 16),
        cap_eff=int(status["CapEff"], 16), cap_bnd=int(status["CapBnd"], 16),
        secbits=secbits, groups=tuple(int(g) for g in status.get("Groups", "").split()),
    )


def _rlimit(pid: int, which: int) -> tuple[int, int]:
    try:
        soft, hard = resource.prlimit(pid, which)
    except ProcessLookupError as exc:
        raise TargetGoneError(pid, "prlimit") from exc
    return (soft & _U64, hard & _U64)


def _proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    try:
        return read_status(pid, tid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        task = "" if tid is None else f"/task/{tid}"
        raise TargetGoneError(pid, f"read /proc/{pid}{task}/status") from exc


def _thread_comm(pid: int, tid: int) -> str:
    try:
        return read_comm(pid, tid)
    except OSError:
        return ""


def _read_int(pid: int, name: ProcNumber, base: int = 10) -> int | None:
    try:
        return read_int(pid, name, base)
    except (OSError, ValueError):
        return None


def _readlink(pid: int, name: ProcLink) -> str | None:
    try:
        return read_link(pid, name)
    except OSError:
        return None


def _read_auxv(pid: int) -> tuple[int, ...]:
    try:
        return read_auxv(pid)
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, "read /proc/PID/auxv") from exc


def _read_exe(pid: int) -> str:
    try:
        return read_link(pid, "exe")
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, "read /proc/PID/exe") from exc


def _read_comm(pid: int) -> str:
    try:
        return read_comm(pid)
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, "read /proc/PID/comm") from exc

