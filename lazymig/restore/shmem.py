"""Rebuilding the shared objects of a dumped process (see :mod:`lazymig.dump.shmem`).

Per object (tracer thread, injected syscalls), as CRIU's restorer does:

1. it is created inside the process at a free address, the size of what its
   VMAs map: a shared anonymous one by ``mmap(MAP_SHARED | MAP_ANONYMOUS)``
   (so the kernel names it ``/dev/zero (deleted)`` again) and opened through
   ``/proc/self/map_files``; a memfd by ``memfd_create`` with its name and
   ``ftruncate``, then mapped there;
2. its contents are written from ``shmem-pagemap-<shmid>.img`` and its pages
   image through ``/proc/PID/mem`` (eagerly: shared pages are never lazy);
3. each of its VMAs is mapped from the object's fd at its address, offset,
   protection and flags; the fd and the first mapping go.

So every VMA that shared an object shares one again, with its contents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from lazymig.dump.shmem import is_shared_object, shmem_pagemap_path
from lazymig.errors import ImageError
from lazymig.linux.vm import write_memory
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_SHARED,
    PAGE_SIZE,
    VmaStatus,
)
from lazymig.proto.images import ImagesDir, PagemapReader, VmaEntry, lazymig_pb2
from lazymig.restore.files import SyscallTarget

__all__ = ["memfd_names", "restore_shared_objects", "shared_vmas"]

log = logging.getLogger(__name__)

_SYS_MMAP: Final = 9
_SYS_MUNMAP: Final = 11
_SYS_CLOSE: Final = 3
_SYS_FTRUNCATE: Final = 77
_SYS_MEMFD_CREATE: Final = 319
_PROT_RW: Final = 0x3
_MAP_FIXED_NOREPLACE: Final = 0x100000
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


def memfd_names(files: Iterable[lazymig_pb2.lazymig_file_entry]) -> dict[int, str]:
    """{inode (the shmid): name} of the memfds among the files ``lazymig-<pid>.img``
    lists (their path is ``/memfd:NAME``). Pure."""
    return {f.inode: f.path.removeprefix("/memfd:") for f in files
            if f.path.startswith("/memfd:") and f.HasField("inode")}


def restore_shared_objects(target: SyscallTarget, images: ImagesDir, vmas: Sequence[VmaEntry],
                           names: Mapping[int, str], free_at: Callable[[int], int],
                           madvise: Callable[[int, int, int], None]) -> int:
    """Rebuild and map every shared object of ``vmas`` (see the module docstring).

    ``names`` are the memfds' names by shmid (:func:`memfd_names`);
    ``free_at(size)`` is a free address for a temporary mapping of ``size``
    bytes; ``madvise(start, end, madv)`` gives a VMA its advice. Returns the
    number of pages written.
    """
    written = 0
    for shmid, group in sorted(shared_vmas(vmas).items()):
        size = max(v.pgoff + v.end - v.start for v in group)
        at = free_at(size)
        first = group[0]
        if first.status & VmaStatus.MEMFD:
            name = names.get(shmid, "")
            fd = target.call(_SYS_MEMFD_CREATE, target.data(name.encode() + b"\0"),
                             _MFD_CLOEXEC, what=f"memfd_create({name})")
            target.call(_SYS_FTRUNCATE, fd, size, what=f"ftruncate(memfd {name})")
            tmp = target.call(_SYS_MMAP, at, size, _PROT_RW, MAP_SHARED | _MAP_FIXED_NOREPLACE,
                              fd, 0, what=f"mmap(memfd {name})")
        else:
            tmp = target.call(_SYS_MMAP, at, size, _PROT_RW,
                              MAP_SHARED | MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0,
                              what="mmap(shared anonymous)")
            fd = target.open(f"/proc/self/map_files/{tmp:x}-{tmp + size:x}",
                             os.O_RDWR | os.O_CLOEXEC)
        try:
            written += _fill(target.pid, images, shmid, tmp, size)
            for v in group:
                what = f"mmap({v.start:#x}-{v.end:#x} of shared object {shmid})"
                got = target.call(_SYS_MMAP, v.start, v.end - v.start, v.prot,
                                  MAP_SHARED | MAP_FIXED | (v.flags & _MAP_KEPT), fd, v.pgoff,
                                  what=what)
                if got != v.start:
                    raise ImageError(f"{what} landed at {got:#x}")
                madvise(v.start, v.end, v.madv)
        finally:
            target.call(_SYS_CLOSE, fd, what="close(shared object)")
            target.call(_SYS_MUNMAP, tmp, size, what="munmap(shared object)")
        log.debug("pid %d: shared object %d (%d bytes) mapped by %d VMAs", target.pid, shmid,
                  size, len(group))
    return written


def _fill(pid: int, images: ImagesDir, shmid: int, tmp: int, size: int) -> int:
    """Write the dumped contents of object ``shmid`` into its mapping at ``tmp``."""
    path = shmem_pagemap_path(images, shmid)
    if not path.exists():
        raise ImageError(f"{path.name} is missing: the contents of shared object {shmid}",
                         path=path)
    written = 0
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
                write_memory(pid, tmp + e.vaddr + off, data)
            written += e.nr_pages
    return written
