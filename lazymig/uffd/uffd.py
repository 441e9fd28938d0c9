"""One userfaultfd, owned: the handshake, the ioctls, and reading its messages.

:class:`Uffd` owns exactly one fd (trio's ``_FdHolder`` rules): ``fd`` becomes
-1 once closed, because a closed fd's number may be reused at once; ``close()``
is idempotent; ``__del__`` closes a forgotten fd and says so with a
ResourceWarning. Waiting for messages is its reader's: the daemon keeps a
reader on ``fd`` (``loop.add_reader``) and removes it before it closes the fd.

Kernel rules worth repeating (Documentation/admin-guide/mm/userfaultfd.rst):

* Every ioctl on the fd fails with EAGAIN while a non-cooperative event (FORK,
  REMAP, REMOVE, UNMAP) is queued and unread: read the events, then retry.
  EAGAIN can outlive the read briefly: the "mm is changing" count drops only
  when the thread that raised the event resumes (``mmap_changing`` in
  fs/userfaultfd.c), so requeue rather than spin.
* A thread that faults on a registered range sleeps until someone resolves the
  fault. Never touch registered memory from the process that serves the fd.
* When the last reference to the fd is closed, missing pages read as zeros.
"""

from __future__ import annotations

import errno
import os
import warnings
from typing import Final, Self

from lazymig.errors import ClosedResourceError, ConfigurationError
from lazymig.linux import uffd as sys_uffd
from lazymig.linux.uffd import UffdError, buffer_address
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.uffd import (
    COPY_STRUCT,
    DEFAULT_FEATURES,
    MSG_SIZE,
    UFFD_API,
    UFFD_USER_MODE_ONLY,
    CopyMode,
    Event,
    Feature,
    Ioctl,
    RegisterMode,
    ZeropageMode,
    decode_events,
    feature_names,
)

__all__ = [
    "DEFAULT_FEATURES",
    "FeatureUnavailableError",
    "Uffd",
    "UffdError",
    "kernel_features",
]

_REQUIRED_API_IOCTLS: Final = Ioctl.API | Ioctl.REGISTER | Ioctl.UNREGISTER


class FeatureUnavailableError(UffdError):
    """The kernel lacks a requested UFFD_FEATURE_*; ``missing`` holds those bits."""

    def __init__(self, missing: int, *, pid: int | None = None) -> None:
        names = ", ".join(feature_names(missing))
        super().__init__(errno.EINVAL, "UFFDIO_API", pid=pid,
                         detail=f"the kernel lacks userfaultfd features {names}")
        self.missing = Feature(missing)


def kernel_features() -> Feature:
    """Every userfaultfd feature this kernel supports (probed on a throwaway fd,
    as CRIU's kerndat does)."""
    fd = sys_uffd.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return Feature(sys_uffd.api(fd, 0)[1])
    finally:
        os.close(fd)


def _check_range(what: str, start: int, length: int) -> None:
    if start < 0 or start % PAGE_SIZE:
        raise ConfigurationError(f"{what}: address {start:#x} is not page-aligned")
    if length <= 0 or length % PAGE_SIZE:
        raise ConfigurationError(f"{what}: length {length:#x} is not a positive page multiple")


class Uffd:
    """The owner of one userfaultfd.

    Create one with :meth:`open` (this process does the UFFDIO_API handshake)
    or :meth:`from_fd` (adopt an fd whose handshake is already done: received
    over SCM_RIGHTS, or delivered by a :class:`~lazymig.proto.uffd.Fork` event).

    Every method raises :class:`~lazymig.errors.ClosedResourceError` after
    :meth:`close`, and :class:`UffdError` (with ``errno``, ``op`` and ``pid``)
    when the kernel refuses. Not thread-safe: use it from one event loop.
    """

    __slots__ = ("__weakref__", "_copy_arg", "_fd", "_features", "_kernel_features", "_pid")

    READ_BATCH: Final = 64
    """Messages asked for by one read() in :meth:`read_events`."""

    def __init__(self, fd: int, *, pid: int | None = None, features: Feature | None = None,
                 kernel_features: Feature | None = None) -> None:
        """Take ownership of ``fd`` as is. Prefer :meth:`open` or :meth:`from_fd`."""
        self._fd = fd
        self._pid = pid
        self._features = features
        self._kernel_features = kernel_features
        self._copy_arg = bytearray(COPY_STRUCT.size)  # reused by copy_pages()

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(cls, features: int = DEFAULT_FEATURES, *, non_blocking: bool = True,
             cloexec: bool = True, user_mode_only: bool = False,
             pid: int | None = None) -> Self:
        """Create a userfaultfd and do the UFFDIO_API handshake for ``features``.

        Only the requested features are enabled. ``pid`` is only a label for
        errors (the fd always covers the calling process's memory).

        Raises:
            FeatureUnavailableError: the kernel lacks some requested feature
                (the message names them).
            UffdError: the fd could not be created, or the handshake failed.
        """
        flags = (os.O_NONBLOCK if non_blocking else 0) | (os.O_CLOEXEC if cloexec else 0)
        if user_mode_only:
            flags |= UFFD_USER_MODE_ONLY
        fd = sys_uffd.userfaultfd(flags)
        try:
            try:
                api, supported, ioctls = sys_uffd.api(fd, features, pid=pid)
            except UffdError as exc:
                if exc.errno == errno.EINVAL:
                    missing = int(features) & ~int(kernel_features())
                    if missing:
                        raise FeatureUnavailableError(missing, pid=pid) from None
                raise
            if api != UFFD_API:
                raise UffdError(errno.EPROTO, "UFFDIO_API", pid=pid,
                                detail=f"kernel answered api {api:#x}, not {UFFD_API:#x}")
            if int(features) & ~supported:
                raise FeatureUnavailableError(int(features) & ~supported, pid=pid)
            if ioctls & _REQUIRED_API_IOCTLS != _REQUIRED_API_IOCTLS:
                raise UffdError(errno.EPROTO, "UFFDIO_API", pid=pid,
                                detail=f"kernel offers ioctls {ioctls:#x} only")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, pid=pid, features=Feature(features), kernel_features=Feature(supported))

    @classmethod
    def from_fd(cls, fd: int, pid: int | None = None, *, non_blocking: bool = True) -> Self:
        """Adopt ``fd``, a userfaultfd whose UFFDIO_API was already done (by the
        process that sent it, or by the kernel for a FORK event's ``ufd``).

        The fd is made non-blocking unless ``non_blocking`` is false. The
        returned object owns it: do not close ``fd`` yourself.
        """
        if fd < 0:
            raise ConfigurationError(f"not a file descriptor: {fd}")
        if non_blocking:
            os.set_blocking(fd, False)
        return cls(fd, pid=pid)

    # ------------------------------------------------------------------ state

    @property
    def fd(self) -> int:
        """The fd, or -1 once closed."""
        return self._fd

    def fileno(self) -> int:
        """The fd (raises ClosedResourceError once closed)."""
        return self._check()

    @property
    def pid(self) -> int | None:
        """The process whose memory this fd covers, when known (used in errors)."""
        return self._pid

    @property
    def features(self) -> Feature | None:
        """Features enabled at the handshake, or None for an adopted fd."""
        return self._features

    @property
    def kernel_features(self) -> Feature | None:
        """Features the kernel reported at the handshake, or None for an adopted fd."""
        return self._kernel_features

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd < 0

    def _check(self) -> int:
        fd = self._fd
        if fd < 0:
            raise ClosedResourceError("the userfaultfd is closed")
        return fd

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Uffd {state} pid={self._pid}>"

    # ------------------------------------------------------------------ ioctls

    def register(self, start: int, length: int,
                 mode: RegisterMode | int = RegisterMode.MISSING) -> Ioctl:
        """UFFDIO_REGISTER ``[start, start+length)`` (of the fd's process) in ``mode``.

        Returns:
            The ioctls the kernel allows on the range (expect WAKE|COPY|ZEROPAGE
            for anonymous memory in MISSING mode).
        """
        _check_range("register", start, length)
        return Ioctl(sys_uffd.register(self._check(), start, length, int(mode), pid=self._pid))

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER ``[start, start+length)``; faults there become ordinary."""
        _check_range("unregister", start, length)
        sys_uffd.unregister(self._check(), start, length, pid=self._pid)

    def copy(self, dst: int, src: object, length: int | None = None, *,
             wake: bool = True) -> int:
        """UFFDIO_COPY ``length`` bytes into ``dst``, one page or many contiguous pages.

        Args:
            dst: page-aligned destination in the fd's process; ``[dst, dst+length)``
                must lie inside one registered VMA.
            src: the data: an int address in this process, or any contiguous
                buffer (bytes, bytearray, memoryview, mmap); a buffer is passed
                by address, never copied.
            length: bytes to copy, a page multiple; defaults to the buffer's
                size (required with an int address).
            wake: wake the threads waiting on the range (else CopyMode.DONTWAKE).

        Returns:
            The bytes copied. Less than ``length`` means the kernel stopped early
            (it says EAGAIN); drain the events and retry or requeue the rest.

        Raises:
            UffdError: nothing was copied (EEXIST: already there; EAGAIN: an
                event is unread; ESRCH/ENOSPC: the process is gone).
        """
        fd = self._check()
        mode = 0 if wake else CopyMode.DONTWAKE
        if isinstance(src, int):
            if length is None:
                raise ConfigurationError("copy from an address needs a length")
            _check_range("copy", dst, length)
            return sys_uffd.copy(fd, dst, src, length, mode, pid=self._pid)
        with buffer_address(src) as (address, size):
            if length is None:
                length = size
            elif length > size:
                raise ConfigurationError(f"copy of {length} bytes from a {size}-byte buffer")
            _check_range("copy", dst, length)
            return sys_uffd.copy(fd, dst, address, length, mode, pid=self._pid)

    def copy_pages(self, dst: int, src: int, length: int) -> int:
        """:meth:`copy` for the fault path: from address ``src``, waking the waiters,
        on this fd's reused ioctl argument and without checking the range (the
        caller's ranges are page-aligned by construction: a kernel EINVAL still
        raises). Returns the bytes copied (short like :meth:`copy`)."""
        fd = self._fd
        if fd < 0:
            raise ClosedResourceError("the userfaultfd is closed")
        return sys_uffd.copy_into(self._copy_arg, fd, dst, src, length, pid=self._pid)

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map the zero page over ``[start, start+length)``.

        Returns the bytes done (short like :meth:`copy`); raises UffdError when none.
        """
        _check_range("zeropage", start, length)
        mode = 0 if wake else ZeropageMode.DONTWAKE
        return sys_uffd.zeropage(self._check(), start, length, mode, pid=self._pid)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE the threads waiting on ``[start, start+length)``."""
        _check_range("wake", start, length)
        sys_uffd.wake(self._check(), start, length, pid=self._pid)

    # ------------------------------------------------------------------ events

    def read_raw(self) -> bytes:
        """What one read() of every queued message returns (up to :attr:`READ_BATCH`),
        undecoded: the daemon takes page faults out of it in place (see
        :func:`~lazymig.proto.uffd.decode_events` for the rest). ``b""`` when
        nothing is queued."""
        fd = self._check()
        try:
            return os.read(fd, MSG_SIZE * self.READ_BATCH)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise UffdError(exc.errno or errno.EIO, "read", pid=self._pid) from None

    def read_events(self) -> list[Event]:
        """Read every queued message (up to :attr:`READ_BATCH`) in one read().

        Returns ``[]`` when nothing is queued (EAGAIN). On a blocking fd this
        waits for a message.
        """
        return decode_events(self.read_raw())

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """``os.close`` the fd (whoever watches it on an event loop removes it
        first). Idempotent."""
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)
            self.close()
