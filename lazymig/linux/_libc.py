"""The one choke point for raw syscalls: libc through ctypes, errors raised at once.

Every ctypes call in lazymig goes through :func:`check`, which turns a failed
call (``-1`` with ``errno`` set) into :class:`~lazymig.errors.LazyMigOSError`
immediately, so no caller ever reads a stale ``errno``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from lazymig.errors import LazyMigOSError

__all__ = ["check", "libc"]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def check(result: int, what: str, *, pid: int | None = None) -> int:
    """Return ``result``, or raise :class:`LazyMigOSError` if it is ``-1``."""
    if result == -1:
        raise LazyMigOSError(ctypes.get_errno(), what, pid=pid)
    return result
