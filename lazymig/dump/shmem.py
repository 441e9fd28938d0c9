"""Shared memory objects of a frozen process, dumped whole, as CRIU's shmem.c does.

Shared anonymous memory (``/dev/zero (deleted)``: ``mmap(-1, n)``,
``MAP_SHARED | MAP_ANONYMOUS``) and memfds (mapped ``MAP_SHARED``, open on
fds, or both) are one object each however many VMAs (of however many processes
of a tree) map it (``vma_entry.shmid`` is the object's inode number; ``pgoff``
the VMA's offset in it). A deleted file of a tmpfs (``/dev/shm/sem.NAME
(deleted)``, a POSIX semaphore) is an unnamed shmem object too: it is dumped
as a memfd named after its path (:func:`mark_deleted_files`), and so is a
deleted file of a disk filesystem up to :data:`DELETED_FILE_LIMIT` bytes
(``tempfile.TemporaryFile()``: CRIU carries such a file as a ghost file). A memfd also gets
a ``memfd_inode_entry`` in ``memfd-inode.img`` (name, size, seals; CRIU's),
which a MEMFD ``file_entry`` of an fd names. Each object's contents go into
``shmem-pagemap-<shmid>.img`` (a ``pagemap_head`` naming its
``pages-<id>.img``, then ``pagemap_entry``s whose ``vaddr`` is the offset in
the object, as CRIU writes them) and that pages image. Only the parts some VMA
maps (all of a memfd) are dumped, and of those only what holds data
(``SEEK_DATA`` on the object: holes stay holes). The object is read through
``/proc/PID/map_files`` or ``/proc/PID/fd``, so nothing is faulted in the
target.

These pages are never lazy (CRIU does not lazy-restore shmem either): the
restorer (:mod:`lazymig.restore.shmem`) writes them before the process runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lazymig.errors import LazyMigOSError
from lazymig.linux.procfs import fd_path, map_file_path, tmpfs_devices
from lazymig.proto.constants import PAGE_SIZE, PE, VmaStatus
from lazymig.proto.images import (
    ImageKind,
    ImagesDir,
    MemfdInodeEntry,
    PagemapEntry,
    PagemapWriter,
    PagesWriter,
)

if TYPE_CHECKING:  # the restore side imports this module: no scanning machinery for it
    from lazymig.dump.scan import Vma

__all__ = [
    "DELETED",
    "DELETED_FILE_LIMIT",
    "SHMEM_PAGEMAP",
    "TMPFS_FILE_LIMIT",
    "ShmemDump",
    "carried_deleted_files",
    "is_shared_object",
    "mark_deleted_files",
    "shared_objects",
    "shmem_pagemap_path",
    "write_shmem",
]

log = logging.getLogger(__name__)

SHMEM_PAGEMAP: Final = "shmem-pagemap-{}.img"
"""CRIU's file name of an object's pagemap (its magic is PAGEMAP's)."""
_CHUNK: Final = 4 << 20
_F_GET_SEALS: Final = 1034
TMPFS_FILE_LIMIT: Final = 64 << 20
DELETED_FILE_LIMIT: Final = TMPFS_FILE_LIMIT
"""The largest deleted file of a disk filesystem dumped (as a memfd) with its contents."""
"""The largest tmpfs file mapped shared whose contents are dumped (they are
copied while the process is frozen, as CRIU's ghost files, whose limit is 1 MiB)."""
DELETED: Final = " (deleted)"
"""The suffix the kernel gives the name of an unlinked file."""
_FILE: Final = VmaStatus.FILE_SHARED | VmaStatus.FILE_PRIVATE


def mark_deleted_files(vmas: Sequence[Vma], carried: Collection[tuple[tuple[int, int], int]]
                       ) -> list[Vma]:
    """``vmas`` with each mapping of a deleted file in ``carried`` (its
    ``(dev, inode)``, see :func:`carried_deleted_files`) marked MEMFD: such a file
    is an unnamed object with contents only the processes hold, as a memfd is
    (POSIX semaphores of ``multiprocessing``, ``/dev/shm/sem.NAME (deleted)``, are;
    ``tempfile.TemporaryFile()`` in /tmp is; so is a library or program replaced
    on disk while it runs, mapped private). A private mapping of it is mapped
    private from the memfd again, its own written pages dumped as any private
    page's. Pure."""
    return [dataclasses.replace(v, status=v.status | VmaStatus.MEMFD)
            if v.status & _FILE and v.path.endswith(DELETED)
            and (v.dev, v.inode) in carried else v for v in vmas]


def carried_deleted_files(pid: int, vmas: Sequence[Vma]) -> set[tuple[tuple[int, int], int]]:
    """The ``(dev, inode)`` of the deleted files ``vmas`` of ``pid`` map (shared or
    private) that are dumped with their contents: every one of a tmpfs, and one of
    another filesystem up to :data:`DELETED_FILE_LIMIT` bytes (CRIU's ghost files,
    whose limit is 1 MiB)."""
    deleted = [v for v in vmas if v.status & _FILE and v.path.endswith(DELETED)]
    if not deleted:
        return set()
    tmpfs = tmpfs_devices(pid)
    return {(v.dev, v.inode) for v in deleted if v.dev in tmpfs or _small(pid, v)}


def is_shared_object(status: int) -> bool:
    """A VMA of a shared object whose contents are dumped (shared anonymous, not
    SysV; or a memfd)."""
    return bool(status & VmaStatus.MEMFD
                or (status & VmaStatus.ANON_SHARED and not status & VmaStatus.SYSVIPC))


@dataclasses.dataclass(frozen=True, slots=True)
class SharedObject:
    """One shared object, the VMAs that map it and the fds it is open on."""

    shmid: int
    vmas: tuple[Vma, ...]
    fds: tuple[int, ...] = ()
    """For a memfd: the fds of the process it is open on."""
    memfd: bool = False
    file: bool = False
    """A file of a tmpfs (a /dev/shm segment), mapped again from its path; dumped
    whole so that a destination without it gets it back."""

    def spans(self, size: int | None = None) -> list[tuple[int, int]]:
        """The [start, end) offsets some VMA maps (and all of a memfd's ``size``), merged."""
        out: list[tuple[int, int]] = []
        ranges = [(v.pgoff, v.pgoff + v.size) for v in self.vmas]
        if size is not None:
            ranges.append((0, size))
        for a, b in sorted(ranges):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            elif a < b:
                out.append((a, b))
        return out

    def source(self, pid: int) -> str:
        """Where to open the object from outside the process."""
        if self.fds:
            return fd_path(pid, self.fds[0])
        v = self.vmas[0]
        return map_file_path(pid, v.start, v.end)


def shared_objects(vmas: Iterable[Vma], memfd_fds: Mapping[int, Sequence[int]] | None = None
                   ) -> list[SharedObject]:
    """The shared objects of ``vmas`` by shmid (the inode), and the memfds open on
    fds (``memfd_fds``: {inode: fds}), in shmid order. Pure."""
    by_id: dict[int, list[Vma]] = {}
    memfds = set(memfd_fds or {})
    for v in vmas:
        if is_shared_object(v.status):
            by_id.setdefault(v.inode, []).append(v)
            if v.status & VmaStatus.MEMFD:
                memfds.add(v.inode)
    for inode in memfd_fds or {}:
        by_id.setdefault(inode, [])
    return [SharedObject(shmid, tuple(group), tuple((memfd_fds or {}).get(shmid, ())),
                         shmid in memfds) for shmid, group in sorted(by_id.items())]


def tmpfs_file_objects(pid: int, vmas: Sequence[Vma]) -> list[SharedObject]:
    """The files of a tmpfs that ``vmas`` of process ``pid`` map shared, by inode
    (not deleted: those are memfds, :func:`mark_deleted_files`), up to
    :data:`TMPFS_FILE_LIMIT` bytes each."""
    files = [v for v in vmas if v.status & VmaStatus.FILE_SHARED
             and not v.status & VmaStatus.MEMFD]
    if not files:
        return []
    tmpfs = tmpfs_devices(pid)
    by_inode: dict[int, list[Vma]] = {}
    for v in files:
        if v.dev in tmpfs:
            by_inode.setdefault(v.inode, []).append(v)
    return [SharedObject(inode, tuple(group), file=True)
            for inode, group in sorted(by_inode.items()) if _small(pid, group[0])]


def _small(pid: int, v: Vma) -> bool:
    size = Path(map_file_path(pid, v.start, v.end)).stat().st_size
    if size > TMPFS_FILE_LIMIT:
        log.info("pid %d: %s (%d bytes) is not dumped: the destination must have it", pid,
                 v.path, size)
    return size <= TMPFS_FILE_LIMIT


def shmem_pagemap_path(images: ImagesDir, shmid: int) -> Path:
    """``shmem-pagemap-<shmid>.img`` in ``images``."""
    return images.path / SHMEM_PAGEMAP.format(shmid)


def _data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Page-aligned [a, b) runs of [start, end) in the object on ``fd`` that hold data."""
    runs: list[tuple[int, int]] = []
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        a, b = data & ~(PAGE_SIZE - 1), (hole + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        if runs and a <= runs[-1][1]:
            runs[-1] = (runs[-1][0], min(b, end))
        else:
            runs.append((a, min(b, end)))
        at = hole
    return runs


def _write_object(images: ImagesDir, pid: int, obj: SharedObject, pages_id: int
                  ) -> tuple[list[Path], MemfdInodeEntry | None]:
    where = obj.source(pid)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or errno.EIO, f"opening shared object {obj.shmid} "
                             f"({where})", pid=pid) from exc
    paths: list[Path] = []
    inode: MemfdInodeEntry | None = None
    try:
        size = None
        st = os.fstat(fd)
        if obj.memfd or obj.file:
            size = st.st_size
        if obj.memfd:
            path = str(Path(where).readlink()) if obj.fds else obj.vmas[0].path
            name = path.removeprefix("/memfd:").removesuffix(" (deleted)")
            inode = MemfdInodeEntry(name=name, uid=st.st_uid, gid=st.st_gid, size=size,
                                    shmid=obj.shmid, seals=_seals(fd), inode_id=obj.shmid)
        with contextlib.ExitStack() as stack:
            pages = stack.enter_context(PagesWriter(images.pages_path(pages_id),
                                                    fsync=images.fsync))
            pagemap = stack.enter_context(PagemapWriter(shmem_pagemap_path(images, obj.shmid),
                                                        pages_id, fsync=images.fsync))
            whole = None if size is None else (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
            for start, end in obj.spans(whole):
                for a, b in _data_runs(fd, start, end):
                    for off in range(a, b, _CHUNK):
                        n = min(_CHUNK, b - off)
                        data = os.pread(fd, n, off)
                        if len(data) < n:  # the object ends here: its last page padded
                            data += bytes(-len(data) % PAGE_SIZE)
                        if data:
                            pages.write(data)
                            pagemap.write(PagemapEntry(off, len(data) // PAGE_SIZE, PE.PRESENT))
                        if len(data) < n:
                            break
            paths += [pages.path, pagemap.path]
    finally:
        os.close(fd)
    return paths, inode


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return 0


@dataclasses.dataclass(slots=True)
class ShmemDump:
    """The shared objects of one dump: each written once, however many processes
    of a tree map it or have it open (they are frozen: it holds the same data
    for each), and ``memfd-inode.img`` once for all of them."""

    done: set[int] = dataclasses.field(default_factory=set)
    """The shmids written."""
    inodes: list[MemfdInodeEntry] = dataclasses.field(default_factory=list)

    def write(self, images: ImagesDir, pid: int, vmas: Sequence[Vma],
              memfd_fds: Mapping[int, Sequence[int]] | None, first_pages_id: int) -> list[Path]:
        """Dump the shared objects of the frozen process ``pid`` not written yet:
        its mapped shared memory, the memfds open on its fds (``memfd_fds``:
        {inode: fds}) and the tmpfs files it maps shared (whole, so that
        :func:`lazymig.restore.shmem.recreate_tmpfs_files` can make them again
        where they are missing); ``pages-<id>.img`` ids are handed out from
        ``first_pages_id``. Returns the paths written (removed again on failure).
        Blocking."""
        paths: list[Path] = []
        try:
            objects = shared_objects(vmas, memfd_fds) + tmpfs_file_objects(pid, vmas)
            for n, obj in enumerate(objects):
                if obj.shmid in self.done:
                    continue
                written, inode = _write_object(images, pid, obj, first_pages_id + n)
                paths += written
                self.done.add(obj.shmid)
                if inode is not None:
                    self.inodes.append(inode)
        except BaseException:
            _remove(paths)
            raise
        return paths

    def write_inodes(self, images: ImagesDir) -> list[Path]:
        """``memfd-inode.img``, if there are memfds."""
        if not self.inodes:
            return []
        return [images.write_entries(ImageKind.MEMFD_INODE, self.inodes)]


def _remove(paths: Iterable[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def write_shmem(images: ImagesDir, pid: int, vmas: Sequence[Vma],
                memfd_fds: Mapping[int, Sequence[int]] | None, first_pages_id: int
                ) -> list[Path]:
    """Dump every shared object of the frozen process ``pid`` (see the module
    docstring and :meth:`ShmemDump.write`) and ``memfd-inode.img`` if there are
    memfds. Returns the paths written. Blocking."""
    one = ShmemDump()
    paths = one.write(images, pid, vmas, memfd_fds, first_pages_id)
    try:
        return paths + one.write_inodes(images)
    except BaseException:
        _remove(paths)
        raise
