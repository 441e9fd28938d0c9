"""Where a page server finds the lazy pages it serves.

Two stores implement :class:`LazyPageStore`: the page pipes of a live dump
(``lazymig dump --lazy-pages``) and the pages files of a dump on disk
(``lazymig page-server --lazy-pages``). The server does not care which.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lazymig.errors import BrokenResourceError, ImageError
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.runs import PageRuns

if TYPE_CHECKING:  # the restore side imports this module: no ptrace machinery for it
    from lazymig.dump.late_fill import LateFill
    from lazymig.dump.pagepipe import PagePipes, PipeBuffer
    from lazymig.proto.images import ImagesDir

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

    def lookup(self, pid: int, vaddr: int, nr_pages: int
               ) -> PageSegment | Awaitable[PageSegment] | None:
        """The bytes of up to ``nr_pages`` lazy pages from ``vaddr``, in one lookup.

        The pages are clamped at the end of the segment that holds ``vaddr`` (so
        the segment may hold fewer than asked: ``length // PAGE_SIZE`` of them).
        Usually a :class:`PageSegment` ready to be read; an awaitable of it when
        they cannot be read yet (the page pipes of a live dump are filled after
        the server starts listening: it asks for them first, and raises if they
        never come); None when ``vaddr`` is not a lazy page of ``pid`` (or
        ``pid`` is unknown).

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
        self._lazy: dict[int, tuple[PageRuns, list[int], int]] = {}
        """Per pid: its lazy ranges, each one's offset in its pages file, that file's fd."""
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
        offsets = [index.offset(r.vaddr, r.nr_pages) for r in ranges]
        missing = [r for r, offset in zip(ranges, offsets, strict=True) if offset is None]
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
        self._lazy[pid] = (PageRuns((r.vaddr, r.nr_pages) for r in ranges),
                           [offset for offset in offsets if offset is not None], fd)

    def pids(self) -> Iterable[int]:
        return self._lazy.keys()

    def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
        return list(self._lazy[pid][0])

    def lookup(self, pid: int, vaddr: int, nr_pages: int) -> PageSegment | None:
        # On every GET: one dict lookup, one bisect, no object but the segment.
        lazy = self._lazy.get(pid)
        if lazy is None or vaddr % PAGE_SIZE:
            return None
        runs, offsets, fd = lazy
        i = runs.find(vaddr)
        if i < 0:
            return None
        length = min(nr_pages << PAGE_SHIFT, runs.end(i) - vaddr)
        return PageSegment(fd, offsets[i] + vaddr - runs.start(i), length, owned=False)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._lazy.clear()


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
        # Here, not at the top: a page server for a dump on disk reads its images with
        # this module before it says ready, and needs neither ctypes nor asyncio.
        from lazymig.linux.vm import set_pipe_size, tee  # noqa: PLC0415

        self._tee = tee
        self._set_pipe_size = set_pipe_size
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

    def lookup(self, pid: int, vaddr: int, nr_pages: int
               ) -> PageSegment | Awaitable[PageSegment] | None:
        pieces = self._pieces(pid, vaddr, nr_pages)
        if not pieces:
            return None
        late = self._late_fill
        if late is not None and not late.complete:  # O(1) once every pipe is filled
            waits = [w for buf, _, _ in pieces if (w := late.wait(buf)) is not None]
            if waits:
                return self._when_filled(waits, pid, vaddr, nr_pages)
        return self._segment(pieces, vaddr)

    async def _when_filled(self, waits: Sequence[Awaitable[object]], pid: int, vaddr: int,
                           nr_pages: int) -> PageSegment:
        import asyncio  # noqa: PLC0415 (a dump on disk never waits: no asyncio before ready)

        await asyncio.gather(*waits)
        return self._segment(self._pieces(pid, vaddr, nr_pages), vaddr)

    def _segment(self, pieces: list[tuple[PipeBuffer, int, int]], vaddr: int) -> PageSegment:
        """A scratch pipe holding exactly the pages of ``pieces`` (tee'd, never consumed)."""
        nr_pages = sum(n for _, _, n in pieces)
        read_fd, write_fd = self._spare.pop() if self._spare else self._new_pipe()
        try:
            for buf, first, n in pieces:
                need = (first + n) << PAGE_SHIFT
                got = self._tee(buf.read_fd, write_fd, need)
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
            self._set_pipe_size(write_fd, self._pipe_size)
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
