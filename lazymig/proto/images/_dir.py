"""Pagemap reader/writer, the :class:`ImagesDir` façade over a CRIU images directory,
and :class:`ImagesWait`, for a dump's images to be complete.

A dump's images are complete once its ``inventory.img`` is there. A dump writes
``inventory.img`` last and atomically (a temporary file renamed into place, as
every :class:`ImagesDir` writer does), so its presence marks a complete dump
(:func:`~lazymig.dump.images.write_images`, a tree's dump too); whoever copies
the images to the destination copies it last. An images directory that holds
the ``inventory.img`` of an older dump looks complete at once.

Waiting polls for the file every :data:`POLL` seconds: one ``stat`` each time, a
bound on the delay it adds, and it works on any filesystem the images come in on
(inotify would miss a file written by another host on NFS). The wait is written
once, as the pauses between two looks (:meth:`ImagesWait.pauses`): a blocking
caller sleeps them (``lazymig restore --wait-for-images``, before its event loop
runs), an event loop awaits them (``lazymig lazy-pages --wait-for-page-server``),
and each says in its own words what timed out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self, TypeVar

from lazymig.errors import ConfigurationError, ImageError
from lazymig.proto.constants import TASK_ALIVE, TASK_STOPPED
from lazymig.proto.images._framing import (
    DEFAULT_MAX_ENTRY_SIZE,
    ImageReader,
    ImageWriter,
    PagesWriter,
    StrPath,
)
from lazymig.proto.images._magic import CRTOOLS_IMAGES_V1_1, ImageKind
from lazymig.proto.images._pagemap import PageIndex, PagemapEntry, PageRange, lazy_ranges
from lazymig.proto.images._wire import Fields, fields, scalar

if TYPE_CHECKING:  # protobuf's runtime is loaded by the readers and writers that need it
    from google.protobuf.message import Message

    from lazymig.proto.images import core_pb2, inventory_pb2, mm_pb2, pstree_pb2

__all__ = ["POLL", "ImagesDir", "ImagesWait", "Pagemap", "PagemapReader", "PagemapWriter"]

_TASKS_WITH_MEMORY = frozenset((TASK_ALIVE, TASK_STOPPED))
"""CRIU's core ``tc.task_state`` of a task with a memory image: TASK_ALIVE, TASK_STOPPED
(not TASK_DEAD, a zombie, nor TASK_HELPER 7)."""

M = TypeVar("M", bound="Message")
T = TypeVar("T")


class Pagemap(NamedTuple):
    """A whole pagemap image: the pages image id and the entries in address order."""

    pages_id: int
    entries: list[PagemapEntry]


class PagemapReader:
    """Stream a ``pagemap-<pid>.img``: :attr:`pages_id` on open, then the entries.

    Iterating yields :class:`PagemapEntry` objects and checks they are page
    aligned, non-empty and sorted without overlaps.

    Raises:
        ImageError: any damage, with the file and the offset of the bad entry.
    """

    def __init__(self, path: StrPath, *, max_entry_size: int = DEFAULT_MAX_ENTRY_SIZE) -> None:
        self._reader = ImageReader(path, ImageKind.PAGEMAP, max_entry_size=max_entry_size)
        try:
            pages_id = self._reader.read_fields("pagemap_head",
                                                lambda head: scalar(head, 1, "pages_id"))
            if pages_id is None:
                raise ImageError("no pagemap_head", path=path, offset=self._reader.offset)
        except BaseException:
            self._reader.close()
            raise
        self.pages_id: int = pages_id
        """The N of the ``pages-N.img`` holding this pagemap's pages."""

    @property
    def path(self) -> Path:
        """The pagemap image's path."""
        return self._reader.path

    def __iter__(self) -> Iterator[PagemapEntry]:
        prev_end = 0
        while (entry := self._reader.read_fields("pagemap_entry", PagemapEntry.from_fields)
               ) is not None:
            offset = self._reader.entry_offset
            if entry.vaddr < prev_end:
                raise ImageError(f"pagemap entry at {entry.vaddr:#x} is out of order or "
                                 "overlaps the previous one", path=self.path, offset=offset)
            prev_end = entry.end
            yield entry

    def close(self) -> None:
        """Close the file. Idempotent."""
        self._reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PagemapWriter:
    """Write a ``pagemap-<pid>.img`` entry by entry (atomically, like :class:`ImageWriter`).

    Each entry is written with its page count in both field 2 (0 if it does
    not fit in 32 bits) and field 5, and with explicit flags.
    """

    def __init__(self, path: StrPath, pages_id: int, *, fsync: bool = False) -> None:
        from lazymig.proto.images import pagemap_pb2

        self._writer = ImageWriter(path, ImageKind.PAGEMAP, fsync=fsync)
        self._prev_end = 0
        try:
            self._writer.write(pagemap_pb2.pagemap_head(pages_id=pages_id))
        except BaseException:
            self._writer.abort()
            raise

    @property
    def path(self) -> Path:
        """The final path of the image."""
        return self._writer.path

    def write(self, entry: PagemapEntry) -> None:
        """Append *entry*; entries must come in address order without overlaps.

        Raises:
            ConfigurationError: *entry* starts below the end of the previous one.
        """
        if entry.vaddr < self._prev_end:
            raise ConfigurationError(f"pagemap entry at {entry.vaddr:#x} is out of order or "
                                     "overlaps the previous one")
        self._writer.write(entry.to_pb())
        self._prev_end = entry.end

    def close(self) -> None:
        """Finish the image and move it into place. Idempotent."""
        self._writer.close()

    def abort(self) -> None:
        """Drop the image."""
        self._writer.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._writer.__exit__(exc_type, exc, tb)


class ImagesDir:
    """A CRIU images directory (``criu dump -D``): typed access to its images.

    Readers raise :class:`~lazymig.errors.ImageError` (naming the file and the
    byte offset) for damaged images and let :class:`FileNotFoundError` through
    for missing ones. Writers replace images atomically.

    Args:
        path: the directory (it must exist to write).
        fsync: fsync every image written, and the directory, on close.
        max_entry_size: bound on a single entry's length when reading.
    """

    def __init__(self, path: StrPath, *, fsync: bool = False,
                 max_entry_size: int = DEFAULT_MAX_ENTRY_SIZE) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.max_entry_size = max_entry_size

    def __repr__(self) -> str:
        return f"ImagesDir({os.fspath(self.path)!r})"

    # -- generic ---------------------------------------------------------------

    def image_path(self, kind: ImageKind, ident: int | str | None = None) -> Path:
        """The path of an image, e.g. ``image_path(ImageKind.MM, 42)`` -> ``<dir>/mm-42.img``."""
        return self.path / kind.file_name(ident)

    def open_reader(self, kind: ImageKind, ident: int | str | None = None) -> ImageReader:
        """Open an image for streaming reads."""
        return ImageReader(self.image_path(kind, ident), kind,
                           max_entry_size=self.max_entry_size)

    def open_writer(self, kind: ImageKind, ident: int | str | None = None) -> ImageWriter:
        """Open an image for writing; it appears on a successful close."""
        return ImageWriter(self.image_path(kind, ident), kind, fsync=self.fsync)

    def read_entries(self, kind: ImageKind, entry_type: type[M],
                     ident: int | str | None = None) -> list[M]:
        """Read every entry of an image as *entry_type*."""
        with self.open_reader(kind, ident) as reader:
            return list(reader.entries(entry_type))

    def read_entry(self, kind: ImageKind, entry_type: type[M],
                   ident: int | str | None = None) -> M:
        """Read an image that holds exactly one entry (ImageError otherwise)."""
        with self.open_reader(kind, ident) as reader:
            return reader.read_one(entry_type)

    def _read_one_fields(self, kind: ImageKind, ident: int, name: str,
                         extract: Callable[[Fields], T]) -> T:
        """:meth:`read_entry` without protobuf's runtime: ``extract`` of the fields of
        the image's only entry (see :meth:`ImageReader.read_fields`)."""
        with self.open_reader(kind, ident) as reader:
            # In a tuple: the value may be None, which read_fields returns at the end.
            found = reader.read_fields(name, lambda entry: (extract(entry),))
            if found is None:
                raise ImageError(f"no {name} entry", path=reader.path, offset=reader.offset)
            reader.expect_end()
            return found[0]

    def write_entries(self, kind: ImageKind, entries: Iterable[Message],
                      ident: int | str | None = None) -> Path:
        """Write an image holding *entries*; return its path."""
        with self.open_writer(kind, ident) as writer:
            for entry in entries:
                writer.write(entry)
        return writer.path

    # -- inventory, pstree, core, mm -----------------------------------------

    def inventory(self) -> inventory_pb2.inventory_entry:
        """Read ``inventory.img``.

        Raises:
            ImageError: damaged, or an ``img_version`` other than 2 (v1.1), the
                only layout lazymig reads.
        """
        from lazymig.proto.images import inventory_pb2

        inv = self.read_entry(ImageKind.INVENTORY, inventory_pb2.inventory_entry)
        if inv.img_version != CRTOOLS_IMAGES_V1_1:
            raise ImageError(f"unsupported images version {inv.img_version} "
                             f"(want {CRTOOLS_IMAGES_V1_1})",
                             path=self.image_path(ImageKind.INVENTORY), offset=4)
        return inv

    def write_inventory(self, entry: inventory_pb2.inventory_entry | None = None) -> Path:
        """Write ``inventory.img``; by default ``img_version=2, fdinfo_per_id=true``.

        Raises:
            ConfigurationError: *entry* has an ``img_version`` other than 2.
        """
        from lazymig.proto.images import inventory_pb2

        if entry is None:
            entry = inventory_pb2.inventory_entry(img_version=CRTOOLS_IMAGES_V1_1,
                                                  fdinfo_per_id=True)
        elif entry.img_version != CRTOOLS_IMAGES_V1_1:
            raise ConfigurationError(f"lazymig writes v1.1 images: img_version must be "
                                     f"{CRTOOLS_IMAGES_V1_1}, not {entry.img_version}")
        return self.write_entries(ImageKind.INVENTORY, [entry])

    def pstree(self) -> list[pstree_pb2.pstree_entry]:
        """Read ``pstree.img``: one entry per process, the root first."""
        from lazymig.proto.images import pstree_pb2

        return self.read_entries(ImageKind.PSTREE, pstree_pb2.pstree_entry)

    def pstree_pids(self) -> list[int]:
        """The pid of each process of ``pstree.img``, the root first (read without
        protobuf's runtime, as :meth:`has_memory` and :meth:`lazy_ranges`: a daemon
        or a page server needs no more)."""
        pids = []
        with self.open_reader(ImageKind.PSTREE) as reader:
            while (pid := reader.read_fields("pstree_entry", _pid)) is not None:
                pids.append(pid)
        return pids

    def write_pstree(self, entries: Iterable[pstree_pb2.pstree_entry]) -> Path:
        """Write ``pstree.img``."""
        return self.write_entries(ImageKind.PSTREE, entries)

    def core(self, tid: int) -> core_pb2.core_entry:
        """Read ``core-<tid>.img`` (one per thread)."""
        from lazymig.proto.images import core_pb2

        return self.read_entry(ImageKind.CORE, core_pb2.core_entry, tid)

    def write_core(self, tid: int, core: core_pb2.core_entry) -> Path:
        """Write ``core-<tid>.img``."""
        return self.write_entries(ImageKind.CORE, [core], tid)

    def has_memory(self, pid: int) -> bool:
        """Whether process *pid* of pstree.img has a memory to restore (``mm-<pid>.img``,
        pagemap and pages), as CRIU reads a dump: only a task alive or stopped when
        dumped has one. A zombie (``tc.task_state`` 2, TASK_DEAD) or one of CRIU's
        helper tasks has ``core-<pid>.img`` alone. A task without a core image, or
        with a core without ``tc``, counts as alive (its memory images are read, and
        their absence is then the error)."""
        if not self.image_path(ImageKind.CORE, pid).exists():
            return True
        state = self._read_one_fields(ImageKind.CORE, pid, "core_entry", _task_state)
        return state is None or state in _TASKS_WITH_MEMORY

    def mm(self, pid: int) -> mm_pb2.mm_entry:
        """Read ``mm-<pid>.img``, whose ``vmas`` list the process's VMAs."""
        from lazymig.proto.images import mm_pb2

        return self.read_entry(ImageKind.MM, mm_pb2.mm_entry, pid)

    def write_mm(self, pid: int, mm: mm_pb2.mm_entry) -> Path:
        """Write ``mm-<pid>.img``."""
        return self.write_entries(ImageKind.MM, [mm], pid)

    # -- pagemap and pages ---------------------------------------------------

    def open_pagemap(self, pid: int) -> PagemapReader:
        """Open ``pagemap-<pid>.img`` for streaming."""
        return PagemapReader(self.image_path(ImageKind.PAGEMAP, pid),
                             max_entry_size=self.max_entry_size)

    def pagemap(self, pid: int) -> Pagemap:
        """Read ``pagemap-<pid>.img`` whole: ``(pages_id, entries)``."""
        with self.open_pagemap(pid) as reader:
            return Pagemap(reader.pages_id, list(reader))

    def open_pagemap_writer(self, pid: int, pages_id: int) -> PagemapWriter:
        """Open ``pagemap-<pid>.img`` for writing entry by entry."""
        return PagemapWriter(self.image_path(ImageKind.PAGEMAP, pid), pages_id,
                             fsync=self.fsync)

    def write_pagemap(self, pid: int, pages_id: int, entries: Iterable[PagemapEntry]) -> Path:
        """Write ``pagemap-<pid>.img``; *entries* must be in address order."""
        with self.open_pagemap_writer(pid, pages_id) as writer:
            for entry in entries:
                writer.write(entry)
        return writer.path

    def pages_path(self, pages_id: int) -> Path:
        """The path of ``pages-<pages_id>.img``."""
        return self.image_path(ImageKind.PAGES, pages_id)

    def open_pages_writer(self, pages_id: int) -> PagesWriter:
        """Open ``pages-<pages_id>.img`` for streaming writes."""
        return PagesWriter(self.pages_path(pages_id), fsync=self.fsync)

    def lazy_ranges(self, pid: int) -> list[PageRange]:
        """The lazy page ranges of *pid*, cut at the VMA boundaries of ``mm-<pid>.img``.

        Each PE_LAZY pagemap entry gives one ``(vaddr, nr_pages)`` per VMA it
        overlaps; pages outside every VMA are dropped (``UFFDIO_COPY`` cannot
        cross a VMA).
        """
        vmas = self._read_one_fields(ImageKind.MM, pid, "mm_entry", _vma_bounds)
        entries = self.pagemap(pid).entries
        try:
            return lazy_ranges(entries, vmas)
        except ConfigurationError as exc:
            raise ImageError(str(exc), path=self.image_path(ImageKind.MM, pid)) from exc

    def page_index(self, pid: int) -> tuple[Path, PageIndex]:
        """The pages image of *pid* and an index of where each page with data is in it.

        Keep the index for repeated lookups (:meth:`PageIndex.offset`).
        """
        pagemap = self.pagemap(pid)
        return self.pages_path(pagemap.pages_id), PageIndex(pagemap.entries)

    def find_pages(self, pid: int, vaddr: int, nr_pages: int = 1) -> tuple[Path, int] | None:
        """Where *nr_pages* pages from *vaddr* of *pid* are stored: ``(pages path, offset)``.

        Returns None unless all of them have data in this dump (PE_PRESENT and
        not PE_PARENT). Reads the pagemap on every call; use
        :meth:`page_index` for many lookups.
        """
        path, index = self.page_index(pid)
        offset = index.offset(vaddr, nr_pages)
        return None if offset is None else (path, offset)


POLL = 0.001
"""Seconds between two looks for ``inventory.img``: at most this much is added to the
downtime, for a ``stat`` a millisecond while waiting."""


class ImagesWait:
    """A wait of up to ``timeout`` seconds, from now, for ``images`` to be complete."""

    def __init__(self, images: ImagesDir, timeout: float, *, poll: float = POLL) -> None:
        self.images = images
        self.inventory = images.image_path(ImageKind.INVENTORY)
        """The file whose presence marks a complete dump."""
        self.timeout = timeout
        self.poll = poll
        self._started = time.monotonic()

    @property
    def complete(self) -> bool:
        """True once the images are complete (one ``stat``)."""
        return self.inventory.exists()

    @property
    def waited(self) -> float:
        """Seconds since this wait began."""
        return time.monotonic() - self._started

    def pauses(self) -> Iterator[float]:
        """The pauses to sleep (or await) between two looks: they end once the images
        are complete or ``timeout`` seconds after the wait began, whichever comes first
        (:attr:`complete` then tells which)."""
        deadline = self._started + self.timeout
        while not self.complete:
            if time.monotonic() >= deadline:
                return
            yield self.poll


# -- the fields a daemon reads, without protobuf's runtime (see _wire) --------------------


def _pid(entry: Fields) -> int:
    """pstree_entry.pid"""
    return scalar(entry, 1, "pid")


def _task_state(core: Fields) -> int | None:
    """core_entry.tc.task_state; None without tc."""
    tc = core.get(3)
    if not tc or not isinstance(tc[-1], bytes):
        return None
    return scalar(fields(tc[-1]), 1, "task_state")


def _vma_bounds(mm: Fields) -> list[tuple[int, int]]:
    """(start, end) of each of mm_entry.vmas."""
    bounds = []
    for vma in mm.get(14, []):
        if not isinstance(vma, bytes):
            raise ValueError("vmas is not a message")
        entry = fields(vma)
        bounds.append((scalar(entry, 1, "start"), scalar(entry, 2, "end")))
    return bounds
