"""Pids as they were: every restored process and thread under its dumped pid.

A parent that remembers its children's pids (``waitpid(pid)``, ``kill(pid)``,
a shell waiting for its foreground job, ``multiprocessing``) breaks if its tree
comes back under new pids. So, as CRIU does, each process and thread is created
with ``clone3`` and ``set_tid`` asking for its dumped pid (Linux 5.5, needs
CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN). Where it is restored
(:func:`choose`, logged once):

* :attr:`PidMode.ORIGINAL`: every dumped pid and tid is free here (across
  hosts, or once the source is gone): they are taken here, in the restorer's
  pid namespace.
* :attr:`PidMode.NAMESPACE`: some are taken (on one machine, by the frozen
  source itself): the tree is restored into a new pid namespace of its own,
  where they are all free. Its pid 1 is a small init
  (:mod:`lazymig.restore.pidns_init`) that reaps the orphans and lives as long
  as any process of the namespace does (its exit would kill them all). Inside,
  ``getpid()``, ``gettid()``, ``getppid()`` (but the root's: 0, its parent is
  outside), ``waitpid(pid)``, ``kill(pid)``, process groups and sessions use
  the dumped pids; outside (this host, its ``/proc``, ``RestoreResult.pid``,
  ``Restorer.tree_pids``) each process has another pid, its pid here. The
  tree keeps this host's ``/proc`` (no mount namespace is made):
  ``/proc/self`` and ``/proc/thread-self`` resolve to the host's pids and so
  still name the process itself, but a path made from ``getpid()``
  (``/proc/<pid>/...``) names another process here, or none.
* :attr:`PidMode.NEW` (``new_pids=True``, ``--new-pids``): the kernel's new
  pids, no namespace (CRIU has no such mode: it always restores the dumped
  pids).

The root is the restorer's child in every mode, so that it waits for it and
gets its exit status as for any child: a helper (the restorer's ``sleep``) forks
it with ``CLONE_PARENT`` (into the namespace first with ``setns``, when there is
one) and is then killed. Its descendants are forked by their restored parents
(:mod:`lazymig.restore.tree`), its threads cloned by it
(:mod:`lazymig.restore.threads`), each under its dumped pid as seen in its own
namespace.

When the root exits, the restorer reaps it as before; its children go on and
are reparented, as without a namespace: to the namespace's init there. The
init ends, and the namespace with it, once its last other process is gone. A
SIGKILL to the init kills the whole namespace (what a failed restore and the
guardian do).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Final

from lazymig.errors import LazyMigOSError
from lazymig.linux.pidns import CLONE_NEWPID, children_in_new_pid_namespace, pid_here
from lazymig.linux.procfs import children, ns_path, pid_in_use
from lazymig.linux.ptrace import PTRACE_O_TRACECLONE, PTRACE_O_TRACEFORK, Tracee
from lazymig.linux.syscalls import SYS_CLONE3, SYS_CLOSE, SYS_OPENAT, SYS_SETNS
from lazymig.linux.vm import write_memory
from lazymig.proto.images import PstreeEntry

__all__ = ["ChildProcess", "PidMode", "choose", "clone_args", "fork", "pstree_ids", "spawn_root",
           "start_init"]

log = logging.getLogger(__name__)

CLONE_VM: Final = 0x100
CLONE_PARENT: Final = 0x8000
_SIGCHLD: Final = 17
_AT_FDCWD: Final = -100
_O_RDONLY_CLOEXEC: Final = 0o2000000
#: struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1): flags, pidfd,
#: child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size.
CLONE_ARGS: Final = struct.Struct("<10Q")
_INIT: Final = Path(__file__).with_name("pidns_init.py")


class PidMode(enum.Enum):
    """Which pids a restore gives (see the module docstring)."""

    ORIGINAL = "original"
    """The dumped pids, here."""
    NAMESPACE = "namespace"
    """The dumped pids, in a new pid namespace of the restored tree's own."""
    NEW = "new"
    """New pids, the kernel's choice (``new_pids=True``)."""


def choose(ids: Collection[int], *, new_pids: bool, what: str) -> PidMode:
    """The mode for restoring ``what``, whose processes and threads had ``ids``
    (the root first); logged once, with the reason.

    Raises:
        UnsupportedDumpError: a dumped pid 1 (a namespace's init, which would have
            to be the new namespace's init) that is taken here.
    """
    from lazymig.restore.task import UnsupportedDumpError  # noqa: PLC0415 (task imports us)

    if new_pids:
        log.info("%s: restored under new pids (new_pids)", what)
        return PidMode.NEW
    taken = sorted(i for i in ids if pid_in_use(i))
    if not taken:
        log.info("%s: restored under its dumped pids (%d pids and tids, all free here)",
                 what, len(ids))
        return PidMode.ORIGINAL
    if 1 in ids:
        raise UnsupportedDumpError(
            f"{what} holds pid 1 (it was a pid namespace's init), which is taken here and by "
            "the init of any new pid namespace: restore it with new_pids=True (--new-pids)")
    shown = ", ".join(map(str, taken[:8])) + (", ..." if len(taken) > 8 else "")
    log.info("%s: restored under its dumped pids in a new pid namespace of its own: pids %s "
             "are taken here (on one machine, by the frozen source); its processes see their "
             "dumped pids, this host sees others (new_pids=True gives new pids without a "
             "namespace)", what, shown)
    return PidMode.NAMESPACE


def clone_args(flags: int, exit_signal: int, set_tid: int = 0) -> bytes:
    """A ``struct clone_args``; ``set_tid``: the address of a one-entry ``set_tid``
    array (the pid in the new task's own namespace; 0: any pid)."""
    return CLONE_ARGS.pack(flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid, 1 if set_tid else 0)


def set_tid_error(err: int, pid: int) -> LazyMigOSError:
    """Why ``clone3`` could not give ``pid`` back, and what to do."""
    if err == errno.EEXIST:
        why = "it was taken since the restore began (a new process, or a process group " \
              "or session id still in use); restore again"
    elif err in (errno.EPERM, errno.EINVAL, errno.ENOSYS, errno.E2BIG):
        why = "this kernel or user cannot ask for a pid (clone3 with set_tid needs Linux " \
              "5.5 and CAP_CHECKPOINT_RESTORE)"
    else:
        why = "the kernel refused it"
    return LazyMigOSError(err, f"restoring pid {pid} (clone3 with set_tid): {why}; "
                               "new_pids=True (--new-pids) restores under new pids")


def start_init(root: int) -> tuple[subprocess.Popen[bytes], int]:
    """Pid 1 of a new pid namespace (:mod:`lazymig.restore.pidns_init`), a child of
    the calling thread, for a tree whose root will be ``root`` there. Returns it
    and the write end of its ready pipe: close it once the root exists."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        with children_in_new_pid_namespace():
            init = subprocess.Popen(
                [sys.executable, "-I", "-S", os.fspath(_INIT), str(root), str(ready_r)],
                pass_fds=(ready_r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)  # it holds no one's pipe
    except BaseException:
        os.close(ready_w)
        raise
    finally:
        os.close(ready_r)
    # Its interpreter's start-up (~40 ms of CPU) must not take a vCPU from the restore:
    # nothing needs it before the tree runs.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, init.pid, 19)
    log.debug("pid namespace of %d: its init is %d here", root, init.pid)
    return init, ready_w


def fork(parent: Tracee, pid: int | None, *, sibling: bool = False,
         namespace_of: int | None = None, share_memory: bool = False) -> Tracee:
    """A child of ``parent`` (with ``sibling``, of its parent: CLONE_PARENT) under
    ``pid`` in its own pid namespace (clone3 with ``set_tid``; None: a new pid),
    seized and stopped before it ran one instruction. With ``namespace_of``, the
    parent enters that process's pid namespace for its children first (setns).
    With ``share_memory`` the child shares the parent's address space (CLONE_VM)
    instead of a copy of it: what was built there is the child's with no page
    copied (a prepared restore, :mod:`lazymig.restore.premap`); the parent must
    then die before the child runs. Runs on the tracer thread of ``parent``, which
    is stopped."""
    parent.set_options(PTRACE_O_TRACEFORK | PTRACE_O_TRACECLONE)
    try:
        with parent.syscalls() as session, \
                session.scratch_page("restoring: injected mmap") as page:
            if namespace_of is not None:
                path = ns_path(namespace_of, "pid")
                write_memory(parent.pid, page, path.encode() + b"\0")
                fd = session.syscall(SYS_OPENAT, _AT_FDCWD, page, _O_RDONLY_CLOEXEC)
                if fd < 0:
                    raise LazyMigOSError(-fd, f"restoring: open({path})", pid=parent.pid)
                res = session.syscall(SYS_SETNS, fd, CLONE_NEWPID)
                session.syscall(SYS_CLOSE, fd)
                if res < 0:
                    raise LazyMigOSError(-res, f"restoring: setns({path})", pid=parent.pid)
            # clone3 refuses an exit signal with CLONE_PARENT: the child's is its parent's.
            wanted = page + CLONE_ARGS.size if pid is not None else 0
            write_memory(parent.pid, page, clone_args(
                (CLONE_PARENT if sibling else 0) | (CLONE_VM if share_memory else 0),
                0 if sibling else _SIGCHLD, wanted)
                + struct.pack("<i", pid or 0))
            seen = session.syscall(SYS_CLONE3, page, CLONE_ARGS.size)
    finally:
        parent.set_options(0)
    if seen < 0:
        if pid is None:
            raise LazyMigOSError(-seen, "restoring: clone3", pid=parent.pid)
        raise set_tid_error(-seen, pid)
    # A sibling's parent is the restorer, in whose namespace the helper is: seen is here.
    here = pid_here(parent.pid, seen, lambda: children(parent.pid))
    tracee = Tracee.adopt(here, stopped=False)
    tracee.wait_interrupt_stop(timeout=5.0)  # the stop of an auto-attached child
    return tracee


def spawn_root(launcher: subprocess.Popen[bytes], helper: Tracee, root: int,
               mode: PidMode, *, share_memory: bool = False,
               ) -> tuple[ChildProcess, Tracee, subprocess.Popen[bytes] | None]:
    """The root's helper under its dumped pid ``root``: forked by ``launcher`` (the
    restorer's ``sleep``, seized as ``helper``) as the restorer's own child, after
    a new pid namespace and its init in :attr:`PidMode.NAMESPACE`; with
    ``share_memory``, in the launcher's address space (see :func:`fork`). The
    launcher is killed and reaped. Returns the root, its tracee and the init; on
    failure the init is killed too."""
    init: subprocess.Popen[bytes] | None = None
    try:
        if mode is PidMode.NAMESPACE:
            init, ready = start_init(root)
            try:
                tracee = fork(helper, root, sibling=True, namespace_of=init.pid,
                              share_memory=share_memory)
            finally:
                os.close(ready)  # the init looks for the root now (or ends, if it failed)
        else:
            tracee = fork(helper, root, sibling=True, share_memory=share_memory)
    except BaseException:
        if init is not None:
            init.kill()
            init.wait()
        raise
    finally:
        helper.abandon()  # a traced process would not be reaped by wait()
        launcher.kill()
        launcher.wait()
    return ChildProcess(tracee.pid), tracee, init


def pstree_ids(entries: Iterable[PstreeEntry]) -> list[int]:
    """Every pid and tid of the processes ``entries`` (pstree.img's), the root first."""
    return list(dict.fromkeys(i for e in entries for i in (e.pid, *e.threads)))


class ChildProcess:
    """A child of this process made otherwise than by :mod:`subprocess` (the restored
    root, forked by a helper with CLONE_PARENT): what the restorer uses of ``Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        """As ``Popen.returncode``: None while it runs, negative if a signal killed it."""

    def poll(self) -> int | None:
        """Its status if it has ended (reaping it), else None."""
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end; its status. Raises ``subprocess.TimeoutExpired``."""
        if timeout is None:
            status = self._reap(0)
            assert status is not None
            return status
        deadline = time.monotonic() + timeout
        while (status := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(0.005)
        return status

    def kill(self) -> None:
        """SIGKILL it, unless it was reaped already."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _reap(self, flags: int) -> int | None:
        while self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: its status is lost (as Popen)
                self.returncode = 0
                break
            if pid == 0:
                return None
            if not os.WIFSTOPPED(status):  # a ptrace stop of a still traced child is not its end
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def __repr__(self) -> str:
        return f"<ChildProcess pid={self.pid} returncode={self.returncode}>"
