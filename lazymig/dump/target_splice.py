"""The frozen target vmsplices its own pages into the dumper's page pipes.

Copying the pages at freeze time (``process_vm_readv`` into our memory, then
``vmsplice``) costs about 0.6 s of downtime per GiB. CRIU's parasite, running
inside the target, vmsplices the target's own pages instead, so the pipes
reference them and nothing is copied. :class:`TargetSplicer` gets the same
without a parasite, with syscalls injected through ptrace
(:meth:`~lazymig.linux.ptrace.Tracee.syscalls`):

1. ``mmap`` a scratch area in the target (``MAP_SHARED|MAP_ANONYMOUS``: shmem
   never merges with the private VMAs being dumped), and a read+exec page that
   /proc/PID/mem fills with a 66-byte vmsplice loop; ``socketpair`` there;
   ``pidfd_getfd`` brings one end to us, the target keeps the other.
2. :meth:`receive`: our pipes' write ends go over the socket in SCM_RIGHTS
   batches of up to 253 (``SCM_MAX_FD``) and the target ``recvmsg``-s them
   (``MSG_CMSG_CLOEXEC|MSG_DONTWAIT``) into the scratch area.
3. :meth:`vmsplice`: iovec arrays and a table of calls are written into the
   scratch area (``process_vm_writev``) and the target runs the loop (PTRACE_CONT
   until its ``int3``): one ``vmsplice`` per pipe (``SPLICE_F_NONBLOCK``: a full
   pipe fails instead of blocking the target). One injected syscall per pipe
   cost ~35 us of ptrace round trips, 0.14 s for the 4096 pipes of 4 GiB; the
   loop costs one round trip per batch.
4. :meth:`close_fds` drops the target's copies with ``close_range`` over each
   contiguous run of them; :meth:`close` closes the socket and unmaps the area.

**What the pipes hold.** vmsplice without ``SPLICE_F_GIFT`` takes references
to the target's pages; nothing is copied and the PTEs stay writable. While the
target is frozen the pipes hold exactly its pages at freeze time. If it ran
again and wrote to a page, the pipe would see the write (no copy-on-write
happens). So page pipes filled this way are only valid while the target stays
frozen: every user (LazyDump, dump) closes them before resuming the target.
Killing the target does not free the pages: the pipes keep them alive.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Final

from lazymig.errors import BrokenResourceError, LazyMigOSError
from lazymig.linux.ptrace import InjectionSession, process_alive
from lazymig.linux.vm import pidfd_getfd, process_vm_writev, read_memory, write_memory
from lazymig.proto.constants import PAGE_SIZE

__all__ = ["IOVEC_ROOM", "SCM_MAX_FD", "UIO_MAXIOV", "TargetSplicer", "free_fd_slots"]

log = logging.getLogger(__name__)

SCM_MAX_FD: Final = 253
"""Most fds one SCM_RIGHTS message may carry (include/net/scm.h)."""
UIO_MAXIOV: Final = 1024
"""Most iovecs one vmsplice takes."""

SYS_CLOSE: Final = 3
SYS_MMAP: Final = 9
SYS_MUNMAP: Final = 11
SYS_RECVMSG: Final = 47
SYS_SOCKETPAIR: Final = 53
SYS_VMSPLICE: Final = 278
SYS_CLOSE_RANGE: Final = 436

_PROT_RW: Final = 0x3
_PROT_RX: Final = 0x5
_MAP_SHARED_ANON: Final = 0x01 | 0x20
_MAP_PRIVATE_ANON: Final = 0x02 | 0x20

# The vmsplice loop the target runs (rdi = table, rsi = entries); each 32-byte
# entry is (fd, iovec array, iovec count, bytes expected), and the result
# overwrites the last field. It stops after the first call that did not queue
# every byte expected, returns the entries done in rax and traps (int3).
# vmsplice's flags are SPLICE_F_NONBLOCK (2): a full pipe fails, never blocks.
#   mov r12, rdi; mov r14, rsi; xor r13d, r13d
#   loop: cmp r13, r14; jae out
#         mov eax, 278 (vmsplice); mov rdi, [r12]; mov rsi, [r12+8]; mov rdx, [r12+16]
#         mov r10d, 2; syscall; inc r13
#         cmp rax, [r12+24]; mov [r12+24], rax; jne out
#         add r12, 32; jmp loop
#   out:  mov rax, r13; int3
_VMSPLICE_LOOP: Final = bytes.fromhex(
    "4989fc4989f64531ed4d39f57330b816010000498b3c24498b742408498b"
    "54241041ba020000000f0549ffc5493b442418498944241875064983c420"
    "ebcb4c89e8cc")
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
_AT_IOVECS: Final = PAGE_SIZE
#: iovecs the area holds at once (64 KiB of them), hence also vmsplice calls.
IOVEC_ROOM: Final = 4096
_AT_TABLE: Final = _AT_IOVECS + IOVEC_ROOM * _IOVEC.size
_AREA_LEN: Final = _AT_TABLE + IOVEC_ROOM * _ENTRY.size


def free_fd_slots(pid: int) -> int:
    """fd numbers process ``pid`` could still open below its RLIMIT_NOFILE soft limit."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        soft = line.split()[3]
        in_use = [int(e.name) for e in os.scandir(f"/proc/{pid}/fd")]
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0
    limit = 1 << 30 if soft == "unlimited" else int(soft)
    return limit - sum(1 for fd in in_use if fd < limit)


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
        self._held: list[int] = []  # our fds the target also holds now
        #: fds one :meth:`receive` sends: SCM_MAX_FD, or what the target's fd table
        #: took the last time it was too full for more.
        self.batch = SCM_MAX_FD
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def use(self, session: InjectionSession) -> None:
        """Run through ``session`` from now on (one per batch of work: the target
        gets its own registers back between them)."""
        self._session = session

    def _run(self, what: str, nr: int, *args: int) -> int:
        res = self._session.syscall(nr, *args)
        if res < 0:
            raise LazyMigOSError(-res, f"injected {what}", pid=self.pid)
        return res

    def _open(self) -> None:
        self._area = self._run("mmap of a scratch area", SYS_MMAP, 0, _AREA_LEN, _PROT_RW,
                               _MAP_SHARED_ANON, -1, 0)
        # The code page is never writable in the target: /proc/PID/mem writes it.
        self._code = self._run("mmap of a code page", SYS_MMAP, 0, PAGE_SIZE, _PROT_RX,
                               _MAP_PRIVATE_ANON, -1, 0)
        write_memory(self.pid, self._code, _VMSPLICE_LOOP)
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
        # Constant parts of the recvmsg arguments: one data byte, room for SCM_MAX_FD fds.
        header = bytearray(_AT_IOVECS)
        _IOVEC.pack_into(header, _AT_IOV, self._area + _AT_BYTE, 1)
        self._write(self._area, header)

    def _write(self, address: int, data: bytearray) -> None:
        buf = (ctypes.c_char * len(data)).from_buffer(data)
        done = process_vm_writev(self.pid, ctypes.addressof(buf), address, len(data))
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
        self._run("recvmsg", SYS_RECVMSG, self._target_sock, self._area + _AT_MSGHDR,
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
        done = self._session.run_code(self._code, self._code + len(_VMSPLICE_LOOP),
                                      self._area + _AT_TABLE, len(calls))
        if not 0 <= done <= len(calls):
            raise BrokenResourceError(f"the vmsplice loop in process {self.pid} returned {done}")
        table = read_memory(self.pid, self._area + _AT_TABLE, _ENTRY.size * done)
        return [_ENTRY.unpack_from(table, i * _ENTRY.size)[3] for i in range(done)]

    def close_fds(self, fds: Sequence[int]) -> None:
        """Close the target's copies of fds it got from :meth:`receive`."""
        for lo, hi in _contiguous(sorted(fds)):
            self._run("close_range", SYS_CLOSE_RANGE, lo, hi, 0)
        gone = set(fds)
        self._held = [fd for fd in self._held if fd not in gone]

    def close(self) -> None:
        """Close everything this put into the target and unmap the area (idempotent).

        Errors are logged, not raised, if the target died meanwhile.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
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
