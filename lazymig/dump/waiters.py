"""Refusing a target that the calling process itself waits for.

A workload started by the very program that migrates it (an orchestrator, a test)
is that program's child, and whoever waits for it there takes the ptrace stops
the dump needs, since a traced child's stops are reported to any ``waitpid`` of
its parent: asyncio's child watcher (a thread blocked in ``waitpid(pid)``),
uvloop's SIGCHLD handler, a thread in ``Popen.wait()``. The freeze would then
hang until it times out. :func:`check_not_waited_for` tells before anything is
touched, and says how to start such a workload instead.
"""

from __future__ import annotations

import gc
import os

from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.linux.procfs import blocked_syscalls, read_stat
from lazymig.linux.syscalls import (
    SYS_WAIT4,
    SYS_WAITID,
)

__all__ = ["HOW_TO_START", "check_not_waited_for"]

HOW_TO_START = (
    "start a workload that will be migrated in a session of its own, without this "
    "process's fds and with nobody waiting for it while it migrates: "
    "subprocess.Popen(argv, start_new_session=True, close_fds=True), not "
    "asyncio.create_subprocess_exec (see \"Starting a workload to migrate\" in "
    "docs/operating.md)")

_P_ALL, _P_PID, _P_PGID = 0, 1, 2


def check_not_waited_for(pid: int) -> None:
    """Raise :class:`~lazymig.dump.freeze.UnsupportedTargetError` if ``pid`` is a child
    of this process that something here waits for (see the module docstring)."""
    try:
        _, fields = read_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return  # gone: the freeze says so
    if fields[4] != os.getpid():  # field 4: the parent
        return
    waiters = _loop_waiters(pid) or _blocked_waiters(pid, pgid=fields[5])
    if waiters:
        raise UnsupportedTargetError(pid, [
            f"it is a child of this process, and {' and '.join(waiters)} waits for it: "
            "that wait would take the ptrace stops the dump needs (the freeze would hang "
            f"until it times out); {HOW_TO_START}"])


def _loop_waiters(pid: int) -> list[str]:
    """The event loops' subprocess transports of this process that own ``pid``, still
    running: asyncio's (its child watcher waits for the pid) and uvloop's (libuv reaps
    on SIGCHLD)."""
    found = []
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name not in ("_UnixSubprocessTransport", "UVProcessTransport"):
            continue
        try:
            if obj.get_pid() != pid or obj.get_returncode() is not None:
                continue
        except Exception:  # a transport half made or closed: not a waiter
            continue
        if name == "UVProcessTransport":
            found.append("uvloop, which started it (asyncio.create_subprocess_exec; it "
                         "also left it this process's fds)")
        else:
            found.append("asyncio's child watcher (it was started with "
                         "asyncio.create_subprocess_exec)")
    return found


def _blocked_waiters(pid: int, *, pgid: int) -> list[str]:
    """Threads of this process blocked in a wait that ``pid``'s stops would end."""
    found = []
    for tid, (nr, args) in blocked_syscalls(os.getpid()).items():
        if nr == SYS_WAIT4:
            who = args[0] - (1 << 64) if args[0] >= 1 << 63 else args[0]
            hit = who in (pid, -1, -pgid) or (who == 0 and pgid == os.getpgrp())
        elif nr == SYS_WAITID:
            hit = (args[0] == _P_ALL or (args[0] == _P_PID and args[1] == pid)
                   or (args[0] == _P_PGID and (args[1] == pgid or (
                       args[1] == 0 and pgid == os.getpgrp()))))
        else:
            continue
        if hit:
            found.append(f"thread {tid} of this process, blocked in "
                         f"{'wait4' if nr == SYS_WAIT4 else 'waitid'} (Popen.wait, "
                         "os.waitpid)")
    return found
