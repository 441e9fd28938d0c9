"""Pages a dump holds in its parent: PE_PARENT pagemap entries, read through the
chain of ``parent`` links (pre-copy rounds, ``criu pre-dump`` dirs), as CRIU's
page-read follows them (criu/pagemap.c, ``open_page_read_at`` with a parent).

An entry with PE_PARENT says: these pages are as in the parent dump. The
parent's pagemap has them with data (in its ``pages-N.img``) or as PE_PARENT
again, one level further. The nearest level that has data wins.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from lazymig.errors import ImageError, LazyMigOSError
from lazymig.linux.uffd import buffer_address
from lazymig.linux.vm import process_vm_writev, write_memory
from lazymig.proto.constants import PAGE_SIZE, PARENT_LINK, PE
from lazymig.proto.images import ImagesDir, PageIndex, PagemapEntry

__all__ = ["ParentChain", "map_pages_image", "write_pages", "write_parent_pages"]

_CHUNK: Final = 4 << 20


class _Level:
    """One dump of the chain: its entries and where each page with data is."""

    def __init__(self, images: ImagesDir, pid: int) -> None:
        pagemap = images.pagemap(pid)
        self.path = images.path
        self.entries = pagemap.entries
        self.starts = [e.vaddr for e in self.entries]
        self.pages = images.pages_path(pagemap.pages_id)
        self.offsets = {e.vaddr: off for e, off in PageIndex(self.entries)}


class ParentChain:
    """The parents of the dump in ``images`` (nearest first), read for process ``pid``.

    Raises:
        ImageError: a dump with PE_PARENT entries has no ``parent`` link, or a
            parent lacks the pagemap of ``pid``.
    """

    def __init__(self, images: ImagesDir, pid: int) -> None:
        self.pid = pid
        self._child = images.path
        self._levels: list[_Level] = []

    def _level(self, depth: int) -> _Level:
        while len(self._levels) <= depth:
            below = self._levels[-1].path if self._levels else self._child
            link = below / PARENT_LINK
            if not link.exists():
                raise ImageError(f"{below} has pages in its parent but no working {PARENT_LINK} "
                                 "link (the pre-dump dirs must be copied along)", path=link)
            try:
                self._levels.append(_Level(ImagesDir(link.resolve()), self.pid))
            except FileNotFoundError as exc:
                raise ImageError(f"the parent dump {link.resolve()} has no pagemap of process "
                                 f"{self.pid}", path=link) from exc
        return self._levels[depth]

    def locate(self, start: int, end: int, depth: int = 0) -> Iterator[tuple[int, int, Path, int]]:
        """Where the pages of ``[start, end)`` are: ``(vaddr, length, pages image,
        offset)`` pieces in address order.

        Raises:
            ImageError: no level of the chain has some of them.
        """
        level = self._level(depth)
        at = start
        i = max(bisect.bisect_right(level.starts, start) - 1, 0)
        while at < end:
            entry = level.entries[i] if i < len(level.entries) else None
            if entry is None or entry.vaddr > at or entry.end <= at:
                if entry is not None and entry.end <= at:
                    i += 1
                    continue
                raise ImageError(f"page {at:#x} is in the parent of {self._child} but "
                                 f"{level.path} does not have it", path=level.path)
            stop = min(end, entry.end)
            if entry.has_data:
                yield at, stop - at, level.pages, level.offsets[entry.vaddr] + at - entry.vaddr
            elif PE.PARENT in entry.flags:
                yield from self.locate(at, stop, depth + 1)
            else:
                raise ImageError(f"page {at:#x} is in the parent of {self._child} but is lazy "
                                 f"in {level.path}", path=level.path)
            at = stop
            i += 1


def write_parent_pages(pid: int, images: ImagesDir, image_pid: int,
                       entries: Sequence[PagemapEntry]) -> int:
    """Write the PE_PARENT pages of ``entries`` (the pagemap of ``image_pid`` in
    ``images``) into process ``pid``'s memory from the parent chain; returns the
    pages written (0, reading nothing, if there is none).

    The parents' pages images are mapped and copied with ``process_vm_writev``:
    one copy, from the page cache (a pre-copy of 1 GiB is written during the
    restore, the downtime); a mapping it cannot write (read-only by now) gets
    ``/proc/PID/mem``'s forced write instead."""
    todo = [e for e in entries if PE.PARENT in e.flags]
    if not todo:
        return 0
    chain = ParentChain(images, image_pid)
    total = sum(e.nr_pages for e in todo) * PAGE_SIZE
    with contextlib.ExitStack() as stack:
        mapped: dict[Path, int] = {}
        for e in todo:
            for vaddr, length, pages, offset in chain.locate(e.vaddr, e.end):
                base = mapped.get(pages)
                if base is None:
                    base = mapped[pages] = stack.enter_context(map_pages_image(pages, total))
                write_pages(pid, vaddr, base + offset, length)
    return total // PAGE_SIZE


@contextlib.contextmanager
def map_pages_image(path: Path, wanted: int) -> Iterator[int]:
    """The address of ``path`` mapped read-only for the block, to read at most
    ``wanted`` bytes of it."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            raise ImageError("empty pages image, yet pages are said to be in it", path=path)
        # Populated at once when most of it is read: faulting its pages in one at a
        # time costs ~20% more. Not for a few pages of a big image (a prepared
        # restore's leftovers): populating 1 GiB to read 7 pages took 0.5 s.
        populate = mmap.MAP_POPULATE if wanted * 2 >= size else 0
        with mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | populate,
                       prot=mmap.PROT_READ) as view, \
                buffer_address(view) as (address, _):
            yield address


def write_pages(pid: int, vaddr: int, source: int, length: int) -> None:
    """Copy ``length`` bytes at our address ``source`` to ``vaddr`` in process ``pid``
    (``process_vm_writev``, 4 MiB a call; a forced write where it refuses)."""
    done = 0
    while done < length:
        n = min(_CHUNK, length - done)
        try:
            got = process_vm_writev(pid, source + done, vaddr + done, n)
        except LazyMigOSError:
            got = 0
        if got <= 0:  # not writable as mapped: forced write
            write_memory(pid, vaddr + done, ctypes.string_at(source + done, n))
            got = n
        done += got
