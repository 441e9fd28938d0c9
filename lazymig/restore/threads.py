"""The threads of a process being restored, and the per-thread state of each.

The restorer rebuilds the process from its leader (the seized helper). For
each other dumped thread, :func:`create_threads` injects a ``clone`` with the
flags of a thread (``CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND |
CLONE_THREAD | CLONE_SYSVSEM``) into the leader, which is traced with
``PTRACE_O_TRACECLONE``: the kernel attaches the new thread to the same
tracer and stops it (``PTRACE_EVENT_STOP``) before it runs one instruction,
so it never runs the leader's injected code, and its stack pointer does not
matter. It is cloned after the credentials were set in the leader: a raw
``setresuid`` changes only the calling thread's, and a clone inherits them.

Each thread, the leader too, then gets its own state by syscalls injected
into it (they only act on the calling thread) and by ptrace
(:func:`set_thread_state` before the scratch mapping goes,
:func:`finish_thread` after it): alternate signal stack, clear-child-tid
address, robust futex list, name, scheduling, rseq registration, then its
blocked-signal mask, the signals that were queued for it, xstate and
registers (fs_base and gs_base, its TLS, among them). A thread gets its
dumped tid back (``clone3`` with ``set_tid``), in the pid namespace the
process was restored in (:mod:`lazymig.restore.pids`: the restorer's, or the
tree's own where the dumped pids are taken here), unless the restore gives
new pids (a plain ``clone``); the leader's pid is the process's.

The process has one userfaultfd, created before the threads: it covers the
memory every thread faults on.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from collections.abc import Sequence
from typing import Final, Protocol

from lazymig.errors import LazyMigOSError
from lazymig.linux.pidns import pid_here
from lazymig.linux.procfs import ns_pids
from lazymig.linux.procfs import threads as tids_of
from lazymig.linux.ptrace import PTRACE_O_TRACECLONE, Tracee, UserRegs
from lazymig.linux.syscalls import (
    SYS_CLONE,
    SYS_CLONE3,
    SYS_PRCTL,
    SYS_RSEQ,
    SYS_RT_SIGQUEUEINFO,
    SYS_RT_TGSIGQUEUEINFO,
    SYS_SCHED_SETSCHEDULER,
    SYS_SET_ROBUST_LIST,
    SYS_SET_TID_ADDRESS,
    SYS_SETPRIORITY,
    SYS_SIGALTSTACK,
)
from lazymig.linux.vm import write_memory
from lazymig.proto.images import CoreEntry
from lazymig.restore.pids import CLONE_ARGS, clone_args, set_tid_error

__all__ = ["DumpedThread", "ThreadTarget", "create_threads", "finish_thread",
           "set_thread_state"]

log = logging.getLogger(__name__)

_U64: Final = (1 << 64) - 1

_PR_SET_NAME: Final = 15
_PRIO_PROCESS: Final = 0

_CLONE_VM: Final = 0x100
_CLONE_FS: Final = 0x200
_CLONE_FILES: Final = 0x400
_CLONE_SIGHAND: Final = 0x800
_CLONE_THREAD: Final = 0x10000
_CLONE_SYSVSEM: Final = 0x40000
CLONE_THREAD_FLAGS: Final = (_CLONE_VM | _CLONE_FS | _CLONE_FILES | _CLONE_SIGHAND
                             | _CLONE_THREAD | _CLONE_SYSVSEM)
"""What glibc's pthread_create passes, less the tid and TLS pointers we set otherwise."""


@dataclasses.dataclass(frozen=True, slots=True)
class DumpedThread:
    """One dumped thread: its ``core-<tid>.img`` and its raw xstate."""

    tid: int
    """Its tid at dump time."""
    core: CoreEntry
    xstate: bytes


class ThreadTarget(Protocol):
    """The process being restored, as the restorer drives it (tracer thread)."""

    pid: int
    tracee: Tracee
    """Its leader."""

    def data(self, payload: bytes, offset: int = 0) -> int:
        """Put ``payload`` in the process's scratch area; its address."""
        ...


def _call(tracee: Tracee, nr: int, *args: int, what: str) -> int:
    res = tracee.inject_syscall(nr, *args)
    if res < 0:
        raise LazyMigOSError(-res, f"restoring thread {tracee.tid}: injected {what}",
                             pid=tracee.pid)
    return res


def create_threads(target: ThreadTarget, threads: Sequence[DumpedThread], *,
                   new_tids: bool = False) -> list[Tracee]:
    """Clone one thread per entry of ``threads`` (the non-leader ones) from the
    leader, each under its dumped tid (``new_tids``: a new one), and give each its
    :func:`set_thread_state`. Returns their tracees, stopped, in the order of
    ``threads``. Run it on the tracer thread, while the scratch mapping is in place."""
    if not threads:
        return []
    leader = target.tracee
    out: list[Tracee] = []
    leader.set_options(PTRACE_O_TRACECLONE)
    try:
        for dumped in threads:
            tid = _clone(target, None if new_tids else dumped.tid)
            tracee = Tracee.adopt(tid, pid=target.pid, stopped=False)
            out.append(tracee)
            tracee.wait_interrupt_stop(timeout=5.0)  # the stop of an auto-attached thread
            tracee.set_syscall_ip(leader.syscall_ip)
            set_thread_state(target, tracee, dumped.core)
            _set_name_and_sched(target, tracee, dumped.core)
            log.debug("pid %d: thread %d restored as %d", target.pid, dumped.tid, tid)
    finally:
        leader.set_options(0)
    return out


def _clone(target: ThreadTarget, tid: int | None) -> int:
    """A new thread of the process, under ``tid`` (clone3 with ``set_tid``) or, with
    None, a new tid (clone). Returns its tid here."""
    leader = target.tracee
    if tid is None:
        seen = _call(leader, SYS_CLONE, CLONE_THREAD_FLAGS, 0, 0, 0, 0, what="clone")
    else:
        wanted = target.data(struct.pack("<i", tid), CLONE_ARGS.size)
        args = target.data(clone_args(CLONE_THREAD_FLAGS, 0, wanted))
        seen = leader.inject_syscall(SYS_CLONE3, args, CLONE_ARGS.size)
        if seen < 0:
            raise set_tid_error(-seen, tid)
    return pid_here(target.pid, seen, lambda: tids_of(target.pid))


def set_thread_state(target: ThreadTarget, tracee: Tracee, core: CoreEntry) -> None:
    """The calling-thread state set by injected syscalls that need the scratch
    area: alternate signal stack, clear-child-tid address, robust futex list."""
    thread = core.thread_core
    if thread.HasField("sas") and thread.sas.ss_size:
        at = target.data(struct.pack("<QiiQ", thread.sas.ss_sp, thread.sas.ss_flags, 0,
                                     thread.sas.ss_size))
        _call(tracee, SYS_SIGALTSTACK, at, 0, what="sigaltstack")
    tracee.inject_syscall(SYS_SET_TID_ADDRESS, core.thread_info.clear_tid_addr)
    if thread.futex_rla:
        _call(tracee, SYS_SET_ROBUST_LIST, thread.futex_rla, thread.futex_rla_len,
              what="set_robust_list")


def _set_name_and_sched(target: ThreadTarget, tracee: Tracee, core: CoreEntry) -> None:
    """A non-leader thread's name and scheduling (the leader's are the process's,
    set with it). A refused policy or nice is logged, as for the leader."""
    thread = core.thread_core
    if thread.comm:
        name = target.data(thread.comm.encode()[:15] + b"\0")
        _call(tracee, SYS_PRCTL, _PR_SET_NAME, name, what="prctl(PR_SET_NAME)")
    if thread.HasField("sched_policy"):
        at = target.data(struct.pack("<i", thread.sched_prio))
        res = tracee.inject_syscall(SYS_SCHED_SETSCHEDULER, 0, thread.sched_policy, at)
        if res < 0:
            log.warning("pid %d: thread %d keeps its scheduling policy: %s", target.pid,
                        tracee.tid, LazyMigOSError(-res, "sched_setscheduler"))
    if thread.HasField("sched_nice"):
        res = tracee.inject_syscall(SYS_SETPRIORITY, _PRIO_PROCESS, 0, thread.sched_nice)
        if res < 0:
            log.warning("pid %d: thread %d keeps its nice value: %s", target.pid, tracee.tid,
                        LazyMigOSError(-res, "setpriority"))


def finish_thread(tracee: Tracee, core: CoreEntry, xstate: bytes, *,
                  shared_signals: bool = False) -> None:
    """A thread's last state, once the scratch mapping is gone and the lazy pages
    have a daemon: rseq registration (the area may be a lazy page), blocked-signal
    mask, the signals queued for it (and, with ``shared_signals``, those of the
    whole process, from core ``tc.signals_s``), xstate and registers. It stays
    stopped; detach it to let it run.

    The signals are queued with every signal blocked (injected syscalls run so)
    into a thread that stays in its ptrace-stop until detached: none is taken
    before its registers are the dumped ones.
    """
    thread = core.thread_core
    if thread.HasField("rseq_entry") and thread.rseq_entry.rseq_abi_pointer:
        r = thread.rseq_entry
        _call(tracee, SYS_RSEQ, r.rseq_abi_pointer, r.rseq_abi_size, 0, r.signature,
              what="rseq")
    tracee.set_sigmask(thread.blk_sigset)
    queued = [(True, s.siginfo) for s in thread.signals_p.signals]
    if shared_signals:
        queued += [(False, s.siginfo) for s in core.tc.signals_s.signals]
    if queued:
        _queue_signals(tracee, queued)
    if xstate:
        tracee.set_xstate(xstate)
    g = core.thread_info.gpregs
    tracee.set_regs(UserRegs(
        r15=g.r15, r14=g.r14, r13=g.r13, r12=g.r12, rbp=g.bp, rbx=g.bx, r11=g.r11,
        r10=g.r10, r9=g.r9, r8=g.r8, rax=g.ax, rcx=g.cx, rdx=g.dx, rsi=g.si, rdi=g.di,
        orig_rax=_U64, rip=g.ip, cs=g.cs, eflags=g.flags, rsp=g.sp, ss=g.ss,
        fs_base=g.fs_base, gs_base=g.gs_base, ds=g.ds, es=g.es, fs=g.fs, gs=g.gs))


def _queue_signals(tracee: Tracee, queued: Sequence[tuple[bool, bytes]]) -> None:
    """rt_tgsigqueueinfo (a thread's own) or rt_sigqueueinfo (the process's) for
    each raw siginfo, in order, from a page mapped for the purpose (the scratch
    mapping is gone by now). The kernel takes any si_code from a process queueing
    to itself, as CRIU's restorer does."""
    # The ids the thread has in its own pid namespace (the tree's own, maybe).
    pid, tid = ns_pids(tracee.pid)[-1], ns_pids(tracee.tid)[-1]
    with tracee.syscalls() as session, \
            session.scratch_page("injected mmap for the queued signals") as page:
        for own, raw in queued:
            write_memory(tracee.pid, page, raw)
            (signo,) = struct.unpack_from("<i", raw)
            if own:
                res = session.syscall(SYS_RT_TGSIGQUEUEINFO, pid, tid, signo, page)
            else:
                res = session.syscall(SYS_RT_SIGQUEUEINFO, pid, signo, page)
            if res < 0:
                raise LazyMigOSError(-res, f"injected sigqueueinfo({signo})", pid=tracee.pid)
