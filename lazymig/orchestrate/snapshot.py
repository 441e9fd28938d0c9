"""Memory snapshots on disk that a page server can serve lazily.

:func:`write_snapshot` writes regions of memory as a CRIU-format dump of one
image pid whose pages are all lazy (PE_LAZY|PE_PRESENT, as ``criu dump``
writes lazy-capable memory). :func:`~lazymig.orchestrate.source.serve_images`
then serves it, and a fresh process that maps the same regions and calls
:func:`~lazymig.uffd.attach.attach` gets them filled on demand (see
``examples/snapshot_attach.py``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence

from lazymig.errors import ConfigurationError
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PAGE_SIZE,
    PE,
    PROT_READ,
    PROT_WRITE,
    VmaStatus,
)
from lazymig.proto.images import ImagesDir, MmEntry, PagemapEntry, PstreeEntry, VmaEntry

__all__ = ["Region", "write_snapshot"]

Region = tuple[int, bytes | bytearray | memoryview]
"""``(address, contents)``: page-aligned address, a whole number of pages."""

async def write_snapshot(images_dir: str | os.PathLike[str], regions: Iterable[Region], *,
                         pid: int = 1) -> ImagesDir:
    """Write ``regions`` into ``images_dir`` as the lazy memory of image pid ``pid``.

    Each region becomes one private anonymous read-write VMA. The files are
    written in a worker thread. Raises ConfigurationError for regions that are
    not page-aligned, empty or overlapping.

    Example::

        await lazymig.write_snapshot("/srv/snap", [(0x7f0000000000, memory)], pid=1)
        async with lazymig.serve_images("/srv/snap", address="0.0.0.0", port=9876):
            ...  # a daemon elsewhere fills processes that attach that region
    """
    ordered: list[Region] = sorted(((address, memoryview(data).cast("B"))
                                    for address, data in regions), key=lambda r: r[0])
    for i, (address, data) in enumerate(ordered):
        if address % PAGE_SIZE or len(data) % PAGE_SIZE or not len(data):
            raise ConfigurationError(f"region at {address:#x} ({len(data)} bytes) is not a "
                                     "whole number of pages at a page-aligned address")
        if i and ordered[i - 1][0] + len(ordered[i - 1][1]) > address:
            raise ConfigurationError(f"region at {address:#x} overlaps the one before")
    images = ImagesDir(images_dir)
    await asyncio.to_thread(_write, images, ordered, pid)
    return images


def _write(images: ImagesDir, regions: Sequence[Region], pid: int) -> None:
    images.write_pstree([PstreeEntry(pid=pid, ppid=0, pgid=pid, sid=pid, threads=[pid])])
    mm = MmEntry(mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0,
                 mm_start_stack=0, mm_start_brk=0, mm_brk=0, mm_arg_start=0, mm_arg_end=0,
                 mm_env_start=0, mm_env_end=0, exe_file_id=0)
    for address, data in regions:
        mm.vmas.append(VmaEntry(start=address, end=address + len(data), pgoff=0, shmid=0,
                                prot=PROT_READ | PROT_WRITE, flags=MAP_PRIVATE | MAP_ANONYMOUS,
                                status=VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE, fd=-1))
    images.write_mm(pid, mm)
    images.write_pagemap(pid, 1, [PagemapEntry(address, len(data) // PAGE_SIZE,
                                               PE.LAZY | PE.PRESENT) for address, data in regions])
    with images.open_pages_writer(1) as pages:
        for _, data in regions:
            pages.write(data)
