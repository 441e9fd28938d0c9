"""Rebuilding the shared objects of a dumped process (see :mod:`lazymig.dump.shmem`).

Per object (tracer thread, injected syscalls), as CRIU's restorer does:

1. it is created inside the process at a free address, the size of what its
   VMAs map: a shared anonymous one by ``mmap(MAP_SHARED | MAP_ANONYMOUS)``
   (so the kernel names it ``/dev/zero (deleted)`` again) and opened through
   ``/proc/self/map_files``; a memfd (``memfd-inode.img``) by
   ``memfd_create`` with its name and ``ftruncate``, then mapped there;
2. its contents are written from ``shmem-pagemap-<shmid>.img`` and its pages
   image through ``/proc/PID/mem`` (eagerly: shared pages are never lazy);
3. each of its VMAs is mapped from the object's fd at its address, offset,
   protection and flags; the first mapping goes; a memfd gets its size and
   seals back and its fd is kept for the fds it was open on
   (:func:`~lazymig.restore.files.restore_files`); the others' fd goes.

So every VMA that shared an object shares one again, with its contents. In a
tree, an object another process rebuilt already is opened from it
(``existing``: its /proc map_files or fd link), not made again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from lazymig.dump.shmem import is_shared_object, shmem_pagemap_path
from lazymig.errors import ImageError
from lazymig.linux.procfs import map_file_path
from lazymig.linux.syscalls import (
    SYS_CLOSE,
    SYS_FCNTL,
    SYS_FTRUNCATE,
    SYS_MEMFD_CREATE,
    SYS_MMAP,
    SYS_MUNMAP,
)
from lazymig.linux.vm import write_memory
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    VmaStatus,
)
from lazymig.proto.images import (
    ImagesDir,
    MemfdInodeEntry,
    PagemapReader,
    VmaEntry,
    lazymig_pb2,
)
from lazymig.restore.files import SyscallTarget

__all__ = ["recreate_tmpfs_files", "restore_shared_objects", "shared_vmas"]

log = logging.getLogger(__name__)

_F_ADD_SEALS: Final = 1033
_F_SEAL_SEAL: Final = 1
_MFD_ALLOW_SEALING: Final = 2
_PROT_RW: Final = PROT_READ | PROT_WRITE
_MFD_CLOEXEC: Final = 1
_MAP_KEPT: Final = MAP_NORESERVE | MAP_LOCKED
_CHUNK: Final = 4 << 20


def shared_vmas(vmas: Sequence[VmaEntry]) -> dict[int, list[VmaEntry]]:
    """{shmid: its VMAs} of the shared objects among ``vmas``. Pure."""
    out: dict[int, list[VmaEntry]] = {}
    for v in vmas:
        if is_shared_object(v.status):
            out.setdefault(v.shmid, []).append(v)
    return out


def restore_shared_objects(target: SyscallTarget, images: ImagesDir, vmas: Sequence[VmaEntry],
                           memfds: Mapping[int, MemfdInodeEntry], free_at: Callable[[int], int],
                           madvise: Callable[[int, int, int], None],
                           existing: Mapping[int, str] | None = None
                           ) -> tuple[int, dict[int, int]]:
    """Rebuild every shared object of ``vmas`` and every memfd of ``memfds``
    (``memfd-inode.img`` by inode id) and map the VMAs (see the module docstring).

    ``free_at(size)`` is a free address for a temporary mapping of ``size``
    bytes; ``madvise(start, end, madv)`` gives a VMA its advice. ``existing``:
    {shmid: path} of objects another process of the tree rebuilt already
    (``/proc/PID/map_files/...``): they are opened from there, not made again,
    so the processes share them as they did. Returns the
    number of pages written and {inode id: its fd in the process} of the
    memfds, left open for :func:`~lazymig.restore.files.restore_files`.
    """
    written = 0
    kept: dict[int, int] = {}
    objects = shared_vmas(vmas)
    for inode in memfds:
        objects.setdefault(inode, [])
    for shmid, group in sorted(objects.items()):
        memfd = memfds.get(shmid)
        if memfd is None and any(v.status & VmaStatus.MEMFD for v in group):
            raise ImageError(f"memfd-inode.img has no entry for the memfd mapped at "
                             f"{group[0].start:#x} (shmid {shmid})")
        size = max([v.pgoff + v.end - v.start for v in group]
                   + ([memfd.size] if memfd is not None else []))
        size = max(PAGE_SIZE, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        at = free_at(size)
        tmp = -1
        sealing = 0
        if existing and shmid in existing:  # another process of the tree made it
            fd = target.open(existing[shmid], os.O_RDWR | os.O_CLOEXEC)
        elif memfd is not None:
            sealing = _MFD_ALLOW_SEALING if memfd.seals & ~_F_SEAL_SEAL else 0
            fd = target.call(SYS_MEMFD_CREATE, target.data(memfd.name.encode() + b"\0"),
                             _MFD_CLOEXEC | sealing, what=f"memfd_create({memfd.name})")
            target.call(SYS_FTRUNCATE, fd, size, what=f"ftruncate(memfd {memfd.name})")
            tmp = target.call(SYS_MMAP, at, size, _PROT_RW, MAP_SHARED | MAP_FIXED_NOREPLACE,
                              fd, 0, what=f"mmap(memfd {memfd.name})")
        else:
            tmp = target.call(SYS_MMAP, at, size, _PROT_RW,
                              MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0,
                              what="mmap(shared anonymous)")
            fd = target.open(map_file_path("self", tmp, tmp + size),
                             os.O_RDWR | os.O_CLOEXEC)
        try:
            if tmp >= 0:
                written += _fill(target.pid, images, shmid, tmp, size)
            for v in group:
                what = f"mmap({v.start:#x}-{v.end:#x} of shared object {shmid})"
                # A private mapping (of a memfd, of a deleted file) is private
                # again: its own written pages are written over it afterwards.
                shared = MAP_PRIVATE if v.flags & MAP_PRIVATE else MAP_SHARED
                got = target.call(SYS_MMAP, v.start, v.end - v.start, v.prot,
                                  shared | MAP_FIXED | (v.flags & _MAP_KEPT), fd, v.pgoff,
                                  what=what)
                if got != v.start:
                    raise ImageError(f"{what} landed at {got:#x}")
                madvise(v.start, v.end, v.madv)
            if tmp >= 0:
                target.call(SYS_MUNMAP, tmp, size, what="munmap(shared object)")
            if memfd is not None:
                if tmp >= 0 and memfd.size != size:  # the mapped part went past its end
                    target.call(SYS_FTRUNCATE, fd, memfd.size, what="ftruncate(memfd)")
                if sealing:  # last: seals stop what rebuilding it needed
                    target.call(SYS_FCNTL, fd, _F_ADD_SEALS, memfd.seals,
                                what=f"fcntl(F_ADD_SEALS) on memfd {memfd.name}")
                kept[shmid] = fd
                fd = -1
        finally:
            if fd >= 0:
                target.call(SYS_CLOSE, fd, what="close(shared object)")
        log.debug("pid %d: shared object %d (%d bytes) mapped by %d VMAs", target.pid, shmid,
                  size, len(group))
    return written, kept


def _fill(pid: int, images: ImagesDir, shmid: int, tmp: int, size: int) -> int:
    """Write the dumped contents of object ``shmid`` into its mapping at ``tmp``."""
    written = 0
    for offset, data in _contents(images, shmid, size):
        write_memory(pid, tmp + offset, data)
        written += len(data) // PAGE_SIZE
    return written


def _contents(images: ImagesDir, shmid: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of the dumped contents of object ``shmid`` of ``size`` bytes."""
    path = shmem_pagemap_path(images, shmid)
    if not path.exists():
        raise ImageError(f"{path.name} is missing: the contents of shared object {shmid}",
                         path=path)
    with PagemapReader(path) as reader, \
            open(images.pages_path(reader.pages_id), "rb", buffering=0) as pages:
        for e in reader:
            length = e.nr_pages * PAGE_SIZE
            if e.vaddr + length > size:
                raise ImageError(f"{path.name}: pages at offset {e.vaddr:#x} lie beyond the "
                                 f"object's {size} bytes", path=path)
            for off in range(0, length, _CHUNK):
                data = pages.read(min(_CHUNK, length - off))
                if len(data) != min(_CHUNK, length - off):
                    raise ImageError(f"{pages.name} ends before the pages of shared object "
                                     f"{shmid} at offset {e.vaddr + off:#x}", path=path)
                yield e.vaddr + off, data


def recreate_tmpfs_files(images: ImagesDir, vmas: Sequence[VmaEntry],
                         files: Sequence[lazymig_pb2.lazymig_file_entry]) -> None:
    """Make again, with their dumped contents and size, the files that ``vmas``
    map shared, that are missing here and whose contents were dumped (the
    files of a tmpfs: a /dev/shm segment of ``multiprocessing.shared_memory``
    on another host). Blocking (the restorer's own I/O: it shares the restored
    process's mount namespace)."""
    ids = {v.shmid for v in vmas if v.status & VmaStatus.FILE_SHARED
           and not is_shared_object(v.status)}
    for f in files:
        if f.id not in ids or f.deleted or not f.HasField("inode") \
                or not shmem_pagemap_path(images, f.inode).exists():
            continue
        try:
            fd = os.open(f.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue  # here already (on the source's host: the same file)
        try:
            os.ftruncate(fd, f.size)
            padded = (f.size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)  # as it was dumped
            for offset, data in _contents(images, f.inode, padded):
                os.pwrite(fd, data[:max(0, f.size - offset)], offset)
        except BaseException:
            Path(f.path).unlink()
            raise
        finally:
            os.close(fd)
        log.info("%s was missing: made again from the dump (%d bytes)", f.path, f.size)
