"""Where a page server finds the lazy pages it serves.

Two stores implement :class:`LazyPageStore`: the page pipes of a live dump
(``lazymig dump --lazy-pages``) and the pages files of a dump on disk
(``lazymig page-server --lazy-pages``). The server does not care which.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lazymig.errors import BrokenResourceError, ImageError
from lazymig.linux.vm import set_pipe_size, tee
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.images import ImagesDir, PageIndex
from lazymig.proto.runs import PageRuns

if TYPE_CHECKING:  # the restore side imports this module: no ptrace machinery for it
    from lazymig.dump.late_fill import LateFill
    from lazymig.dump.pagepipe import PagePipes, PipeBuffer

__all__ = ["ImagesPageStore", "LazyPageStore", "PageSegment", "PipePageStore"]


@dataclass(slots=True)
class PageSegment:
    """The bytes of one reply, ready to be read.

    ``fd`` is a pipe holding exactly ``length`` bytes (``offset`` None), or a
    file whose bytes start at ``offset``. Call :meth:`close` when done, saying
    whether every byte was moved: ``release`` (if the store gave one) then may
    reuse the pipe; otherwise ``owned`` fds are closed and a store's own file
    fds are left alone.
    """

    fd: int
    offset: int | None
    length: int
    owned: bool
    release: Callable[[bool], None] | None = None

    def close(self, drained: bool = False) -> None:
        if self.fd < 0:
            return
        if self.release is not None:
            self.release(drained)
        elif self.owned:
            os.close(self.fd)
        self.fd = -1


class LazyPageStore(Protocol):
    """The lazy pages of a dump, by image pid and dump-time address."""

    def pids(self) -> Iterable[int]:
        """The image pids that have lazy pages."""
        ...

    def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
        """Every lazy range of ``pid`` as (vaddr, nr_pages), sorted."""
        ...

    def available(self, pid: int, vaddr: int, nr_pages: int) -> int:
        """How many of ``nr_pages`` from ``vaddr`` one reply can carry.

        The count is clamped at the end of the segment that holds ``vaddr``
        (so it may be smaller than asked); 0 means ``vaddr`` is not a lazy page
        of ``pid`` (or ``pid`` is unknown).
        """
        ...

    def pending(self, pid: int, vaddr: int, nr_pages: int) -> Awaitable[object] | None:
        """None if the ``nr_pages`` lazy pages at ``vaddr`` (as clamped by
        :meth:`available`) can be read now (the usual case); else an awaitable
        that ends once they can, and asks for them first (the page pipes of a
        live dump are filled after the server starts listening). It raises if
        they never will be."""
        ...

    def segment(self, pid: int, vaddr: int, nr_pages: int) -> PageSegment:
        """The bytes of ``nr_pages`` (as clamped by :meth:`available`) at ``vaddr``,
        once :meth:`pending` is done with them.

        Serving a page never consumes it: it can be served again.
        """
        ...

    def close(self) -> None:
        """Release every fd the store holds (idempotent)."""
        ...


class ImagesPageStore:
    """The lazy pages of a dump on disk (``lazymig page-server --lazy-pages -D DIR``).

    Serves what CRIU's ``page-server --lazy-pages`` serves: the PE_LAZY pages
    of every task in pstree.img whose data is in the pages image (CRIU writes
    lazy-capable pages as PE_LAZY|PE_PRESENT in an ordinary dump). A zombie
    has no memory images (core-N.img alone): it has no lazy pages either.
    Pages go to the socket straight from the pages file.
    """

    def __init__(self, images: ImagesDir) -> None:
        self._ranges: dict[int, PageRuns] = {}
        self._index: dict[int, tuple[int, PageIndex]] = {}
        self._fds: list[int] = []
        try:
            for pid in images.pstree_pids():
                if images.has_memory(pid):
                    self._add(images, pid)
        except BaseException:
            self.close()
            raise

    def _add(self, images: ImagesDir, pid: int) -> None:
        ranges = images.lazy_ranges(pid)
        if not ranges:
            return
        path, index = images.page_index(pid)
        missing = [r for r in ranges if index.offset(r.vaddr, r.nr_pages) is None]
        if missing:
            raise ImageError(
                f"{len(missing)} lazy ranges of pid {pid} (first at {missing[0].vaddr:#x}) "
                "have no data in the images: this dump kept them in the dumper's page pipes "
                "(dump --lazy-pages), so only that dumper can serve them", path=path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._fds.append(fd)
        if os.fstat(fd).st_size < index.size:  # its pagemap claims pages it does not hold
            raise ImageError(f"{os.fstat(fd).st_size} bytes where the pagemap of pid {pid} "
                             f"says {index.size}", path=path)
        self._index[pid] = (fd, index)
        self._ranges[pid] = PageRuns((r.vaddr, r.nr_pages) for r in ranges)

    def pids(self) -> Iterable[int]:
        return self._ranges.keys()

    def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
        return list(self._ranges[pid])

    def available(self, pid: int, vaddr: int, nr_pages: int) -> int:
        ranges = self._ranges.get(pid)
        return 0 if ranges is None else min(nr_pages, ranges.pages_from(vaddr))

    def pending(self, pid: int, vaddr: int, nr_pages: int) -> Awaitable[object] | None:
        return None

    def segment(self, pid: int, vaddr: int, nr_pages: int) -> PageSegment:
        fd, index = self._index[pid]
        offset = index.offset(vaddr, nr_pages)
        assert offset is not None, "available() vouched for these pages"
        return PageSegment(fd, offset, nr_pages * PAGE_SIZE, owned=False)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._index.clear()
        self._ranges.clear()


class PipePageStore:
    """The lazy pages of a live dump, held in its page pipes (``lazymig dump --lazy-pages``).

    Each GET gets a scratch pipe of its own: the page pipe is tee'd into it up
    to the end of the requested pages and the prefix dropped, so the page pipe
    keeps every page (it can be served again) and concurrent connections never
    share a scratch pipe. A GET that runs on past the end of a page pipe gets
    the head of the next one too (up to a scratch pipe's worth): the pagemap
    lists whole runs, not pipes, so the daemon's requests do not stop at pipe
    boundaries, and a reply cut short there would cost it a second GET.
    Drained scratch pipes are kept for the next GETs (no pipe2 +
    F_SETPIPE_SZ + close per request).

    With ``late_fill`` the lazy pipes are being filled while the server runs:
    :meth:`pending` waits for (and hurries) the pipe a GET needs.
    """

    _POOL = 8

    def __init__(self, pid: int, pipes: PagePipes, late_fill: LateFill | None = None) -> None:
        self._pid = pid
        self._pipes = pipes
        self._late_fill = late_fill
        self._ranges = PageRuns.merged((r.vaddr, r.nr_pages) for r in pipes.lazy_runs())
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._pipe_size = pipes.pipe_size  # a scratch pipe holds up to a whole page pipe
        self._spare: list[tuple[int, int]] = []  # empty scratch pipes (read fd, write fd)

    def pids(self) -> Iterable[int]:
        return (self._pid,)

    def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
        return list(self._ranges) if pid == self._pid else []

    def _pieces(self, pid: int, vaddr: int, nr_pages: int) -> list[tuple[PipeBuffer, int, int]]:
        """(page pipe, first page in it, pages) holding up to ``nr_pages`` lazy pages
        from ``vaddr`` in a row: on into the next pipe while it starts with the next
        page, up to what one scratch pipe holds."""
        if pid != self._pid or vaddr % PAGE_SIZE:
            return []
        out: list[tuple[PipeBuffer, int, int]] = []
        left = min(nr_pages, self._pipe_size >> PAGE_SHIFT)
        while left > 0 and (hit := self._pipes.find(vaddr)) is not None:
            buf, first, avail = hit
            n = min(left, avail)
            if out and out[-1][0] is buf and out[-1][1] + out[-1][2] == first:
                out[-1] = (buf, out[-1][1], out[-1][2] + n)
            elif out and first:  # only a pipe's head can follow in the scratch pipe
                break
            else:
                out.append((buf, first, n))
            left -= n
            vaddr += n << PAGE_SHIFT
        return out

    def available(self, pid: int, vaddr: int, nr_pages: int) -> int:
        return sum(n for _, _, n in self._pieces(pid, vaddr, nr_pages))

    def pending(self, pid: int, vaddr: int, nr_pages: int) -> Awaitable[object] | None:
        late = self._late_fill
        if late is None or late.complete:  # on every GET: O(1) once every pipe is filled
            return None
        waits = [w for buf, _, _ in self._pieces(pid, vaddr, nr_pages)
                 if (w := late.wait(buf)) is not None]
        return asyncio.gather(*waits) if waits else None

    def segment(self, pid: int, vaddr: int, nr_pages: int) -> PageSegment:
        pieces = self._pieces(pid, vaddr, nr_pages)
        assert sum(n for _, _, n in pieces) == nr_pages, "available() vouched for these pages"
        read_fd, write_fd = self._spare.pop() if self._spare else self._new_pipe()
        try:
            for buf, first, n in pieces:
                need = (first + n) << PAGE_SHIFT
                got = tee(buf.read_fd, write_fd, need)
                if got != need:
                    raise BrokenResourceError(f"tee gave {got} of {need} bytes at {vaddr:#x}")
                skip = first << PAGE_SHIFT  # only the first piece has one
                while skip:
                    skip -= os.splice(read_fd, self._devnull, skip)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise

        def release(drained: bool) -> None:
            if drained and self._devnull >= 0 and len(self._spare) < self._POOL:
                self._spare.append((read_fd, write_fd))
            else:  # bytes may be left in it: never reuse
                os.close(read_fd)
                os.close(write_fd)

        return PageSegment(read_fd, None, nr_pages * PAGE_SIZE, owned=True, release=release)

    def _new_pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            set_pipe_size(write_fd, self._pipe_size)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        return read_fd, write_fd

    def close(self) -> None:
        """Close the page pipes and the store's own fds (idempotent)."""
        self._pipes.close()
        for read_fd, write_fd in self._spare:
            os.close(read_fd)
            os.close(write_fd)
        self._spare.clear()
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
