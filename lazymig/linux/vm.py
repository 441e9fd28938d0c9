"""Memory and pipe syscalls the dump side needs: process_vm_readv/writev, vmsplice,
tee, anonymous mmap/munmap, pipe sizing, /proc/PID/mem access, pidfd_getfd, and
the PAGEMAP_SCAN ioctl.

Every ctypes call goes through :func:`lazymig.linux._libc.check`, so a failure
raises :class:`~lazymig.errors.LazyMigOSError` with the errno at once.

Facts checked on Linux 6.18 (and recorded so nobody re-tries them):

* ``splice()`` *from* ``/proc/PID/mem`` fails with ``EINVAL``: the mem file has
  no ``splice_read``. Pages reach a pipe by copying them into our own address
  space first (``process_vm_readv``, or ``pread`` of ``/proc/PID/mem`` for
  mappings without ``PROT_READ``) and ``vmsplice()``-ing them from there.
* ``F_SETPIPE_SZ`` above ``/proc/sys/fs/pipe-max-size`` needs
  ``CAP_SYS_RESOURCE``; an unprivileged user over ``fs.pipe-user-pages-soft``
  gets ``EPERM`` (and new pipes of only two slots).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from typing import Any

from lazymig.errors import LazyMigOSError
from lazymig.linux._libc import check, libc, syscall
from lazymig.linux.procfs import read_status, sysctl_int
from lazymig.linux.syscalls import SYS_PIDFD_GETFD
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
)

__all__ = [
    "F_GETPIPE_SZ",
    "F_SETPIPE_SZ",
    "PAGE_IS_FILE",
    "PAGE_IS_PFNZERO",
    "PAGE_IS_PRESENT",
    "PAGE_IS_SWAPPED",
    "PAGE_IS_WRITTEN",
    "PM_SCAN_CHECK_WPASYNC",
    "PM_SCAN_WP_MATCHING",
    "SPLICE_F_GIFT",
    "SPLICE_F_MORE",
    "SPLICE_F_MOVE",
    "SPLICE_F_NONBLOCK",
    "UIO_MAXIOV",
    "AnonMapping",
    "MemoryWriter",
    "buffer_address",
    "get_pipe_size",
    "local_view",
    "mmap_anonymous",
    "munmap",
    "pagemap_scan",
    "pidfd_getfd",
    "pipe_max_size",
    "pipe_size_unlimited",
    "process_vm_readv",
    "process_vm_writev",
    "read_memory",
    "read_memory_into",
    "set_pipe_size",
    "tee",
    "vmsplice",
    "write_memory",
]

SPLICE_F_MOVE = 0x01
SPLICE_F_NONBLOCK = 0x02
SPLICE_F_MORE = 0x04
SPLICE_F_GIFT = 0x08

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032

UIO_MAXIOV = 1024
"""Most iovecs one process_vm_writev or vmsplice takes (UIO_MAXIOV, include/uapi/linux/uio.h)."""
_MAP_POPULATE = 0x8000
_MAP_FAILED = ctypes.c_void_p(-1).value


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_IoVecP = ctypes.POINTER(_IoVec)


def _iov_at(iovs: ctypes.Array[_IoVec], i: int) -> Any:
    """A pointer to ``iovs[i]`` (what process_vm_writev takes for its tail)."""
    return ctypes.cast(ctypes.addressof(iovs) + i * ctypes.sizeof(_IoVec), _IoVecP)


_process_vm_readv = libc.process_vm_readv
_process_vm_readv.argtypes = (
    ctypes.c_int, _IoVecP, ctypes.c_ulong, _IoVecP, ctypes.c_ulong, ctypes.c_ulong,
)
_process_vm_readv.restype = ctypes.c_ssize_t

_process_vm_writev = libc.process_vm_writev
_process_vm_writev.argtypes = _process_vm_readv.argtypes
_process_vm_writev.restype = ctypes.c_ssize_t

_vmsplice = libc.vmsplice
_vmsplice.argtypes = (ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint)
_vmsplice.restype = ctypes.c_ssize_t

_tee = libc.tee
_tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_tee.restype = ctypes.c_ssize_t

_mmap = libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)
_mmap.restype = ctypes.c_void_p

_munmap = libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int


def process_vm_readv(pid: int, local: int, remote: int, length: int) -> int:
    """Copy ``length`` bytes at ``remote`` in process ``pid`` to our address ``local``.

    Returns the bytes copied: fewer than ``length`` when a remote page cannot be
    read (unmapped, or a mapping without ``PROT_READ``: this call does not force
    access the way ``/proc/PID/mem`` does).
    """
    liov = _IoVec(local, length)
    riov = _IoVec(remote, length)
    return check(_process_vm_readv(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0),
                 f"process_vm_readv({remote:#x}, {length})", pid=pid)


def process_vm_writev(pid: int, local: int, remote: int, length: int) -> int:
    """Copy ``length`` bytes from our address ``local`` to ``remote`` in process ``pid``.

    Returns the bytes copied (short on an unwritable remote page).
    """
    liov = _IoVec(local, length)
    riov = _IoVec(remote, length)
    return check(_process_vm_writev(pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0),
                 f"process_vm_writev({remote:#x}, {length})", pid=pid)


def vmsplice(fd: int, address: int, length: int, flags: int = 0) -> int:
    """vmsplice(2) one user buffer into the pipe ``fd``; returns the bytes queued.

    Without ``SPLICE_F_GIFT`` the pipe *references* the user pages instead of
    copying them: whoever calls this must never write to the buffer again (see
    :class:`AnonMapping`).
    """
    iov = _IoVec(address, length)
    return check(_vmsplice(fd, ctypes.byref(iov), 1, flags), f"vmsplice(fd {fd}, {length})")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """pidfd_getfd(2): a close-on-exec copy of fd ``target_fd`` of the process behind
    ``pidfd`` (needs ptrace-attach rights over it)."""
    return syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                   ctypes.c_uint(0), what=f"pidfd_getfd(fd {target_fd})")


def copy_fd(pid: int, fd: int) -> int:
    """A close-on-exec copy of fd ``fd`` of process ``pid`` here (the same open file
    description; needs ptrace-attach rights over it)."""
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


# PAGEMAP_SCAN (Linux 6.7+, include/uapi/linux/fs.h): page categories.
PAGE_IS_WRITTEN = 1 << 1  # not write-protected by a WP_ASYNC userfaultfd since the last scan
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
# ... and flags: write-protect the pages reported (atomically with the report), and
# fail with EPERM on a VMA not registered for async write-protect (never skip it).
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class _PmScanArg(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask"))


class _PageRegion(ctypes.Structure):
    _fields_ = (("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64))


_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
_SCAN_VEC = 1024

_ioctl = libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def pagemap_scan(fd: int, start: int, end: int, *, inverted: int = 0, required: int = 0,
                 anyof: int = 0, vec_len: int = _SCAN_VEC,
                 flags: int = 0) -> list[tuple[int, int]]:
    """PAGEMAP_SCAN on an open /proc/PID/pagemap: the address ranges in [start, end)
    whose pages have every ``required`` category (each flipped first if it is in
    ``inverted``) and at least one of ``anyof``, sorted, neighbours joined. The
    kernel walks the page tables and returns ranges, not one 8-byte entry per page.
    ``vec_len`` is the size of the output vector (ranges per ioctl). ``flags``:
    ``PM_SCAN_WP_MATCHING`` (and ``PM_SCAN_CHECK_WPASYNC``) write-protect what is
    returned, for dirty tracking (:mod:`lazymig.dump.track`). ENOTTY before
    Linux 6.7.

    How far a call got is read from what it returned, not from ``walk_end`` alone
    (fs/proc/task_mmu.c, ``do_pagemap_scan``): the kernel fills our vector through
    a bounce buffer of at most 512 regions, one page-table walk per buffer, and
    sets ``walk_end`` only when a walk stops early (the buffer full). A later walk
    of the same call that reaches ``end`` leaves it where the earlier one stopped,
    behind the ranges it returned. So: a vector not filled means the walk reached
    ``end``; a full one resumes at the later of ``walk_end`` and the end of the
    last range returned (a range cut there is joined again below).
    """
    if vec_len < 1:
        raise ValueError(f"vec_len must be at least 1, not {vec_len}")
    vec = (_PageRegion * vec_len)()
    arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), flags=flags, start=start, end=end,
                     vec=ctypes.addressof(vec), vec_len=vec_len, category_inverted=inverted,
                     category_mask=required, category_anyof_mask=anyof,
                     return_mask=required | anyof)
    out: list[tuple[int, int]] = []
    while True:
        n = check(_ioctl(fd, _PAGEMAP_SCAN, ctypes.addressof(arg)),
                  f"PAGEMAP_SCAN({arg.start:#x}-{end:#x})")
        for region in vec[:n]:
            if out and region.start < out[-1][1]:
                raise LazyMigOSError(errno.EIO, f"PAGEMAP_SCAN returned {region.start:#x}-"
                                     f"{region.end:#x} behind {out[-1][1]:#x}")
            if out and out[-1][1] == region.start:
                out[-1] = (out[-1][0], region.end)
            else:
                out.append((region.start, region.end))
        if n < vec_len:
            return out
        resume = max(arg.walk_end, out[-1][1])
        if resume >= end:
            return out
        if resume <= arg.start:  # no progress: never loop on a kernel that misreports
            raise LazyMigOSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {resume:#x}")
        arg.start = resume
        arg.vec_len = vec_len
        arg.walk_end = 0


def tee(fd_in: int, fd_out: int, length: int, flags: int = 0) -> int:
    """tee(2): duplicate up to ``length`` bytes from pipe ``fd_in`` into pipe ``fd_out``
    without consuming them; returns the bytes duplicated."""
    return check(_tee(fd_in, fd_out, length, flags), f"tee(fd {fd_in} -> fd {fd_out}, {length})")


def mmap_anonymous(length: int, *, populate: bool = False, at: int | None = None) -> int:
    """Map ``length`` bytes of private anonymous read-write memory; returns its address.

    ``at``: exactly there (``MAP_FIXED_NOREPLACE``: a mapping already there is an
    error, never replaced).
    """
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (_MAP_POPULATE if populate else 0)
    if at is not None:
        flags |= MAP_FIXED_NOREPLACE
    addr = _mmap(at, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == _MAP_FAILED:
        raise LazyMigOSError(ctypes.get_errno(), f"mmap({length})" if at is None
                             else f"mmap({length} at {at:#x})")
    if at is not None and addr != at:  # a kernel before 4.17 takes the flag as a hint
        _munmap(addr, length)
        raise LazyMigOSError(errno.EEXIST, f"mmap({length} at {at:#x}) got {addr:#x}")
    return int(addr)


def local_view(address: int, length: int) -> memoryview:
    """A writable byte view of ``length`` bytes of our own memory at ``address``
    (a mapping the caller keeps alive longer than the view)."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def buffer_address(buffer: bytearray | mmap.mmap) -> int:
    """The address of a writable buffer's first byte, for a syscall that takes one
    (the buffer must not be resized or closed while the address is in use)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def munmap(address: int, length: int) -> None:
    """Unmap ``length`` bytes at ``address`` of our own address space."""
    check(_munmap(address, length), f"munmap({address:#x}, {length})")


class AnonMapping:
    """A private anonymous mapping of our own, unmapped by :meth:`close` (idempotent).

    This is the staging area between a frozen target and a pipe: pages are
    copied in (``process_vm_readv``), then ``vmsplice``-d into the pipe, then the
    mapping is unmapped. ``view()`` hands out a memoryview for ``pread``; it must
    not outlive the mapping.
    """

    __slots__ = ("address", "length")

    def __init__(self, length: int, *, populate: bool = False) -> None:
        self.length = length
        self.address = mmap_anonymous(length, populate=populate)

    def view(self) -> memoryview:
        """A writable memoryview over the mapping (valid until :meth:`close`)."""
        if self.address == 0:
            raise ValueError("mapping is closed")
        return local_view(self.address, self.length)

    def close(self) -> None:
        """Unmap the memory; pages already vmspliced stay alive inside the pipe."""
        if self.address:
            addr, self.address = self.address, 0
            munmap(addr, self.length)

    def __enter__(self) -> AnonMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipe_max_size() -> int:
    """``/proc/sys/fs/pipe-max-size``: the largest F_SETPIPE_SZ we may ask for."""
    return sysctl_int("fs.pipe-max-size")


_CAP_SYS_RESOURCE = 24


def pipe_size_unlimited() -> bool:
    """True if this process has CAP_SYS_RESOURCE, so that F_SETPIPE_SZ may exceed
    fs.pipe-max-size (and the per-user pipe page limits do not apply)."""
    return bool(int(read_status(os.getpid()).get("CapEff", "0"), 16) >> _CAP_SYS_RESOURCE & 1)


def set_pipe_size(fd: int, size: int) -> int:
    """F_SETPIPE_SZ; returns the size the kernel actually gave (at least ``size``)."""
    try:
        return fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or errno.EIO, f"F_SETPIPE_SZ({size}) on fd {fd}") from exc


def get_pipe_size(fd: int) -> int:
    """F_GETPIPE_SZ: the pipe's capacity in bytes."""
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def _mem_path(pid: int) -> str:
    return f"/proc/{pid}/mem"


def read_memory(pid: int, address: int, length: int) -> bytes:
    """Read another process's memory through ``/proc/PID/mem``.

    This forces access like a debugger does (it reads ``PROT_NONE`` mappings), so
    it is the fallback for pages ``process_vm_readv`` refuses. Raises on a short read.
    """
    out = bytearray(length)
    read_memory_into(pid, address, memoryview(out))
    return bytes(out)


def read_memory_into(pid: int, address: int, view: memoryview) -> None:
    """Fill ``view`` from ``/proc/PID/mem`` at ``address`` (forced access, no short reads)."""
    fd = _open_mem(pid, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            where = address + done
            try:
                n = os.preadv(fd, [view[done:]], where)
            except OSError as exc:
                raise LazyMigOSError(exc.errno or errno.EIO, f"read memory at {where:#x}",
                                     pid=pid) from exc
            if n == 0:
                raise LazyMigOSError(errno.EIO, f"short read of memory at {where:#x}", pid=pid)
            done += n
    finally:
        os.close(fd)


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` into another process's memory through ``/proc/PID/mem``."""
    with MemoryWriter(pid) as mem:
        mem.write(address, data)


class MemoryWriter:
    """``/proc/PID/mem`` opened once for many writes (:func:`write_memory` opens it
    for each). Writes go through page protections, as a debugger's do."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = _open_mem(pid, os.O_WRONLY)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``address``."""
        done = 0
        view = memoryview(data)
        while done < len(view):
            where = address + done
            try:
                n = os.pwrite(self._fd, view[done:], where)
            except OSError as exc:
                raise LazyMigOSError(exc.errno or errno.EIO, f"write memory at {where:#x}",
                                     pid=self.pid) from exc
            if n == 0:
                raise LazyMigOSError(errno.EIO, f"short write of memory at {where:#x}",
                                     pid=self.pid)
            done += n

    def write_pieces(self, buffer: bytearray | mmap.mmap,
                     pieces: Sequence[tuple[int, int, int]]) -> None:
        """For each ``(address, offset, length)`` of ``pieces``, write ``length`` bytes
        of ``buffer`` from ``offset`` to ``address``: with ``process_vm_writev``, up to
        1,024 pieces a call, and through the file for a piece it refuses (a page
        without write permission). Thousands of small pieces cost a syscall each
        through the file alone. No view of ``buffer`` outlives the call (an mmap
        can be closed after it, whatever it raised)."""
        if not pieces:
            return
        base = buffer_address(buffer)
        local = (_IoVec * len(pieces))(*(_IoVec(base + off, n) for _, off, n in pieces))
        remote = (_IoVec * len(pieces))(*(_IoVec(address, n) for address, _, n in pieces))
        i = 0
        while i < len(pieces):
            count = min(UIO_MAXIOV, len(pieces) - i)
            done = _process_vm_writev(self.pid, _iov_at(local, i), count, _iov_at(remote, i),
                                      count, 0)
            if done < 0:
                err = ctypes.get_errno()
                if err != errno.EFAULT:
                    raise LazyMigOSError(err, f"process_vm_writev({pieces[i][0]:#x}, ...)",
                                         pid=self.pid)
                done = 0
            end = i + count
            while i < end and done >= pieces[i][2]:  # skip what it wrote
                done -= pieces[i][2]
                i += 1
            if i < end:  # it stopped in piece i: the rest of it through the file
                address, off, n = pieces[i]
                self.write(address + done, buffer[off + done:off + n])
                i += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> MemoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_mem(pid: int, flags: int) -> int:
    try:
        return os.open(_mem_path(pid), flags | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise LazyMigOSError(errno.ESRCH, f"open /proc/{pid}/mem", pid=pid) from exc
    except OSError as exc:
        raise LazyMigOSError(exc.errno or errno.EIO, f"open /proc/{pid}/mem", pid=pid) from exc
