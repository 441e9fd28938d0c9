"""Shared memory objects of a frozen process, dumped whole, as CRIU's shmem.c does.

Shared anonymous memory (``/dev/zero (deleted)``: ``mmap(-1, n)``,
``MAP_SHARED | MAP_ANONYMOUS``) and memfds mapped ``MAP_SHARED`` are one
object each however many VMAs map it (``vma_entry.shmid`` is the object's
inode number, as in CRIU; ``pgoff`` the VMA's offset in it). Each object's
contents go into ``shmem-pagemap-<shmid>.img`` (a ``pagemap_head`` naming its
``pages-<id>.img``, then ``pagemap_entry``s whose ``vaddr`` is the offset in
the object, as CRIU writes them) and that pages image. Only the parts some
VMA maps are dumped, and of those only what holds data (``SEEK_DATA`` on the
object: holes stay holes). The object is read through
``/proc/PID/map_files``, so nothing is faulted in the target.

These pages are never lazy (CRIU does not lazy-restore shmem either): the
restorer (:mod:`lazymig.restore.shmem`) writes them before the process runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from lazymig.dump.scan import Vma
from lazymig.errors import LazyMigOSError
from lazymig.proto.constants import PAGE_SIZE, PE, VmaStatus
from lazymig.proto.images import ImagesDir, PagemapEntry, PagemapWriter, PagesWriter

__all__ = ["SHMEM_PAGEMAP", "is_shared_object", "shared_objects", "shmem_pagemap_path",
           "write_shmem"]

SHMEM_PAGEMAP: Final = "shmem-pagemap-{}.img"
"""CRIU's file name of an object's pagemap (its magic is PAGEMAP's)."""
_CHUNK: Final = 4 << 20


def is_shared_object(status: int) -> bool:
    """A VMA of a shared object whose contents are dumped (shared anonymous, not
    SysV; or a memfd)."""
    return bool(status & VmaStatus.MEMFD
                or (status & VmaStatus.ANON_SHARED and not status & VmaStatus.SYSVIPC))


@dataclasses.dataclass(frozen=True, slots=True)
class SharedObject:
    """One shared object and the VMAs that map it."""

    shmid: int
    vmas: tuple[Vma, ...]

    def spans(self) -> list[tuple[int, int]]:
        """The [start, end) offsets some VMA maps, merged."""
        out: list[tuple[int, int]] = []
        for a, b in sorted((v.pgoff, v.pgoff + v.size) for v in self.vmas):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out


def shared_objects(vmas: Iterable[Vma]) -> list[SharedObject]:
    """The shared objects of ``vmas`` by shmid (the inode), in shmid order. Pure."""
    by_id: dict[int, list[Vma]] = {}
    for v in vmas:
        if is_shared_object(v.status):
            by_id.setdefault(v.inode, []).append(v)
    return [SharedObject(shmid, tuple(group)) for shmid, group in sorted(by_id.items())]


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


def _write_object(images: ImagesDir, pid: int, obj: SharedObject, pages_id: int) -> list[Path]:
    first = obj.vmas[0]
    where = f"/proc/{pid}/map_files/{first.start:x}-{first.end:x}"
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or errno.EIO, f"opening the shared memory at "
                             f"{first.start:#x} ({where})", pid=pid) from exc
    paths: list[Path] = []
    try:
        with contextlib.ExitStack() as stack:
            pages = stack.enter_context(PagesWriter(images.pages_path(pages_id),
                                                    fsync=images.fsync))
            pagemap = stack.enter_context(PagemapWriter(shmem_pagemap_path(images, obj.shmid),
                                                        pages_id, fsync=images.fsync))
            for start, end in obj.spans():
                for a, b in _data_runs(fd, start, end):
                    for off in range(a, b, _CHUNK):
                        n = min(_CHUNK, b - off)
                        data = os.pread(fd, n, off)
                        if len(data) < n:  # the object ends inside the mapping (SIGBUS there)
                            data = data[: len(data) & ~(PAGE_SIZE - 1)]
                        if data:
                            pages.write(data)
                            pagemap.write(PagemapEntry(off, len(data) // PAGE_SIZE, PE.PRESENT))
                        if len(data) < n:
                            break
            paths += [pages.path, pagemap.path]
    finally:
        os.close(fd)
    return paths


def write_shmem(images: ImagesDir, pid: int, vmas: Sequence[Vma], first_pages_id: int
                ) -> list[Path]:
    """Dump every shared object of the frozen process ``pid`` (see the module
    docstring); ``pages-<id>.img`` ids are handed out from ``first_pages_id``.
    Returns the paths written. Blocking."""
    paths: list[Path] = []
    try:
        for n, obj in enumerate(shared_objects(vmas)):
            paths += _write_object(images, pid, obj, first_pages_id + n)
    except BaseException:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    return paths

