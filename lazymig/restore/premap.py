"""Pre-copied memory built on the destination before the freeze: a prepared restore.

A restore of a pre-copy (:mod:`lazymig.dump.precopy`) must give the restored
process every page the rounds copied. Written into it after the freeze, as
:mod:`lazymig.restore.parent` does, that is the downtime: up to a GiB of pages
allocated and copied before it may run. Here they are put in place while the
source still runs, and the freeze only moves them:

* :meth:`PreparedMemory.apply` (while the source runs, one pre-dump round at a
  time, in chain order): each page the round holds with data is written into a
  *window*, a private anonymous mapping of the process-to-be (the restorer's
  ``sleep`` helper, seized; the restored root is later cloned in its address
  space with ``CLONE_VM``, :func:`~lazymig.restore.pids.fork`) that holds the
  dump addresses ``[start, end)`` at ``scratch``. A later round overwrites what
  it copied again, so a window holds each page's newest copy, as the chain's
  nearest level with data does.
* :meth:`PreparedMemory.arrange` (after the freeze, with the final dump): a
  dumped VMA that is private anonymous read-write (no ``MAP_GROWSDOWN``,
  ``MAP_NORESERVE`` or ``MAP_LOCKED``: a move keeps the window's flags) and lies
  in one window is *moved* there: its pages that the final pagemap does not mark
  in-parent (written after the last round: they come from the final images or
  lazily) are dropped (``MADV_DONTNEED``), then the range is moved into place
  with ``mremap(MREMAP_MAYMOVE | MREMAP_FIXED)``, which moves page tables and
  copies no page. Every other VMA is mapped as in any restore, and its in-parent
  pages are written from the chain (:func:`~lazymig.restore.parent.write_parent_pages`).

The windows are kept where nothing of the source's address space was when they
were made (above 4 GiB, 2 MiB aligned so that ``mremap`` moves whole page
tables); a window that the final dump's VMAs overlap after all is moved away
first. The final dump must be a child of the last round applied (its ``parent``
link), or nothing prepared is used: its pages would not be the newest.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Protocol

from lazymig.errors import ImageError, LazyMigOSError
from lazymig.linux.procfs import read_maps
from lazymig.linux.syscalls import SYS_MADVISE, SYS_MMAP, SYS_MREMAP, SYS_MUNMAP
from lazymig.proto.constants import (
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PARENT_LINK,
    PE,
    PROT_READ,
    PROT_WRITE,
    VmaStatus,
)
from lazymig.proto.images import ImagesDir, PagemapEntry, VmaEntry
from lazymig.restore.parent import map_pages_image, write_pages

__all__ = ["Move", "PreparedMemory", "Window", "round_pid", "subtract", "written_elsewhere"]

log = logging.getLogger(__name__)

Range = tuple[int, int]

_ALIGN: Final = 2 << 20
"""Windows start and end on 2 MiB boundaries, at a 2 MiB aligned scratch address:
mremap then moves whole page tables (a PMD entry each), not 512 entries each."""
_CLUSTER_GAP: Final = 64 << 20
"""Pages of a round no further apart than this share a window (a gap costs address
space only)."""
_FLOOR: Final = 1 << 32
_PROT_RW: Final = PROT_READ | PROT_WRITE
_MOVABLE_FLAGS: Final = MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_NORESERVE | MAP_LOCKED
_NOT_ANON: Final = (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED | VmaStatus.ANON_SHARED
                    | VmaStatus.VDSO | VmaStatus.VVAR | VmaStatus.VSYSCALL | VmaStatus.SYSVIPC
                    | VmaStatus.AIORING | VmaStatus.MEMFD | VmaStatus.SOCKET)


class Injector(Protocol):
    """What the restorer's target offers: one injected syscall, or a queued batch."""

    pid: int

    def call(self, nr: int, *args: int, what: str) -> int: ...

    def queue(self, nr: int, *args: int, what: str, expect: int | None = None,
              hint: bool = False) -> None: ...

    def run_queued(self) -> list[int]: ...


@dataclasses.dataclass(slots=True)
class Window:
    """Dump addresses ``[start, end)`` held at ``scratch`` in the process-to-be."""

    start: int
    end: int
    scratch: int

    @property
    def delta(self) -> int:
        return self.scratch - self.start

    @property
    def scratch_range(self) -> Range:
        return self.scratch, self.scratch + self.end - self.start


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    """A dumped VMA whose pages are moved into place from a window."""

    vma: VmaEntry
    window: Window
    keep: tuple[Range, ...]
    """Its in-parent pages the window holds (dump addresses); the rest is dropped."""


def round_pid(round_dir: Path) -> int:
    """The pid whose pagemap a pre-dump round holds (pre-copy is of one process).

    Raises:
        ImageError: none, or more than one.
    """
    pids = [int(p.name[len("pagemap-"):-len(".img")]) for p in round_dir.glob("pagemap-*.img")
            if p.name[len("pagemap-"):-len(".img")].isdigit()]
    if len(pids) != 1:
        raise ImageError(f"a pre-dump round holds one process's pagemap, this one {len(pids)}",
                         path=round_dir)
    return pids[0]


class PreparedMemory:
    """The windows of one process-to-be and the rounds applied to them (see the
    module docstring). Every method but :meth:`plain` runs on the tracer thread of
    the process-to-be."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        """Sorted by ``start``, disjoint."""
        self.have: list[Range] = []
        """Dump addresses whose newest copy (of the rounds applied) is in a window."""
        self.rounds: list[Path] = []
        """The rounds applied, in order (resolved paths)."""
        self.image_pid: int | None = None
        self.pages = 0
        """Pages written into windows, every round counted."""

    # -- before the freeze ---------------------------------------------------------------

    def apply(self, target: Injector, round_dir: Path) -> int:
        """Write the pages round ``round_dir`` holds with data into the windows
        (made as needed); returns how many.

        Raises:
            ImageError: the round is not the child of the last one applied, or of
                another process.
        """
        round_dir = round_dir.resolve()
        pid = round_pid(round_dir)
        if self.image_pid is not None and pid != self.image_pid:
            raise ImageError(f"a pre-dump round of process {pid}, after rounds of "
                             f"{self.image_pid}", path=round_dir)
        link = round_dir / PARENT_LINK
        parent = link.resolve() if link.is_symlink() else None
        if self.rounds and parent != self.rounds[-1]:
            raise ImageError(f"this pre-dump round's parent is {parent}, not the last round "
                             f"applied ({self.rounds[-1]}): rounds must come in chain order",
                             path=round_dir)
        images = ImagesDir(round_dir)
        pagemap = images.pagemap(pid)
        data = [e for e in pagemap.entries if e.has_data]
        ranges = _union([], [(e.vaddr, e.end) for e in data])
        self._cover(target, ranges)
        pieces: list[tuple[int, int, int]] = []  # (scratch address, offset in image, length)
        offset = 0
        for e in data:
            for start, end, window in self._split(e.vaddr, e.end):
                pieces.append((start + window.delta, offset + start - e.vaddr, end - start))
            offset += e.end - e.vaddr
        if pieces:
            path = images.pages_path(pagemap.pages_id)
            size = path.stat().st_size
            if size < offset:
                raise ImageError(f"holds {size} bytes; its pagemap needs {offset}", path=path)
            # Mapped populated and read-only: a round's image is read whole, and faulting
            # it in a page at a time (or copying it first) costs more.
            with map_pages_image(path, size) as base:
                for address, at, length in pieces:
                    write_pages(target.pid, address, base + at, length)
        self.have = _union(self.have, ranges)
        self.rounds.append(round_dir)
        self.image_pid = pid
        written = offset // PAGE_SIZE
        self.pages += written
        log.info("prepared restore of %d: round %s applied, %d pages (%d windows)", pid,
                 round_dir, written, len(self.windows))
        return written

    def _cover(self, target: Injector, ranges: Sequence[Range]) -> None:
        """Make windows for what of ``ranges`` no window holds."""
        missing = subtract(ranges, [(w.start, w.end) for w in self.windows])
        clusters: list[list[int]] = []
        for start, end in missing:
            last = clusters[-1] if clusters else None
            # Within a gap between two windows only, and not too far apart.
            if last is not None and start - last[1] <= _CLUSTER_GAP and \
                    self._gap_of(start) == self._gap_of(last[0]):
                last[1] = end
            else:
                clusters.append([start, end])
        for start, end in clusters:
            i = self._gap_of(start)
            lo = max(start - start % _ALIGN, self.windows[i - 1].end if i else 0)
            hi = -(-end // _ALIGN) * _ALIGN
            if i < len(self.windows):
                hi = min(hi, self.windows[i].start)
            busy = _maps(target.pid) + [(w.start, w.end) for w in self.windows] + [(lo, hi)]
            scratch = _free(busy, hi - lo, phase=lo)
            got = target.call(SYS_MMAP, scratch, hi - lo, _PROT_RW,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0,
                              what=f"mmap(window {lo:#x}-{hi:#x})")
            if got != scratch:
                raise LazyMigOSError(errno.EADDRINUSE, f"a window landed at {got:#x}, not "
                                     f"{scratch:#x}", pid=target.pid)
            self.windows.insert(i, Window(lo, hi, scratch))

    def _gap_of(self, address: int) -> int:
        """The index of the first window after ``address``."""
        return bisect.bisect_right([w.start for w in self.windows], address)

    def _split(self, start: int, end: int) -> Iterable[tuple[int, int, Window]]:
        """``[start, end)`` cut at window boundaries (every part is in a window)."""
        i = max(self._gap_of(start) - 1, 0)
        at = start
        while at < end:
            w = self.windows[i]
            if w.end <= at:
                i += 1
                continue
            stop = min(end, w.end)
            yield at, stop, w
            at = stop
            i += 1

    # -- after the freeze ----------------------------------------------------------------

    def usable(self, images_dir: Path, pid: int) -> str:
        """Why the prepared memory cannot serve the final dump in ``images_dir`` of
        ``pid`` (an empty string: it can)."""
        if not self.rounds:
            return "no pre-dump round was applied"
        if pid != self.image_pid:
            return f"the dump is of process {pid}, the rounds of {self.image_pid}"
        link = images_dir / PARENT_LINK
        parent = link.resolve() if link.is_symlink() else None
        if parent != self.rounds[-1]:
            return (f"the dump's parent is {parent}, not the last round applied "
                    f"({self.rounds[-1]})")
        return ""

    def forget(self) -> None:
        """Use none of the pages prepared (the windows are unmapped all the same)."""
        self.have = []

    def scratch_ranges(self) -> list[Range]:
        return [w.scratch_range for w in self.windows]

    def arrange(self, target: Injector, vmas: Sequence[VmaEntry],
                entries: Sequence[PagemapEntry], busy: Sequence[Range]) -> list[Move]:
        """Plan and prepare the moves for the final dump's ``vmas`` and pagemap
        ``entries`` (``busy``: what else is mapped or will be): windows in the way of
        a dumped VMA moved away, windows grown to a whole VMA where free. Queues
        nothing; returns the moves, done by :meth:`queue_moves`."""
        dumped = sorted((v.start, v.end) for v in vmas)
        for w in self.windows:
            lo, hi = w.scratch_range
            if subtract([(lo, hi)], dumped) == [(lo, hi)]:
                continue
            others = [x.scratch_range for x in self.windows if x is not w]
            to = _free([*busy, *dumped, *others, (w.start, w.end)], hi - lo, phase=w.start)
            target.call(SYS_MREMAP, lo, hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED, to,
                        what=f"mremap(window {lo:#x} away from the dumped VMAs)")
            w.scratch = to
        parent = _union([], [(e.vaddr, e.end) for e in entries if PE.PARENT in e.flags])
        keep_all = _intersect(parent, self.have)
        moves: list[Move] = []
        for v in vmas:
            if v.status & _NOT_ANON or not v.status & VmaStatus.ANON_PRIVATE or \
                    v.flags & _MOVABLE_FLAGS != MAP_PRIVATE | MAP_ANONYMOUS or v.prot != _PROT_RW:
                continue
            keep = _intersect(keep_all, [(v.start, v.end)])
            if not keep:
                continue
            inside = [w for w in self.windows if w.start < v.end and v.start < w.end]
            if len(inside) != 1:
                continue
            w = inside[0]
            if not self._grow(target, w, v.start, v.end, busy, dumped):
                continue
            moves.append(Move(v, w, tuple(keep)))
        maps = _maps(target.pid)
        starts = [s for s, _ in maps]
        ok = []
        for m in moves:  # the moved range must be one mapping of the window's
            lo = m.vma.start + m.window.delta
            i = bisect.bisect_right(starts, lo) - 1
            if i >= 0 and maps[i][1] >= m.vma.end + m.window.delta:
                ok.append(m)
            else:
                log.debug("VMA %#x-%#x is not one mapping in its window: written instead",
                          m.vma.start, m.vma.end)
        return ok

    def _grow(self, target: Injector, w: Window, start: int, end: int, busy: Sequence[Range],
              dumped: Sequence[Range]) -> bool:
        """Make window ``w`` hold dump addresses ``[start, end)`` too (the kernel
        merges an anonymous mapping made right beside it); False if the scratch
        addresses that needs are taken."""
        for lo, hi in ((start, w.start), (w.end, end)):
            if lo >= hi:
                continue
            at = lo + w.delta
            if subtract([(at, at + hi - lo)], [*busy, *dumped, *self.scratch_ranges()]) != \
                    [(at, at + hi - lo)]:
                return False
            got = target.call(SYS_MMAP, at, hi - lo, _PROT_RW,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0,
                              what=f"mmap(window growth {lo:#x}-{hi:#x})")
            if got != at:
                return False
            delta = w.delta
            w.start, w.end = min(w.start, lo), max(w.end, hi)
            w.scratch = w.start + delta
        return True

    @staticmethod
    def queue_moves(target: Injector, moves: Sequence[Move]) -> None:
        """Queue, for each move, the drop of the pages it does not keep and the
        move itself; the VMA's madvise advice is the caller's."""
        for m in moves:
            v, d = m.vma, m.window.delta
            for lo, hi in subtract([(v.start, v.end)], m.keep):
                target.queue(SYS_MADVISE, lo + d, hi - lo, MADV_DONTNEED,
                             what=f"madvise({lo + d:#x}, DONTNEED)")
            target.queue(SYS_MREMAP, v.start + d, v.end - v.start, v.end - v.start,
                         MREMAP_MAYMOVE | MREMAP_FIXED, v.start,
                         what=f"mremap({v.start + d:#x} -> {v.start:#x})", expect=v.start)

    def queue_unmap(self, target: Injector) -> None:
        """Queue the unmapping of what is left of every window."""
        for lo, hi in self.scratch_ranges():
            target.queue(SYS_MUNMAP, lo, hi - lo, what=f"munmap(window {lo:#x})")
        self.windows = []


def written_elsewhere(entries: Sequence[PagemapEntry], moves: Sequence[Move],
                      ) -> list[PagemapEntry]:
    """The in-parent entries of ``entries`` cut to what the moves do not keep: the
    pages still to write from the chain."""
    kept = _union([], [r for m in moves for r in m.keep])
    parent = [(e.vaddr, e.end) for e in entries if PE.PARENT in e.flags]
    return [PagemapEntry(lo, (hi - lo) // PAGE_SIZE, PE.PARENT)
            for lo, hi in subtract(_union([], parent), kept)]


def _maps(pid: int) -> list[Range]:
    out = []
    for line in read_maps(pid).splitlines():
        lo, hi = line.split(maxsplit=1)[0].split("-")
        out.append((int(lo, 16), int(hi, 16)))
    return out


def _free(busy: Iterable[Range], size: int, *, phase: int) -> int:
    """The lowest address >= 4 GiB, congruent to ``phase`` modulo 2 MiB, where
    ``size`` bytes overlap nothing of ``busy`` (nor touch it: a guard page apart,
    so that the kernel merges no mapping of ours with one of the helper's)."""
    at = _FLOOR + phase % _ALIGN
    for start, end in sorted(busy):
        if end + PAGE_SIZE <= at:
            continue
        if start >= at + size + PAGE_SIZE:
            break
        at = end + PAGE_SIZE
        at += (phase - at) % _ALIGN
    return at


# -- sorted, disjoint ranges ---------------------------------------------------------------


def _union(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    out: list[Range] = []
    for lo, hi in sorted([*a, *b]):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _intersect(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Sequence[Range], b: Sequence[Range]) -> list[Range]:
    """The ranges ``a`` (sorted, disjoint) without ``b`` (any order, may overlap)."""
    out: list[Range] = []
    cut = _union([], b)
    j = 0
    for lo, hi in a:
        while j < len(cut) and cut[j][1] <= lo:
            j += 1
        k = j
        at = lo
        while k < len(cut) and cut[k][0] < hi:
            if cut[k][0] > at:
                out.append((at, cut[k][0]))
            at = max(at, cut[k][1])
            k += 1
        if at < hi:
            out.append((at, hi))
    return out
