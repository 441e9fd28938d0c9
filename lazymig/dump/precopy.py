"""Pre-copy: a running process's memory copied in rounds before the freeze, each
round only what was written since the one before (:mod:`lazymig.dump.track`).

Each round is a CRIU pre-dump images dir: ``pagemap-PID.img`` and
``pages-1.img``, the pages copied in that round with data (PE_PRESENT), the ones
copied by an earlier round and not written since as PE_PARENT entries, and a
``parent`` symlink to the round before (``criu pre-dump --prev-images-dir``), so
``crit`` reads the chain. The final dump, made while the process is frozen,
is a child of the last round: pages not written since they were copied are
PE_PARENT entries there too, and only the last dirty set has data (or stays
lazy on the page server). A restore reads PE_PARENT pages through the chain
(:mod:`lazymig.restore.parent`).

Pages are read while the process runs: a page written during the read was
written after the scan that reported it, so the next scan reports it again;
the copy that counts is the last one.

Which rounds: the first copies every page present; then one round after the
other until one of :class:`PreCopyOptions`' limits (the dirty set stops
shrinking, falls under a threshold, the time or the round count is spent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, Protocol

from lazymig.dump import keeper
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.dump.images import PAGES_ID
from lazymig.dump.keeper import KeeperRecord
from lazymig.dump.push import PagePush, PushTarget
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.dump.track import DirtyRound, DirtyTracker
from lazymig.errors import ConfigurationError, LazyMigOSError
from lazymig.linux.procfs import children
from lazymig.linux.vm import AnonMapping, process_vm_readv
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE, PARENT_LINK, PE
from lazymig.proto.images import ImagesDir, PagemapEntry, PagemapReader, PagemapWriter

__all__ = ["PreCopy", "PreCopyOptions", "RoundReport", "link_parent", "pushed_record",
           "runs_of", "split_scan"]

log = logging.getLogger(__name__)

_CHUNK: Final = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class PreCopyOptions:
    """When pre-copy rounds stop, and what happens after the freeze."""

    max_rounds: int = 8
    """Rounds at most, the first (every page) included."""
    min_dirty_pages: int = 256
    """Stop once a round finds fewer pages written than this (1 MiB)."""
    min_shrink: float = 0.8
    """Stop once a round's dirty set is more than this fraction of the round
    before's: more rounds would not shrink it (the process writes as fast as we copy)."""
    max_seconds: float = 60.0
    """Start no round after this many seconds."""
    lazy: bool = True
    """After the freeze, leave the last dirty set to the page server (hybrid:
    the shortest stop); False copies it before the restored process runs."""

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ConfigurationError(f"max_rounds must be at least 1, not {self.max_rounds}")
        if not 0 < self.min_shrink <= 1:
            raise ConfigurationError(f"min_shrink must be in (0, 1], not {self.min_shrink}")
        if self.min_dirty_pages < 0 or self.max_seconds < 0:
            raise ConfigurationError("min_dirty_pages and max_seconds must not be negative")


@dataclasses.dataclass(frozen=True, slots=True)
class RoundReport:
    """One pre-copy round, for progress reports."""

    number: int
    """1 for the first round (every page present)."""
    images_dir: Path
    pages_dirtied: int
    """Pages the scan found written since the round before (present, the first time)."""
    pages_sent: int
    """Pages copied into the round's images (fewer when some went away meanwhile)."""
    seconds: float
    """The round's duration, scan and copy."""

    @property
    def bytes_per_second(self) -> float:
        """Copy rate of the round."""
        return self.pages_sent * PAGE_SIZE / self.seconds if self.seconds > 0 else 0.0


OnRound = Callable[[RoundReport], Awaitable[object] | None]


class PreCopy:
    """Pre-copy rounds of running process ``pid``, as a chain of pre-dump dirs.

    ``await PreCopy.start(pid, base)`` starts tracking its writes; each
    :meth:`round` writes one pre-dump dir under ``base`` (``1``, ``2``...);
    :meth:`run` does rounds until a limit of ``options``. Then freeze the
    process and call :meth:`finish` (the pages to write as PE_PARENT in the
    final dump); :meth:`aclose` stops tracking (any time: the process is left
    as it was; the dirs written stay, remove them if unwanted).

    Args:
        on_round: called (awaited if a coroutine function) after each round,
            e.g. to copy the round's dir to the destination while the next runs.
    """

    def __init__(self, tracker: DirtyTracker, base: Path, options: PreCopyOptions,
                 on_round: OnRound | None) -> None:
        self.pid = tracker.pid
        self.base = base
        self.options = options
        self.rounds: list[RoundReport] = []
        self._tracker = tracker
        self._on_round = on_round
        self._valid: set[int] = set()  # page numbers whose last copy is current
        self._parent: Path | None = None  # the last round of an earlier command
        self._keeper: KeeperRecord | None = None

    @classmethod
    async def start(cls, pid: int, base: str | os.PathLike[str], *,
                    options: PreCopyOptions | None = None,
                    on_round: OnRound | None = None) -> PreCopy:
        """Start tracking ``pid``'s writes (see :class:`~lazymig.dump.track.DirtyTracker`).
        The rounds' dirs are made in ``base`` (made if missing)."""
        tracker = await DirtyTracker.start(pid)
        return cls(tracker, Path(base), options or PreCopyOptions(), on_round)

    @classmethod
    async def resume(cls, pid: int, parent: Path, *, options: PreCopyOptions | None = None,
                     on_round: OnRound | None = None) -> PreCopy:
        """Carry on the tracking a ``pre-dump --track-mem`` left in ``parent``
        (:mod:`lazymig.dump.keeper`): the next round, or the dump, is its child.

        Raises:
            ConfigurationError: ``parent`` has no tracking of ``pid``, or it ended.
        """
        try:
            record, valid = await asyncio.to_thread(_read_parent, parent, pid)
            fd = await asyncio.to_thread(keeper.take, record)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ConfigurationError(
                f"{parent} holds no memory tracking of process {pid} ({exc}): make it with "
                "`lazymig pre-dump --track-mem`, and dump the process it names") from exc
        self = cls(DirtyTracker(pid, fd), parent.parent, options or PreCopyOptions(),
                   on_round)
        self._parent, self._keeper, self._valid = parent, record, valid
        return self

    @property
    def last_dir(self) -> Path | None:
        """The last round's images dir (the final dump's parent)."""
        return self.rounds[-1].images_dir if self.rounds else self._parent

    @property
    def pages_sent(self) -> int:
        """Pages copied by every round so far."""
        return sum(r.pages_sent for r in self.rounds)

    async def round(self, images_dir: Path | None = None, *,
                    push: PushTarget | None = None) -> RoundReport:
        """One round: the pages written since the last one (all, the first time)
        into a new pre-dump dir (``images_dir``, an empty dir; default: a new
        ``base/N``). With ``push`` the pages go to that page server instead
        (:mod:`lazymig.dump.push`; one session, the server writes the pagemap and
        the pages), and the dir keeps what the next round needs."""
        began = time.monotonic()
        if kids := await asyncio.to_thread(children, self.pid):
            raise UnsupportedTargetError(
                self.pid, [f"it forked {len(kids)} child process(es) during pre-copy "
                           f"({', '.join(map(str, kids[:4]))}): pre-copy of a process tree "
                           "is not implemented"],
                "migrate it without pre-copy (the tree is then dumped whole at the freeze)")
        dirty = await self._tracker.collect()
        number = len(self.rounds) + 1
        images = images_dir or self.base / str(number)
        parent = self.last_dir
        sent = await asyncio.to_thread(self._write_round, images, dirty, parent, push)
        report = RoundReport(number, images, dirty.pages, sent, time.monotonic() - began)
        self.rounds.append(report)
        log.info("pid %d pre-copy round %d: %d pages written since the last, %d copied in "
                 "%.3f s (%.1f MB/s)", self.pid, number, report.pages_dirtied, sent,
                 report.seconds, report.bytes_per_second / 1e6)
        if self._on_round is not None:
            res = self._on_round(report)
            if inspect.isawaitable(res):
                await res
        return report

    async def run(self) -> list[RoundReport]:
        """Rounds until one of the options' limits; returns them all."""
        began = time.monotonic()
        while len(self.rounds) < self.options.max_rounds:
            before = self.rounds[-1].pages_dirtied if self.rounds else None
            report = await self.round()
            why = self._enough(report.pages_dirtied, before, time.monotonic() - began)
            if why:
                log.info("pid %d pre-copy: %s: freeze now", self.pid, why)
                break
        return list(self.rounds)

    def _enough(self, dirty: int, before: int | None, spent: float) -> str:
        """Why no round should follow (an empty string: go on)."""
        opts = self.options
        if before is not None and dirty < opts.min_dirty_pages:
            return f"{dirty} pages written, under {opts.min_dirty_pages}"
        if before is not None and len(self.rounds) > 2 and dirty > before * opts.min_shrink:
            return f"the dirty set stopped shrinking ({dirty} pages after {before})"
        if spent >= opts.max_seconds:
            return f"{spent:.0f} s spent"
        return ""

    async def finish(self) -> set[int]:
        """Call with the process frozen: the last scan. Returns the page numbers
        whose copy in the chain is current (not written since it was made): the
        final dump's PE_PARENT pages. The tracking ends with :meth:`aclose`,
        after the downtime (unregistering 1 GiB takes ~40 ms)."""
        last = await self._tracker.collect(protect=False)
        self._valid.difference_update(_pages(last.ranges))
        return set(self._valid)

    async def park(self) -> KeeperRecord:
        """End this command but not the tracking: a keeper process holds it on
        (:mod:`lazymig.dump.keeper`), named in the last round's dir, for the next
        ``pre-dump`` or ``dump --prev-images-dir``."""
        last = self.last_dir
        if last is None:
            raise ConfigurationError("park() before any round: nothing to carry on")
        if self._keeper is None:
            self._keeper = await asyncio.to_thread(keeper.spawn, self.pid, self._tracker.fd)
        await asyncio.to_thread(self._keeper.write, last)
        await self._tracker.detach()
        log.info("pid %d: its memory tracking is held by keeper process %d until the next "
                 "`lazymig pre-dump` or `lazymig dump --track-mem --prev-images-dir %s` (or "
                 "`kill %d`)", self.pid, self._keeper.keeper, last, self._keeper.keeper)
        return self._keeper

    async def aclose(self) -> None:
        """Stop tracking; the process is as it was before :meth:`start` (idempotent;
        a keeper is stopped too)."""
        await self._tracker.close()
        if self._keeper is not None:
            await asyncio.to_thread(keeper.stop, self._keeper)

    async def __aenter__(self) -> PreCopy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- writing a round (in a worker thread) -------------------------------------------

    def _write_round(self, path: Path, dirty: DirtyRound, parent: Path | None,
                     push: PushTarget | None) -> int:
        path.mkdir(parents=True, exist_ok=True)
        images = ImagesDir(path)
        self._valid.difference_update(_pages(dirty.ranges))
        # Pages copied by an earlier round and not written since: PE_PARENT.
        older = runs_of(sorted(self._valid)) if parent is not None else []
        entries: list[PagemapEntry] = []
        copied: list[int] = []

        def record(vaddr: int, nr_pages: int, flags: PE) -> None:
            last = entries[-1] if entries else None
            if last is not None and last.flags == flags and last.end == vaddr:
                entries[-1] = PagemapEntry(last.vaddr, last.nr_pages + nr_pages, flags)
            else:
                entries.append(PagemapEntry(vaddr, nr_pages, flags))

        sink: _PagesSink = _LocalPages(images) if push is None else PagePush(push, self.pid)
        try:
            if isinstance(sink, PagePush):
                sink.open(needs_parent=bool(older))
            for vaddr, view, nr_pages in self._pieces(dirty.ranges, older):
                if view is None:
                    sink.parent(vaddr, nr_pages)
                    record(vaddr, nr_pages, PE.PARENT)
                else:
                    sink.present(vaddr, view)
                    record(vaddr, nr_pages, PE.PRESENT)
                    copied += range(vaddr >> PAGE_SHIFT, (vaddr >> PAGE_SHIFT) + nr_pages)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        self._valid.update(copied)
        if parent is not None:
            link_parent(path, parent)
        if push is None:
            images.write_pagemap(self.pid, PAGES_ID, entries)
        else:  # the pages are on the page server; what it holds, for the next round
            with PagemapWriter(path / pushed_record(self.pid), 0) as writer:
                for entry in entries:
                    writer.write(entry)
        images.write_inventory()
        return len(copied)

    def _pieces(self, dirty: Sequence[tuple[int, int]], older: Sequence[PageRun],
                ) -> Iterator[tuple[int, memoryview | None, int]]:
        """The round in address order: ``(vaddr, pages read, nr_pages)`` for the
        written pages (read now, a chunk at a time; a page that cannot be read is
        skipped), ``(vaddr, None, nr_pages)`` for runs of ``older``."""
        parents = iter(older)
        nxt = next(parents, None)
        with AnonMapping(_CHUNK) as buf:
            view = buf.view()
            for start, end in dirty:
                while nxt is not None and nxt.vaddr < start:
                    yield nxt.vaddr, None, nxt.nr_pages
                    nxt = next(parents, None)
                at = start
                while at < end:
                    want = min(end - at, _CHUNK)
                    try:
                        got = process_vm_readv(self.pid, buf.address, at, want)
                    except LazyMigOSError as exc:  # EFAULT: the first page went away
                        log.debug("pid %d: page %#x not copied: %s", self.pid, at, exc)
                        got = 0
                    got -= got % PAGE_SIZE
                    if got:
                        yield at, view[:got], got >> PAGE_SHIFT
                    at += got or PAGE_SIZE  # skip a page that cannot be read
            while nxt is not None:
                yield nxt.vaddr, None, nxt.nr_pages
                nxt = next(parents, None)


class _PagesSink(Protocol):
    def present(self, vaddr: int, data: memoryview) -> None: ...
    def parent(self, vaddr: int, nr_pages: int) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _LocalPages:
    """A round's pages into its own ``pages-1.img`` (the pagemap is written after)."""

    def __init__(self, images: ImagesDir) -> None:
        self._writer = images.open_pages_writer(PAGES_ID)

    def present(self, vaddr: int, data: memoryview) -> None:
        self._writer.write(data)

    def parent(self, vaddr: int, nr_pages: int) -> None:
        pass

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()


def pushed_record(pid: int) -> str:
    """The file a pre-dump that pushed its pages leaves in its own images dir:
    the pagemap entries the page server received (pagemap format), so that the
    next pre-dump or the dump knows which pages the chain holds."""
    return f"lazymig-pushed-{pid}.img"


def split_scan(scan: MemoryScan, current: set[int], *,
               lazy: bool) -> tuple[MemoryScan, list[PageRun]]:
    """Cut the final dump's ``scan`` in two: the runs still to copy (lazy ones
    kept lazy only with ``lazy``) and the pages whose copy in the parent chain is
    ``current`` (page numbers), for PE_PARENT entries."""
    todo: list[PageRun] = []
    parent: list[PageRun] = []
    for run in scan.runs:
        pages = range(run.vaddr >> PAGE_SHIFT, (run.vaddr >> PAGE_SHIFT) + run.nr_pages)
        if current.issuperset(pages):  # the common cases, without a loop in Python
            parent.append(PageRun(run.vaddr, run.nr_pages, False))
            continue
        if current.isdisjoint(pages):
            todo.append(PageRun(run.vaddr, run.nr_pages, run.lazy and lazy))
            continue
        parent += runs_of(p for p in pages if p in current)
        todo += (PageRun(r.vaddr, r.nr_pages, run.lazy and lazy)
                 for r in runs_of(p for p in pages if p not in current))
    return MemoryScan(scan.pid, scan.vmas, tuple(todo)), parent


def _read_parent(parent: Path, pid: int) -> tuple[KeeperRecord, set[int]]:
    """The keeper record of ``parent`` and the pages its pagemap holds."""
    record = KeeperRecord.read(parent)
    if record.pid != pid:
        raise ProcessLookupError(errno.ESRCH, f"it tracks process {record.pid}")
    images = ImagesDir(parent)
    pushed = parent / pushed_record(pid)
    if pushed.exists():  # its pages went to a page server
        with PagemapReader(pushed) as reader:
            entries = list(reader)
    else:
        entries = images.pagemap(pid).entries
    return record, {p for e in entries
                    for p in range(e.vaddr >> PAGE_SHIFT, e.end >> PAGE_SHIFT)}


def link_parent(images_dir: Path, parent: Path) -> None:
    """Make ``images_dir/parent`` point to ``parent``, relative as CRIU makes it."""
    target = os.path.relpath(parent.resolve(), images_dir.resolve())
    (images_dir / PARENT_LINK).symlink_to(target)


def runs_of(pages: Iterable[int]) -> list[PageRun]:
    """Sorted page numbers as runs of consecutive pages (not lazy)."""
    out: list[PageRun] = []
    start = prev = -2
    for p in pages:
        if p != prev + 1:
            if start >= 0:
                out.append(PageRun(start << PAGE_SHIFT, prev - start + 1, False))
            start = p
        prev = p
    if start >= 0:
        out.append(PageRun(start << PAGE_SHIFT, prev - start + 1, False))
    return out


def _pages(ranges: Sequence[tuple[int, int]]) -> set[int]:
    return {p for s, e in ranges for p in range(s >> PAGE_SHIFT, e >> PAGE_SHIFT)}
