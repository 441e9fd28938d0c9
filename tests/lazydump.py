"""Test helpers: a small CRIU-format dump on disk whose lazy pages hold a known
pattern, and page pipes read back the way the page server serves them."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

from lazymig.dump.pagepipe import PagePipes, PagesNotFoundError
from lazymig.dump.store import PageSegment, PipePageStore
from lazymig.proto.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PE, VmaStatus
from lazymig.proto.images import ImagesDir, MmEntry, PagemapEntry, PstreeEntry, VmaEntry


def page_pattern(pid: int, vaddr: int) -> bytes:
    """The 4 KiB a test page at ``vaddr`` of ``pid`` holds."""
    return struct.pack("<QQ", pid, vaddr) * (PAGE_SIZE // 16)


def write_lazy_dump(directory: Path, layout: dict[int, list[tuple[int, int]]]) -> ImagesDir:
    """Write pstree, mm, pagemap, pages and (last) inventory images for
    ``{pid: [(vaddr, nr_pages), ...]}``.

    Each (vaddr, nr_pages) is one private anonymous VMA whose pages are all
    PE_LAZY|PE_PRESENT (an ordinary CRIU dump of lazy-capable memory).
    """
    images = ImagesDir(directory)
    images.write_pstree([PstreeEntry(pid=pid, ppid=0, pgid=pid, sid=pid, threads=[pid])
                         for pid in layout])
    for pages_id, (pid, vmas) in enumerate(layout.items(), start=1):
        mm = MmEntry(mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0,
                     mm_start_stack=0, mm_start_brk=0, mm_brk=0, mm_arg_start=0, mm_arg_end=0,
                     mm_env_start=0, mm_env_end=0, exe_file_id=0)
        for vaddr, nr in vmas:
            mm.vmas.append(VmaEntry(start=vaddr, end=vaddr + nr * PAGE_SIZE, pgoff=0, shmid=0,
                                    prot=3, flags=MAP_PRIVATE | MAP_ANONYMOUS,
                                    status=VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE, fd=-1))
        images.write_mm(pid, mm)
        images.write_pagemap(pid, pages_id, [PagemapEntry(vaddr, nr, PE.LAZY | PE.PRESENT)
                                             for vaddr, nr in vmas])
        with images.open_pages_writer(pages_id) as pages:
            for vaddr, nr in vmas:
                for i in range(nr):
                    pages.write(page_pattern(pid, vaddr + i * PAGE_SIZE))
    images.write_inventory()  # last, as a dump writes it: the dump is complete
    return images


class PipeServer:
    """Lazy pages of page pipes as the page server gets them (a
    :class:`PipePageStore`); leaving the block closes the store and the pipes."""

    def __init__(self, pipes: PagePipes) -> None:
        self._pid = os.getpid()  # any pid: the store serves what it was given under it
        self._store = PipePageStore(self._pid, pipes)

    def serve(self, vaddr: int, nr_pages: int) -> tuple[int, bytes]:
        """Up to ``nr_pages`` lazy pages from ``vaddr``: how many, and their bytes."""
        segment = self._store.lookup(self._pid, vaddr, nr_pages)
        if segment is None:
            raise PagesNotFoundError(f"no lazy pages at {vaddr:#x}")
        assert isinstance(segment, PageSegment), "every pipe is filled: nothing to wait for"
        n = segment.length // PAGE_SIZE
        out = bytearray()
        try:
            while len(out) < segment.length:
                chunk = os.read(segment.fd, segment.length - len(out))
                assert chunk, "the scratch pipe ended early"
                out += chunk
        finally:
            segment.close(drained=len(out) == segment.length)
        return n, bytes(out)

    def __enter__(self) -> PipeServer:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None
                 ) -> None:
        self._store.close()
