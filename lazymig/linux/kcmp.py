"""kcmp(2): whether two fds (of one or two processes) share an open file description."""

from __future__ import annotations

import ctypes
from typing import Final

from lazymig.linux._libc import syscall
from lazymig.linux.syscalls import SYS_KCMP

__all__ = ["same_epoll_target", "same_file"]

_KCMP_FILE: Final = 0
_KCMP_EPOLL_TFD: Final = 7

def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """True if fd ``fd1`` of ``pid1`` and fd ``fd2`` of ``pid2`` are one open file
    description (dup'd or inherited: they share offset and status flags).

    Needs PTRACE_MODE_READ access to both processes.
    """
    res = syscall(SYS_KCMP, ctypes.c_long(pid1), ctypes.c_long(pid2), ctypes.c_long(_KCMP_FILE),
                  ctypes.c_ulong(fd1), ctypes.c_ulong(fd2), what=f"kcmp(fd {fd1}, fd {fd2})",
                  pid=pid1)
    return res == 0


class _EpollSlot(ctypes.Structure):
    """struct kcmp_epoll_slot { __u32 efd, tfd, toff; }"""

    _fields_ = (("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32))


def same_epoll_target(pid: int, fd: int, epfd: int, tfd: int, toff: int = 0) -> bool:
    """True if fd ``fd`` of ``pid`` is the file that its epoll ``epfd`` watches
    under fd number ``tfd`` (the ``toff``-th such registration: a file closed
    after it was added stays registered under its old number while a dup of it
    lives, and the number may be registered again for another file).

    Raises LazyMigOSError; ENOENT: ``epfd`` has no such registration.
    """
    slot = _EpollSlot(epfd, tfd, toff)
    res = syscall(SYS_KCMP, ctypes.c_long(pid), ctypes.c_long(pid), ctypes.c_long(_KCMP_EPOLL_TFD),
                  ctypes.c_ulong(fd), ctypes.c_void_p(ctypes.addressof(slot)),
                  what=f"kcmp(fd {fd}, epoll fd {epfd} target {tfd})", pid=pid)
    return res == 0
