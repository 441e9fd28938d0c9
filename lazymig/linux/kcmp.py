"""kcmp(2): whether two fds (of one or two processes) share an open file description."""

from __future__ import annotations

import ctypes
from typing import Final

from lazymig.linux._libc import check, libc
from lazymig.linux.syscalls import SYS_KCMP

__all__ = ["same_file"]

_KCMP_FILE: Final = 0

_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """True if fd ``fd1`` of ``pid1`` and fd ``fd2`` of ``pid2`` are one open file
    description (dup'd or inherited: they share offset and status flags).

    Needs PTRACE_MODE_READ access to both processes.
    """
    res = check(int(_syscall(ctypes.c_long(SYS_KCMP), ctypes.c_long(pid1), ctypes.c_long(pid2),
                             ctypes.c_long(_KCMP_FILE), ctypes.c_ulong(fd1),
                             ctypes.c_ulong(fd2))), f"kcmp(fd {fd1}, fd {fd2})", pid=pid1)
    return res == 0
