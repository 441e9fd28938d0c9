"""Restoring a dumped process tree (``pstree.img`` with more than one entry).

How (every ptrace request on one tracer thread; see :mod:`lazymig.restore.restorer`
for how one process is rebuilt):

1. **The skeleton.** The root's helper is started and seized as for one
   process, under its dumped pid (:mod:`lazymig.restore.pids`). Then, in
   ``pstree.img`` order (parents before children), each process is forked by
   its parent's helper, before anything of the parent is rebuilt: a
   ``clone3`` injected into the parent, with ``set_tid`` asking for the dumped
   pid (a plain new pid with ``new_pids``). The parent is traced with
   ``PTRACE_O_TRACEFORK``, so the child arrives seized and stopped before it
   runs one instruction: a copy of the helper, ready to be rebuilt. Sessions
   and groups are made as they are forked: a session leader calls ``setsid``
   (before it forks the members of its session), a group leader
   ``setpgid(0, 0)``; once every process exists, the others join their group
   (``setpgid(0, pgid)``). A process whose session or group was outside the
   dumped tree is in the restorer's, as for one process.
2. **Zombies** are forked the same way and exit at once with their dumped
   status (``exit_group`` injected into them, or the signal that killed
   them): their parent finds them as it left them, not reaped.
3. Every live process is then rebuilt like a single one (memory, uffd, mm,
   files, threads, registers), its uffd handed to the daemon under its image
   pid (zombies are announced as such), one guardian covering the root and its
   descendants (or the whole pid namespace), and each is detached, the
   children first. The files of every process come before any is detached:
   the descriptions, pipes and shared objects processes shared are taken from
   the one that restored them (:class:`~lazymig.restore.files.TreeFiles`).

**Pids.** Every process and thread gets its dumped pid back, so a parent that
waits for a child by pid (``waitpid(pid)``: a shell waiting for its
foreground job), or signals it by pid, goes on as it was. Where they are free
here (across hosts, or once the source is gone) they are taken in the
restorer's pid namespace; where some are taken (on one machine, by the frozen
source) the tree is restored in a new pid namespace of its own, with a small
init as its pid 1: its processes see their dumped pids, this host sees others
(``Restorer.tree_pids``). With ``new_pids`` every process gets a new pid, and
such a parent gets ECHILD or ESRCH (``waitpid(-1)`` works).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import time
from typing import TYPE_CHECKING

from lazymig.errors import LazyMigError, LazyMigOSError
from lazymig.guardian import spawn_guardian
from lazymig.linux.procfs import fd_path, map_file_path, read_stat
from lazymig.linux.ptrace import TargetGoneError, Tracee, TracerThread
from lazymig.linux.syscalls import SYS_EXIT_GROUP, SYS_SETPGID, SYS_SETSID
from lazymig.proto.constants import TASK_DEAD
from lazymig.proto.handover import RestoreFinished, TaskHandover, ZombieTask
from lazymig.proto.images import ImagesDir, PstreeEntry
from lazymig.restore.files import TreeFiles, restore_files
from lazymig.restore.pids import fork
from lazymig.restore.shmem import shared_vmas
from lazymig.restore.task import DumpedTask, FdInheritance, load_process
from lazymig.uffd.handover import HandoverSession

if TYPE_CHECKING:
    from lazymig.restore.restorer import Restorer, RestoreResult, _Target

__all__ = ["TASK_DEAD", "is_tree", "restore_tree"]

log = logging.getLogger(__name__)



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
            tasks[e.pid] = load_process(images, e, lazy_pages=lazy_pages, fds=fds, core=core)
    return _Tree(entries, tasks, zombies)


async def restore_tree(restorer: Restorer) -> RestoreResult:
    """Restore the tree dumped in ``restorer.images`` (see the module docstring);
    the result is the root's. ``restorer.tree_pids`` maps image pids to the
    restored ones. On failure every process created is killed."""
    from lazymig.restore.restorer import RestoreError, RestoreResult, _Target  # noqa: PLC0415

    tree = await asyncio.to_thread(_load, restorer.images, restorer.lazy_pages, restorer.fds)
    root = tree.entries[0].pid
    lazy = [pid for pid, t in tree.tasks.items() if t.lazy]
    daemon: HandoverSession | None = None
    if restorer.lazy_pages and lazy:
        daemon = await restorer._connect()
    tracer = TracerThread("lazymig-restore-tree")
    started = time.monotonic()
    targets: dict[int, _Target] = {}
    uffds: dict[int, int] = {}
    try:
        root_tracee = await tracer.run(restorer._spawn_and_seize)
        tracees = await tracer.run(_skeleton, root_tracee, tree, restorer.tree_pids,
                                   restorer.new_pids)
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
                shared.setdefault(shmid, map_file_path(target.pid, v.start, v.end))
            for inode, fd in target.objects.items():  # memfds, mapped or not
                shared.setdefault(inode, fd_path(target.pid, fd))
        for pid in lazy:
            uffds[pid] = await tracer.run(restorer._userfaultfd, targets[pid], tree.tasks[pid])
        if daemon is not None:
            for e in tree.entries:
                if e.pid in uffds:
                    await daemon.send(TaskHandover(e.pid, uffds[e.pid]))
                elif e.pid in tree.zombies:
                    await daemon.send(ZombieTask(e.pid))
            await daemon.send(RestoreFinished())
            # One guardian: should the daemon die it kills the root and every
            # descendant, or the whole pid namespace (its uffd stands for all of theirs).
            restorer.guardian = spawn_guardian(daemon, next(iter(uffds.values())),
                                               restorer._guarded_pid())
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
        if daemon is not None:
            daemon.close()
    assert restorer.process is not None
    result = RestoreResult(
        pid=restorer.process.pid, image_pid=root, nonlazy_pages=nonlazy,
        lazy_pages=sum(r.nr_pages for t in tree.tasks.values() for r in t.lazy),
        seconds=time.monotonic() - started, pid_namespace=restorer._init_pid())
    log.info("tree of %d restored in %.3f s: %d processes and %d zombies (dumped pid: pid "
             "here %s)", root, result.seconds, len(tree.tasks), len(tree.zombies),
             ", ".join(f"{old}:{new}" for old, new in restorer.tree_pids.items()))
    return result


# -- tracer thread ------------------------------------------------------------------


def _skeleton(root: Tracee, tree: _Tree, pids: dict[int, int],
              new_pids: bool) -> dict[int, Tracee]:
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
        child = fork(parent, None if new_pids else e.pid)
        pids[e.pid] = child.pid
        if e.pid in tree.zombies:
            _exit_as_zombie(child, tree.zombies[e.pid])
            continue
        tracees[e.pid] = child
        _own_session(child, e)
    for e in tree.entries[1:]:  # members of a group led by another process of the tree
        if e.pid in tracees and e.pgid != e.pid and e.pgid in tracees \
                and os.getpgid(pids[e.pid]) != pids[e.pgid]:
            pgid = pids[e.pgid] if new_pids else e.pgid  # as the process sees it
            res = tracees[e.pid].inject_syscall(SYS_SETPGID, 0, pgid)
            if res < 0:
                raise LazyMigOSError(-res, f"restoring: setpgid(0, {pgid})", pid=pids[e.pid])
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
