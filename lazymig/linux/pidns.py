"""Pid namespaces: the calling thread's children in a new one, and the pid a process
or thread has here.

``unshare(CLONE_NEWPID)`` moves no one: it only makes the calling *thread's*
next child the first process (pid 1) of a new pid namespace, and its later
children members of it. :func:`children_in_new_pid_namespace` does that for
one block and then points the thread's children back at its own namespace
(``setns``), so that nothing else it forks lands there. Allowed in a
multi-threaded process (CLONE_NEWPID implies no CLONE_THREAD), with
CAP_SYS_ADMIN.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from lazymig.errors import LazyMigError
from lazymig.linux._libc import check, libc
from lazymig.linux.procfs import ns_pids

__all__ = ["CLONE_NEWPID", "children_in_new_pid_namespace", "pid_here"]

CLONE_NEWPID: Final = 0x20000000


@contextlib.contextmanager
def children_in_new_pid_namespace() -> Iterator[None]:
    """Within the block, the calling thread's children go into a new pid
    namespace (the first one is its pid 1); after it, into the thread's own again."""
    own = os.open("/proc/thread-self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
    try:
        check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        try:
            yield
        finally:
            check(libc.setns(own, CLONE_NEWPID), "setns back to the restorer's pid namespace")
    finally:
        os.close(own)


def pid_here(caller: int, seen: int, among: Callable[[], Iterable[int]]) -> int:
    """The pid in this /proc of the process or thread that a ``clone`` made by
    ``caller`` returned as ``seen`` (the pid in the caller's own namespace):
    ``seen`` itself unless the caller is in a nested pid namespace, else the one
    of ``among`` (the caller's children, or its threads) whose innermost pid it is."""
    if len(ns_pids(caller)) == 1:
        return seen
    for candidate in among():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if ns_pids(candidate)[-1] == seen:
                return candidate
    raise LazyMigError(f"process {caller} made {seen} in its pid namespace, which is "
                       "none of its children or threads here")
