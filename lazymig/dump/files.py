"""The open files of a process: checked, read from outside, written as CRIU images.

Every fd of a process is dumped, fds 0, 1 and 2 as any other (as CRIU does):
a log file on fd 1 is reopened at its offset, /dev/null is /dev/null again,
a pipe to itself is a pipe again. What on fds 0-2 stays behind on the source
host, what would be refused on another fd (a terminal, a socket, a deleted
file...) or a pipe that a process outside the dumped tree holds, is recorded as
*external* (``lazymig_task_entry.external_files``, with the name
``--inherit-fd`` gives it: ``pipe:[INO]``, ``socket:[INO]``, the path); the
restorer puts a fd of its caller in its place (``--inherit-fd``,
``--shell-job``, ``stdio=``) or refuses.

What is dumped, read from /proc/PID/fd, /proc/PID/fdinfo and kcmp(2) (nothing
is injected into the target):

* regular files, at their offset, with their status flags (access mode,
  O_APPEND, O_NONBLOCK, O_PATH, ...) and close-on-exec; the name the kernel
  shows for it (it follows renames) must still lead to it (not deleted, not
  hidden under a mount). Directories too (dirfds
  for openat, O_PATH or not), read part-way or not, at their offset as CRIU
  does (``reg_file_entry.pos``, restored with lseek): a directory's offset is
  a cookie of its filesystem (on ext4 a hash of the next name, which
  ext4_dir_llseek takes back; on /proc a position in its listing, which
  ``top`` keeps open) and so means the same on the same filesystem: a
  walk (``find``, ``os.scandir``) goes on with the next name, none
  repeated or lost. (On another host's copy of the tree the hashes differ:
  CRIU has the same limit.);
* the harmless memory character devices (/dev/null, /dev/zero, /dev/full,
  /dev/random, /dev/urandom), recorded as regular files as CRIU does;
* pipes that only processes of the dumped tree hold: both ends (or the one
  end the process kept: a read end whose writers are all closed still yields
  its data, then EOF), the data queued in them (read with tee(2) through a
  reader opened on /proc/PID/fd/N, so the pipe keeps it) and their capacity.
  A pipe end open in a process outside the tree is refused: after the
  migration that process would stay on the source host, cut off;
* named FIFOs as CRIU dumps them: a FIFO ``file_entry`` naming a REG one
  (no fd of its own) with the path and the status flags, the queued data in
  ``fifo-data.img``; refused, as a pipe, when a process outside the tree has
  the FIFO open (reopened by its path on the destination, where it must exist);
* fds that share an open file description (dup'd, inherited) share one
  ``file_entry`` and so share their offset again after a restore (kcmp); in
  a tree, across processes too (:func:`share_files`);
* memfds, deleted files of a tmpfs and deleted files of other filesystems up
  to 64 MiB (``tempfile.TemporaryFile()``), as a MEMFD ``file_entry`` at its
  offset, with its flags (its contents and name: :mod:`lazymig.dump.shmem`);
  the destination gets a memfd, not a file on a disk;
* file locks, as CRIU dumps them into ``filelocks.img`` (``file_lock_entry``
  per lock, read from the fdinfo ``lock:`` lines: the locks taken through
  that open file description): POSIX (``fcntl``, ``lockf``: the process's),
  OFD and ``flock`` locks (the description's), taken again at restore through
  the same fd, without waiting (a conflicting lock held here fails the
  restore: on one host, a write lock of the source until it is killed);
* the files of an event loop, :mod:`lazymig.dump.anon_files`'s: eventfds,
  epoll instances, timerfds, signalfds and the unix socketpairs whose both
  ends the process holds (with the data queued on them).

Everything else is refused with the fd and its kind named: other sockets,
fanotify, pidfds and other anonymous-inode files, larger deleted files,
other devices, and terminals beyond fds 0-2. A terminal is
never reopened by name because nothing identifies it across a move:
/dev/pts/3 on the destination (if it exists) is somebody else's terminal
(CRIU too needs the whole pty pair, or
``--inherit-fd``/``--shell-job``, for a terminal). :func:`inspect_files`
refuses from /proc alone, before the target is frozen; :func:`collect_files`
checks again once it is frozen.
F_SETOWN/F_SETSIG owners are not dumped (``fown`` is written as zeros).

Images (CRIU's layout, decodable by ``crit``): ``fdinfo-<files_id>.img``
(``fdinfo_entry`` per fd), ``files.img`` (``file_entry`` per open file
description, with a ``reg_file_entry``, ``pipe_entry``, ``fifo_entry``,
``memfd_file_entry`` or an event-loop file's entry), ``pipes-data.img``
(``pipe_data_entry`` then the queued bytes, per pipe), ``fifo-data.img`` (the
same, per named FIFO, if there is one) and, if a socket has data queued,
``sk-queues.img`` (``sk_packet_entry`` then the bytes, per message);
an external file is a ``file_entry`` of type EXT, an external pipe a PIPE
one (no data: it is its other end's too).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import stat
import termios
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lazymig.dump.shmem import DELETED, DELETED_FILE_LIMIT
from lazymig.errors import LazyMigOSError, UnsupportedTargetError
from lazymig.linux.kcmp import same_file
from lazymig.linux.procfs import fd_links, fd_path, fds, processes, read_fdinfo, tmpfs_devices
from lazymig.linux.ptrace import TargetGoneError
from lazymig.linux.vm import SPLICE_F_NONBLOCK, get_pipe_size, set_pipe_size, tee
from lazymig.proto.images import (
    FdinfoEntry,
    FifoEntry,
    FileEntry,
    FileLockEntry,
    FownEntry,
    ImageKind,
    ImagesDir,
    MemfdFileEntry,
    PipeDataEntry,
    PipeEntry,
    RegFileEntry,
    SkPacketEntry,
    fdinfo_pb2,
)

if TYPE_CHECKING:  # loaded only for a process that has such files (_inspect_anon)
    from lazymig.dump.anon_files import AnonFds

__all__ = [
    "FD_CLOEXEC",
    "FILES_ID",
    "FL_FLOCK",
    "FL_OFD",
    "FL_POSIX",
    "SAFE_CHAR_DEVICES",
    "STDIO_FDS",
    "DumpedFiles",
    "collect_files",
    "external_stdio",
    "inspect_files",
    "read_files",
    "share_files",
    "write_files",
    "write_pipe_data",
]

log = logging.getLogger(__name__)

FILES_ID: Final = 1
"""The files id of the dumped process (``task_kobj_ids_entry.files_id``): ``fdinfo-1.img``."""
FD_CLOEXEC: Final = 1
"""``fdinfo_entry.flags`` bit for a close-on-exec fd (CRIU stores F_GETFD's value)."""
SAFE_CHAR_DEVICES: Final = {
    (1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full", (1, 8): "/dev/random",
    (1, 9): "/dev/urandom",
}
"""Character devices (major, minor) that hold no state: reopening them by name is exact."""

STDIO_FDS: Final = 3
"""fds below this may be external (see the module docstring)."""
_TTY_MAJORS: Final = frozenset({4, 5, *range(136, 144)})
_PIPE_LINK: Final = re.compile(r"pipe:\[\d+\]")
FL_POSIX: Final = 1
FL_FLOCK: Final = 2
FL_OFD: Final = 4
"""``file_lock_entry.type`` values (CRIU's file-lock.h)."""
_LOCK_KINDS: Final = {"POSIX": FL_POSIX, "FLOCK": FL_FLOCK, "OFDLCK": FL_OFD}
_LOCK_TYPES: Final = {"READ": fcntl.F_RDLCK, "WRITE": fcntl.F_WRLCK}
_ANON_KINDS: Final = {
    "[eventfd]": "an eventfd", "[eventpoll]": "an epoll instance",
    "[signalfd]": "a signalfd", "[timerfd]": "a timerfd", "inotify": "an inotify instance",
    "[fanotify]": "a fanotify instance", "[pidfd]": "a pidfd",
    "[userfaultfd]": "a userfaultfd", "[io_uring]": "an io_uring instance",
}


@dataclasses.dataclass(slots=True)
class DumpedFiles:
    """A process's open files as CRIU's images hold them."""

    fds: list[FdinfoEntry] = dataclasses.field(default_factory=list)
    files: list[FileEntry] = dataclasses.field(default_factory=list)
    pipe_data: list[tuple[PipeDataEntry, bytes]] = dataclasses.field(default_factory=list)
    fifo_data: list[tuple[PipeDataEntry, bytes]] = dataclasses.field(default_factory=list)
    """The data queued in named FIFOs (``fifo-data.img``; ``pipe_id``: the FIFO's inode)."""
    external: dict[int, str] = dataclasses.field(default_factory=dict)
    """{file id: name} of the descriptions that stay behind (``external_files``)."""
    memfds: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    """{inode: fds} of the memfds open on fds (their contents: dump/shmem.py)."""
    locks: list[FileLockEntry] = dataclasses.field(default_factory=list)
    """The file locks the process holds (``filelocks.img``, every process's in a tree)."""
    sk_queues: list[tuple[SkPacketEntry, bytes]] = dataclasses.field(default_factory=list)
    """The data queued on unix sockets (``sk-queues.img``; dump/anon_files.py)."""
    origins: dict[int, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    """{file id: (an fd on it, st_dev, st_ino)}, at dump time only (see :func:`share_files`)."""

    def file(self, file_id: int) -> FileEntry:
        """The ``file_entry`` with id ``file_id``."""
        return next(f for f in self.files if f.id == file_id)

    def fds_of(self, file_id: int) -> list[tuple[int, bool]]:
        """(fd number, close-on-exec) of every fd on open file description ``file_id``."""
        return [(e.fd, bool(e.flags & FD_CLOEXEC)) for e in self.fds if e.id == file_id]


# -- looking at the fds from outside --------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Fd:
    fd: int
    link: str
    st: os.stat_result
    flags: int
    """Status flags from fdinfo (O_CLOEXEC included when the fd has it)."""
    pos: int
    locks: tuple[str, ...]
    """The fdinfo ``lock:`` lines: the locks taken through this open file description."""
    shmem: bool
    """A memfd, a deleted file of a tmpfs, or a deleted file of another filesystem
    up to DELETED_FILE_LIMIT: a shmem object dumped with its contents (dump/shmem.py)."""


def _fdinfo(pid: int, fd: int) -> tuple[int, int, tuple[str, ...]]:
    """(flags, pos, ``lock:`` lines) from /proc/PID/fdinfo/FD."""
    flags = pos = 0
    locks = []
    for key, value in read_fdinfo(pid, fd):
        if key == "flags":
            flags = int(value, 8)
        elif key == "pos":
            pos = int(value)
        elif key == "lock":
            locks.append(value.strip())
    return flags, pos, tuple(locks)


def _lock(pid: int, fd: int, line: str) -> FileLockEntry | str:
    """The ``file_lock_entry`` of a fdinfo ``lock:`` line of fd ``fd`` (``1: POSIX
    ADVISORY  WRITE 1868 fe:00:2842666 5 14``, as CRIU's parse_file_lock_buf
    reads it), or why it cannot be migrated."""
    fields = line.split()
    kind = _LOCK_KINDS.get(fields[1]) if len(fields) >= 8 else None
    kinds = "POSIX (fcntl, lockf), OFD and flock locks are migrated"
    if kind is None or fields[2] != "ADVISORY" or fields[3] not in _LOCK_TYPES:
        return f"fd {fd} holds a lock this kernel shows as {line!r}: {kinds}"
    start = int(fields[6])
    end = -1 if fields[7] == "EOF" else int(fields[7])
    return FileLockEntry(type=kind, flag=_LOCK_TYPES[fields[3]], pid=pid, fd=fd, start=start,
                         len=0 if end < 0 else end - start + 1)


def _list_fds(pid: int) -> list[_Fd]:
    try:
        numbers = sorted(fds(pid))
    except FileNotFoundError as exc:
        raise TargetGoneError(pid, f"process {pid} exited") from exc
    out = []
    tmpfs: frozenset[tuple[int, int]] | None = None
    for fd in numbers:
        where = Path(fd_path(pid, fd))
        try:
            link = str(where.readlink())
            st = where.stat()
            flags, pos, locks = _fdinfo(pid, fd)
            shmem = link.startswith("/memfd:")
            if not shmem and link.endswith(DELETED) and stat.S_ISREG(st.st_mode):
                if tmpfs is None:
                    tmpfs = tmpfs_devices(pid)
                # On fds 0-2 a deleted file of a disk (output captured by the
                # caller) stays behind as before: the caller gives another.
                shmem = ((os.major(st.st_dev), os.minor(st.st_dev)) in tmpfs
                         or (fd >= STDIO_FDS and st.st_size <= DELETED_FILE_LIMIT))
        except FileNotFoundError:
            continue  # closed meanwhile (only possible before the freeze)
        out.append(_Fd(fd, link, st, flags, pos, locks, shmem))
    return out


def _external(f: _Fd) -> str | None:
    """The name of fd ``f`` if it stays behind: a socket (the restore takes it over
    on this host, or is given one: restore/sockets.py), or on fds 0-2 what could
    not be dumped on another fd (a terminal, a deleted file...); else None
    (pipes are told by their other holders, see :func:`_check`)."""
    if stat.S_ISSOCK(f.st.st_mode):
        return f.link
    if f.fd >= STDIO_FDS or _refusal(f) is None:
        return None
    return f.link


def _refusal(f: _Fd) -> str | None:
    """Why fd ``f`` cannot be migrated, or None (on fds 0-2: see :func:`_external`)."""
    mode, link = f.st.st_mode, f.link
    lock = next((why for line in f.locks if isinstance(why := _lock(0, f.fd, line), str)), None)
    if lock is not None:
        return lock
    if link.startswith("anon_inode:"):
        kind = _ANON_KINDS.get(link.removeprefix("anon_inode:"), "an anonymous-inode file")
        return f"fd {f.fd} is {kind} ({link})"
    if f.shmem:
        return None  # its contents are dumped with the shared objects (dump/shmem.py)
    if stat.S_ISFIFO(mode):  # a pipe or a named FIFO (see _check for their other holders)
        return None
    if stat.S_ISCHR(mode):
        dev = (os.major(f.st.st_rdev), os.minor(f.st.st_rdev))
        if dev in SAFE_CHAR_DEVICES:
            return None
        if dev[0] in _TTY_MAJORS:
            return (f"fd {f.fd} is a terminal ({link}): a terminal does not move to another "
                    "host; only fds 0-2 may be terminals (`lazymig restore --shell-job` gives "
                    "the restored process the restorer's)")
        return f"fd {f.fd} is the character device {link} ({dev[0]}:{dev[1]})"
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return f"fd {f.fd} is an unsupported kind of file ({link}, mode {mode:o})"
    if link.endswith(" (deleted)") or f.st.st_nlink == 0:
        return (f"fd {f.fd} is a deleted file of {f.st.st_size} bytes "
                f"({link.removesuffix(' (deleted)')}): lazymig carries deleted files "
                f"of up to {DELETED_FILE_LIMIT >> 20} MiB")
    try:
        named = Path(link).stat()
    except OSError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (f.st.st_dev, f.st.st_ino):
        return (f"fd {f.fd} is a file ({link}) its name no longer leads to (a mount or another "
                "file is there now)")
    return None


def _pipe_holders(pid: int, links: Iterable[str], tree: Collection[int]) -> dict[str, int]:
    """{link: another process, not of ``tree``, that has it open} for the pipes
    and named FIFOs whose /proc fd links are ``links`` (``pipe:[INO]``, a path)."""
    wanted = set(links)
    found: dict[str, int] = {}
    if not wanted:
        return found
    # Every fd of every process on the host (a loaded host has thousands of fds;
    # this runs before the freeze and again after it).
    for other in processes():
        if other == pid or other in tree:
            continue
        try:  # gone, or a kernel thread
            theirs = fd_links(other)
        except OSError:
            continue
        for _, link in theirs:
            if link in wanted:
                found.setdefault(link, other)
    return found


def _inspect_anon(pid: int, fds: Sequence[_Fd]) -> AnonFds | None:
    """:func:`~lazymig.dump.anon_files.inspect_anon` of ``fds``; None where none is an
    anonymous-inode file or a socket (most processes): that module, sock_diag and
    their images are then not loaded, a part of every dump's start-up."""
    if not any(f.link.startswith("anon_inode:") or stat.S_ISSOCK(f.st.st_mode) for f in fds):
        return None
    from lazymig.dump.anon_files import inspect_anon  # noqa: PLC0415 (start-up, above)

    return inspect_anon(pid, [(f.fd, f.link, f.st) for f in fds])


def _check(pid: int, *, strict: bool = True, tree: Collection[int] = ()
           ) -> tuple[list[_Fd], dict[int, str], AnonFds | None]:
    """The fds to dump, {fd: name} of the external ones among them and the
    event-loop files (dump/anon_files.py); raises UnsupportedTargetError naming
    every fd that cannot be dumped (unless not ``strict``). A pipe the processes
    of ``tree`` hold is theirs, not external."""
    fds = _list_fds(pid)
    anon = _inspect_anon(pid, fds)
    kinds = anon.kinds if anon is not None else {}
    external = {f.fd: name for f in fds
                if f.fd not in kinds and (name := _external(f)) is not None}
    reasons = [r for f in fds if f.fd not in external and f.fd not in kinds
               and (r := _refusal(f)) is not None] + (anon.reasons if anon is not None else [])
    pipes: dict[str, list[_Fd]] = {}  # pipes and named FIFOs, by their /proc fd link
    for f in fds:
        if stat.S_ISFIFO(f.st.st_mode):
            pipes.setdefault(f.link, []).append(f)
    for link, other in sorted(_pipe_holders(pid, pipes, tree).items()):
        inner = [f.fd for f in pipes[link] if f.fd >= STDIO_FDS]
        kind = "a pipe" if _PIPE_LINK.fullmatch(link) else "a named FIFO"
        if inner:
            reasons.append(f"fd {inner[0]} is {kind} ({link}) also open in process "
                           f"{other}: the other end would stay behind")
        else:  # only on stdio: the caller gives the restored process another
            external.update((f.fd, link) for f in pipes[link])
    if reasons and strict:
        raise UnsupportedTargetError(pid, reasons)
    return fds, external, anon


def external_stdio(pid: int, tree: Collection[int] = ()) -> dict[int, str]:
    """{fd: name} of what on fds 0-2 of ``pid`` would stay on the source host
    (see the module docstring; ``tree``: the processes dumped with it), reading
    only /proc."""
    return {fd: name for fd, name in _check(pid, strict=False, tree=tree)[1].items()
            if fd < STDIO_FDS}


def inspect_files(pid: int, tree: Collection[int] = ()) -> None:
    """Refuse the fds that cannot be migrated, reading only /proc (the target is not
    touched); ``tree``: the other processes dumped with it. Raises
    :class:`~lazymig.dump.freeze.UnsupportedTargetError`."""
    _check(pid, tree=tree)


# -- the frozen process --------------------------------------------------------------


def collect_files(pid: int, tree: Collection[int] = ()) -> DumpedFiles:
    """Read the open files of the frozen process ``pid`` (checking them again);
    ``tree``: the other processes dumped with it, which may share its pipes.

    Blocking (it reads /proc and the pipes' data): run it off the event loop.
    Raises :class:`~lazymig.dump.freeze.UnsupportedTargetError` or
    :class:`~lazymig.errors.LazyMigOSError`.
    """
    fds, external, anon = _check(pid, tree=tree)
    out = DumpedFiles()
    owners: list[_Fd] = []  # the first fd of each open file description
    fifos: list[FileEntry] = []  # the REG entries holding named FIFOs' paths
    zero = FownEntry(uid=0, euid=0, signum=0, pid_type=0, pid=0)
    for f in fds:
        owner = next((o for o in owners if o.st.st_ino == f.st.st_ino
                      and o.st.st_dev == f.st.st_dev and same_file(pid, o.fd, pid, f.fd)), None)
        if owner is None:
            owners.append(f)
            file_id = len(owners)
            out.origins[file_id] = (f.fd, f.st.st_dev, f.st.st_ino)
            flags = f.flags & ~os.O_CLOEXEC
            if not stat.S_ISDIR(f.st.st_mode):  # O_TMPFILE's O_DIRECTORY: reopened, ENOTDIR
                flags &= ~os.O_TMPFILE
            if f.fd in external:
                out.external[file_id] = external[f.fd]
                if stat.S_ISSOCK(f.st.st_mode):
                    from lazymig.linux.sockdiag import describe_socket  # noqa: PLC0415

                    log.info("pid %d: fd %d is %s (%s): it stays on this host, for the "
                             "restore to take over here or be given in its place", pid, f.fd,
                             describe_socket(pid, f.fd), f.link)
            if f.fd in external and not stat.S_ISFIFO(f.st.st_mode):
                entry = FileEntry(type=fdinfo_pb2.EXT, id=file_id)
            elif anon is not None and f.fd in anon.kinds:
                entry = anon.file_entry(f.fd, file_id, flags)
            elif f.shmem:
                entry = FileEntry(type=fdinfo_pb2.MEMFD, id=file_id, memfd=MemfdFileEntry(
                    id=file_id, flags=flags, pos=f.pos, fown=zero, inode_id=f.st.st_ino))
            elif stat.S_ISFIFO(f.st.st_mode) and _PIPE_LINK.fullmatch(f.link):
                entry = FileEntry(type=fdinfo_pb2.PIPE, id=file_id, pipe=PipeEntry(
                    id=file_id, pipe_id=f.st.st_ino, flags=flags, fown=zero))
            elif stat.S_ISFIFO(f.st.st_mode):
                # As CRIU: the path and flags in a REG entry of their own (no fd on
                # it), which the FIFO entry names (regf_id; numbered after the rest).
                fifos.append(FileEntry(type=fdinfo_pb2.REG, id=0, reg=RegFileEntry(
                    id=0, flags=flags, pos=0, fown=zero, name=f.link, mode=f.st.st_mode)))
                entry = FileEntry(type=fdinfo_pb2.FIFO, id=file_id, fifo=FifoEntry(
                    id=file_id, pipe_id=f.st.st_ino))
            else:
                name = f.link
                if stat.S_ISCHR(f.st.st_mode):
                    name = SAFE_CHAR_DEVICES[(os.major(f.st.st_rdev), os.minor(f.st.st_rdev))]
                entry = FileEntry(type=fdinfo_pb2.REG, id=file_id, reg=RegFileEntry(
                    id=file_id, flags=flags, pos=f.pos, fown=zero, name=name,
                    mode=f.st.st_mode))
                if stat.S_ISREG(f.st.st_mode):
                    entry.reg.size = f.st.st_size
            out.files.append(entry)
        else:
            file_id = owners.index(owner) + 1
        if owner is None and f.fd not in external:  # dups show the same locks
            out.locks += [lock for line in f.locks
                          if isinstance(lock := _lock(pid, f.fd, line), FileLockEntry)]
        if f.shmem:
            out.memfds.setdefault(f.st.st_ino, []).append(f.fd)
        out.fds.append(FdinfoEntry(id=file_id, flags=FD_CLOEXEC if f.flags & os.O_CLOEXEC else 0,
                                   type=out.file(file_id).type, fd=f.fd))
    for regf, fifo in zip(fifos, (e for e in out.files if e.type == fdinfo_pb2.FIFO),
                          strict=True):
        regf.id = regf.reg.id = fifo.fifo.regf_id = len(out.files) + 1
        out.files.append(regf)
    if anon is not None:
        out.sk_queues = anon.socket_queues({e.fd: e.id for e in out.fds})
    queued = {(bool(_PIPE_LINK.fullmatch(f.link)), f.st.st_ino): f.fd for f in fds
              if stat.S_ISFIFO(f.st.st_mode) and f.fd not in external}
    for (anonymous, ino), fd in sorted(queued.items()):
        size, data = _pipe_contents(pid, fd)
        (out.pipe_data if anonymous else out.fifo_data).append(
            (PipeDataEntry(pipe_id=ino, bytes=len(data), size=size), data))
    return out


def share_files(pid: int, files: DumpedFiles, earlier: Sequence[tuple[int, DumpedFiles]]
                ) -> DumpedFiles:
    """``files`` of the frozen process ``pid`` with each open file description it
    shares with a process of ``earlier`` (inherited across a fork: kcmp(2) says
    so) under that process's file id, its own ``file_entry`` dropped: files.img
    holds it once, and the restore gives it back to every process that had it
    as one description (one offset; one end of one pipe). The ids must be unique
    in the tree already. Blocking."""
    renamed: dict[int, int] = {}
    for file_id, (fd, dev, ino) in files.origins.items():
        same = next((other_id for other_pid, other in earlier
                     for other_id, (other_fd, *key) in other.origins.items()
                     if key == [dev, ino] and same_file(pid, fd, other_pid, other_fd)), None)
        if same is not None:
            renamed[file_id] = same
    if not renamed:
        return files
    for e in files.fds:
        e.id = renamed.get(e.id, e.id)
    gone = set(renamed) | {f.fifo.regf_id for f in files.files
                           if f.id in renamed and f.HasField("fifo")}
    return DumpedFiles(
        fds=files.fds, files=[f for f in files.files if f.id not in gone],
        pipe_data=files.pipe_data, fifo_data=files.fifo_data, memfds=files.memfds,
        locks=files.locks,
        external={renamed.get(i, i): name for i, name in files.external.items()},
        origins={i: o for i, o in files.origins.items() if i not in renamed})


def _pipe_contents(pid: int, fd: int) -> tuple[int, bytes]:
    """(capacity, queued bytes) of the pipe on fd ``fd`` of ``pid``, left in place.

    A reader opened on /proc/PID/fd/FD is a new open file description of the
    same pipe; tee(2) copies its queued bytes into a scratch pipe without
    consuming them.
    """
    what = f"reading the pipe on fd {fd}"
    try:
        reader = os.open(fd_path(pid, fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or 0, what, pid=pid) from exc
    try:
        size = get_pipe_size(reader)
        queued = int.from_bytes(fcntl.ioctl(reader, termios.FIONREAD, b"\0" * 4), "little")
        if not queued:
            return size, b""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            set_pipe_size(w, size)
            copied = tee(reader, w, queued, SPLICE_F_NONBLOCK)
            if copied != queued:
                raise LazyMigOSError(0, f"{what}: tee copied {copied} of {queued} bytes",
                                     pid=pid)
            return size, os.read(r, queued)
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(reader)


# -- images -----------------------------------------------------------------------------


def write_files(images: ImagesDir, files: DumpedFiles) -> list[Path]:
    """Write ``fdinfo-1.img``, ``files.img``, ``pipes-data.img`` (and ``fifo-data.img``
    if it holds a named FIFO, ``sk-queues.img`` if a socket has data queued);
    returns their paths."""
    paths = [images.write_entries(ImageKind.FDINFO, files.fds, FILES_ID),
             images.write_entries(ImageKind.FILES, files.files),
             write_pipe_data(images, ImageKind.PIPES_DATA, files.pipe_data)]
    if any(f.type == fdinfo_pb2.FIFO for f in files.files):
        paths.append(write_pipe_data(images, ImageKind.FIFO_DATA, files.fifo_data))
    if files.sk_queues:
        paths.append(write_sk_queues(images, files.sk_queues))
    if files.locks:
        paths.append(images.write_entries(ImageKind.FILE_LOCKS, files.locks))
    return paths


def write_pipe_data(images: ImagesDir, kind: ImageKind,
                    queued: Iterable[tuple[PipeDataEntry, bytes]]) -> Path:
    """Write ``pipes-data.img`` or ``fifo-data.img`` (``pipe_data_entry`` then the
    bytes, per pipe; once per ``pipe_id``: a pipe open in several processes)."""
    seen: set[int] = set()
    with images.open_writer(kind) as writer:
        for entry, data in queued:
            if entry.pipe_id not in seen:
                seen.add(entry.pipe_id)
                writer.write(entry)
                writer.write_extra(data)
    return writer.path


def write_sk_queues(images: ImagesDir, queues: Iterable[tuple[SkPacketEntry, bytes]]) -> Path:
    """Write ``sk-queues.img`` (``sk_packet_entry`` then the bytes, per message)."""
    with images.open_writer(ImageKind.SK_QUEUES) as writer:
        for entry, data in queues:
            writer.write(entry)
            writer.write_extra(data)
    return writer.path


def read_files(images: ImagesDir, files_id: int = FILES_ID) -> DumpedFiles:
    """Read what :func:`write_files` wrote (nothing for a dump without
    ``fdinfo-<files_id>.img``; a process of a tree has its own ``files_id``)."""
    out = DumpedFiles()
    if not images.image_path(ImageKind.FDINFO, files_id).exists():
        return out
    out.fds = images.read_entries(ImageKind.FDINFO, FdinfoEntry, files_id)
    out.files = images.read_entries(ImageKind.FILES, FileEntry)
    for kind, queued in ((ImageKind.PIPES_DATA, out.pipe_data),
                         (ImageKind.FIFO_DATA, out.fifo_data)):
        if kind is ImageKind.PIPES_DATA or images.image_path(kind).exists():
            with images.open_reader(kind) as reader:
                while (entry := reader.read(PipeDataEntry)) is not None:
                    queued.append((entry, reader.read_extra(entry.bytes)))
    if images.image_path(ImageKind.FILE_LOCKS).exists():
        out.locks = images.read_entries(ImageKind.FILE_LOCKS, FileLockEntry)
    if images.image_path(ImageKind.SK_QUEUES).exists():
        with images.open_reader(ImageKind.SK_QUEUES) as reader:
            while (packet := reader.read(SkPacketEntry)) is not None:
                out.sk_queues.append((packet, reader.read_extra(packet.length)))
    return out
