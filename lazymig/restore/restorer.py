"""Restoring a process dumped by ``lazymig dump`` (``criu restore``, one process).

How (all ptrace requests on one :class:`~lazymig.linux.ptrace.TracerThread`):

1. A helper process is started (``sleep``, with the restorer's own fds 0, 1
   and 2, or ``stdio``, and the fds of ``inherit_fds``) and seized once it
   sleeps. It forks the restored process under its dumped pid, as the
   restorer's child, in a pid namespace of its own where that pid is taken
   here (:mod:`lazymig.restore.pids`), and is killed; with ``new_pids`` it
   becomes the restored process itself, under its new pid.
2. Its rseq area is unregistered; a two-page scratch mapping holding a
   ``syscall`` instruction is made at an address free in both its map and the
   dumped one, and every later injected syscall runs there.
3. Every mapping of the helper but the scratch one, its vDSO/vvar and
   vsyscall is unmapped; the vDSO and vvar pages are moved (mremap) to where
   the dumped process had them.
4. Each dumped VMA is mapped at its address with its protection: private
   anonymous ones anonymous, file ones (private or shared) from the file
   recorded in ``lazymig-<pid>.img`` at their offset; shared anonymous memory
   and memfds are rebuilt with their contents, one object per shmid
   (:mod:`lazymig.restore.shmem`). The mm fields (brk, stack, args,
   env, auxv, exe) are set at once with ``PR_SET_MM_MAP`` just before, while
   nothing is mapped: the kernel refuses (EBUSY) to switch the exe while the
   old one is mapped, and the old one, the helper's, may be the dumped one.
5. Pages with data in ``pages-1.img`` are written through ``/proc/PID/mem``.
   With ``lazy_pages``, PE_LAZY pages are not: a userfaultfd is created
   inside the process, the VMAs holding lazy pages are registered on it, the restorer
   takes it with ``pidfd_getfd`` and hands it to the lazy-pages daemon
   (:class:`~lazymig.uffd.handover.HandoverSession`, then ``restore finished``);
   a guardian (:mod:`lazymig.guardian`) keeps a duplicate of the uffd and
   that connection, and kills the process should the daemon die.
6. Signal dispositions, the alternate stack, clear-tid address, robust futex
   list, comm, cwd, umask, rlimits, the open files (fds 0-2 too, but those the
   caller gives: see :mod:`lazymig.restore.files`), process group
   and session (see :func:`_set_session`), personality, scheduling policy and
   nice, THP-disable, itimers, credentials (groups, gids, uids) and dumpable
   are set (madvise advice was given with the VMAs; a parent-death signal is
   not restored, see :meth:`Restorer._finish`); the other threads are
   cloned and given their own state (:mod:`lazymig.restore.threads`);
   the scratch mapping goes; rseq is registered again in each thread (after
   the handover: the area may be a lazy page); then each thread's signal
   mask, queued signals, xstate and registers, and every thread is detached.

If anything fails the half-built process is killed; the images are never
written to.

A prepared restore of a pre-copy (:meth:`Restorer.prepare`, :meth:`Restorer.add_round`)
does step 1's helper before the dump, builds the pre-copied memory in it while
the source runs, forks the root inside its address space (``CLONE_VM``), and in
steps 4 and 5 moves those pages into place instead of writing them
(:mod:`lazymig.restore.premap`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import resource
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Final

from lazymig.dump.shmem import is_shared_object
from lazymig.errors import LazyMigError, LazyMigOSError
from lazymig.guardian import spawn_guardian
from lazymig.linux.procfs import fd_path, read_maps, read_syscall
from lazymig.linux.ptrace import InjectionSession, SyscallBatch, Tracee, TracerThread
from lazymig.linux.syscalls import (
    SYS_CHDIR,
    SYS_CLOCK_NANOSLEEP,
    SYS_CLOSE,
    SYS_IOCTL,
    SYS_MADVISE,
    SYS_MMAP,
    SYS_MREMAP,
    SYS_MUNMAP,
    SYS_NANOSLEEP,
    SYS_OPENAT,
    SYS_PERSONALITY,
    SYS_PRCTL,
    SYS_RSEQ,
    SYS_RT_SIGACTION,
    SYS_SCHED_SETSCHEDULER,
    SYS_SETFSGID,
    SYS_SETFSUID,
    SYS_SETGROUPS,
    SYS_SETITIMER,
    SYS_SETPGID,
    SYS_SETPRIORITY,
    SYS_SETRESGID,
    SYS_SETRESUID,
    SYS_SETSID,
    SYS_UMASK,
    SYS_USERFAULTFD,
)
from lazymig.linux.vm import MemoryWriter, copy_fd, read_memory, write_memory
from lazymig.proto.constants import (
    ACTION_SIGNALS,
    KSIGACTION,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    VmaStatus,
)
from lazymig.proto.handover import RestoreFinished, TaskHandover
from lazymig.proto.images import CredsEntry, ImagesDir, PagemapEntry, VmaEntry
from lazymig.proto.uffd import (
    API_STRUCT,
    REGISTER_STRUCT,
    UFFD_API,
    UFFDIO_API,
    UFFDIO_REGISTER,
    Feature,
    RegisterMode,
)
from lazymig.restore.files import restore_files
from lazymig.restore.parent import write_parent_pages
from lazymig.restore.pids import ChildProcess, PidMode, choose, pstree_ids, spawn_root
from lazymig.restore.premap import Move, PreparedMemory, subtract, written_elsewhere
from lazymig.restore.shmem import recreate_tmpfs_files, restore_shared_objects
from lazymig.restore.sockets import take_over_sockets
from lazymig.restore.task import (
    DumpedTask,
    FdInheritance,
    InheritFd,
    UnsupportedDumpError,
    load_task,
)
from lazymig.restore.threads import create_threads, finish_thread, set_thread_state
from lazymig.restore.tree import is_tree, restore_tree
from lazymig.uffd.handover import HandoverSession
from lazymig.uffd.uffd import DEFAULT_FEATURES, kernel_features

__all__ = ["RestoreError", "RestoreResult", "Restorer", "restore"]

log = logging.getLogger(__name__)

_U64: Final = (1 << 64) - 1

_AT_FDCWD: Final = -100
_O_RDONLY: Final = 0
_O_CLOEXEC: Final = 0o2000000
_O_NONBLOCK: Final = 0o4000
_PROT_RWX: Final = 7
_PR_SET_DUMPABLE: Final = 4
_PR_SET_THP_DISABLE: Final = 41
_PRIO_PROCESS: Final = 0
_PR_SET_NAME: Final = 15
_PR_SET_MM: Final = 35
_PR_SET_MM_MAP: Final = 14
_RSEQ_FLAG_UNREGISTER: Final = 1
_WALL: Final = 0x40000000

# The scratch mapping: a syscall instruction at 0, the data area of single calls
# from _DATA, and the area of batched calls (their code, data and table) from _BATCH_AT.
_DATA: Final = 64
_BATCH_AT: Final = 2 * PAGE_SIZE
_SCRATCH_SIZE: Final = _BATCH_AT + (256 << 10)  # ~4,000 calls a batch
_MAP_FLAGS_KEPT: Final = MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_NORESERVE | MAP_LOCKED
_SPECIAL: Final = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")
_NOT_MAPPED_HERE: Final = VmaStatus.VDSO | VmaStatus.VVAR | VmaStatus.VSYSCALL
_PRCTL_MM_MAP: Final = struct.Struct("<11QQII")  # struct prctl_mm_map


class RestoreError(LazyMigError):
    """A restore failed after the process was created; it has been killed."""


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreResult:
    """A restored process."""

    pid: int
    """The restored process's pid as this host sees it: the dumped one, unless the
    restore made it a pid namespace of its own (in which it has the dumped one) or
    gave new pids (``new_pids``)."""
    image_pid: int
    """Its pid at dump time."""
    nonlazy_pages: int
    lazy_pages: int
    seconds: float
    """From starting the helper to detaching the restored process."""
    prepared_pages: int = 0
    """Of ``nonlazy_pages``, those a prepared restore had in place before the freeze
    and moved there (:meth:`Restorer.prepare`)."""
    pid_namespace: int | None = None
    """The pid here of the init (pid 1) of the pid namespace the process was restored
    in, when its dumped pids were taken here (:mod:`lazymig.restore.pids`); None
    when it was restored in the restorer's."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Map:
    start: int
    end: int
    name: str


def _read_maps(pid: int) -> list[_Map]:
    out = []
    for line in read_maps(pid).splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append(_Map(start, end, fields[5].strip() if len(fields) > 5 else ""))
    return out


def _free_gap(busy: Sequence[tuple[int, int]], size: int, *, floor: int = 1 << 32) -> int:
    """The lowest address >= ``floor`` where ``size`` bytes overlap nothing in ``busy``."""
    at = floor
    for start, end in sorted(busy):
        if end <= at:
            continue
        if start >= at + size:
            break
        at = (end + 0xFFFFF) & ~0xFFFFF
    return at


class _Phases:
    """How long each step of a restore took, for the debug log (where the time goes)."""

    def __init__(self, started: float) -> None:
        self._last = started
        self._took: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        now = time.monotonic()
        self._took.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {took * 1e3:.1f} ms" for name, took in self._took)


class _Target:
    """The helper being turned into the restored process (tracer thread only).

    Syscalls run in it one at a time (:meth:`call`) or queued and run together
    in a batch (:meth:`queue`, :meth:`run_queued`): one PTRACE_CONT for up to
    thousands of calls, which is what keeps a process of many mappings quick
    to restore. Inside :meth:`injecting` every call shares one injection
    session (registers and signal mask saved once).
    """

    def __init__(self, tracee: Tracee) -> None:
        self.tracee = tracee
        self.pid = tracee.pid
        self.scratch = 0
        self.objects: dict[int, int] = {}
        """{memfd inode id: its fd here} (restore_shared_objects, for restore_files)."""
        self.in_tree = False
        """A process of a tree: its session and group were made as it was forked."""
        self.shared_from: dict[int, str] = {}
        """{shmid: path} of shared objects another process of its tree rebuilt already."""
        self._session: InjectionSession | None = None
        self._batch: SyscallBatch | None = None
        self._queued: list[tuple[str, int | None, bool]] = []
        """(what, result it must give, only a hint) of each queued call, in order."""
        self._results: list[int] = []

    @contextlib.contextmanager
    def injecting(self) -> Iterator[None]:
        """One injection session over the block, through the scratch mapping's
        ``syscall`` (it must be in place), with a batch area in that mapping."""
        with self.tracee.syscalls(at=self.scratch) as session:
            self._session = session
            self._batch = SyscallBatch(self.scratch + _BATCH_AT, _SCRATCH_SIZE - _BATCH_AT)
            try:
                yield
            finally:
                self._session = self._batch = None
                self._queued.clear()
                self._results.clear()

    def raw(self, nr: int, *args: int) -> int:
        """Syscall ``nr(*args)`` in the process; its result (``-errno`` on failure)."""
        if self._session is not None:
            return self._session.syscall(nr, *args)
        return self.tracee.inject_syscall(nr, *args)

    def call(self, nr: int, *args: int, what: str) -> int:
        res = self.raw(nr, *args)
        if res < 0:
            raise LazyMigOSError(-res, f"restoring: injected {what}", pid=self.pid)
        return res

    def queue(self, nr: int, *args: int, what: str, expect: int | None = None,
              hint: bool = False) -> None:
        """Queue syscall ``nr(*args)`` for the next batch (inside :meth:`injecting`):
        ``expect`` is the result it must give; a failure of a ``hint`` (madvise)
        is only logged. A full batch is run first."""
        assert self._batch is not None, "queue() outside injecting()"
        if not self._batch.fits():
            self._run_batch()
        self._batch.add(nr, *args, what=f"restoring: injected {what}", may_fail=hint)
        self._queued.append((what, expect, hint))

    def queue_data(self, payload: bytes) -> int:
        """Put ``payload`` in the batch area for the next queued call; its address."""
        assert self._batch is not None, "queue_data() outside injecting()"
        if not self._batch.fits(1, len(payload)):
            self._run_batch()
        return self._batch.data(payload)

    def run_queued(self) -> list[int]:
        """Run what is queued; the results of every call queued since the last
        :meth:`run_queued` (a full batch may have run earlier), in order.

        Raises:
            LazyMigOSError: a call failed (the ones after it did not run).
            RestoreError: a call gave another result than it should.
        """
        self._run_batch()
        results, self._results = self._results, []
        return results

    def _run_batch(self) -> None:
        assert self._session is not None and self._batch is not None
        queued, self._queued = self._queued, []
        results = self._session.run_batch(self._batch)
        for res, (name, expect, hint) in zip(results, queued, strict=True):
            if hint and res < 0:
                log.warning("pid %d: %s failed: %s", self.pid, name, os.strerror(-res))
            elif expect is not None and res != expect:
                raise RestoreError(f"{name} gave {res:#x}, not {expect:#x}")
        self._results += results

    def data(self, payload: bytes, offset: int = 0) -> int:
        """Write ``payload`` into the scratch data area; returns its address."""
        if _DATA + offset + len(payload) > _BATCH_AT:
            raise LazyMigOSError(errno.E2BIG, "restoring: scratch area too small", pid=self.pid)
        address = self.scratch + _DATA + offset
        write_memory(self.pid, address, payload)
        return address

    def open(self, path: str, flags: int = _O_RDONLY | _O_CLOEXEC) -> int:
        """openat(AT_FDCWD, path, flags) in the process; its fd."""
        address = self.data(os.fsencode(path) + b"\0")
        return self.call(SYS_OPENAT, _AT_FDCWD, address, flags, 0, what=f"open({path})")

    def close(self, fd: int) -> None:
        """close(fd) in the process."""
        self.call(SYS_CLOSE, fd, what=f"close({fd})")


class Restorer:
    """Restore the process dumped in ``images_dir`` (see the module docstring).

    Args:
        images_dir: the dump.
        lazy_pages: leave PE_LAZY pages to the lazy-pages daemon at ``socket_path``.
        socket_path: the daemon's UNIX socket (default ``<images_dir>/lazy-pages.socket``).
        stdio: fds of the caller that become fds 0, 1, 2 of the restored
            process, whatever they were at dump time (default: the dumped ones).
        inherit_fds: CRIU's ``--inherit-fd fd[N]:NAME``: the caller's fd N
            takes the place of every fd the dumped process had on NAME
            (``pipe:[INO]``, ``socket:[INO]``, a path; the refusal of an
            external fd names it).
        shell_job: CRIU's ``--shell-job``: the dumped fds 0-2 that stayed behind
            (a terminal, a socket, a pipe to another process) become the
            restorer's own (or ``stdio``'s) fds 0-2. Without it, nor ``stdio``
            or ``inherit_fds`` for them, the restore is refused.
        new_pids: restore under new pids; by default every process and thread
            gets its dumped pid back, in a new pid namespace of the restored
            tree's own where those are taken here (:mod:`lazymig.restore.pids`).
    """

    def __init__(self, images_dir: str | os.PathLike[str], *, lazy_pages: bool = False,
                 socket_path: str | os.PathLike[str] | None = None,
                 stdio: tuple[int, int, int] | None = None,
                 inherit_fds: Sequence[InheritFd] = (), shell_job: bool = False,
                 new_pids: bool = False) -> None:
        self.images = ImagesDir(images_dir)
        self.lazy_pages = lazy_pages
        self.socket_path = Path(socket_path) if socket_path is not None else \
            self.images.path / "lazy-pages.socket"
        self.stdio = stdio
        self.fds = FdInheritance(stdio=stdio is not None, inherit=tuple(inherit_fds),
                                 shell_job=shell_job)
        self.new_pids = new_pids
        self.process: subprocess.Popen[bytes] | ChildProcess | None = None
        self.pid_namespace: subprocess.Popen[bytes] | None = None
        """The init of the restored processes' own pid namespace, if they have one."""
        self.guardian: subprocess.Popen[bytes] | None = None
        """With lazy pages, the process guarding the restored one (lazymig.guardian)."""
        self.tree_pids: dict[int, int] = {}
        """A restored tree's pids: {image pid: pid here} (lazymig.restore.tree)."""
        self._taken: list[int] = []  # sockets taken over from the source (restore/sockets.py)
        # A prepared restore (prepare(), add_round()): the process-to-be, seized on
        # its tracer thread, with the pre-copied memory built in it.
        self._prepared: tuple[TracerThread, Tracee, PreparedMemory, list[int]] | None = None
        self._moved = 0  # pages a prepared restore moved into place

    async def prepare(self) -> None:
        """Start the process-to-be now, before the dump ends (a pre-copy's prepared
        destination): the helper that becomes the restored process is spawned and
        seized, and each pre-dump round given to :meth:`add_round` is written into
        it while the source runs. :meth:`run` then only moves those pages into
        place (:mod:`lazymig.restore.premap`). :meth:`kill` ends it if no
        :meth:`run` follows.

        Raises:
            RestoreError: it was prepared already, or the helper did not start.
        """
        if self._prepared is not None:
            raise RestoreError("this restore is prepared already")
        tracer = TracerThread("lazymig-restore")
        try:
            helper = await tracer.run(self._spawn_helper)
        except BaseException:
            tracer.close()
            self.kill()
            raise
        self._prepared = (tracer, helper, PreparedMemory(), self._passed_fds())

    async def add_round(self, round_dir: str | os.PathLike[str]) -> int:
        """Write the pages of pre-dump round ``round_dir`` (a child of the round
        added before it) into the prepared process-to-be; returns how many.

        Raises:
            RestoreError: not prepared.
            ImageError: the round is not the next of the chain, or is damaged.
        """
        if self._prepared is None:
            raise RestoreError("add_round() before prepare()")
        tracer, helper, memory, _ = self._prepared
        return await tracer.run(memory.apply, _Target(helper), Path(round_dir))

    def unprepare(self) -> None:
        """End the prepared process-to-be if :meth:`run` never took it (a migration
        given up before its restore); a no-op otherwise."""
        if self._prepared is not None:
            self.kill()

    def _take_prepared(self, why_not: str) -> tuple[TracerThread, Tracee, PreparedMemory] | None:
        """The prepared process-to-be, or None (and it is killed) when ``why_not``
        says why it cannot be used."""
        if self._prepared is None:
            return None
        if why_not:
            log.warning("the prepared restore is not used (%s): restoring without it", why_not)
            self.kill()  # the helper, and its tracer thread
            return None
        tracer, helper, memory, _ = self._prepared
        self._prepared = None
        return tracer, helper, memory

    async def run(self) -> RestoreResult:
        """Restore; returns once the process runs (detached from the restorer's ptrace).

        Raises:
            UnsupportedDumpError: refused before any process was created.
            RestoreError, LazyMigOSError, BrokenResourceError: the restore failed;
                the half-built process was killed.
        """
        phases = _Phases(time.monotonic())
        # On the source's host, its sockets are taken over (restore/sockets.py).
        self.fds, self._taken = await asyncio.to_thread(take_over_sockets, self.images, self.fds)
        if await asyncio.to_thread(is_tree, self.images):
            self._take_prepared("the dump is of a process tree")
            return await restore_tree(self)
        try:
            task = await asyncio.to_thread(load_task, self.images, lazy_pages=self.lazy_pages,
                                           fds=self.fds)
        except BaseException:
            self._take_prepared("the dump cannot be restored")
            raise
        phases.done("load")
        prepared = self._take_prepared(self._prepared_unfit(task))
        if prepared is not None and (why := prepared[2].usable(self.images.path, task.pid)):
            log.warning("the pages prepared for process %d are not used (%s): they are written "
                        "from the pre-dump chain", task.pid, why)
            prepared[2].forget()
        daemon: HandoverSession | None = None
        try:
            if self.lazy_pages and task.lazy:
                daemon = await self._connect()
                phases.done("connect")
        except BaseException:
            if prepared is not None:
                self._prepared = (*prepared, [])  # kill() ends the traced helper so
                self.kill()
            raise
        tracer = prepared[0] if prepared is not None else TracerThread("lazymig-restore")
        started = time.monotonic()
        try:
            tracee = await tracer.run(self._spawn_and_seize,
                                      prepared[1] if prepared is not None else None)
            phases.done("spawn")
            target = _Target(tracee)
            nonlazy = await tracer.run(self._build, target, task,
                                       prepared[2] if prepared is not None else None)
            phases.done("build")
            uffd = -1
            if task.lazy:
                uffd = await tracer.run(self._userfaultfd, target, task)
                phases.done("uffd")
            try:
                if daemon is not None:
                    await daemon.send(TaskHandover(task.pid, uffd))
                    await daemon.send(RestoreFinished())
                    # Before it runs: should the daemon die, the guardian kills it
                    # rather than let it run on pages that never came.
                    self.guardian = spawn_guardian(daemon, uffd, self._guarded_pid())
            finally:
                if uffd >= 0:
                    os.close(uffd)
            phases.done("handover")
            await tracer.run(self._finish, target, task)
            phases.done("finish")
        except BaseException as exc:
            # SIGKILL while still traced: detached first, the half-built process
            # would run on (and die of SIGSEGV, or worse, run on holes).
            self.kill()
            if isinstance(exc, Exception) and not isinstance(exc, LazyMigError):
                raise RestoreError(f"restore of process {task.pid} failed: {exc}") from exc
            raise
        finally:
            tracer.close()
            if daemon is not None:
                daemon.close()
        assert self.process is not None
        lazy = sum(r.nr_pages for r in task.lazy)
        result = RestoreResult(pid=self.process.pid, image_pid=task.pid, nonlazy_pages=nonlazy,
                               lazy_pages=lazy, seconds=time.monotonic() - started,
                               prepared_pages=self._moved, pid_namespace=self._init_pid())
        log.info("process %d restored as %d in %.3f s (%d pages written, %d lazy)", task.pid,
                 result.pid, result.seconds, nonlazy, lazy)
        log.debug("process %d: restore phases %s", task.pid, phases)
        return result

    def wait(self) -> int:
        """Wait for the restored process to end; its status as ``Popen.returncode``
        (negative: killed by that signal)."""
        if self.process is None:
            raise RestoreError("nothing was restored")
        return self.process.wait()

    def kill(self) -> None:
        """Kill and reap the restored (or half-restored) process, if any, and the
        init of its pid namespace (which kills every process in it); a prepared
        process-to-be that never ran too."""
        self._release_taken()
        prepared, self._prepared = self._prepared, None
        if prepared is not None and self.process is not None:
            # The prepared helper, still traced: Popen.kill() could take a ptrace stop it
            # polls for its end, and then not kill it. It is our unreaped child (the
            # tracer thread never waits without WNOHANG for it to exit).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            prepared[0].close(wait=False)  # a round being written into it fails at once
            _reap(self.process.pid)
            self.process = None
        for process in (self.process, self.pid_namespace):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for process in (self.process, self.pid_namespace):
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)

    def _release_taken(self) -> None:
        for fd in self._taken:
            os.close(fd)
        self._taken = []

    def _guarded_pid(self) -> int:
        """What the guardian kills should the daemon die: the pid namespace's init
        (and so all in it), else the restored process (and its descendants)."""
        process = self.pid_namespace or self.process
        assert process is not None
        return process.pid

    def _init_pid(self) -> int | None:
        return None if self.pid_namespace is None else self.pid_namespace.pid

    async def _connect(self) -> HandoverSession:
        """The handover session with the lazy-pages daemon (BrokenResourceError if none
        listens)."""
        return await HandoverSession.connect(self.socket_path)

    # -- tracer thread -----------------------------------------------------------------

    def _prepared_unfit(self, task: DumpedTask) -> str:
        """Why the prepared process-to-be cannot become ``task`` (empty: it can)."""
        if self._prepared is None:
            return ""
        if self._passed_fds() != self._prepared[3]:
            return "the fds it must inherit changed since it was started"
        return ""

    def _passed_fds(self) -> list[int]:
        """The caller's fds (above 2) the helper inherits."""
        return sorted({i.fd for i in self.fds.inherit if i.fd > 2})

    def _spawn_and_seize(self, prepared: Tracee | None = None) -> Tracee:
        """The process-to-be, seized: the helper (``prepared``, or a new one) or the
        root it forks under the dumped pid (in the helper's address space when it was
        prepared: the memory built there is the root's)."""
        entries = self.images.pstree()
        root = entries[0].pid
        mode = choose(pstree_ids(entries), new_pids=self.new_pids,
                      what=f"{'tree of ' if len(entries) > 1 else 'process '}{root}")
        tracee = prepared if prepared is not None else self._spawn_helper()
        if mode is PidMode.NEW:
            return tracee
        assert isinstance(self.process, subprocess.Popen)
        self.process, tracee, self.pid_namespace = spawn_root(
            self.process, tracee, root, mode, share_memory=prepared is not None)
        return tracee

    def _spawn_helper(self) -> Tracee:
        """Start the restorer's ``sleep`` helper and seize it once it sleeps."""
        sleep = shutil.which("sleep")
        if sleep is None:
            raise RestoreError("no `sleep` executable on PATH to start the restored process from")
        stdin, stdout, stderr = self.stdio if self.stdio is not None else (0, 1, 2)
        passed = self._passed_fds()
        try:
            self.process = subprocess.Popen([sleep, "1000000"], stdin=stdin, stdout=stdout,
                                            stderr=stderr, close_fds=True, pass_fds=passed)
        finally:
            self._release_taken()  # the helper has its own copies
        pid = self.process.pid
        deadline = time.monotonic() + 5.0
        while True:  # seize it once it sleeps: its loader is done with the address space
            blocked = read_syscall(pid, pid)
            if blocked is not None and blocked[0] in (SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP):
                break
            if time.monotonic() > deadline:
                raise RestoreError(f"the helper process {pid} never went to sleep")
            time.sleep(0.001)
        return Tracee.seize(pid)

    def _build(self, target: _Target, task: DumpedTask,
               prepared: PreparedMemory | None = None) -> int:
        """Steps 2-5 but the uffd; returns the number of pages written (or, from
        ``prepared``, moved into place)."""
        tracee, pid = target.tracee, target.pid
        conf = tracee.get_rseq_configuration()
        if conf is not None and conf.rseq_abi_pointer:
            target.call(SYS_RSEQ, conf.rseq_abi_pointer, conf.rseq_abi_size,
                        _RSEQ_FLAG_UNREGISTER, conf.signature, what="rseq(unregister)")
        maps = _read_maps(pid)
        dumped = [(v.start, v.end) for v in task.mm.vmas]
        busy = [(m.start, m.end) for m in maps] + dumped
        windows = prepared.scratch_ranges() if prepared is not None else []
        scratch = _free_gap(busy, _SCRATCH_SIZE)
        got = target.call(SYS_MMAP, scratch, _SCRATCH_SIZE, _PROT_RWX,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0,
                          what="mmap(scratch)")
        if got != scratch:
            raise RestoreError(f"scratch mapping landed at {got:#x}, not {scratch:#x}")
        write_memory(pid, scratch, b"\x0f\x05\xcc")
        tracee.set_syscall_ip(scratch)
        target.scratch = scratch

        moves: list[Move] = []
        with target.injecting():
            for m in maps:
                if m.name not in _SPECIAL:
                    for lo, hi in subtract([(m.start, m.end)], windows):
                        target.queue(SYS_MUNMAP, lo, hi - lo, what=f"munmap({lo:#x})")
            target.run_queued()
            busy.append((scratch, scratch + _SCRATCH_SIZE))
            if prepared is not None:  # out of the way of the dumped VMAs first
                moves = prepared.arrange(target, task.mm.vmas, task.entries, busy)
                busy += prepared.scratch_ranges()
            self._move_vdso(target, task, maps, busy)
            # Before the dumped VMAs: the kernel refuses to switch the exe while the old
            # one is mapped, and the old one (the helper's) may be the dumped exe too.
            # But a deleted exe is the memfd it is carried as: once that is made.
            exe = next((f for f in task.extra.files if f.id == task.mm.exe_file_id), None)
            carried = exe is not None and exe.deleted and exe.inode in task.memfds
            if not carried:
                self._set_mm(target, task)
            recreate_tmpfs_files(self.images, task.mm.vmas, task.extra.files)
            _map_vmas(target, task, {move.vma.start for move in moves})
            if prepared is not None:
                prepared.queue_moves(target, moves)
                for move in moves:
                    v = move.vma
                    for advice in _advice(v.madv):
                        target.queue(SYS_MADVISE, v.start, v.end - v.start, advice,
                                     what=f"madvise({v.start:#x}, {advice})", hint=True)
                prepared.queue_unmap(target)
                target.run_queued()
            shared, target.objects = restore_shared_objects(
                target, self.images, task.mm.vmas, task.memfds,
                lambda size: _free_gap(busy, size),
                lambda start, end, madv: _madvise(target, start, end, madv), target.shared_from)
            if carried:
                assert exe is not None
                self._set_mm(target, task, fd_path("self", target.objects[exe.inode]))
        if prepared is None:
            return shared + self._write_pages(pid, task, task.entries)
        kept = self._moved = sum(hi - lo for m in moves for lo, hi in m.keep) // PAGE_SIZE
        log.info("process %d: %d pre-copied pages moved into place (%d VMAs), %d written "
                 "from the pre-dump chain", task.pid, kept, len(moves),
                 sum(e.nr_pages for e in written_elsewhere(task.entries, moves)))
        return shared + kept + self._write_pages(pid, task, written_elsewhere(task.entries,
                                                                              moves))

    def _move_vdso(self, target: _Target, task: DumpedTask, maps: Sequence[_Map],
                   busy: list[tuple[int, int]]) -> None:
        """mremap the helper's vvar+vdso block to the dumped block's address.

        A dumped process may lack some of them (valgrind unmaps its vDSO, keeping the
        vvar pages): the helper's are paired with the dumped ones by kind, in order,
        and those the dumped process did not have are unmapped."""
        mine = [m for m in maps if m.name in ("[vdso]", "[vvar]", "[vvar_vclock]")]
        theirs = [v for v in task.mm.vmas if v.status & (VmaStatus.VDSO | VmaStatus.VVAR)]
        if [m.name == "[vdso]" for m in mine] != [bool(v.status & VmaStatus.VDSO)
                                                   for v in theirs]:
            mine = self._drop_missing_vdso(target, mine, theirs)
        if not theirs:
            return
        shape_mine = [(m.start - mine[0].start, m.end - m.start) for m in mine]
        shape_theirs = [(v.start - theirs[0].start, v.end - v.start) for v in theirs]
        if shape_mine != shape_theirs:
            raise UnsupportedDumpError(
                f"the dumped vDSO/vvar layout {shape_theirs} differs from this kernel's "
                f"{shape_mine}: vDSO proxying is not implemented")
        src, dst = mine[0].start, theirs[0].start
        size = mine[-1].end - src
        if src == dst:
            return
        steps = [dst]
        if src < dst + size and dst < src + size:  # overlapping: go through a free place
            steps.insert(0, _free_gap([*busy, (src, src + size)], size))
        for to in steps:
            for off, length in shape_mine:
                target.call(SYS_MREMAP, src + off, length, length,
                            MREMAP_MAYMOVE | MREMAP_FIXED, to + off, what="mremap(vdso)")
            src = to

    @staticmethod
    def _drop_missing_vdso(target: _Target, mine: list[_Map], theirs: list[VmaEntry]
                           ) -> list[_Map]:
        """Unmap the helper's vDSO or vvar pages of kinds the dumped process did not
        have (all of them if it had none); the rest, to be moved as one block."""
        want_vdso = sum(1 for v in theirs if v.status & VmaStatus.VDSO)
        want_vvar = len(theirs) - want_vdso
        kept: list[_Map] = []
        for m in mine:
            vdso = m.name == "[vdso]"
            if (want_vdso if vdso else want_vvar) > 0:
                kept.append(m)
                if vdso:
                    want_vdso -= 1
                else:
                    want_vvar -= 1
            else:  # the dumped process had none such: neither will the restored one
                target.call(SYS_MUNMAP, m.start, m.end - m.start, what="munmap(vdso)")
        return kept

    def _set_mm(self, target: _Target, task: DumpedTask, exe: str | None = None) -> None:
        """PR_SET_MM_MAP: the mm's fields, auxv and exe (its dumped path, or ``exe``)."""
        mm = task.mm
        exe_fd = target.open(exe or task.file_path(mm.exe_file_id))
        try:
            auxv = struct.pack(f"<{len(mm.mm_saved_auxv)}Q", *mm.mm_saved_auxv)
            auxv_at = target.data(auxv, 256)
            mm_map = _PRCTL_MM_MAP.pack(
                mm.mm_start_code, mm.mm_end_code, mm.mm_start_data, mm.mm_end_data,
                mm.mm_start_brk, mm.mm_brk, mm.mm_start_stack, mm.mm_arg_start, mm.mm_arg_end,
                mm.mm_env_start, mm.mm_env_end, auxv_at, len(auxv), exe_fd)
            at = target.data(mm_map)
            target.call(SYS_PRCTL, _PR_SET_MM, _PR_SET_MM_MAP, at, len(mm_map), 0,
                        what="prctl(PR_SET_MM_MAP)")
        finally:
            target.call(SYS_CLOSE, exe_fd, what="close")

    def _write_pages(self, pid: int, task: DumpedTask, parent: Sequence[PagemapEntry]) -> int:
        """Write the pages with data in the pages image (but the lazy ones, with
        ``lazy_pages``), and the in-parent ones of ``parent`` from the parent chain;
        returns how many. The image is mapped and handed to ``process_vm_writev`` as
        it is: one copy, and no syscall per entry."""
        skip = [(v.start, v.end) for v in task.mm.vmas if v.status & _NOT_MAPPED_HERE]
        pieces: list[tuple[int, int, int]] = []  # (address, offset in the image, length)
        offset = 0
        for e in task.entries:
            if not e.has_data:
                continue
            length = e.nr_pages * PAGE_SIZE
            if not ((self.lazy_pages and e.is_lazy) or any(s <= e.vaddr < end for s, end in skip)):
                pieces.append((e.vaddr, offset, length))
            offset += length
        if pieces:
            path = self.images.pages_path(task.pages_id)
            with open(path, "rb") as pages:
                size = os.fstat(pages.fileno()).st_size
                if size < offset:
                    raise RestoreError(f"{path} holds {size} bytes; the pagemap needs {offset}")
                # ACCESS_COPY: writable to us (ctypes takes only writable buffers), never
                # written.
                with mmap.mmap(pages.fileno(), size, access=mmap.ACCESS_COPY) as image, \
                        MemoryWriter(pid) as memory:
                    memory.write_pieces(image, pieces)
        written = sum(n for _, _, n in pieces) // PAGE_SIZE
        return written + write_parent_pages(pid, self.images, task.pid, parent)

    def _userfaultfd(self, target: _Target, task: DumpedTask) -> int:
        """Create and register the uffd in the target; returns the restorer's copy."""
        fd = target.call(SYS_USERFAULTFD, _O_CLOEXEC | _O_NONBLOCK, what="userfaultfd")
        try:
            features = int(DEFAULT_FEATURES | (kernel_features() & Feature.THREAD_ID))
            at = target.data(API_STRUCT.pack(UFFD_API, features, 0))
            target.call(SYS_IOCTL, fd, UFFDIO_API, at, what="ioctl(UFFDIO_API)")
            with target.injecting():
                for r in _lazy_vmas(task):
                    at = target.queue_data(REGISTER_STRUCT.pack(r[0], r[1] - r[0],
                                                                RegisterMode.MISSING, 0))
                    target.queue(SYS_IOCTL, fd, UFFDIO_REGISTER, at,
                                 what=f"ioctl(UFFDIO_REGISTER {r[0]:#x}-{r[1]:#x})")
                target.run_queued()
            mine = copy_fd(target.pid, fd)
        finally:
            target.call(SYS_CLOSE, fd, what="close(uffd)")
        return int(mine)

    def _finish(self, target: _Target, task: DumpedTask) -> None:
        """Step 6: everything but memory, then detach."""
        tracee, pid = target.tracee, target.pid
        core, tc = task.core, task.core.tc
        thread = core.thread_core
        with target.injecting():
            for sig, sa in zip(ACTION_SIGNALS, tc.sigactions, strict=False):
                at = target.queue_data(struct.pack(KSIGACTION, sa.sigaction, sa.flags,
                                                   sa.restorer, sa.mask))
                target.queue(SYS_RT_SIGACTION, sig, at, 0, 8, what=f"rt_sigaction({sig})")
            # With the sigactions, in one batch: each single injected call is a round
            # trip to the tracee, and a busy machine makes each one slow.
            comm = (tc.comm or thread.comm).encode()[:15] + b"\0"
            target.queue(SYS_PRCTL, _PR_SET_NAME, target.queue_data(comm),
                         what="prctl(PR_SET_NAME)")
            if task.extra.HasField("cwd"):
                target.queue(SYS_CHDIR, target.queue_data(os.fsencode(task.extra.cwd) + b"\0"),
                             what=f"chdir({task.extra.cwd})")
            if task.extra.HasField("umask"):
                target.queue(SYS_UMASK, task.extra.umask, what="umask")  # the old one: >= 0
            target.run_queued()
            set_thread_state(target, tracee, core)
            for which, rl in enumerate(tc.rlimits.rlimits):
                try:
                    resource.prlimit(pid, which, (_rlim(rl.cur), _rlim(rl.max)))
                except (OSError, ValueError) as exc:  # raising a hard limit: CAP_SYS_RESOURCE
                    log.warning("pid %d: rlimit %d not restored to %s: %s", pid, which,
                                (rl.cur, rl.max), exc)
            if not target.in_tree:  # a tree's processes got theirs together (restore/tree.py)
                restore_files(target, task.files, task.given_fds, target.objects)
                _set_session(target, task)
            _set_sched_and_timers(target, task)
            target.run_queued()
            # Before the creds: asking for a tid (clone3 set_tid) needs the privilege they
            # drop.
            others = create_threads(target, task.threads, new_tids=self.new_pids)
            if thread.HasField("creds"):  # each thread's (a raw setresuid sets the caller's)
                # The other threads' first: the leader's are batched with the dumpable
                # flag, which must come after them all.
                for t, dumped in zip(others, task.threads, strict=True):
                    own = dumped.core.thread_core
                    _set_thread_creds(target, t, own.creds if own.HasField("creds")
                                      else thread.creds)
                _queue_creds(target, thread.creds)
            if task.mm.HasField("dumpable"):  # after the creds: changing them resets it
                target.queue(SYS_PRCTL, _PR_SET_DUMPABLE, task.mm.dumpable,
                             what="PR_SET_DUMPABLE")
            target.run_queued()
        if thread.pdeath_sig:
            # Recorded (core's pdeath_sig) but not restored, on purpose. It asks for
            # a signal when the *original* parent dies; that parent stays on the
            # source host and nothing here can tell of its death. Set here, the
            # kernel would tie it to the thread that forked the helper, the
            # restorer's tracer thread: it would fire as soon as the restore ends
            # (and `restore -d` exits), killing a process that was migrated fine.
            log.warning("pid %d: parent-death signal %d not restored: its parent stays on "
                        "the source host, and here it would fire when the restorer ends",
                        pid, thread.pdeath_sig)
        # The scratch mapping goes; the dumped vDSO (now in place) has a syscall insn.
        vdso_ip = _vdso_syscall_ip(pid, task)
        for t in (tracee, *others):
            t.set_syscall_ip(vdso_ip)
        target.call(SYS_MUNMAP, target.scratch, _SCRATCH_SIZE, what="munmap(scratch)")
        for t, dumped in zip(others, task.threads, strict=True):
            finish_thread(t, dumped.core, dumped.xstate)
        finish_thread(tracee, core, task.xstate, shared_signals=True)
        # The leader first: a group stop it enters holds the others as they are detached.
        tracee.detach(signal.SIGSTOP if task.extra.job_stopped else 0)
        for t in others:
            t.detach()


def _reap(pid: int, timeout: float = 5.0) -> None:
    """Reap child ``pid``, killed and perhaps traced (its ptrace stops are not its end)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG | _WALL)
        except ChildProcessError:
            return
        if got and not os.WIFSTOPPED(status):
            return
        if time.monotonic() > deadline:
            log.warning("process %d not reaped %g s after SIGKILL", pid, timeout)
            return
        time.sleep(0.005)


def _vdso_syscall_ip(pid: int, task: DumpedTask) -> int | None:
    """A ``syscall`` instruction in the dumped vDSO (moved into place by _move_vdso),
    for the calls injected once the scratch mapping is gone; None if it has none (each
    thread then searches its mappings, reading /proc/PID/maps: 5,000 lines for a
    process of 5,000 mappings, once per thread)."""
    for v in task.mm.vmas:
        if v.status & VmaStatus.VDSO and v.prot & mmap.PROT_EXEC:
            at = read_memory(pid, v.start, v.end - v.start).find(b"\x0f\x05")
            if at >= 0:
                return v.start + at
    return None


def _map_vmas(target: _Target, task: DumpedTask, moved: Collection[int] = ()) -> None:
    """Step 4 but the shared objects, in batches: private anonymous VMAs
    anonymous (but those starting at ``moved``: a prepared restore moves them into
    place), file ones (private or shared) from their file, opened once for
    its VMAs (at most ``_files_per_batch()`` files open at a time).

    Two VMAs of one file that touch get two opens of it: the kernel merges
    adjacent mappings of the same open file, and they were two VMAs when dumped.
    """
    files: dict[tuple[str, int, int], list[VmaEntry]] = {}
    anonymous: list[VmaEntry] = []
    prev: tuple[int, tuple[str, int, int]] | None = None  # (end, key) of the last file VMA
    for v in task.mm.vmas:
        if v.status & _NOT_MAPPED_HERE or is_shared_object(v.status):
            continue  # see _move_vdso and restore_shared_objects
        if not v.status & (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED):
            if v.start not in moved:
                anonymous.append(v)
            continue
        # Shared: the same file, opened as it was (writes reach it).
        mode = v.fdflags & os.O_ACCMODE if v.status & VmaStatus.FILE_SHARED else _O_RDONLY
        key = (task.file_path(v.shmid), mode, 0)
        if prev is not None and prev[0] == v.start and prev[1][:2] == key[:2]:
            key = (*key[:2], 1 - prev[1][2])
        files.setdefault(key, []).append(v)
        prev = (v.end, key)
    for v in anonymous:
        _queue_mmap(target, v, -1)
    opened = list(files.items())
    step = _files_per_batch()
    for i in range(0, len(opened), step):
        chunk = opened[i:i + step]
        for (path, mode, _), _ in chunk:
            target.queue(SYS_OPENAT, _AT_FDCWD, target.queue_data(os.fsencode(path) + b"\0"),
                         mode | _O_CLOEXEC, 0, what=f"open({path})")
        fds = target.run_queued()[-len(chunk):]
        for fd, (_, vmas) in zip(fds, chunk, strict=True):
            for v in vmas:
                _queue_mmap(target, v, fd)
        for fd in fds:
            target.queue(SYS_CLOSE, fd, what=f"close({fd})")
    target.run_queued()


def _queue_mmap(target: _Target, v: VmaEntry, fd: int) -> None:
    """Queue the mmap of ``v`` (from ``fd``, or anonymous if -1) and its madvise."""
    flags = (v.flags & _MAP_FLAGS_KEPT) | MAP_FIXED
    if fd < 0:
        target.queue(SYS_MMAP, v.start, v.end - v.start, v.prot, flags | MAP_ANONYMOUS, -1, 0,
                     what=f"mmap({v.start:#x}-{v.end:#x})", expect=v.start)
    else:
        if v.status & VmaStatus.FILE_SHARED:
            flags = (flags & ~MAP_PRIVATE) | MAP_SHARED
        target.queue(SYS_MMAP, v.start, v.end - v.start, v.prot, flags & ~MAP_ANONYMOUS, fd,
                     v.pgoff, what=f"mmap({v.start:#x}-{v.end:#x})", expect=v.start)
    for advice in _advice(v.madv):
        target.queue(SYS_MADVISE, v.start, v.end - v.start, advice,
                     what=f"madvise({v.start:#x}-{v.end:#x}, {advice})", hint=True)


def _files_per_batch() -> int:
    """Files opened at a time while mapping: well below the fd limit the helper
    inherited from us."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min(256, soft // 2))


def _advice(madv: int) -> list[int]:
    """The madvise advice numbers whose bits are set in ``vma_entry.madv``."""
    return [advice for advice in range(madv.bit_length()) if madv >> advice & 1]


def _madvise(target: _Target, start: int, end: int, madv: int) -> None:
    """madvise each advice whose bit is set in ``vma_entry.madv`` (a failure is logged:
    the advice is a hint, and KSM or THP may be off here)."""
    for advice in _advice(madv):
        res = target.raw(SYS_MADVISE, start, end - start, advice)
        if res < 0:
            log.warning("pid %d: madvise(%#x-%#x, %d) failed: %s", target.pid, start, end,
                        advice, os.strerror(-res))


def _set_session(target: _Target, task: DumpedTask) -> None:
    """Process group and session on the new host, by this rule:

    * a session leader (sid == pid at dump time) leads a new session, and so a
      new process group, with its new pid as their id (``setsid``); it has no
      controlling terminal;
    * a process group leader (pgid == pid) leads a new process group in the
      restorer's session (``setpgid(0, 0)``);
    * any other process joins the restorer's group and session (where the
      helper it is built from already is): the group and session it was in
      are made of processes that stay on the source host, and their ids name
      nothing here.
    """
    if task.sid == task.pid:
        target.queue(SYS_SETSID, what="setsid")
    elif task.pgid == task.pid:
        target.queue(SYS_SETPGID, 0, 0, what="setpgid(0, 0)")


def _set_sched_and_timers(target: _Target, task: DumpedTask) -> None:
    """Queue personality, scheduling policy and nice, THP-disable, itimers."""
    tc, thread = task.core.tc, task.core.thread_core
    # personality() returns the old persona: any value but -1 (not an errno) is fine.
    target.queue(SYS_PERSONALITY, tc.personality, what="personality")
    if thread.HasField("sched_policy"):
        at = target.queue_data(struct.pack("<i", thread.sched_prio))
        target.queue(SYS_SCHED_SETSCHEDULER, 0, thread.sched_policy, at,
                     what="sched_setscheduler")
    if thread.HasField("sched_nice"):
        target.queue(SYS_SETPRIORITY, _PRIO_PROCESS, 0, thread.sched_nice, what="setpriority")
    if task.mm.thp_disabled:
        target.queue(SYS_PRCTL, _PR_SET_THP_DISABLE, 1, 0, 0, 0, what="PR_SET_THP_DISABLE")
    if tc.HasField("timers"):
        for which, t in enumerate((tc.timers.real, tc.timers.virt, tc.timers.prof)):
            if t.isec or t.iusec or t.vsec or t.vusec:
                at = target.queue_data(struct.pack("<4q", t.isec, t.iusec, t.vsec, t.vusec))
                target.queue(SYS_SETITIMER, which, at, 0, what=f"setitimer({which})")


def _queue_creds(target: _Target, c: CredsEntry) -> None:
    """Queue the leader's groups, gids, then uids (last: dropping root drops the right
    to change them); setfsgid and setfsuid return the old id, never an errno."""
    groups = struct.pack(f"<{len(c.groups)}I", *c.groups)
    target.queue(SYS_SETGROUPS, len(c.groups), target.queue_data(groups) if groups else 0,
                 what="setgroups")
    target.queue(SYS_SETRESGID, c.gid, c.egid, c.sgid, what="setresgid")
    target.queue(SYS_SETFSGID, c.fsgid, what="setfsgid")
    target.queue(SYS_SETRESUID, c.uid, c.euid, c.suid, what="setresuid")
    target.queue(SYS_SETFSUID, c.fsuid, what="setfsuid")


def _set_thread_creds(target: _Target, tracee: Tracee, c: CredsEntry) -> None:
    """The same for another thread ``tracee``, in one injection session of its own
    (a raw setresuid sets the calling thread's creds only)."""
    with tracee.syscalls(at=target.scratch) as session:
        def call(nr: int, *args: int, what: str) -> None:
            res = session.syscall(nr, *args)
            if res < 0:
                raise LazyMigOSError(-res, f"restoring thread {tracee.tid}: injected {what}",
                                     pid=target.pid)

        groups = struct.pack(f"<{len(c.groups)}I", *c.groups)
        call(SYS_SETGROUPS, len(c.groups), target.data(groups) if groups else 0,
             what="setgroups")
        call(SYS_SETRESGID, c.gid, c.egid, c.sgid, what="setresgid")
        session.syscall(SYS_SETFSGID, c.fsgid)  # returns the old fsgid
        call(SYS_SETRESUID, c.uid, c.euid, c.suid, what="setresuid")
        session.syscall(SYS_SETFSUID, c.fsuid)


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value >= _U64 else value


def _lazy_vmas(task: DumpedTask) -> list[tuple[int, int]]:
    """The ``[start, end)`` of every VMA holding lazy pages: registered whole, as
    CRIU's restorer does. Registering each lazy run would split a VMA at every
    run (16,384 one-page runs: 32,767 VMAs, close to the kernel's default
    ``vm.max_map_count``); a page of it that was never dumped faults to the
    daemon, which gives it the zero page, until the transfer ends."""
    starts = [v.start for v in task.mm.vmas]
    spans: dict[int, int] = {}
    for vaddr, _ in task.lazy:
        v = task.mm.vmas[bisect.bisect_right(starts, vaddr) - 1]
        spans[v.start] = v.end
    return sorted(spans.items())


async def restore(images_dir: str | os.PathLike[str], *, lazy_pages: bool = False,
                  socket_path: str | os.PathLike[str] | None = None,
                  stdio: tuple[int, int, int] | None = None,
                  inherit_fds: Sequence[InheritFd] = (), shell_job: bool = False,
                  new_pids: bool = False) -> RestoreResult:
    """Restore the process dumped in ``images_dir``; see :class:`Restorer`."""
    return await Restorer(images_dir, lazy_pages=lazy_pages, socket_path=socket_path,
                          stdio=stdio, inherit_fds=inherit_fds, shell_job=shell_job,
                          new_pids=new_pids).run()
