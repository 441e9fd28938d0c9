"""Reopening a dumped process's files inside the process being restored.

:func:`restore_files` (tracer thread, injected syscalls) rebuilds the files
:func:`~lazymig.restore.task.load_task` read and checked:

1. per pipe: ``pipe2`` inside the process, both ends moved above every dumped
   fd number; the restorer opens the write end through /proc/PID/fd, sets the
   capacity and writes the queued data back; per unix socketpair the same
   (:class:`~lazymig.restore.anon_files.AnonFiles`);
2. per open file description: ``openat`` of its path (of a memfd, the one
   :mod:`lazymig.restore.shmem` rebuilt, through /proc/self/fd) with the
   dumped status flags and ``lseek`` to the dumped offset (of a named FIFO: see
   :func:`_open_fifo`), or for a pipe end the end pipe2
   made with its status flags set (see :func:`_pipe_end`), or an event-loop
   file made again (eventfd, epoll, timerfd, signalfd, a socketpair's end:
   :mod:`lazymig.restore.anon_files`); then ``dup3`` onto
   each of its fd numbers with its close-on-exec flag: fds that shared a
   description share it again;
3. the staging pipe ends are closed: a pipe end the process had not kept (a
   read end whose writers were closed) is closed again;
4. once every fd is in place, each epoll's registrations are added again.

In a tree every process gets its files before any runs
(:mod:`lazymig.restore.tree`), and what processes shared they share again
(:class:`TreeFiles`): a description another process restored already is taken
from it with ``pidfd_getfd`` (injected), and an end of a pipe another process
made is opened through that process's /proc fd link, so each pipe is made
once, with its data, wherever it was.

fds 0, 1 and 2 are restored as the others. The caller may hand the restored
process fds of its own instead (:class:`~lazymig.restore.task.FdInheritance`, planned by
:func:`~lazymig.restore.task.plan_given_fds`): ``stdio`` replaces fds 0, 1 and 2, ``--inherit-fd
fd[N]:NAME`` every fd of the dumped file NAME, ``--shell-job`` the external
ones among fds 0-2 (a terminal, a socket or a pipe that stayed on the source
host) with the restorer's own. The helper the process is built from holds
them (Popen's stdio and ``pass_fds``); they are moved above every dumped fd
first, then ``dup3``'d where they belong, and whatever else of the helper's
is closed.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import struct
import termios
from collections.abc import Mapping
from typing import Final, Protocol

from lazymig.dump.files import FD_CLOEXEC, FL_FLOCK, FL_OFD, FL_POSIX, STDIO_FDS, DumpedFiles
from lazymig.errors import ImageError, LazyMigOSError
from lazymig.linux.procfs import fd_path, ns_pids
from lazymig.linux.syscalls import (
    SYS_DUP3,
    SYS_FCNTL,
    SYS_FLOCK,
    SYS_LSEEK,
    SYS_PIDFD_GETFD,
    SYS_PIDFD_OPEN,
    SYS_PIPE2,
)
from lazymig.linux.vm import read_memory, set_pipe_size
from lazymig.proto.images import FileEntry, PipeDataEntry, fdinfo_pb2
from lazymig.restore.anon_files import ANON_TYPES, AnonFiles

__all__ = ["SyscallTarget", "TreeFiles", "restore_files"]

log = logging.getLogger(__name__)

_SETFL_MASK: Final = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME
_F_OFD_SETLK: Final = 37
_LOCK_SH: Final = 1
_LOCK_EX: Final = 2
_LOCK_NB: Final = 4


class SyscallTarget(Protocol):
    """The process being restored, as the restorer drives it (tracer thread)."""

    pid: int

    def call(self, nr: int, *args: int, what: str) -> int:
        """Inject syscall ``nr``; its result, or LazyMigOSError."""
        ...

    def data(self, payload: bytes, offset: int = 0) -> int:
        """Put ``payload`` in the process's scratch area; its address."""
        ...

    def open(self, path: str, flags: int) -> int:
        """openat(AT_FDCWD, path, flags) in the process; its fd."""
        ...

    def close(self, fd: int) -> None:
        """close(fd) in the process."""
        ...


@dataclasses.dataclass(slots=True)
class TreeFiles:
    """What the processes of a tree restored so far hold, for the next ones to
    share (every process of the tree stays stopped until all have their files)."""

    descriptions: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """{file id: (pid, fd)}: a fd on each open file description restored."""
    pipes: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """{pipe id: (pid, fd)}: a fd on either end of each pipe restored."""
    fifos: set[int] = dataclasses.field(default_factory=set)
    """The named FIFOs (inode ids) whose queued data is back."""


def restore_files(target: SyscallTarget, files: DumpedFiles,
                  given: Mapping[int, int] | None = None,
                  memfds: Mapping[int, int] | None = None,
                  tree: TreeFiles | None = None) -> None:
    """Rebuild ``files`` in ``target`` (see the module docstring), with the helper's
    fds in ``given`` (``DumpedTask.given_fds``) in place of the dumped ones, and
    the memfds rebuilt already (``memfds``: {inode id: fd}; closed here). In a
    tree (``tree``), a description another process restored already is taken
    from it (``pidfd_getfd``: one description again), an end of a pipe it made
    is opened through its /proc fd (one pipe again), and what this one restores
    is added. Run it on the tracer thread, after
    :func:`~lazymig.restore.task.check_files`."""
    given = dict(given or {})
    tree = tree if tree is not None else TreeFiles()
    dumped = {e.fd for e in files.fds}
    objects = dict(memfds or {})
    top = max([*dumped, *given.values(), *objects.values(), STDIO_FDS]) + 1
    for inode, fd in sorted(objects.items()):  # out of the way of the dumped fd numbers
        objects[inode] = target.call(SYS_FCNTL, fd, fcntl.F_DUPFD_CLOEXEC, top,
                                     what=f"fcntl(F_DUPFD) of memfd {inode}")
        top = objects[inode] + 1
        target.close(fd)
    staged: dict[int, int] = {}  # the helper's fd -> where it waits meanwhile
    for hfd in sorted(set(given.values())):
        staged[hfd] = target.call(SYS_FCNTL, hfd, fcntl.F_DUPFD_CLOEXEC, top,
                                  what=f"fcntl(F_DUPFD) of the given fd {hfd}")
        top = staged[hfd] + 1
    for hfd in sorted(set(range(STDIO_FDS)) | set(given.values())):
        if hfd not in dumped:  # the helper's: the dumped process had nothing there
            _close_quiet(target, hfd)
    for fd, hfd in sorted(given.items()):
        if fd in dumped:
            cloexec = next(c for n, c in files.fds_of(_file_of(files, fd)) if n == fd)
        else:
            cloexec = False  # given by stdio= where the process had no fd
        target.call(SYS_DUP3, staged[hfd], fd, os.O_CLOEXEC if cloexec else 0,
                    what=f"dup3 of the given fd {hfd} to fd {fd}")
    for at in staged.values():
        target.close(at)
    mine = [(f, fds) for f in files.files
            if (fds := [(fd, c) for fd, c in files.fds_of(f.id) if fd not in given])]
    wanted = {f.pipe.pipe_id for f, _ in mine
              if f.type == fdinfo_pb2.PIPE and f.id not in tree.descriptions}
    ends: dict[int, tuple[int, int]] = {}
    used: set[int] = set()  # staging pipe ends handed out as some description
    for entry, data in files.pipe_data:
        if entry.pipe_id in wanted and entry.pipe_id not in tree.pipes:
            ends[entry.pipe_id] = _make_pipe(target, top, entry.size, data)
            top += 2
    anon = AnonFiles(target, files, top)
    fifos: dict[int, int] = {}  # {FIFO inode id: a read-write fd holding it open meanwhile}
    taken = set(tree.descriptions)  # made by another process of the tree, locks and all
    for f, fds in mine:
        if f.id in tree.descriptions:  # another process of the tree has it: the same one
            tmp = _take_fd(target, *tree.descriptions[f.id])
        elif f.type == fdinfo_pb2.PIPE and f.pipe.pipe_id not in ends \
                and f.pipe.pipe_id in tree.pipes:  # made by another process of the tree
            pid, fd = tree.pipes[f.pipe.pipe_id]
            tmp = target.open(fd_path(pid, fd), _via_proc(f.pipe.flags))
        elif f.type == fdinfo_pb2.PIPE:
            tmp = _pipe_end(target, f.pipe.pipe_id, f.pipe.flags, ends, used)
        elif f.type in ANON_TYPES:
            tmp = anon.open(f)
        elif f.type == fdinfo_pb2.FIFO:
            tmp = _open_fifo(target, files, f, fifos, tree, top)
        elif f.type == fdinfo_pb2.MEMFD:  # a new description of the memfd rebuilt already
            tmp = target.open(fd_path("self", objects[f.memfd.inode_id]),
                              _via_proc(f.memfd.flags))
            if f.memfd.pos:
                target.call(SYS_LSEEK, tmp, f.memfd.pos, os.SEEK_SET, what="lseek(memfd)")
        else:
            tmp = target.open(f.reg.name, f.reg.flags | os.O_CLOEXEC)
            if f.reg.pos and not f.reg.flags & os.O_PATH:
                target.call(SYS_LSEEK, tmp, f.reg.pos, os.SEEK_SET,
                            what=f"lseek({f.reg.name})")
        for fd, cloexec in fds:
            if fd == tmp:
                target.call(SYS_FCNTL, fd, fcntl.F_SETFD, FD_CLOEXEC if cloexec else 0,
                            what=f"fcntl(F_SETFD) on fd {fd}")
            else:
                target.call(SYS_DUP3, tmp, fd, os.O_CLOEXEC if cloexec else 0,
                            what=f"dup3 to fd {fd}")
        if tmp not in used and tmp not in (fd for fd, _ in fds):
            target.close(tmp)
        tree.descriptions.setdefault(f.id, (target.pid, fds[0][0]))
        if f.type == fdinfo_pb2.PIPE:
            tree.pipes.setdefault(f.pipe.pipe_id, (target.pid, fds[0][0]))
    for r, w in ends.values():
        target.close(r)
        target.close(w)
    for fd in fifos.values():
        target.close(fd)
    for fd in objects.values():
        target.close(fd)
    _lock_files(target, files, taken, set(given))
    anon.finish()
    log.info("pid %d: %d fds reopened (%d files, %d pipes), %d given by the caller",
             target.pid, len(files.fds), len(mine), len(ends), len(given))


def _take_fd(target: SyscallTarget, pid: int, fd: int) -> int:
    """A fd in ``target`` on the open file description of fd ``fd`` of process
    ``pid`` (``pidfd_getfd``, injected: the new fd is close-on-exec)."""
    here = ns_pids(pid)[-1]  # as the target sees it, in the tree's pid namespace
    pidfd = target.call(SYS_PIDFD_OPEN, here, 0, what=f"pidfd_open({here})")
    try:
        return target.call(SYS_PIDFD_GETFD, pidfd, fd, 0,
                           what=f"pidfd_getfd(fd {fd} of process {here})")
    finally:
        target.close(pidfd)


def _via_proc(flags: int) -> int:
    """Dumped status flags to reopen a file through its /proc fd link with: without
    O_NOFOLLOW (the link is one; ``tempfile.mkstemp`` files have it)."""
    return (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC


def _file_of(files: DumpedFiles, fd: int) -> int:
    return next(e.id for e in files.fds if e.fd == fd)


def _close_quiet(target: SyscallTarget, fd: int) -> None:
    """close(fd) in the process; not open is fine."""
    try:
        target.close(fd)
    except LazyMigOSError as exc:
        if exc.errno != errno.EBADF:
            raise


def _pipe_end(target: SyscallTarget, pipe_id: int, flags: int,
              ends: dict[int, tuple[int, int]], used: set[int]) -> int:
    """An fd in ``target`` on a new description of one end of pipe ``pipe_id``.

    The first description of each end is the one pipe2 made (its status flags
    set with F_SETFL); another one (rare: a pipe end reopened through /proc) is
    opened through /proc/self/fd, which adds O_LARGEFILE.
    """
    if pipe_id not in ends:
        raise ImageError(f"pipes-data.img has no entry for pipe {pipe_id}")
    end = ends[pipe_id][1 if flags & os.O_ACCMODE == os.O_WRONLY else 0]
    if end not in used:
        used.add(end)
        target.call(SYS_FCNTL, end, fcntl.F_SETFL, flags & _SETFL_MASK, what="fcntl(F_SETFL)")
        return end
    return target.open(fd_path("self", end), _via_proc(flags))


def _lock_files(target: SyscallTarget, files: DumpedFiles, taken: set[int],
                given: set[int]) -> None:
    """Take again, through the fds they were taken through, the file locks of
    ``files.locks`` (CRIU's restore_file_lock, without waiting): POSIX locks
    (the process's own), OFD and flock locks (the open file description's; not
    again on those of ``taken``, whose locks came with them). Not on the fds
    ``given`` by the caller in place of the dumped ones."""
    for lock in files.locks:
        file_id = next((e.id for e in files.fds if e.fd == lock.fd), None)
        if file_id is None or file_id in taken or file_id in files.external or lock.fd in given:
            continue
        kind = {FL_POSIX: "POSIX", FL_OFD: "OFD", FL_FLOCK: "flock"}.get(lock.type)
        mode = {fcntl.F_RDLCK: "read", fcntl.F_WRLCK: "write"}.get(lock.flag)
        if kind is None or mode is None:
            raise ImageError(f"filelocks.img: a lock of type {lock.type}, flag {lock.flag} "
                             f"on fd {lock.fd}: lazymig restores POSIX, OFD and flock locks")
        what = f"the {kind} {mode} lock on fd {lock.fd}"
        try:
            if lock.type == FL_FLOCK:
                target.call(SYS_FLOCK, lock.fd, (_LOCK_SH if lock.flag == fcntl.F_RDLCK
                                                 else _LOCK_EX) | _LOCK_NB, what=f"flock: {what}")
            else:  # struct flock: l_type, l_whence, l_start, l_len, l_pid
                at = target.data(struct.pack("<hh4xqqi4x", lock.flag, os.SEEK_SET, lock.start,
                                             lock.len, 0))
                target.call(SYS_FCNTL, lock.fd,
                            _F_OFD_SETLK if lock.type == FL_OFD else fcntl.F_SETLK, at,
                            what=f"fcntl: {what}")
        except LazyMigOSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LazyMigOSError(exc.errno, f"taking {what} again (bytes {lock.start}, "
                                 f"{lock.len or 'to the end'}): another process holds a "
                                 "conflicting lock on the file here (on one host, the source "
                                 "until it is killed: a plain dump, then restore, frees it)",
                                 pid=target.pid) from exc
    log.debug("pid %d: %d file locks taken again", target.pid, len(files.locks))


def _open_fifo(target: SyscallTarget, files: DumpedFiles, f: FileEntry,
               holding: dict[int, int], tree: TreeFiles, top: int) -> int:
    """An fd in ``target`` on a new description of the named FIFO of ``f``, as CRIU
    does it: the FIFO is first opened read-write (``holding``; no open of it
    blocks then, whatever its mode; kept at a fd >= ``top``), its queued data
    written back once per tree, then opened with the dumped flags.

    The data is written only into an empty FIFO: one that holds data already is
    the very pipe the dumped process holds still (a migration on one host, the
    source stopped with it open), its data there."""
    regf = files.file(f.fifo.regf_id).reg
    pipe_id = f.fifo.pipe_id
    if pipe_id not in holding:
        fd = target.open(regf.name, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # Out of the way of the dumped fd numbers (dup3'd onto later).
        holding[pipe_id] = target.call(SYS_FCNTL, fd, fcntl.F_DUPFD_CLOEXEC, top,
                                       what=f"fcntl(F_DUPFD) of the FIFO {regf.name}")
        target.close(fd)
        if pipe_id not in tree.fifos:
            tree.fifos.add(pipe_id)
            queued = next(((e, d) for e, d in files.fifo_data if e.pipe_id == pipe_id), None)
            if queued is None:
                raise ImageError(f"fifo-data.img has no entry for the FIFO {regf.name}")
            _fill_fifo(target, holding[pipe_id], regf.name, *queued)
    return target.open(regf.name, regf.flags | os.O_CLOEXEC)


def _fill_fifo(target: SyscallTarget, fd: int, name: str, entry: PipeDataEntry,
               data: bytes) -> None:
    """Put ``data`` back in the FIFO open on ``fd`` of ``target`` (see :func:`_open_fifo`)."""
    try:
        mine = os.open(f"/proc/{target.pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or 0, f"opening the restored FIFO {name}",
                             pid=target.pid) from exc
    try:
        if int.from_bytes(fcntl.ioctl(mine, termios.FIONREAD, b"\0" * 4), "little"):
            log.info("pid %d: the FIFO %s holds data already: the dumped process's own "
                     "pipe, kept open on this host", target.pid, name)
            return
        if entry.size:
            set_pipe_size(mine, entry.size)
        view = memoryview(data)
        while view:
            view = view[os.write(mine, view):]
    finally:
        os.close(mine)


def _make_pipe(target: SyscallTarget, top: int, size: int, data: bytes) -> tuple[int, int]:
    """A pipe in ``target`` holding ``data``, its ends at fds >= ``top``: (read, write)."""
    at = target.data(b"\0" * 8)
    target.call(SYS_PIPE2, at, os.O_CLOEXEC, what="pipe2")
    low = struct.unpack("<2i", read_memory(target.pid, at, 8))
    ends = []
    for fd in low:
        ends.append(target.call(SYS_FCNTL, fd, fcntl.F_DUPFD_CLOEXEC, top, what="fcntl(F_DUPFD)"))
        target.close(fd)
    r, w = ends
    try:
        mine = os.open(fd_path(target.pid, w), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or 0, "opening a restored pipe", pid=target.pid) from exc
    try:
        if size:
            set_pipe_size(mine, size)
        view = memoryview(data)
        while view:
            view = view[os.write(mine, view):]
    finally:
        os.close(mine)
    return r, w
