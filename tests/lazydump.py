"""Test helper: a small CRIU-format dump on disk whose lazy pages hold a known pattern."""

from __future__ import annotations

import struct
from pathlib import Path

from lazymig.proto.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PE, VmaStatus
from lazymig.proto.images import ImagesDir, MmEntry, PagemapEntry, PstreeEntry, VmaEntry


def page_pattern(pid: int, vaddr: int) -> bytes:
    """The 4 KiB a test page at ``vaddr`` of ``pid`` holds."""
    return struct.pack("<QQ", pid, vaddr) * (PAGE_SIZE // 16)


def write_lazy_dump(directory: Path, layout: dict[int, list[tuple[int, int]]]) -> ImagesDir:
    """Write pstree, mm, pagemap and pages images for ``{pid: [(vaddr, nr_pages), ...]}``.

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
    return images
