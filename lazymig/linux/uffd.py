"""Raw userfaultfd: the syscall, the /dev/userfaultfd fallback, and the ioctls.

Each function is one kernel call. Arguments are packed into a ``bytearray``
with the ``struct.Struct`` mirrors of :mod:`lazymig.proto.uffd` and passed to
``fcntl.ioctl``, which lets the kernel write the ``out`` fields back (also on
failure) and releases the GIL during the call. Any ``OSError`` becomes a
:class:`UffdError` at once, carrying ``errno``, the ioctl's name and the pid.

Nothing here owns the fd: see :class:`lazymig.uffd.uffd.Uffd` for that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from typing import Final

from lazymig.errors import LazyMigOSError
from lazymig.linux._libc import syscall
from lazymig.proto import uffd as p
from lazymig.proto.constants import PAGE_SIZE

__all__ = [
    "Buffer",
    "UffdError",
    "api",
    "buffer_address",
    "copy",
    "memory_alive",
    "open_dev_userfaultfd",
    "register",
    "unregister",
    "userfaultfd",
    "wake",
    "zeropage",
]

Buffer = bytes | bytearray | memoryview
"""Objects accepted as a page source, besides anything else exporting a buffer (mmap)."""

_RECOVERABLE: Final = frozenset({errno.EAGAIN, errno.EEXIST, errno.ENOENT})
_GONE: Final = frozenset({errno.ESRCH, errno.ENOSPC})
_MM_OPS: Final = frozenset({"UFFDIO_UNREGISTER", "UFFDIO_REGISTER"})


class UffdError(LazyMigOSError):
    """A userfaultfd call failed.

    ``errno`` says why, ``op`` names the call (``"UFFDIO_COPY"``...), ``pid``
    names the process whose memory the fd covers, when known. The two
    properties classify the errno the way CRIU does (criu/uffd.c).
    """

    def __init__(self, err: int, op: str, *, pid: int | None = None, detail: str = "") -> None:
        super().__init__(err, f"{op}{': ' + detail if detail else ''}", pid=pid)
        self.op = op

    @property
    def recoverable(self) -> bool:
        """EAGAIN, EEXIST or ENOENT: the memory map changed under us, or the page
        is already there. Drain the uffd's events, then retry or requeue."""
        return self.errno in _RECOVERABLE

    @property
    def process_gone(self) -> bool:
        """ESRCH or ENOSPC (or ENOMEM from UFFDIO_UNREGISTER/REGISTER): the process
        exited. Retire it and close the fd; this is not a daemon failure.

        The (un)register case follows CRIU for UNREGISTER; the kernel answers
        ENOMEM to both once the mm has no users (fs/userfaultfd.c,
        ``mmget_not_zero``), as tests/test_uffd_kernel.py shows.
        """
        return self.errno in _GONE or (self.errno == errno.ENOMEM and self.op in _MM_OPS)


# --------------------------------------------------------------------------- creating an fd


def _syscall_nr() -> int | None:
    return p.NR_USERFAULTFD.get(os.uname().machine)  # as platform.machine(), without platform


def userfaultfd(flags: int) -> int:
    """Create a userfaultfd with ``flags`` (O_CLOEXEC, O_NONBLOCK, UFFD_USER_MODE_ONLY).

    Uses the syscall; when that gives EPERM (``vm.unprivileged_userfaultfd=0``
    without CAP_SYS_PTRACE) or ENOSYS (seccomp, unknown arch), falls back to
    :func:`open_dev_userfaultfd`, whose access is controlled by the file mode.

    Raises:
        UffdError: neither way worked (the syscall's errno is kept).
    """
    nr = _syscall_nr()
    if nr is None:
        err = errno.ENOSYS
    else:
        try:
            return syscall(nr, ctypes.c_int(flags), what="userfaultfd")
        except LazyMigOSError as exc:
            err = exc.errno or errno.EIO
    if err not in (errno.EPERM, errno.ENOSYS):
        raise UffdError(err, "userfaultfd")
    try:
        return open_dev_userfaultfd(flags)
    except UffdError as exc:
        raise UffdError(
            err, "userfaultfd", detail=f"fallback /dev/userfaultfd failed too: {exc}"
        ) from exc


def open_dev_userfaultfd(flags: int) -> int:
    """Create a userfaultfd through ``/dev/userfaultfd`` and USERFAULTFD_IOC_NEW.

    Raises:
        UffdError: the device is missing or not accessible, or the ioctl failed.
    """
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UffdError(exc.errno or errno.EIO, "open /dev/userfaultfd") from None
    try:
        return fcntl.ioctl(dev, p.USERFAULTFD_IOC_NEW, flags)
    except OSError as exc:
        raise UffdError(exc.errno or errno.EIO, "USERFAULTFD_IOC_NEW") from None
    finally:
        os.close(dev)


# --------------------------------------------------------------------------- ioctls


def _ioctl(fd: int, request: int, arg: bytearray, op: str, pid: int | None) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise UffdError(exc.errno or errno.EIO, op, pid=pid) from None


def api(fd: int, features: int, *, pid: int | None = None) -> tuple[int, int, int]:
    """UFFDIO_API: the handshake, once per fd. Returns ``(api, features, ioctls)``
    as the kernel wrote them: ``features`` is every feature the kernel supports."""
    arg = bytearray(p.API_STRUCT.pack(p.UFFD_API, features, 0))
    _ioctl(fd, p.UFFDIO_API, arg, "UFFDIO_API", pid)
    api_, kfeatures, ioctls = p.API_STRUCT.unpack(arg)
    return api_, kfeatures, ioctls


def register(fd: int, start: int, length: int, mode: int, *, pid: int | None = None) -> int:
    """UFFDIO_REGISTER ``[start, start+length)``; returns the ``ioctls`` mask
    (:class:`~lazymig.proto.uffd.Ioctl` bits) usable on the range."""
    arg = bytearray(p.REGISTER_STRUCT.pack(start, length, mode, 0))
    _ioctl(fd, p.UFFDIO_REGISTER, arg, "UFFDIO_REGISTER", pid)
    return int(p.REGISTER_STRUCT.unpack(arg)[3])


def unregister(fd: int, start: int, length: int, *, pid: int | None = None) -> None:
    """UFFDIO_UNREGISTER ``[start, start+length)``."""
    _ioctl(fd, p.UFFDIO_UNREGISTER, bytearray(p.RANGE_STRUCT.pack(start, length)),
           "UFFDIO_UNREGISTER", pid)


def memory_alive(fd: int, probe: int) -> bool:
    """Whether the process whose memory uffd ``fd`` covers still has it (it did not exit).

    A uffd says nothing when its process exits, but UFFDIO_UNREGISTER answers ENOMEM
    once that memory has no users. ``probe`` is a page no process maps (the lowest
    one mmap allows, :func:`lazymig.linux.procfs.lowest_mappable`): its unregister
    changes nothing, and fails with EINVAL while the process lives.
    """
    try:
        unregister(fd, probe, PAGE_SIZE)
    except UffdError as exc:
        return not exc.process_gone
    return True


def wake(fd: int, start: int, length: int, *, pid: int | None = None) -> None:
    """UFFDIO_WAKE the threads waiting on ``[start, start+length)``."""
    _ioctl(fd, p.UFFDIO_WAKE, bytearray(p.RANGE_STRUCT.pack(start, length)),
           "UFFDIO_WAKE", pid)


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0, *,
         pid: int | None = None) -> int:
    """UFFDIO_COPY ``length`` bytes from address ``src`` (in this process) to
    ``dst`` (in the uffd's process). Returns the bytes copied.

    A partial copy is not an error here: the kernel reports it as EAGAIN with
    ``copy`` > 0, and this returns that short count, like a short write.

    Raises:
        UffdError: nothing was copied.
    """
    return copy_into(bytearray(p.COPY_STRUCT.size), fd, dst, src, length, mode, pid=pid)


def copy_into(arg: bytearray, fd: int, dst: int, src: int, length: int, mode: int = 0, *,
              pid: int | None = None) -> int:
    """:func:`copy` with the caller's ``struct uffdio_copy`` buffer (``arg``, 40 bytes,
    reused): the fault path builds no argument per copy."""
    _pack_copy(arg, 0, dst, src, length, mode, 0)
    try:
        _raw_ioctl(fd, _UFFDIO_COPY, arg)
    except OSError as exc:
        done = int.from_bytes(arg[32:40], "little", signed=True)
        if done > 0:
            return done
        raise UffdError(exc.errno or errno.EIO, "UFFDIO_COPY", pid=pid) from None
    return int.from_bytes(arg[32:40], "little", signed=True)


_UFFDIO_COPY = p.UFFDIO_COPY
_pack_copy = p.COPY_STRUCT.pack_into
_raw_ioctl = fcntl.ioctl


def zeropage(fd: int, start: int, length: int, mode: int = 0, *,
             pid: int | None = None) -> int:
    """UFFDIO_ZEROPAGE: map zero pages over ``[start, start+length)``. Returns the
    bytes done (short on a partial success, like :func:`copy`).

    Raises:
        UffdError: nothing was done.
    """
    arg = bytearray(p.ZEROPAGE_STRUCT.pack(start, length, mode, 0))
    try:
        fcntl.ioctl(fd, p.UFFDIO_ZEROPAGE, arg)
    except OSError as exc:
        done = p.ZEROPAGE_STRUCT.unpack(arg)[3]
        if done > 0:
            return int(done)
        raise UffdError(exc.errno or errno.EIO, "UFFDIO_ZEROPAGE", pid=pid) from None
    return int(p.ZEROPAGE_STRUCT.unpack(arg)[3])


# --------------------------------------------------------------------------- buffer addresses


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (part of the stable ABI since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBuffer_Release.restype = None
_PyBUF_SIMPLE: Final = 0


@contextlib.contextmanager
def buffer_address(obj: object) -> Iterator[tuple[int, int]]:
    """Pin ``obj``'s buffer and yield ``(address, nbytes)``, without copying.

    Works for read-only buffers too (bytes, memoryview slices of bytes), and
    for mmap and bytearray (which cannot be resized while pinned).

    Raises:
        TypeError: ``obj`` does not export a buffer.
        BufferError: the buffer is not contiguous.
    """
    view = _PyBuffer()
    _PyObject_GetBuffer(obj, ctypes.byref(view), _PyBUF_SIMPLE)
    try:
        yield (view.buf or 0), view.len
    finally:
        _PyBuffer_Release(ctypes.byref(view))
