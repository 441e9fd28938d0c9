"""Restoring a dumped process tree (``pstree.img`` with more than one entry).

How (every ptrace request on one tracer thread; see :mod:`lazymig.restore.restorer`
for how one process is rebuilt):

1. **The skeleton.** The root's helper is started and seized as for one
   process. Then, in ``pstree.img`` order (parents before children), each
   process is forked by its parent's helper, before anything of the parent is
   rebuilt: a ``clone3`` injected into the parent, with ``set_tid`` asking for
   the dumped pid (free across hosts, or once the source is gone: it then
   comes back under it; else ``fork`` gives it a new one). The parent is
   traced with ``PTRACE_O_TRACEFORK``, so the child arrives seized and stopped
   before it runs one instruction: a copy of the helper, ready to be rebuilt.
   Sessions and groups are made as they are forked: a session leader calls
   ``setsid`` (before it forks the members of its session), a group leader
   ``setpgid(0, 0)``; once every process exists, the others join their group
   (``setpgid(0, pgid)``, the group leader's pid here). A process whose
   session or group was outside the dumped tree is in the restorer's, as for
   one process.
2. **Zombies** are forked the same way and exit at once with their dumped
   status (``exit_group`` injected into them, or the signal that killed
   them): their parent finds them as it left them, not reaped.
3. Every live process is then rebuilt like a single one (memory, uffd, mm,
   files, threads, registers), its uffd handed to the daemon under its image
   pid (zombies are announced as such), one guardian covering the root and its
   descendants, and each is detached, the children first. The files of every
   process come before any is detached: the descriptions, pipes and shared
   objects processes shared are taken from the one that restored them
   (:class:`~lazymig.restore.files.TreeFiles`).

On one host the frozen source still holds the dumped pids, so the restored
tree gets new ones: a parent waiting for a child by its old pid
(``waitpid(pid)``) gets ECHILD there; ``waitpid(-1)`` works. The root always
gets a new pid (its helper is started by the restorer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import struct
import time
from typing import TYPE_CHECKING, Final

from lazymig.errors import LazyMigError, LazyMigOSError
from lazymig.guardian import spawn_guardian
from lazymig.linux.procfs import read_stat
from lazymig.linux.ptrace import PTRACE_O_TRACEFORK, TargetGoneError, Tracee, TracerThread
from lazymig.linux.syscalls import (
    SYS_CLONE3,
    SYS_EXIT_GROUP,
    SYS_FORK,
    SYS_SETPGID,
    SYS_SETSID,
)
from lazymig.linux.vm import write_memory
from lazymig.proto.images import ImagesDir, PstreeEntry
from lazymig.restore.files import TreeFiles, restore_files
from lazymig.restore.shmem import shared_vmas
from lazymig.restore.task import DumpedTask, FdInheritance, load_task
from lazymig.uffd.handover import send_restore_finished, send_task, send_zombie

if TYPE_CHECKING:
    from lazymig.restore.restorer import Restorer, RestoreResult, _Target

__all__ = ["TASK_DEAD", "is_tree", "restore_tree"]

log = logging.getLogger(__name__)

TASK_DEAD: Final = 2
"""CRIU's task state of a zombie (``core.tc.task_state``)."""

_SIGCHLD: Final = 17
#: struct clone_args up to set_tid_size: flags, pidfd, child_tid, parent_tid,
#: exit_signal, stack, stack_size, tls, set_tid, set_tid_size.
_CLONE_ARGS: Final = struct.Struct("<10Q")


def is_tree(images: ImagesDir) -> bool:
    """True if the dump in ``images`` holds more than one process."""
    try:
        return len(images.pstree()) > 1
    except FileNotFoundError:
        return False


@dataclasses.dataclass(slots=True)
class _Tree:
    entries: list[PstreeEntry]
    tasks: dict[int, DumpedTask]
    """The live processes' tasks by image pid."""
    zombies: dict[int, int]
    """Image pid: wait status, of each zombie."""


def _load(images: ImagesDir, lazy_pages: bool, fds: FdInheritance) -> _Tree:
    entries = images.pstree()
    tasks: dict[int, DumpedTask] = {}
    zombies: dict[int, int] = {}
    for e in entries:
        core = images.core(e.pid)
        if core.HasField("tc") and core.tc.task_state == TASK_DEAD:
            zombies[e.pid] = core.tc.exit_code
        else:
            tasks[e.pid] = load_task(images, lazy_pages=lazy_pages, fds=fds, pid=e.pid)
    return _Tree(entries, tasks, zombies)


async def restore_tree(restorer: Restorer) -> RestoreResult:
    """Restore the tree dumped in ``restorer.images`` (see the module docstring);
    the result is the root's. ``restorer.tree_pids`` maps image pids to the
    restored ones. On failure every process created is killed."""
    from lazymig.restore.restorer import RestoreError, RestoreResult, _Target  # noqa: PLC0415

    tree = await asyncio.to_thread(_load, restorer.images, restorer.lazy_pages, restorer.fds)
    root = tree.entries[0].pid
    lazy = [pid for pid, t in tree.tasks.items() if t.lazy]
    sock: socket.socket | None = None
    if restorer.lazy_pages and lazy:
        sock = await restorer._connect()
    tracer = TracerThread("lazymig-restore-tree")
    started = time.monotonic()
    targets: dict[int, _Target] = {}
    uffds: dict[int, int] = {}
    try:
        root_tracee = await tracer.run(restorer._spawn_and_seize)
        tracees = await tracer.run(_skeleton, root_tracee, tree, restorer.tree_pids)
        for pid, tracee in tracees.items():
            targets[pid] = _Target(tracee)
            targets[pid].in_tree = True
        nonlazy = 0
        shared: dict[int, str] = {}
        for pid, target in targets.items():
            target.shared_from = shared
            nonlazy += await tracer.run(restorer._build, target, tree.tasks[pid])
            # Shared memory this process rebuilt: the next ones open it from here.
            for shmid, vmas in shared_vmas(tree.tasks[pid].mm.vmas).items():
                v = vmas[0]
                shared.setdefault(shmid, f"/proc/{target.pid}/map_files/{v.start:x}-{v.end:x}")
            for inode, fd in target.objects.items():  # memfds, mapped or not
                shared.setdefault(inode, f"/proc/{target.pid}/fd/{fd}")
        for pid in lazy:
            uffds[pid] = await tracer.run(restorer._userfaultfd, targets[pid], tree.tasks[pid])
        if sock is not None:
            for e in tree.entries:
                if e.pid in uffds:
                    await send_task(sock, e.pid, uffds[e.pid])
                elif e.pid in tree.zombies:
                    await send_zombie(sock, e.pid)
            await send_restore_finished(sock)
            assert restorer.process is not None
            # One guardian: should the daemon die it kills the root and every
            # descendant (its uffd stands for all of theirs).
            restorer.guardian = spawn_guardian(sock, next(iter(uffds.values())),
                                               restorer.process.pid)
        for fd in uffds.values():
            os.close(fd)
        uffds.clear()
        # Every process's files before any runs: those they share are taken from
        # the process that restored them first (see restore_files).
        files = TreeFiles()
        for pid, target in targets.items():
            await tracer.run(_restore_files, target, tree.tasks[pid], files)
        for pid in reversed(list(targets)):  # children first
            await tracer.run(restorer._finish, targets[pid], tree.tasks[pid])
    except BaseException as exc:
        for target in targets.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(target.pid, signal.SIGKILL)
        restorer.kill()
        if isinstance(exc, Exception) and not isinstance(exc, LazyMigError):
            raise RestoreError(f"restore of the tree of {root} failed: {exc}") from exc
        raise
    finally:
        for fd in uffds.values():
            os.close(fd)
        tracer.close()
        if sock is not None:
            sock.close()
    assert restorer.process is not None
    result = RestoreResult(
        pid=restorer.process.pid, image_pid=root, nonlazy_pages=nonlazy,
        lazy_pages=sum(r.nr_pages for t in tree.tasks.values() for r in t.lazy),
        seconds=time.monotonic() - started)
    same = sum(1 for old, new in restorer.tree_pids.items() if old == new)
    moved = {old: new for old, new in restorer.tree_pids.items() if old not in (new, root)}
    if moved:
        log.warning("tree of %d: %d processes restored under new pids (%s): their dumped pids "
                    "are taken here (on one machine, by the frozen source); a parent that "
                    "waits for or signals a child by its old pid gets ECHILD or ESRCH",
                    root, len(moved), ", ".join(f"{o}->{n}" for o, n in moved.items()))
    log.info("tree of %d restored in %.3f s: %d processes and %d zombies, %d under their "
             "dumped pids (%s)", root, result.seconds, len(tree.tasks), len(tree.zombies), same,
             ", ".join(f"{old}->{new}" for old, new in restorer.tree_pids.items()))
    return result


# -- tracer thread ------------------------------------------------------------------


def _skeleton(root: Tracee, tree: _Tree, pids: dict[int, int]) -> dict[int, Tracee]:
    """Step 1 and 2: every process forked by its parent's helper; returns the live
    ones' tracees by image pid (the root first, parents before children) and
    fills ``pids`` (image pid: pid here)."""
    first = tree.entries[0]
    pids[first.pid] = root.pid
    tracees = {first.pid: root}
    _own_session(root, first)
    for e in tree.entries[1:]:
        parent = tracees.get(e.ppid)
        if parent is None:
            raise LazyMigError(f"pstree.img lists process {e.pid} before its parent {e.ppid}")
        child = _fork(parent, e.pid)
        pids[e.pid] = child.pid
        if e.pid in tree.zombies:
            _exit_as_zombie(child, tree.zombies[e.pid])
            continue
        tracees[e.pid] = child
        _own_session(child, e)
    for e in tree.entries[1:]:  # members of a group led by another process of the tree
        if e.pid in tracees and e.pgid != e.pid and e.pgid in tracees \
                and os.getpgid(pids[e.pid]) != pids[e.pgid]:
            res = tracees[e.pid].inject_syscall(SYS_SETPGID, 0, pids[e.pgid])
            if res < 0:
                raise LazyMigOSError(-res, f"restoring: setpgid(0, {pids[e.pgid]})",
                                     pid=pids[e.pid])
    return tracees


def _restore_files(target: _Target, task: DumpedTask, files: TreeFiles) -> None:
    """The process's open files (its rlimits come later: until then it may have
    as many fds as its hard limit allows)."""
    _, hard = resource.prlimit(target.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(target.pid, resource.RLIMIT_NOFILE, (hard, hard))
    restore_files(target, task.files, task.given_fds, target.objects, files)


def _own_session(tracee: Tracee, e: PstreeEntry) -> None:
    """A session leader leads a new session, a group leader a new group
    (:func:`lazymig.restore.restorer._set_session`'s rule, at fork time)."""
    args: tuple[int, ...] = ()
    if e.sid == e.pid:
        nr, what = SYS_SETSID, "setsid"
    elif e.pgid == e.pid:
        nr, args, what = SYS_SETPGID, (0, 0), "setpgid(0, 0)"
    else:
        return
    res = tracee.inject_syscall(nr, *args)
    if res < 0:
        raise LazyMigOSError(-res, f"restoring: injected {what}", pid=tracee.pid)


def _fork(parent: Tracee, pid: int) -> Tracee:
    """A child of ``parent`` under ``pid`` if free (clone3 with set_tid), else a
    new pid (fork); seized and stopped before it ran."""
    parent.set_options(PTRACE_O_TRACEFORK)
    try:
        with parent.syscalls() as session, \
                session.scratch_page("restoring: injected mmap") as page:
            write_memory(parent.pid, page, _CLONE_ARGS.pack(
                0, 0, 0, 0, _SIGCHLD, 0, 0, 0, page + _CLONE_ARGS.size, 1)
                + struct.pack("<i", pid))
            child = session.syscall(SYS_CLONE3, page, _CLONE_ARGS.size)
            if child < 0:
                log.debug("process %d gets a new pid (clone3 with set_tid: %s)", pid,
                          os.strerror(-child))
                child = session.syscall(SYS_FORK)
            if child < 0:
                raise LazyMigOSError(-child, f"restoring: fork for process {pid}",
                                     pid=parent.pid)
    finally:
        parent.set_options(0)
    tracee = Tracee.adopt(child, stopped=False)
    tracee.wait_interrupt_stop(timeout=5.0)  # the stop of an auto-attached child
    return tracee


def _exit_as_zombie(child: Tracee, status: int) -> None:
    """Make ``child`` end with wait status ``status`` and leave it unreaped."""
    sig = status & 0x7F
    if sig:
        child.set_sigmask(0)
        os.kill(child.pid, sig)
        child.detach()
    else:
        with contextlib.suppress(TargetGoneError, LazyMigError):
            child.inject_syscall(SYS_EXIT_GROUP, status >> 8 & 0xFF)
        with contextlib.suppress(LazyMigError):
            child.detach()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            state, _ = read_stat(child.pid)
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            return
        time.sleep(0.001)
    raise LazyMigError(f"the zombie {child.pid} did not exit with status {status:#x}")
