"""ptrace(2) for x86_64: seize, interrupt and wait; registers, xstate, signal mask
and rseq configuration; and syscall injection into a stopped tracee.

**Threading rule.** "Attachment and subsequent commands are per thread"
(ptrace(2)): every request for a tracee must come from the OS thread that
attached it. :class:`Tracee` remembers that thread and refuses calls from any
other. :class:`TracerThread` is a one-thread executor to keep all of them on
(async code awaits :meth:`TracerThread.run`, never the default pool).

python-ptrace supplies the classic requests (GETREGS/SETREGS, SINGLESTEP, CONT,
DETACH, PEEK/POKE, GETFPREGS); it is wrapped here so that its ``PtraceError``
becomes :class:`~lazymig.errors.LazyMigOSError`. What it lacks (SEIZE,
INTERRUPT, GETREGSET NT_X86_XSTATE, GET/SETSIGMASK, GET_RSEQ_CONFIGURATION) goes
through ctypes and :mod:`lazymig.linux._libc`.

**Waiting.** A ptrace-stop of a tracee is reported to *any* ``waitpid`` in the
tracer's thread group that matches it, including ``waitpid(pid, 0)``. Do not
freeze a child of your own process that something else waits for (asyncio's
child watchers do): the watcher would swallow the stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, ParamSpec, TypeVar

from ptrace.binding import func as _pt  # type: ignore[import-untyped]
from ptrace.error import PtraceError  # type: ignore[import-untyped]

from lazymig.errors import BrokenResourceError, ConfigurationError, LazyMigError, LazyMigOSError
from lazymig.linux._libc import check, libc, syscall
from lazymig.linux.procfs import read_maps, read_stat, read_status
from lazymig.linux.syscalls import (
    SYS_GET_ROBUST_LIST,
    SYS_GETPID,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_POLL,
)
from lazymig.linux.vm import read_memory, write_memory
from lazymig.proto.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE

__all__ = [
    "NT_PRSTATUS",
    "NT_X86_XSTATE",
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_STOP",
    "PTRACE_O_SUSPEND_SECCOMP",
    "PTRACE_O_TRACECLONE",
    "SIGINFO_SIZE",
    "AlreadyTracedError",
    "BatchedCall",
    "InjectionSession",
    "RseqConfiguration",
    "SyscallBatch",
    "TargetGoneError",
    "Tracee",
    "TracerThread",
    "UserRegs",
    "park",
    "process_alive",
    "robust_list",
]

P = ParamSpec("P")
T = TypeVar("T")

PTRACE_GETREGSET: Final = 0x4204
PTRACE_SETREGSET: Final = 0x4205
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_GETSIGMASK: Final = 0x420A
PTRACE_SETSIGMASK: Final = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION: Final = 0x420F
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_PEEKSIGINFO: Final = 0x4209
PTRACE_PEEKSIGINFO_SHARED: Final = 1

PTRACE_O_TRACEFORK: Final = 1 << 1
PTRACE_O_TRACECLONE: Final = 1 << 3
PTRACE_EVENT_CLONE: Final = 3

PTRACE_O_SUSPEND_SECCOMP: Final = 1 << 21
PTRACE_EVENT_STOP: Final = 128

NT_PRSTATUS: Final = 1
NT_PRFPREG: Final = 2
NT_X86_XSTATE: Final = 0x202

_WALL: Final = 0x40000000  # __WALL: wait for clone (non-leader) threads too

# x86_64 syscall restart codes, as left in rax by an interrupted syscall.
_ERESTARTSYS: Final = 512
_ERESTARTNOINTR: Final = 513
_ERESTARTNOHAND: Final = 514
_ERESTART_RESTARTBLOCK: Final = 516

_EFLAGS_TF: Final = 1 << 8
_EFLAGS_DF: Final = 1 << 10

_U64: Final = (1 << 64) - 1
_TOLD_POLL: Final = 1e-3  # s between checks for a ptrace-stop while code runs
_SYSCALL_INSN: Final = b"\x0f\x05"

# The largest NT_X86_XSTATE area we expect (AMX tiles included it is ~11 KiB);
# the kernel truncates to the real size and reports it in iov_len.
_XSTATE_BUF: Final = 64 * 1024
SIGINFO_SIZE: Final = 128  # sizeof(siginfo_t)
_PEEK_BATCH: Final = 32

# SyscallBatch's loop (rdi = table, rsi = entries; 64-byte entries: nr with bit 63
# set if it may fail, six arguments, result), assembled from:
#     mov r12, rdi; mov r13, rsi
#   next: test r13, r13; jz done
#     mov rax, [r12]; btr rax, 63
#     mov rdi, [r12+8]; mov rsi, [r12+16]; mov rdx, [r12+24]
#     mov r10, [r12+32]; mov r8, [r12+40]; mov r9, [r12+48]
#     syscall; mov [r12+56], rax
#     cmp rax, -4095; jb ok                      # unsigned: not -errno
#     bt qword [r12], 63; jnc done              # failed, and may not
#   ok: add r12, 64; dec r13; jmp next
#   done: int3                                  # r13 = calls not done
_SYSCALL_LOOP: Final = bytes.fromhex(
    "4989fc4989f54d85ed7447498b0424480fbaf03f498b7c2408498b742410498b5424184d8b542420"
    "4d8b4424284d8b4c24300f054989442438483d01f0ffff7208490fba24243f73094983c44049ffcd"
    "ebb4cc")
_BATCH_CODE: Final = 128  # bytes kept for the loop at the start of the area
_BATCH_CALL: Final = struct.Struct("<8Q")
_BATCH_ENTRY: Final = _BATCH_CALL.size
_MAY_FAIL: Final = 1 << 63

_ptrace = libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _RseqConf(ctypes.Structure):
    _fields_ = (
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class _PeekSiginfoArgs(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32))


class TargetGoneError(LazyMigOSError):
    """The target process (or one of its threads) does not exist or has exited.

    ``errno`` is always ``ESRCH``; ``pid`` names the process.
    """

    def __init__(self, pid: int, what: str) -> None:
        super().__init__(errno.ESRCH, what, pid=pid)


class AlreadyTracedError(LazyMigError):
    """The target is already traced by another process (a debugger, strace, CRIU).

    ``tracer`` is the tracer's pid when /proc told us, else ``None``.
    """

    def __init__(self, pid: int, tracer: int | None) -> None:
        by = f"by pid {tracer}" if tracer else "by another tracer"
        super().__init__(f"process {pid} is already traced {by}; detach it first")
        self.pid = pid
        self.tracer = tracer


_REG_NAMES: Final = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
    "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
    "gs_base", "ds", "es", "fs", "gs",
)


@dataclasses.dataclass(frozen=True, slots=True)
class UserRegs:
    """x86_64 ``struct user_regs_struct`` (what PTRACE_GETREGS and NT_PRSTATUS give).

    Values are unsigned 64-bit. CRIU's ``user_x86_regs_entry`` has the same
    fields without the ``r``/``e`` prefixes (``bp``, ``ax``, ``ip``, ``flags``, ``sp`` ...).
    """

    r15: int
    r14: int
    r13: int
    r12: int
    rbp: int
    rbx: int
    r11: int
    r10: int
    r9: int
    r8: int
    rax: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    orig_rax: int
    rip: int
    cs: int
    eflags: int
    rsp: int
    ss: int
    fs_base: int
    gs_base: int
    ds: int
    es: int
    fs: int
    gs: int

    @classmethod
    def _from_struct(cls, struct: Any) -> UserRegs:
        return cls(*(int(getattr(struct, name)) & _U64 for name in _REG_NAMES))

    def _to_struct(self) -> Any:
        return _pt.ptrace_registers_t(*(getattr(self, name) for name in _REG_NAMES))

    def as_dict(self) -> dict[str, int]:
        """Field name to value, in kernel order."""
        return {name: getattr(self, name) for name in _REG_NAMES}

    def with_syscall_restart(self) -> UserRegs:
        """The registers to *save in an image* for a thread stopped inside a syscall.

        A restored thread starts from these registers through sigreturn, so the
        kernel's restart logic never sees it; CRIU therefore applies it when
        dumping (compel ``get_task_regs``): ``-ERESTART{SYS,NOINTR,NOHAND}``
        re-executes the syscall (``rip -= 2``, ``rax = orig_rax``), and
        ``-ERESTART_RESTARTBLOCK`` becomes ``-EINTR``. But poll(2) with a timeout:
        it is re-executed with its whole timeout, for a program with no signal
        handler never sees EINTR from it and may treat it as fatal (``tail -f``
        exits: "error waiting for inotify and output events"). Registers of a
        thread not in a syscall (``orig_rax`` negative) are returned unchanged.
        """
        if _signed(self.orig_rax) < 0:
            return self
        ret = _signed(self.rax)
        if ret in (-_ERESTARTSYS, -_ERESTARTNOINTR, -_ERESTARTNOHAND) \
                or (ret == -_ERESTART_RESTARTBLOCK and self.orig_rax == SYS_POLL):
            return dataclasses.replace(self, rax=self.orig_rax, rip=(self.rip - 2) & _U64)
        if ret == -_ERESTART_RESTARTBLOCK:
            return dataclasses.replace(self, rax=(-errno.EINTR) & _U64)
        return self


@dataclasses.dataclass(frozen=True, slots=True)
class RseqConfiguration:
    """``struct ptrace_rseq_configuration``: a thread's registered rseq area.

    ``rseq_abi_pointer == 0`` means the thread has not registered one.
    """

    rseq_abi_pointer: int
    rseq_abi_size: int
    signature: int
    flags: int


def _signed(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is neither a zombie nor dead (per /proc/PID/stat)."""
    try:
        state = read_stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X", "x")


class TracerThread:
    """The single OS thread that issues every ptrace request for its tracees.

    Wraps a ``ThreadPoolExecutor(max_workers=1)``. Async code awaits
    :meth:`run`; synchronous code on another thread may use :meth:`call`. When the
    thread ends (:meth:`close`), the kernel detaches any tracee still attached to it
    and lets it run (``exit_ptrace``): a last safety net, not the normal path.
    """

    def __init__(self, name: str = "lazymig-ptrace") -> None:
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def _bound(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the tracer thread and await its result."""
        if self._executor is None:
            raise BrokenResourceError("the tracer thread is closed")
        loop = asyncio.get_running_loop()
        call = functools.partial(self._bound, fn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the tracer thread and block until it returns (sync callers).

        Called from the tracer thread itself, it runs ``fn`` directly.
        """
        if self.is_current():
            return fn(*args, **kwargs)
        if self._executor is None:
            raise BrokenResourceError("the tracer thread is closed")
        call = functools.partial(self._bound, fn, *args, **kwargs)
        return self._executor.submit(call).result()

    def is_current(self) -> bool:
        """True when called on the tracer thread."""
        return self._ident is not None and threading.get_ident() == self._ident

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._executor is None

    def close(self, *, wait: bool = True) -> None:
        """Stop the thread (idempotent). Do not call it from the tracer thread."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait)


class Tracee:
    """One traced thread, driven from the thread that created this object.

    Create it on the tracer thread with :meth:`seize` (attach to a running
    thread and stop it) or :meth:`adopt` (a thread this OS thread already
    traces, e.g. a child that called PTRACE_TRACEME). Every method refuses to run
    on any other thread.
    """

    def __init__(self, tid: int, *, pid: int | None = None) -> None:
        self.tid = tid
        self.pid = tid if pid is None else pid
        self._thread = threading.get_ident()
        self.attached = False
        self.stopped = False
        #: The stop we saw was a group-stop (SIGSTOP & co): the thread was, or was
        #: becoming, job-control stopped. Detaching leaves it stopped.
        self.group_stopped = False
        #: Signals that arrived while we ran injected syscalls; sent again before
        #: detaching so the target does not lose them.
        self.deferred_signals: list[int] = []
        self._syscall_ip: int | None = None

    # -- attaching and stopping ------------------------------------------------

    @classmethod
    def seize(cls, tid: int, *, pid: int | None = None, options: int = 0,
              timeout: float = 10.0) -> Tracee:
        """PTRACE_SEIZE + PTRACE_INTERRUPT ``tid`` and wait until it is stopped.

        Signals that reach the thread before the interrupt stop are delivered
        (PTRACE_CONT with the signal), as CRIU's ``compel_wait_task`` does.
        On failure after the seize, the thread is detached again.
        """
        self = cls(tid, pid=pid)
        self._seize(options)
        try:
            self.interrupt()
            self.wait_interrupt_stop(timeout=timeout)
        except BaseException:
            self.abandon()
            raise
        return self

    @classmethod
    def adopt(cls, tid: int, *, pid: int | None = None, stopped: bool = True) -> Tracee:
        """Wrap a thread this OS thread already traces."""
        self = cls(tid, pid=pid)
        self.attached = True
        self.stopped = stopped
        return self

    def _seize(self, options: int) -> None:
        self._check_thread()
        res = _ptrace(PTRACE_SEIZE, self.tid, None, ctypes.c_void_p(options or None))
        if res == -1:
            err = ctypes.get_errno()
            if err == errno.EPERM:
                tracer = _tracer_pid(self.tid)
                if tracer:
                    raise AlreadyTracedError(self.pid, tracer)
            raise self._error(err, f"PTRACE_SEIZE thread {self.tid}")
        self.attached = True

    def interrupt(self) -> None:
        """PTRACE_INTERRUPT: ask the thread to enter a ptrace-stop (then wait for it)."""
        self._raw(PTRACE_INTERRUPT, 0, 0, "PTRACE_INTERRUPT")

    def wait(self, *, timeout: float = 10.0) -> int:
        """waitpid(tid, __WALL) until a stop is reported; returns the raw status.

        Polls with WNOHANG and a short back-off so that an unkillable target
        cannot hang the tracer thread forever. An exit raises :class:`TargetGoneError`.
        """
        self._check_thread()
        deadline = time.monotonic() + timeout
        delay = 0.0
        while True:
            status = self._poll_stop()
            if status is not None:
                return status
            if time.monotonic() > deadline:
                raise LazyMigOSError(errno.ETIMEDOUT, f"thread {self.tid} did not stop within "
                                     f"{timeout} s (uninterruptible sleep?)", pid=self.pid)
            if delay == 0.0:
                os.sched_yield()
                delay = 1e-5
            else:
                time.sleep(delay)
                delay = min(delay * 2, 1e-3)

    def wait_interrupt_stop(self, *, timeout: float = 10.0) -> None:
        """Wait for the PTRACE_INTERRUPT (or group) stop, delivering signals met on the way."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.wait(timeout=max(deadline - time.monotonic(), 0.0))
            event = status >> 16
            sig = os.WSTOPSIG(status)
            if event == PTRACE_EVENT_STOP:
                self.group_stopped = sig not in (signal.SIGTRAP, 0)
                return
            # A signal-delivery-stop (event 0) or an event we did not ask for:
            # let the thread handle the signal; the interrupt is still pending.
            self.cont(sig if event == 0 else 0)

    # -- resuming -------------------------------------------------------------

    def cont(self, sig: int = 0) -> None:
        """PTRACE_CONT, delivering ``sig`` (0: none)."""
        self._check_thread()
        self._lib(f"PTRACE_CONT(sig {sig})", _pt.ptrace_cont, self.tid, sig)
        self.stopped = False

    def singlestep(self, sig: int = 0) -> None:
        """PTRACE_SINGLESTEP (python-ptrace cannot pass a signal: ``sig`` must be 0)."""
        self._check_thread()
        if sig:
            raise ConfigurationError("singlestep cannot deliver a signal")
        self._lib("PTRACE_SINGLESTEP", _pt.ptrace_singlestep, self.tid)
        self.stopped = False

    def detach(self, sig: int = 0) -> None:
        """Re-send deferred signals, then PTRACE_DETACH: the thread runs on (idempotent)."""
        self._check_thread()
        if not self.attached:
            return
        for deferred in self.deferred_signals:
            try:
                os.kill(self.pid, deferred)
            except ProcessLookupError:
                pass
        self.deferred_signals.clear()
        self._lib("PTRACE_DETACH", _pt.ptrace_detach, self.tid, sig)
        self.attached = self.stopped = False

    def abandon(self) -> None:
        """Best-effort detach for error paths; never raises.

        PTRACE_DETACH needs a ptrace-stop; a thread seized but not yet stopped is
        interrupted first. If even that fails the thread stays attached until the
        tracer thread exits, when the kernel detaches it.
        """
        if not self.attached or threading.get_ident() != self._thread:
            return
        try:
            if not self.stopped:
                self.interrupt()
                self.wait_interrupt_stop(timeout=2.0)
            self.detach()
        except LazyMigError:
            pass

    # -- reading state ----------------------------------------------------------

    def get_regs(self) -> UserRegs:
        """PTRACE_GETREGS (general registers, fs_base and gs_base included)."""
        self._check_thread()
        return UserRegs._from_struct(self._lib("PTRACE_GETREGS", _pt.ptrace_getregs, self.tid))

    def set_regs(self, regs: UserRegs) -> None:
        """PTRACE_SETREGS."""
        self._check_thread()
        self._lib("PTRACE_SETREGS", _pt.ptrace_setregs, self.tid, regs._to_struct())

    def get_xstate(self) -> bytes:
        """The raw NT_X86_XSTATE area (XSAVE layout: legacy FXSAVE 512 bytes, XSAVE
        header, extended components), as PTRACE_GETREGSET returns it.

        Falls back to the 512-byte FXSAVE area (NT_PRFPREG) on CPUs without XSAVE.
        """
        self._check_thread()
        buf = ctypes.create_string_buffer(_XSTATE_BUF)
        iov = _IoVec(ctypes.addressof(buf), _XSTATE_BUF)
        res = _ptrace(PTRACE_GETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))
        if res == -1:
            err = ctypes.get_errno()
            if err not in (errno.ENODEV, errno.EINVAL, errno.EIO):
                raise self._error(err, "PTRACE_GETREGSET(NT_X86_XSTATE)")
            iov = _IoVec(ctypes.addressof(buf), 512)
            self._raw(PTRACE_GETREGSET, NT_PRFPREG, ctypes.addressof(iov),
                      "PTRACE_GETREGSET(NT_PRFPREG)")
        return buf.raw[: iov.iov_len]

    def set_xstate(self, xstate: bytes) -> None:
        """PTRACE_SETREGSET NT_X86_XSTATE: load a raw XSAVE area as :meth:`get_xstate`
        returned it (the kernel checks its header against this CPU's features)."""
        self._check_thread()
        buf = ctypes.create_string_buffer(bytes(xstate), len(xstate))
        iov = _IoVec(ctypes.addressof(buf), len(xstate))
        note = NT_X86_XSTATE if len(xstate) > 512 else NT_PRFPREG
        self._raw(PTRACE_SETREGSET, note, ctypes.addressof(iov), "PTRACE_SETREGSET(xstate)")

    def get_sigmask(self) -> int:
        """PTRACE_GETSIGMASK: the blocked-signal mask (bit ``n - 1`` is signal ``n``)."""
        mask = ctypes.c_uint64()
        self._raw(PTRACE_GETSIGMASK, 8, ctypes.addressof(mask), "PTRACE_GETSIGMASK")
        return mask.value

    def set_sigmask(self, mask: int) -> None:
        """PTRACE_SETSIGMASK."""
        value = ctypes.c_uint64(mask & _U64)
        self._raw(PTRACE_SETSIGMASK, 8, ctypes.addressof(value), "PTRACE_SETSIGMASK")

    def get_rseq_configuration(self) -> RseqConfiguration | None:
        """PTRACE_GET_RSEQ_CONFIGURATION; ``None`` on kernels without it (< 5.13)."""
        self._check_thread()
        conf = _RseqConf()
        res = _ptrace(PTRACE_GET_RSEQ_CONFIGURATION, self.tid, ctypes.sizeof(conf),
                      ctypes.addressof(conf))
        if res == -1:
            err = ctypes.get_errno()
            if err == errno.EIO:
                return None
            raise self._error(err, "PTRACE_GET_RSEQ_CONFIGURATION")
        return RseqConfiguration(conf.rseq_abi_pointer, conf.rseq_abi_size, conf.signature,
                                 conf.flags)

    def pending_signals(self, *, shared: bool = False) -> list[bytes]:
        """PTRACE_PEEKSIGINFO: the thread's queued signals as raw ``siginfo_t``
        (128 bytes each), oldest first; with ``shared`` the process-wide queue.
        Nothing is dequeued."""
        self._check_thread()
        out: list[bytes] = []
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * _PEEK_BATCH)
        while True:
            args = _PeekSiginfoArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0,
                                    _PEEK_BATCH)
            got = self._raw(PTRACE_PEEKSIGINFO, ctypes.addressof(args), ctypes.addressof(buf),
                            "PTRACE_PEEKSIGINFO")
            out += [buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(got)]
            if got < _PEEK_BATCH:
                return out

    def set_options(self, options: int) -> None:
        """PTRACE_SETOPTIONS (they replace those given to :meth:`seize`)."""
        self._check_thread()
        res = _ptrace(PTRACE_SETOPTIONS, self.tid, None, ctypes.c_void_p(options or None))
        if res == -1:
            raise self._error(ctypes.get_errno(), "PTRACE_SETOPTIONS")

    @property
    def syscall_ip(self) -> int | None:
        """The ``syscall`` instruction injected syscalls use (None: not found yet)."""
        return self._syscall_ip

    def peek(self, address: int) -> int:
        """PTRACE_PEEKDATA: one 8-byte word (unsigned) at an aligned address."""
        self._check_thread()
        return int(self._lib(f"PTRACE_PEEKDATA({address:#x})", _pt.ptrace_peekdata, self.tid,
                             address)) & _U64

    def poke(self, address: int, word: int) -> None:
        """PTRACE_POKEDATA: write one 8-byte word at an aligned address (forced access)."""
        self._check_thread()
        self._lib(f"PTRACE_POKEDATA({address:#x})", _pt.ptrace_pokedata, self.tid, address,
                  word & _U64)

    # -- syscall injection -----------------------------------------------------

    def inject_syscall(self, nr: int, *args: int, timeout: float = 5.0) -> int:
        """Make the stopped thread execute syscall ``nr(*args)``; return its raw result.

        The result is the signed value of ``rax``: ``-errno`` (``-4095 .. -1``) on failure.

        How: find a ``syscall`` instruction (``0f 05``) already mapped executable in
        the target (the vDSO has some; we never write to its code), point ``rip``
        at it with the arguments in ``rax, rdi, rsi, rdx, r10, r8, r9``, set
        ``orig_rax = -1`` so the kernel's syscall-restart logic leaves these
        registers alone (compel ``parasite_setup_regs``), block every signal but
        SIGTRAP (compel ``parasite_run``), PTRACE_SINGLESTEP over it and wait for
        the SIGTRAP after the syscall. The original registers and signal mask are
        restored whatever happens. Signals that arrive meanwhile (SIGSTOP, the only
        blockable-proof one besides SIGKILL) are remembered and re-sent on detach.
        For many syscalls in a row use :meth:`syscalls` (registers saved once).
        """
        with self.syscalls(timeout=timeout) as session:
            return session.syscall(nr, *args)

    @contextlib.contextmanager
    def syscalls(self, *, timeout: float = 5.0,
                 at: int | None = None) -> Iterator[InjectionSession]:
        """Inject several syscalls (or run a code stub), saving and restoring the
        registers and signal mask only once, around the whole block.

        Yields an :class:`InjectionSession`; ``timeout`` applies to each call.
        Half the ptrace requests per syscall of :meth:`inject_syscall`. ``at``: the
        ``syscall`` instruction to use (default: one found in the target's code).

        The registers are moved off the thread's own before its signal mask is
        changed and put back after it is restored: a tracer that dies in between
        leaves the thread in injected code (harmless ``getpid`` at ``at``), never
        in its own code with every signal blocked.
        """
        self._check_thread()
        if not self.stopped:
            raise ConfigurationError(f"thread {self.tid} is not in a ptrace-stop")
        if at is None:
            at = self._syscall_ip if self._syscall_ip is not None else self._find_syscall_ip()
        saved = self.get_regs()
        saved_mask = self.get_sigmask()
        base = dataclasses.replace(saved, orig_rax=_U64, rip=at, rax=SYS_GETPID,
                                   eflags=saved.eflags & ~(_EFLAGS_TF | _EFLAGS_DF))
        try:
            self.set_regs(base)
            self.set_sigmask(_U64 & ~(1 << (signal.SIGTRAP - 1)))
            yield InjectionSession(self, base, saved, saved_mask, timeout)
        finally:
            if self.stopped:
                self.set_sigmask(saved_mask)
                self.set_regs(saved)

    def _run_until_trap(self, what: str, expect_ip: int, timeout: float, *,
                        step: bool = True) -> UserRegs:
        """Single-step (``step``) or continue until the SIGTRAP that ends ``what``;
        check that ``rip`` is ``expect_ip`` then and return the registers.
        Other signals met on the way are deferred (re-sent on detach)."""
        deadline = time.monotonic() + timeout
        for _ in range(16):
            if step:
                self.singlestep()
            else:
                self.cont(0)
            try:
                status = self.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except LazyMigOSError as exc:
                if exc.errno == errno.ETIMEDOUT:  # stop it, so that the caller can restore
                    self.interrupt()
                    self.wait_interrupt_stop(timeout=2.0)
                raise
            sig = os.WSTOPSIG(status)
            if status >> 16 == 0 and sig == signal.SIGTRAP:
                break
            if status >> 16 == 0:
                self.deferred_signals.append(sig)
        else:
            raise BrokenResourceError(f"{what} in thread {self.tid} never trapped")
        after = self.get_regs()
        if after.rip != expect_ip:
            raise BrokenResourceError(f"{what} in thread {self.tid} stopped at {after.rip:#x}, "
                                      f"expected {expect_ip:#x}")
        return after

    def _run_until_told(self, what: str, told: Callable[[float], bool],
                        stops_within: tuple[int, int], timeout: float) -> None:
        """PTRACE_CONT until ``told(wait)`` (which may block up to ``wait`` seconds)
        says the code reached its end, then PTRACE_INTERRUPT it there: the thread
        ends in an interrupt stop, never in a SIGTRAP stop that a dying tracer
        would turn into a fatal signal. Its ``rip`` must lie in ``stops_within``
        (inclusive). Signals met on the way are deferred (re-sent on detach)."""
        deadline = time.monotonic() + timeout
        self.cont(0)
        while not told(_TOLD_POLL):
            status = self._poll_stop()
            if status is not None:
                if status >> 16 == 0:
                    self.deferred_signals.append(os.WSTOPSIG(status))
                self.cont(0)
            elif time.monotonic() > deadline:
                self._stop_here()
                raise LazyMigOSError(errno.ETIMEDOUT, f"{what} in thread {self.tid} did not "
                                     f"end within {timeout} s", pid=self.pid)
        self._stop_here()
        rip = self.get_regs().rip
        if not stops_within[0] <= rip <= stops_within[1]:
            raise BrokenResourceError(f"{what} in thread {self.tid} stopped at {rip:#x}, "
                                      f"outside {stops_within[0]:#x}-{stops_within[1]:#x}")

    def _poll_stop(self) -> int | None:
        """A pending ptrace-stop's status (the thread is stopped then), else None."""
        try:
            wpid, status = os.waitpid(self.tid, _WALL | os.WNOHANG)
        except ChildProcessError as exc:
            self.attached = self.stopped = False
            raise TargetGoneError(self.pid, f"thread {self.tid} is not traced any more "
                                  "(it exited)") from exc
        if not wpid:
            return None
        if not os.WIFSTOPPED(status):
            self.attached = self.stopped = False
            if os.WIFSIGNALED(status):
                how = f"was killed by signal {os.WTERMSIG(status)}"
            else:
                how = f"exited with status {os.WEXITSTATUS(status)}"
            raise TargetGoneError(self.pid, f"thread {self.tid} {how}")
        self.stopped = True
        return status

    def _stop_here(self) -> None:
        """PTRACE_INTERRUPT the running thread into an interrupt stop, deferring
        signals met on the way (not delivering them: it runs injected code)."""
        self.interrupt()
        while True:
            status = self.wait()
            if status >> 16 == PTRACE_EVENT_STOP:
                return
            if status >> 16 == 0:
                self.deferred_signals.append(os.WSTOPSIG(status))
            self.cont(0)

    def set_syscall_ip(self, ip: int | None) -> None:
        """Use the ``syscall`` instruction at ``ip`` for :meth:`inject_syscall`
        (``None``: search the mappings again on the next injection)."""
        self._syscall_ip = ip

    def _find_syscall_ip(self) -> int:
        """Address of a ``0f 05`` byte pair in an executable mapping (vDSO first)."""
        try:
            lines = read_maps(self.pid).splitlines()
        except FileNotFoundError as exc:
            raise TargetGoneError(self.pid, "read maps") from exc
        candidates: list[tuple[int, int]] = []
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) < 2 or "x" not in fields[1] or "r" not in fields[1]:
                continue
            name = fields[5] if len(fields) > 5 else ""
            if name == "[vsyscall]":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if name == "[vdso]":
                candidates.insert(0, (start, end))
            else:
                candidates.append((start, end))
        for start, end in candidates:
            for chunk in range(start, end, 1 << 20):
                size = min(end - chunk, 1 << 20)
                try:
                    data = read_memory(self.pid, chunk, size)
                except LazyMigOSError:
                    break
                at = data.find(_SYSCALL_INSN)
                if at >= 0:
                    self._syscall_ip = chunk + at
                    return chunk + at
        raise BrokenResourceError(f"no syscall instruction found in process {self.pid}")

    # -- plumbing ---------------------------------------------------------------

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError(f"ptrace request for thread {self.tid} from a thread other than "
                               "its tracer: use the TracerThread that created it")

    def _raw(self, request: int, addr: int, data: int, what: str) -> int:
        self._check_thread()
        try:
            return check(_ptrace(request, self.tid, addr or None, data or None), what,
                         pid=self.pid)
        except LazyMigOSError as exc:
            raise self._error(exc.errno or errno.EIO, what) from None

    def _lib(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except PtraceError as exc:
            raise self._error(exc.errno or errno.EIO, what) from None

    def _error(self, err: int, what: str) -> LazyMigOSError:
        if err == errno.ESRCH and not process_alive(self.tid):
            self.attached = self.stopped = False
            return TargetGoneError(self.pid, f"{what}: thread {self.tid} is gone")
        return LazyMigOSError(err, f"{what} (thread {self.tid})", pid=self.pid)


class InjectionSession:
    """Syscalls and code run by a stopped tracee (see :meth:`Tracee.syscalls`).

    Only valid inside that ``with`` block, on the tracer thread.
    """

    __slots__ = ("_base", "_timeout", "_tracee", "regs", "sigmask")

    def __init__(self, tracee: Tracee, base: UserRegs, regs: UserRegs, sigmask: int,
                 timeout: float) -> None:
        self._tracee = tracee
        self._base = base
        self._timeout = timeout
        #: The thread's own registers and signal mask (put back when the session ends).
        self.regs = regs
        self.sigmask = sigmask

    @property
    def tracee(self) -> Tracee:
        """The thread this session runs in."""
        return self._tracee

    @contextlib.contextmanager
    def scratch_page(self, what: str) -> Iterator[int]:
        """A private read-write page mapped in the tracee's process for the block
        (arguments the injected calls read); LazyMigOSError ``what`` if mmap fails."""
        page = self.syscall(SYS_MMAP, 0, PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if page < 0:
            raise LazyMigOSError(-page, what, pid=self._tracee.pid)
        try:
            yield page
        finally:
            self.syscall(SYS_MUNMAP, page, PAGE_SIZE)

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall ``nr(*args)``; returns rax, signed (``-errno`` on failure)."""
        if len(args) > 6:
            raise ConfigurationError(f"a syscall takes at most 6 arguments, got {len(args)}")
        argv = [a & _U64 for a in args] + [0] * (6 - len(args))
        ip = self._base.rip
        self._tracee.set_regs(dataclasses.replace(
            self._base, rax=nr, rdi=argv[0], rsi=argv[1], rdx=argv[2], r10=argv[3], r8=argv[4],
            r9=argv[5]))
        return _signed(self._tracee._run_until_trap(f"injected syscall {nr}",
                                                    ip + len(_SYSCALL_INSN), self._timeout).rax)

    def run_batch(self, batch: SyscallBatch) -> list[int]:
        """Run every syscall of ``batch`` in the tracee, with one PTRACE_CONT
        (see :class:`SyscallBatch`); returns their results (signed), and empties
        the batch.

        Raises:
            LazyMigOSError: a call not marked ``may_fail`` failed (named by its
                ``what``); the calls after it did not run.
        """
        if not batch:
            return []
        table, image = batch.image()
        write_memory(self._tracee.pid, batch.area, image)
        self._tracee.set_regs(dataclasses.replace(
            self._base, rip=batch.area, rdi=table, rsi=len(batch)))
        after = self._tracee._run_until_trap(
            f"{len(batch)} batched syscalls", batch.area + len(_SYSCALL_LOOP), self._timeout,
            step=False)
        calls = batch.take()
        done = len(calls) - after.r13  # r13: the calls left when the loop stopped
        raw = read_memory(self._tracee.pid, table, _BATCH_ENTRY * len(calls))
        results = [_signed(v) for v in struct.unpack(f"<{8 * len(calls)}Q", raw)[7::8]]
        if done < len(calls):
            failed = calls[done]
            raise LazyMigOSError(-results[done], failed.what, pid=self._tracee.pid)
        return results

    def run_code(self, entry: int, regs: Mapping[str, int], told: Callable[[float], bool],
                 stops_within: tuple[int, int]) -> None:
        """Run the target's code from ``entry`` with ``regs`` (name to value; the
        others as at the session's start) until it tells us it is done
        (``told(wait)``, e.g. a byte on a socket, may block up to ``wait``
        seconds); it is then stopped with PTRACE_INTERRUPT, its ``rip`` in
        ``stops_within``. The code leaves its results in memory.

        Every signal but SIGTRAP stays blocked meanwhile; the code must not
        touch the stack (rsp is the thread's own, below its red zone unknown).
        """
        values = {name: value & _U64 for name, value in regs.items()}
        self._tracee.set_regs(dataclasses.replace(self._base, rip=entry, **values))
        self._tracee._run_until_told(f"code at {entry:#x}", told, stops_within, self._timeout)


@dataclasses.dataclass(frozen=True, slots=True)
class BatchedCall:
    """One syscall of a :class:`SyscallBatch`."""

    nr: int
    args: tuple[int, ...]
    what: str
    """What it does, for the error that names it (``"injected mmap(0x7f..)"``)."""
    may_fail: bool = False
    """Its failure does not stop the batch (its result says it)."""


class SyscallBatch:
    """Syscalls a stopped thread runs one after the other, in a loop of code
    placed in its own memory, with one PTRACE_CONT for them all
    (:meth:`InjectionSession.run_batch`): a syscall injected alone costs a
    single-step round trip (four ptrace requests and a wait, ~0.1 ms), so
    thousands of mmaps cost seconds that way. CRIU's restorer blob does the same.

    The caller owns ``area``: ``size`` bytes of the target, readable, writable
    and executable. It gets the loop's code, then the bytes the calls point to
    (:meth:`data`), then the table of calls (64 bytes each: number, six
    arguments, result). The loop stops at the first call that fails (a result
    in -4095..-1) unless it ``may_fail``, and ends in ``int3``. It touches no
    stack; every signal but SIGTRAP stays blocked (the session's mask).
    """

    def __init__(self, area: int, size: int) -> None:
        self.area = area
        self.size = size
        self._calls: list[BatchedCall] = []
        self._data = bytearray()

    def __len__(self) -> int:
        return len(self._calls)

    def fits(self, calls: int = 1, data: int = 0) -> bool:
        """Whether ``calls`` more calls and ``data`` more bytes fit in the area."""
        used = _BATCH_CODE + len(self._data) + data + 8 + _BATCH_ENTRY * (len(self._calls) + calls)
        return used <= self.size

    def data(self, payload: bytes) -> int:
        """Put ``payload`` in the area (written when the batch runs); its address there."""
        if not self.fits(0, len(payload)):
            raise ConfigurationError(f"{len(payload)} bytes more do not fit in the batch area "
                                     f"of {self.size} bytes: run the batch first")
        at = self.area + _BATCH_CODE + len(self._data)
        self._data += payload
        return at

    def add(self, nr: int, *args: int, what: str, may_fail: bool = False) -> None:
        """Queue syscall ``nr(*args)`` (at most six arguments)."""
        if len(args) > 6:
            raise ConfigurationError(f"a syscall takes at most 6 arguments, got {len(args)}")
        if not self.fits():
            raise ConfigurationError(f"the batch area of {self.size} bytes is full: run the "
                                     "batch first")
        self._calls.append(BatchedCall(nr, args, what, may_fail))

    def image(self) -> tuple[int, bytes]:
        """The table's address and the bytes of the whole area to write."""
        table_at = -(-(_BATCH_CODE + len(self._data)) // 8) * 8
        table = bytearray()
        for c in self._calls:
            argv = [a & _U64 for a in c.args] + [0] * (6 - len(c.args))
            table += _BATCH_CALL.pack(c.nr | (_MAY_FAIL if c.may_fail else 0), *argv, 0)
        head = _SYSCALL_LOOP.ljust(_BATCH_CODE, b"\xcc") + self._data
        return self.area + table_at, bytes(head.ljust(table_at, b"\0") + table)

    def take(self) -> list[BatchedCall]:
        """The queued calls; the batch is empty afterwards."""
        calls, self._calls = self._calls, []
        self._data = bytearray()
        return calls


def park(tracee: Tracee) -> None:
    """Move a tracee from the SIGTRAP stop an injected syscall leaves it in to a
    PTRACE_EVENT_STOP (PTRACE_INTERRUPT, then PTRACE_CONT without the signal).

    Call it after injecting syscalls. In a signal-delivery-stop, a tracer that
    dies without detaching (lazymig killed, a cancelled freeze whose tracer
    thread ends) lets the kernel deliver the pending SIGTRAP, which kills the
    target; from an interrupt stop it just runs on. Signals that surface on the
    way are deferred like those met during injection (re-sent on detach).
    Run it on the tracer thread.
    """
    tracee.interrupt()
    tracee.cont(0)
    while True:
        status = tracee.wait()
        event, sig = status >> 16, os.WSTOPSIG(status)
        if event == PTRACE_EVENT_STOP:
            return
        if event == 0:
            tracee.deferred_signals.append(sig)
        tracee.cont(0)


def robust_list(pid: int, tid: int) -> tuple[int, int]:
    """``get_robust_list(tid)``: the thread's robust futex list (head, len);
    (0, 0) if the kernel will not say (EPERM)."""
    head, length = ctypes.c_uint64(), ctypes.c_size_t()
    try:
        syscall(SYS_GET_ROBUST_LIST, ctypes.c_long(tid), ctypes.byref(head), ctypes.byref(length),
                what="get_robust_list", pid=pid)
    except LazyMigOSError as exc:
        if exc.errno == errno.ESRCH:
            raise TargetGoneError(pid, f"thread {tid} is gone") from exc
        return (0, 0)
    return (head.value, length.value)


def _tracer_pid(pid: int) -> int | None:
    try:
        return int(read_status(pid).get("TracerPid", "0")) or None
    except OSError:
        return None
