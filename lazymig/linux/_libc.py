"""The one choke point for raw syscalls: libc through ctypes, errors raised at once.

Every ctypes call in lazymig goes through :func:`check`, which turns a failed
call (``-1`` with ``errno`` set) into :class:`~lazymig.errors.LazyMigOSError`
immediately, so no caller ever reads a stale ``errno``. A system call libc has
no wrapper for goes through :func:`syscall`, the one place ``syscall(2)``'s
return type is declared (``libc.syscall`` is one object shared by every module).
"""

from __future__ import annotations

import ctypes

from lazymig.errors import LazyMigOSError

__all__ = ["check", "libc", "syscall"]

libc = ctypes.CDLL(None, use_errno=True)
"""The process's own symbols, libc's among them (it is loaded already); not
``ctypes.util.find_library("c")``, which runs ldconfig at import and loads 1 MiB."""


def check(result: int, what: str, *, pid: int | None = None) -> int:
    """Return ``result``, or raise :class:`LazyMigOSError` if it is ``-1``."""
    if result == -1:
        raise LazyMigOSError(ctypes.get_errno(), what, pid=pid)
    return result


_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def syscall(nr: int, *args: object, what: str, pid: int | None = None) -> int:
    """syscall(2) number ``nr`` with ``args`` (ctypes values, or pointers by
    ``ctypes.byref``); its result, or :class:`LazyMigOSError` naming ``what``."""
    return check(int(_syscall(ctypes.c_long(nr), *args)), what, pid=pid)
