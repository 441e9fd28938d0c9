"""The receiving page server: ``lazymig page-server -D DIR`` (without
``--lazy-pages``), CRIU's ``criu page-server`` as the target of ``pre-dump
--page-server`` (criu/page-xfer.c, ``page_server_serve``).

It takes one session and writes what it is sent into DIR, as CRIU's does:

* PS_IOV_OPEN2 (or the legacy OPEN) of a process's pagemap opens
  ``pagemap-ID.img`` and a pages image, ``pages-N.img`` with N from 0x10001 up
  as CRIU's standalone page server numbers them (``up_page_ids_base``: never
  one a dump writing into the same dir would use); OPEN2 is answered with one
  byte, whether DIR has a ``parent`` holding that process's pagemap;
* PS_IOV_ADD_F writes a pagemap entry with its flags; with PE_PRESENT the page
  bytes that follow go into the pages image; a PE_PARENT entry must be in the
  parent's pagemap (CRIU's ``check_pagehole_in_parent``); the legacy ADD and
  HOLE are ADD_F with PE_PRESENT and PE_PARENT, and an ADD before any OPEN
  opens its target (CRIU: "Deprecated IO w/o open");
* PS_IOV_PARENT is answered with a 4-byte int, the same question;
* PS_IOV_CLOSE finishes the images (written under temporary names until then)
  and is answered with status 0.

A session that ends without CLOSE, or breaks the protocol, leaves no images
behind. ``prev_images_dir`` makes the ``parent`` link first (``criu page-server
--prev-images-dir``). Shared memory pagemaps (PS_TYPE_SHMEM) are refused:
lazymig's pre-dump sends none.

The session runs on a blocking socket in a worker thread: file writes and the
page bytes stay off the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import logging
import os
import socket
from pathlib import Path
from typing import Final

from lazymig.errors import ConfigurationError, RemoteProtocolError
from lazymig.proto.constants import PAGE_SIZE, PARENT_LINK, PE
from lazymig.proto.images import ImagesDir, PagemapEntry
from lazymig.proto.images._framing import PagesWriter
from lazymig.proto.pageserver import (
    NEED_DATA,
    AddPages,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    GetRequest,
    OpenReply,
    OpenRequest,
    PageServerConnection,
    ParentReply,
    ParentRequest,
    Role,
)
from lazymig.proto.wire import DstType, WireVersion

__all__ = ["FIRST_PAGES_ID", "ReceiveReport", "link_prev_images", "receive_pages",
           "receive_session"]

log = logging.getLogger(__name__)

FIRST_PAGES_ID: Final = 0x10001
"""The first pages image id of a standalone page server (CRIU's up_page_ids_base)."""
_RECV: Final = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiveReport:
    """What one push session wrote."""

    images_dir: Path
    pagemaps: tuple[int, ...]
    """The ids (pids) of the pagemaps written."""
    pages: int
    """Pages received with data."""
    parent_pages: int
    """Pages written as PE_PARENT entries."""


class _Target:
    """One open pagemap and its pages image."""

    def __init__(self, images: ImagesDir, pid: int, pages_id: int) -> None:
        self.pid = pid
        self.pages = PagesWriter(images.pages_path(pages_id))
        try:
            self.pagemap = images.open_pagemap_writer(pid, pages_id)
        except BaseException:
            self.pages.abort()
            raise
        self.parent = _parent_entries(images.path, pid)

    def has_parent(self) -> bool:
        return self.parent is not None

    def check_hole(self, vaddr: int, nr_pages: int) -> None:
        """A PE_PARENT entry must be in the parent's pagemap."""
        if self.parent is None:
            raise RemoteProtocolError(f"PE_PARENT pages at {vaddr:#x} for process {self.pid}, "
                                      "but this page server has no parent images for it",
                                      field="flags")
        starts, ends = self.parent
        at, end = vaddr, vaddr + nr_pages * PAGE_SIZE
        while at < end:
            i = bisect.bisect_right(starts, at) - 1
            if i < 0 or ends[i] <= at:
                raise RemoteProtocolError(f"page {at:#x} of process {self.pid} is said to be in "
                                          "the parent, which does not have it", field="vaddr")
            at = ends[i]

    def close(self) -> None:
        self.pages.close()
        self.pagemap.close()

    def abort(self) -> None:
        self.pages.abort()
        self.pagemap.abort()


def _parent_entries(images_dir: Path, pid: int) -> tuple[list[int], list[int]] | None:
    """``(starts, ends)`` of the parent's pagemap of ``pid``, or None without one."""
    link = images_dir / PARENT_LINK
    try:
        entries = ImagesDir(link.resolve(strict=True)).pagemap(pid).entries
    except FileNotFoundError:
        return None
    runs: list[tuple[int, int]] = []
    for e in sorted(entries, key=lambda e: e.vaddr):
        if runs and runs[-1][1] == e.vaddr:
            runs[-1] = (runs[-1][0], e.end)
        else:
            runs.append((e.vaddr, e.end))
    return [s for s, _ in runs], [e for _, e in runs]


def receive_session(sock: socket.socket, images_dir: str | os.PathLike[str], *,
                    wire: WireVersion = WireVersion.V2) -> ReceiveReport:
    """Take one push session on the connected ``sock`` (blocking) and write its
    images into ``images_dir``; returns what was written.

    Raises:
        RemoteProtocolError: the client broke the protocol, or ended without CLOSE
            (nothing is left in ``images_dir``).
    """
    images = ImagesDir(images_dir)
    conn = PageServerConnection(Role.SERVER, wire)
    targets: dict[int, _Target] = {}
    done: list[_Target] = []
    current: _Target | None = None
    next_id = FIRST_PAGES_ID
    pages = parent_pages = 0
    buf = bytearray(_RECV)
    view = memoryview(buf)

    def open_target(dst_type: DstType, pid: int) -> _Target:
        nonlocal current, next_id
        if dst_type is not DstType.PID:
            raise RemoteProtocolError("shared memory pagemaps are not taken by lazymig's page "
                                      "server (only process pagemaps)", field="dst_id")
        if current is not None:
            current.close()
            done.append(current)
        if pid in targets:
            raise RemoteProtocolError(f"the pagemap of process {pid} opened twice",
                                      field="dst_id")
        current = targets[pid] = _Target(images, pid, next_id)
        next_id += 1
        return current

    try:
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                n = sock.recv_into(view)
                conn.receive_data(view[:n])
                continue
            if isinstance(event, OpenRequest):
                target = open_target(event.dst_type, event.id)
                log.info("receiving the pagemap of process %d into %s (parent: %s)", event.id,
                         images.path, "yes" if target.has_parent() else "no")
                if event.wants_reply:
                    sock.sendall(conn.send(OpenReply(target.has_parent())))
            elif isinstance(event, ParentRequest):
                sock.sendall(conn.send(ParentReply(
                    _parent_entries(images.path, event.id) is not None)))
            elif isinstance(event, AddPages):
                if current is not None and current.pid == event.id:
                    target = current
                else:
                    log.warning("pages for process %d without an OPEN first (CRIU: deprecated "
                                "IO w/o open)", event.id)
                    target = open_target(event.dst_type, event.id)
                if PE.PARENT in event.flags:
                    target.check_hole(event.vaddr, event.nr_pages)
                    parent_pages += event.nr_pages
                try:
                    target.pagemap.write(PagemapEntry(event.vaddr, event.nr_pages, event.flags))
                except ConfigurationError as exc:  # out of address order
                    raise RemoteProtocolError(str(exc), field="vaddr") from None
                if PE.PRESENT in event.flags and PE.PARENT not in event.flags:
                    _take_payload(sock, conn, target.pages, view)
                    pages += event.nr_pages
            elif isinstance(event, CloseRequest):
                if current is not None:
                    current.close()
                    done.append(current)
                    current = None
                sock.sendall(conn.send(CloseReply(0)))
                break
            elif isinstance(event, ConnectionClosed):
                raise RemoteProtocolError("the client hung up without CLOSE: the images it "
                                          "sent are incomplete and were dropped", field="cmd")
            elif isinstance(event, GetRequest):
                raise RemoteProtocolError("a GET at a receiving page server: lazy pages are "
                                          "served by `lazymig page-server --lazy-pages`",
                                          field="cmd")
            else:
                raise RemoteProtocolError(f"unexpected {type(event).__name__}", field="cmd")
    except BaseException:
        for t in targets.values():
            t.abort()
        raise
    log.info("received %d pages (%d more in the parent) for %d pagemap(s) into %s", pages,
             parent_pages, len(done), images.path)
    return ReceiveReport(images.path, tuple(t.pid for t in done), pages, parent_pages)


def _take_payload(sock: socket.socket, conn: PageServerConnection, pages: PagesWriter,
                  view: memoryview) -> None:
    """The page bytes of the ADD_F just read: what the codec buffered, then the
    socket's, straight into the pages image."""
    while conn.payload_remaining:
        n = conn.receive_payload_into(view)
        if n:
            pages.write(view[:n])
            continue
        n = sock.recv_into(view[:min(conn.payload_remaining, len(view))])
        if n == 0:
            raise RemoteProtocolError(f"the client hung up {conn.payload_remaining} bytes "
                                      "short of the pages it announced", field="nr_pages")
        conn.payload_received_directly(n)
        pages.write(view[:n])


def link_prev_images(images_dir: str | os.PathLike[str], prev: str) -> None:
    """``--prev-images-dir PREV`` (relative to the images dir, as CRIU takes it):
    make ``images_dir/parent`` point there."""
    link = Path(images_dir, PARENT_LINK)
    if not Path(images_dir, prev).is_dir():
        raise ConfigurationError(f"--prev-images-dir {prev}: {Path(images_dir, prev)} is not a "
                                 "directory (it is relative to -D)")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(prev)


async def receive_pages(listener: socket.socket, images_dir: str | os.PathLike[str], *,
                        wire: WireVersion = WireVersion.V2) -> ReceiveReport:
    """Accept one client on ``listener`` (listening, non-blocking) and take its
    push session (:func:`receive_session`, in a worker thread)."""
    loop = asyncio.get_running_loop()
    conn, peer = await loop.sock_accept(listener)
    log.info("page client %s connected to push pages", peer)
    try:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await asyncio.to_thread(receive_session, conn, images_dir, wire=wire)
    finally:
        conn.close()

