"""The frozen target vmsplices its own pages into the dumper's page pipes.

Copying the pages at freeze time (``process_vm_readv`` into our memory, then
``vmsplice``) costs about 0.6 s of downtime per GiB. CRIU's parasite, running
inside the target, vmsplices the target's own pages instead, so the pipes
reference them and nothing is copied. :class:`TargetSplicer` gets the same
without a parasite, with syscalls injected through ptrace
(:meth:`~lazymig.linux.ptrace.Tracee.syscalls`):

1. ``mmap`` a scratch area in the target (``MAP_SHARED|MAP_ANONYMOUS``: shmem
   never merges with the private VMAs being dumped), and a read+exec page that
   /proc/PID/mem fills with the code below; ``socketpair`` there;
   ``pidfd_getfd`` brings one end to us, the target keeps the other.
2. :meth:`receive`: our pipes' write ends go over the socket in SCM_RIGHTS
   batches of up to 253 (``SCM_MAX_FD``) and the target ``recvmsg``-s them
   (``MSG_CMSG_CLOEXEC|MSG_DONTWAIT``) into the scratch area.
3. :meth:`vmsplice`: iovec arrays and a table of calls are written into the
   scratch area (``process_vm_writev``) and the target runs the code page's
   loop: one ``vmsplice`` per pipe (``SPLICE_F_NONBLOCK``: a full pipe fails
   instead of blocking the target). One injected syscall per pipe cost ~35 us
   of ptrace round trips, 0.14 s for the 4096 pipes of 4 GiB; the loop costs a
   few round trips per batch.
4. :meth:`close_fds` drops the target's copies with ``close_range`` over each
   contiguous run of them; :meth:`close` closes the socket and unmaps the area.

**A dumper killed meanwhile.** Steps 2 to 4 (a batch, :meth:`use`) run in the
code page, never single-stepped: each run ends in a tail that says "done" over
the socket and waits there, where the dumper stops it with PTRACE_INTERRUPT
(a stop a dying tracer leaves harmlessly, unlike a SIGTRAP stop). If the dumper
dies (SIGKILL, OOM) the kernel detaches the target; the loop sees the socket's
end-of-file before each vmsplice and stops, the tail drops the SIGPIPE a pipe
without reader raised and ``rt_sigreturn``-s on a frame built for each batch
(:func:`sigreturn_frame`: the target's own registers, signal mask, altstack and
FPU/xstate): the target runs on. Steps 1 and :meth:`close` are single-stepped
and not covered. A target left so keeps the area, the code page and its socket.

**What the pipes hold.** vmsplice without ``SPLICE_F_GIFT`` takes references
to the target's pages; nothing is copied and the PTEs stay writable. While the
target is frozen the pipes hold exactly its pages at freeze time. If it ran
again and wrote to a page, the pipe would see the write (no copy-on-write
happens). So page pipes filled this way are only valid while the target stays
frozen: every user (LazyDump, dump) closes them before resuming the target.
Killing the target does not free the pages: the pipes keep them alive.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Sequence
from typing import Final

from lazymig.errors import BrokenResourceError, LazyMigOSError
from lazymig.linux.procfs import fds, open_files_limit, read_status
from lazymig.linux.ptrace import InjectionSession, UserRegs, process_alive
from lazymig.linux.syscalls import (
    SYS_CLOSE,
    SYS_CLOSE_RANGE,
    SYS_MMAP,
    SYS_MUNMAP,
    SYS_RECVMSG,
    SYS_SIGALTSTACK,
    SYS_SOCKETPAIR,
)
from lazymig.linux.vm import (
    UIO_MAXIOV,
    buffer_address,
    pidfd_getfd,
    process_vm_writev,
    read_memory,
    write_memory,
)
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)

__all__ = ["IOVEC_ROOM", "SCM_MAX_FD", "UIO_MAXIOV", "TargetSplicer", "free_fd_slots",
           "sigreturn_frame"]

log = logging.getLogger(__name__)

SCM_MAX_FD: Final = 253
"""Most fds one SCM_RIGHTS message may carry (include/net/scm.h)."""


_PROT_RW: Final = PROT_READ | PROT_WRITE
_PROT_RX: Final = PROT_READ | PROT_EXEC
_MAP_SHARED_ANON: Final = MAP_SHARED | MAP_ANONYMOUS
_MAP_PRIVATE_ANON: Final = MAP_PRIVATE | MAP_ANONYMOUS

# The code page (assembled from the listing below; its last 8 bytes, at
# _AT_AREA_PTR, hold the scratch area's address, read rip-relative). Two entries,
# one ending: every run ends in the tail, which tells us over the socket that it
# is done and waits there for our PTRACE_INTERRUPT. If the dumper dies (SIGKILL,
# OOM) the wait reads end-of-file and the tail rt_sigreturns to the target's own
# registers, signal mask, altstack and FPU state (the frame at _AT_FRAME): the
# target runs on instead of meeting a trap without a tracer.
#
# loop (rdi = table, rsi = entries; each 32-byte entry is fd, iovec array, iovec
# count, bytes expected; the result overwrites the last field):
#   mov r12, rdi; mov r14, rsi; xor r13d, r13d; mov rbx, [rip+area]
#   next: cmp r13, r14; jae done
#     recvfrom(life, buf, 1, MSG_PEEK|MSG_DONTWAIT, 0, 0); test rax, rax; jz done  # dumper gone
#     vmsplice([r12], [r12+8], [r12+16], SPLICE_F_NONBLOCK); inc r13
#     cmp rax, -EPIPE; jne 1f; mov qword [rbx+RAISED], 1    # it queued a SIGPIPE
#   1: cmp rax, [r12+24]; mov [r12+24], rax; jne done; add r12, 32; jmp next
#   done: mov [rbx+RESULT], r13; jmp tail
# stub (rax = syscall number, rdi, rsi, rdx, r10, r8, r9 = arguments):
#   syscall; mov rbx, [rip+area]; mov [rbx+RESULT], rax
# tail:
#   mov rbx, [rip+area]
#   xor eax, eax; xchg rax, [rbx+RAISED]      # read and clear: one drain per SIGPIPE
#   if rax and [rbx+DRAIN_OK]: rt_sigtimedwait({SIGPIPE}, NULL, {0, 0}, 8)
#   sendto(life, buf, 1, MSG_NOSIGNAL|MSG_DONTWAIT, 0, 0)    # "done"
#   wait: recvfrom(life, buf, 1, 0, 0, 0); test rax, rax; jg wait   # we stop it here
#   lea rsp, [rbx+FRAME+8]; rt_sigreturn; ud2
# (life = the target's end of the socketpair; buf, RAISED, DRAIN_OK, RESULT, FRAME:
# the _AT_* offsets in the scratch area.)
_CODE: Final = bytes.fromhex(
    "4989fc4989f64531ed488b1d280100004d39f5736bb82d0000008bbbb004"
    "0000488db3e8040000ba0100000041ba420000004531c04531c90f054885"
    "c07441b816010000498b3c24498b742408498b54241041ba020000000f05"
    "49ffc54883f8e0750b48c783c004000001000000493b4424184989442418"
    "75064983c420eb904c89abb8040000eb100f05488b1da6000000488983b8"
    "040000488b1d9800000031c0488783c00400004885c074274883bbc80400"
    "0000741db880000000488dbbd004000031f6488d93d804000041ba080000"
    "000f05b82c0000008bbbb0040000488db3e8040000ba0100000041ba4040"
    "00004531c04531c90f05b82d0000008bbbb0040000488db3e8040000ba01"
    "0000004531d24531c04531c90f054885c07fd9488da308050000b80f0000"
    "000f050f0b0f1f8000000000")
_AT_STUB: Final = 0x89
_AT_WAIT: Final = 0xFA  # the tail's wait loop: where our PTRACE_INTERRUPT finds it
_AT_WAIT_END: Final = 0x11C
_AT_AREA_PTR: Final = 0x138
_ENTRY: Final = struct.Struct("<qQQq")
_SOCK_SEQPACKET_CLOEXEC: Final = socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
_MSG_CMSG_CLOEXEC: Final = 0x40000000
_MSG_CTRUNC: Final = 0x8

# struct msghdr (x86_64): name, namelen (+pad), iov, iovlen, control, controllen, flags (+pad)
_MSGHDR: Final = struct.Struct("<QI4xQQQQi4x")
_IOVEC: Final = struct.Struct("<QQ")
_CMSGHDR: Final = struct.Struct("<Qii")  # cmsg_len, cmsg_level, cmsg_type

# Scratch area layout: one page of headers, then the iovec arrays.
_AT_MSGHDR: Final = 0
_AT_IOV: Final = 64
_AT_BYTE: Final = 80
_AT_PAIR: Final = 96
_AT_CMSG: Final = 128
_CMSG_SPACE: Final = _CMSGHDR.size + 4 * SCM_MAX_FD + 4  # aligned to 8
# What the code page reads and writes (offsets fixed in _CODE):
_AT_LIFE: Final = 1200  # the target's end of the socketpair (int)
_AT_RESULT: Final = 1208  # the stub's rax, or the loop's entries done
_AT_RAISED: Final = 1216  # nonzero: a vmsplice failed with EPIPE (queued a SIGPIPE)
_AT_DRAIN_OK: Final = 1224  # nonzero: no SIGPIPE was pending before, so drain one
_AT_SIGSET: Final = 1232  # {SIGPIPE}, for rt_sigtimedwait
_AT_TIMESPEC: Final = 1240  # {0, 0}: rt_sigtimedwait does not wait
_AT_FRAME: Final = 1280  # struct rt_sigframe (64-byte aligned)
_AT_IOVECS: Final = PAGE_SIZE
#: iovecs the area holds at once (64 KiB of them), hence also vmsplice calls.
IOVEC_ROOM: Final = 4096
_AT_TABLE: Final = _AT_IOVECS + IOVEC_ROOM * _IOVEC.size
_AT_XSTATE: Final = _AT_TABLE + IOVEC_ROOM * _ENTRY.size  # 64-byte aligned (XRSTOR)
_XSTATE_ROOM: Final = 64 * 1024 + PAGE_SIZE
_AREA_LEN: Final = _AT_XSTATE + _XSTATE_ROOM

# struct rt_sigframe (x86_64, arch/x86/include/asm/sigframe.h): pretcode, then
# struct ucontext: uc_flags, uc_link, uc_stack (stack_t, 24 bytes), uc_mcontext
# (struct sigcontext: r8-r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags,
# cs, gs, fs, ss (16-bit), err, trapno, oldmask, cr2, fpstate, reserved1[8]),
# uc_sigmask; then a siginfo (128 bytes). rt_sigreturn reads it at rsp - 8.
_SIGFRAME_HEAD: Final = struct.Struct("<QQQ24s")
_SIGCONTEXT: Final = struct.Struct("<18Q4H4QQ64x")
_SIGCONTEXT_REGS: Final = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi",
                           "rbp", "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")
_UC_FLAGS: Final = 0x1 | 0x2 | 0x4  # UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
# struct _fpx_sw_bytes in the FXSAVE area's sw_reserved: without it rt_sigreturn
# restores only x87/SSE and resets AVX and beyond (check_xstate_in_sigframe).
_FPX_SW_BYTES: Final = struct.Struct("<IIQI")
_AT_FPX_SW: Final = 464
_FP_XSTATE_MAGIC1: Final = 0x46505853
_FP_XSTATE_MAGIC2: Final = 0x46505845
_FXSAVE_LEN: Final = 512
_SIGPIPE_BIT: Final = 1 << (signal.SIGPIPE - 1)
_STACK_T_LEN: Final = 24


def free_fd_slots(pid: int) -> int:
    """fd numbers process ``pid`` could still open below its RLIMIT_NOFILE soft limit."""
    try:
        soft = open_files_limit(pid)
        in_use = fds(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    limit = 1 << 30 if soft is None else soft
    return limit - sum(1 for fd in in_use if fd < limit)


def sigreturn_frame(regs: UserRegs, sigmask: int, altstack: bytes, xstate: bytes,
                    xstate_at: int) -> tuple[bytes, bytes]:
    """The ``rt_sigframe`` that makes ``rt_sigreturn`` restore ``regs``, ``sigmask``,
    the sigaltstack ``altstack`` (a raw stack_t) and the FPU/xstate ``xstate`` (as
    PTRACE_GETREGSET gave it), which must be written at ``xstate_at`` (64-byte
    aligned); returns the frame and the xstate area to write there.

    ``regs`` are the thread's as at an interrupt stop: an interrupted syscall is
    set up to restart as the kernel would have (rt_sigreturn disables the
    kernel's own restart logic).
    """
    if xstate_at % 64:
        raise ValueError(f"an xstate area must be 64-byte aligned, not at {xstate_at:#x}")
    regs = regs.with_syscall_restart()
    head = _SIGFRAME_HEAD.pack(0, _UC_FLAGS, 0, altstack)
    context = _SIGCONTEXT.pack(*(getattr(regs, name) for name in _SIGCONTEXT_REGS),
                               regs.cs, regs.gs, regs.fs, regs.ss, 0, 0, 0, 0, xstate_at)
    frame = head + context + struct.pack("<Q", sigmask) + bytes(128)
    area = bytearray(xstate)
    if len(area) > _FXSAVE_LEN:  # an XSAVE area: say so, as the kernel's own frames do
        xstate_bv = struct.unpack_from("<Q", area, _FXSAVE_LEN)[0]
        _FPX_SW_BYTES.pack_into(area, _AT_FPX_SW, _FP_XSTATE_MAGIC1, len(xstate) + 4,
                                xstate_bv | 0x3, len(xstate))
        area += struct.pack("<I", _FP_XSTATE_MAGIC2)
    return frame, bytes(area)


def _sigpipe_pending(pid: int, tid: int) -> bool:
    """SIGPIPE is pending for thread ``tid`` itself (/proc status SigPnd): where a
    failed vmsplice queues one, and where rt_sigtimedwait dequeues first."""
    return bool(int(read_status(pid, tid)["SigPnd"], 16) & _SIGPIPE_BIT)


class TargetSplicer:
    """Scratch area, socket and fds inside a frozen target, to make it vmsplice.

    ``session`` runs syscalls and code in the target (use this on the tracer
    thread only). :meth:`close` undoes everything in the target (idempotent;
    best effort if the target died); use it as a context manager.
    """

    def __init__(self, pid: int, session: InjectionSession) -> None:
        self.pid = pid
        self._session = session
        self._area = 0
        self._code = 0
        self._target_sock = -1
        self._sock: socket.socket | None = None
        self._altstack = bytes(_STACK_T_LEN)
        self._poller = select.poll()
        self._held: list[int] = []  # our fds the target also holds now
        #: fds one :meth:`receive` sends: SCM_MAX_FD, or what the target's fd table
        #: took the last time it was too full for more.
        self.batch = SCM_MAX_FD
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @property
    def syscall_ip(self) -> int:
        """The code page's ``syscall`` instruction: start each batch's session
        there (``Tracee.syscalls(at=...)``), so that a dumper killed before the
        batch's first run leaves the target to the tail's rt_sigreturn."""
        return self._code + _AT_STUB

    def use(self, session: InjectionSession) -> None:
        """Run through ``session`` from now on (one per batch of work: the target
        gets its own registers back between them); writes the rt_sigreturn frame
        that hands the target back its own state if the dumper dies meanwhile."""
        self._session = session
        self._write_frame()

    def _write_frame(self) -> None:
        session = self._session
        tracee = session.tracee
        frame, xstate = sigreturn_frame(session.regs, session.sigmask, self._altstack,
                                        tracee.get_xstate(), self._area + _AT_XSTATE)
        if len(xstate) > _XSTATE_ROOM:
            raise BrokenResourceError(f"an xstate area of {len(xstate)} bytes does not fit "
                                      f"the scratch area ({_XSTATE_ROOM})")
        # A SIGPIPE the target had pending itself is left alone (signals do not queue).
        drain = not _sigpipe_pending(self.pid, tracee.tid)
        flags = bytearray(_AT_TIMESPEC + 16 - _AT_RAISED)  # RAISED 0, TIMESPEC {0, 0}
        struct.pack_into("<Q", flags, _AT_DRAIN_OK - _AT_RAISED, int(drain))
        struct.pack_into("<Q", flags, _AT_SIGSET - _AT_RAISED, _SIGPIPE_BIT)
        self._write(self._area + _AT_RAISED, flags)
        self._write(self._area + _AT_FRAME, bytearray(frame))
        self._write(self._area + _AT_XSTATE, bytearray(xstate))

    def _run(self, what: str, nr: int, *args: int) -> int:
        """Inject syscall ``nr`` by single-stepping (setting up and tearing down)."""
        res = self._session.syscall(nr, *args)
        if res < 0:
            raise LazyMigOSError(-res, f"injected {what}", pid=self.pid)
        return res

    def _call(self, what: str, nr: int, *args: int) -> int:
        """Run syscall ``nr`` through the code page's stub (during a batch)."""
        names = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
        self._run_code(self._code + _AT_STUB, {"rax": nr, **dict(zip(names, args, strict=False))})
        res = self._result()
        if res < 0:
            raise LazyMigOSError(-res, f"{what} run by the target", pid=self.pid)
        return res

    def _result(self) -> int:
        """What the code page's last run left at RESULT (the stub's rax, or the loop's
        entries done)."""
        res: int = struct.unpack("<q", read_memory(self.pid, self._area + _AT_RESULT, 8))[0]
        return res

    def _run_code(self, entry: int, regs: dict[str, int]) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError):  # a stale "done" of a failed run
            while self._sock.recv(16, socket.MSG_DONTWAIT):
                pass
        self._session.run_code(entry, regs, self._told,
                               (self._code + _AT_WAIT, self._code + _AT_WAIT_END))

    def _told(self, wait: float) -> bool:
        """The code page's tail said "done" (within ``wait`` seconds)."""
        assert self._sock is not None
        if not self._poller.poll(max(1, round(wait * 1000))):
            return False
        try:
            return bool(self._sock.recv(16, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False

    def _open(self) -> None:
        self._area = self._run("mmap of a scratch area", SYS_MMAP, 0, _AREA_LEN, _PROT_RW,
                               _MAP_SHARED_ANON, -1, 0)
        # The code page is never writable in the target: /proc/PID/mem writes it.
        self._code = self._run("mmap of a code page", SYS_MMAP, 0, PAGE_SIZE, _PROT_RX,
                               _MAP_PRIVATE_ANON, -1, 0)
        write_memory(self.pid, self._code,
                     _CODE + bytes(_AT_AREA_PTR - len(_CODE)) + struct.pack("<Q", self._area))
        pair = self._area + _AT_PAIR
        self._run("socketpair", SYS_SOCKETPAIR, socket.AF_UNIX, _SOCK_SEQPACKET_CLOEXEC, 0, pair)
        ours, theirs = struct.unpack("<ii", read_memory(self.pid, pair, 8))
        self._target_sock = theirs
        try:
            pidfd = os.pidfd_open(self.pid)
            try:
                fd = pidfd_getfd(pidfd, ours)
            finally:
                os.close(pidfd)
        finally:
            self._run("close", SYS_CLOSE, ours)
        self._sock = socket.socket(fileno=fd)
        self._poller.register(self._sock, select.POLLIN)
        # Constant parts of the recvmsg arguments: one data byte, room for SCM_MAX_FD fds.
        header = bytearray(_AT_IOVECS)
        _IOVEC.pack_into(header, _AT_IOV, self._area + _AT_BYTE, 1)
        struct.pack_into("<q", header, _AT_LIFE, theirs)
        self._write(self._area, header)
        # The target's altstack as it is, for the frame (rt_sigreturn sets it again).
        stack_t = self._area + _AT_FRAME
        self._run("sigaltstack", SYS_SIGALTSTACK, 0, stack_t)
        self._altstack = read_memory(self.pid, stack_t, _STACK_T_LEN)
        self._write_frame()

    def _write(self, address: int, data: bytearray) -> None:
        done = process_vm_writev(self.pid, buffer_address(data), address, len(data))
        if done != len(data):
            raise BrokenResourceError(f"wrote {done} of {len(data)} bytes into the scratch "
                                      f"area of process {self.pid}")

    def receive(self, fds: Sequence[int]) -> list[int]:
        """Put copies of the first :attr:`batch` of ``fds`` into the target.

        Returns their numbers in the target, in order: a prefix of ``fds``, shorter
        than sent when the target's fd table was full (the kernel drops the rest;
        :attr:`batch` shrinks to what it took). Send the others again.
        """
        assert self._sock is not None and fds
        sent = list(fds[:self.batch])
        socket.send_fds(self._sock, [b"p"], sent)
        msghdr = bytearray(_MSGHDR.size)
        _MSGHDR.pack_into(msghdr, 0, 0, 0, self._area + _AT_IOV, 1, self._area + _AT_CMSG,
                          _CMSG_SPACE, 0)
        self._write(self._area + _AT_MSGHDR, msghdr)
        self._call("recvmsg", SYS_RECVMSG, self._target_sock, self._area + _AT_MSGHDR,
                   _MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        raw = read_memory(self.pid, self._area, _AT_CMSG + _CMSG_SPACE)
        controllen, flags = _MSGHDR.unpack_from(raw, _AT_MSGHDR)[5:7]
        got: list[int] = []
        if controllen >= _CMSGHDR.size:
            length, level, kind = _CMSGHDR.unpack_from(raw, _AT_CMSG)
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = (length - _CMSGHDR.size) // 4
                got = list(struct.unpack_from(f"<{n}i", raw, _AT_CMSG + _CMSGHDR.size))
        self._held += got
        if len(got) < len(sent):
            if not flags & _MSG_CTRUNC:
                raise BrokenResourceError(f"process {self.pid} received {len(got)} of "
                                          f"{len(sent)} fds without MSG_CTRUNC")
            log.debug("process %d took %d of %d fds (its RLIMIT_NOFILE)", self.pid, len(got),
                      len(sent))
            self.batch = max(len(got), 1)
        return got

    def vmsplice(self, calls: Sequence[tuple[int, Sequence[tuple[int, int]]]]) -> list[int]:
        """Run ``vmsplice(fd, iovecs, SPLICE_F_NONBLOCK)`` in the target for each
        ``(target fd, [(address, length), ...])``, in order, in one go (a loop of
        its own: no ptrace round trip per call); returns each call's raw result
        (bytes queued, or ``-errno``), stopping after the first that did not
        queue every byte. At most :data:`IOVEC_ROOM` iovecs in all and
        :data:`UIO_MAXIOV` per call."""
        nr_iovs = sum(len(iovs) for _, iovs in calls)
        if nr_iovs > IOVEC_ROOM:
            raise ValueError(f"{nr_iovs} iovecs do not fit the scratch area")
        data = bytearray(_AT_TABLE - _AT_IOVECS + _ENTRY.size * len(calls))
        at = 0
        for i, (fd, iovs) in enumerate(calls):
            if len(iovs) > UIO_MAXIOV:
                raise ValueError(f"{len(iovs)} iovecs in one vmsplice (at most {UIO_MAXIOV})")
            _ENTRY.pack_into(data, _AT_TABLE - _AT_IOVECS + i * _ENTRY.size, fd,
                             self._area + _AT_IOVECS + at * _IOVEC.size, len(iovs),
                             sum(length for _, length in iovs))
            for address, length in iovs:
                _IOVEC.pack_into(data, at * _IOVEC.size, address, length)
                at += 1
        self._write(self._area + _AT_IOVECS, data)
        self._run_code(self._code, {"rdi": self._area + _AT_TABLE, "rsi": len(calls)})
        done = self._result()
        if not 0 <= done <= len(calls):
            raise BrokenResourceError(f"the vmsplice loop in process {self.pid} returned {done}")
        table = read_memory(self.pid, self._area + _AT_TABLE, _ENTRY.size * done)
        return [_ENTRY.unpack_from(table, i * _ENTRY.size)[3] for i in range(done)]

    def close_fds(self, fds: Sequence[int]) -> None:
        """Close the target's copies of fds it got from :meth:`receive`."""
        for lo, hi in _contiguous(sorted(fds)):
            self._call("close_range", SYS_CLOSE_RANGE, lo, hi, 0)
        gone = set(fds)
        self._held = [fd for fd in self._held if fd not in gone]

    def close(self, session: InjectionSession | None = None) -> None:
        """Close everything this put into the target and unmap the area (idempotent),
        through ``session`` if given (a teardown is single-stepped: it needs no
        rt_sigreturn frame, nor the fds :meth:`use` takes to write one).

        Errors are logged, not raised, if the target died meanwhile.
        """
        if session is not None:
            self._session = session
        sock, self._sock = self._sock, None
        if sock is not None:
            self._poller.unregister(sock)
            sock.close()
        steps: list[tuple[str, int, tuple[int, ...]]] = []
        if self._held:
            steps += [("close_range", SYS_CLOSE_RANGE, (lo, hi, 0))
                      for lo, hi in _contiguous(sorted(self._held))]
            self._held = []
        if self._target_sock >= 0:
            steps.append(("close", SYS_CLOSE, (self._target_sock,)))
            self._target_sock = -1
        if self._area:
            steps.append(("munmap", SYS_MUNMAP, (self._area, _AREA_LEN)))
            self._area = 0
        if self._code:
            steps.append(("munmap", SYS_MUNMAP, (self._code, PAGE_SIZE)))
            self._code = 0
        first: LazyMigOSError | None = None
        for what, nr, args in steps:
            try:
                self._run(what, nr, *args)
            except LazyMigOSError as exc:
                if exc.errno == errno.ESRCH or not process_alive(self.pid):
                    log.debug("process %d is gone; its %s is moot", self.pid, what)
                    return
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> TargetSplicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _contiguous(fds: list[int]) -> list[tuple[int, int]]:
    """Sorted fd numbers as (first, last) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for fd in fds:
        if runs and runs[-1][1] + 1 == fd:
            runs[-1] = (runs[-1][0], fd)
        else:
            runs.append((fd, fd))
    return runs
