"""Where the lazy-pages daemon gets pages: a remote page server or local images.

Both implement :class:`PageSource`, so the daemon does not care where pages
come from (CRIU's ``page_read`` vtable, as a ``typing.Protocol``).

:class:`RemotePageSource` speaks CRIU's page-server protocol as the client.
Requests are pipelined and replies matched strictly in order; a reply may
carry fewer pages than asked. Page bytes are received straight into the
buffer handed back to the caller (one copy, by the kernel). With
``channels=2`` urgent requests (faults) travel on a connection of their own,
so they never queue behind background megabytes (QEMU's postcopy-preempt
channel). CRIU's own page server accepts a single connection, so one channel
is the default; on it, the daemon bounds background requests in flight.

Only :meth:`RemotePageSource.aclose` ends a session with a FIN. Every other end
(:meth:`~RemotePageSource.abort`, the process dying or being killed) resets the
connection: ``criu dump --lazy-pages`` (4.1.1) takes a plain EOF for a finished
transfer and kills its frozen source, while a reset makes it fail and resume
the source, which is what must happen when the restored copy did not get its
pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from lazymig.dump.store import ImagesPageStore
from lazymig.errors import BrokenResourceError, ClosedResourceError, LazyMigError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.images import ImagesDir
from lazymig.proto.pageserver import (
    DEFAULT_MAX_PAGES,
    NEED_DATA,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    GetReply,
    GetRequest,
    PageData,
    PageServerConnection,
    Role,
)
from lazymig.proto.wire import WireVersion

__all__ = ["LocalPageSource", "PageChunk", "PageSource", "RemotePageSource"]

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
"""struct linger {on, 0 s}: close() sends a reset (RST) instead of a FIN."""
_LINGER_OFF = struct.pack("ii", 0, 0)


@dataclass(frozen=True, slots=True)
class PageChunk:
    """Pages as received: ``nr_pages`` pages at dump-time address ``vaddr``."""

    vaddr: int
    nr_pages: int
    data: bytearray


class PageSource(Protocol):
    """Lazy pages by image pid and dump-time address."""

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        """Fetch up to ``nr_pages`` pages at ``vaddr`` (maybe fewer, never zero)."""
        ...

    async def aclose(self) -> None:
        """End the session cleanly (CRIU: PS_IOV_CLOSE and its status)."""
        ...

    def abort(self) -> None:
        """Drop the session at once, without the closing exchange."""
        ...


class _Channel:
    """One TCP connection to a page server, with pipelined GETs."""

    def __init__(self, sock: socket.socket, wire: WireVersion, max_pages: int, name: str) -> None:
        self.sock = sock
        self.name = name
        self.codec = PageServerConnection(Role.CLIENT, wire, max_pages=max_pages)
        self.waiters: deque[asyncio.Future[PageChunk | CloseReply]] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None

    def start(self) -> None:
        self.reader = asyncio.get_running_loop().create_task(self._read_replies())

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    async def request(self, event: GetRequest | CloseRequest) -> PageChunk | CloseReply:
        if self.broken is not None:
            raise BrokenResourceError(f"page server connection ({self.name}) is broken") \
                from self.broken
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PageChunk | CloseReply] = loop.create_future()
        self.waiters.append(waiter)
        try:
            await loop.sock_sendall(self.sock, self.codec.send(event))
        except OSError as exc:
            error = BrokenResourceError(f"page server connection ({self.name}) lost: {exc}")
            self._fail(error)
            raise error from exc
        return await waiter

    async def _read_replies(self) -> None:
        loop = asyncio.get_running_loop()
        codec = self.codec
        scratch = bytearray(64 * 1024)
        try:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    n = await loop.sock_recv_into(self.sock, scratch)
                    codec.receive_data(memoryview(scratch)[:n])
                elif isinstance(event, GetReply):
                    data = bytearray(event.nr_pages * PAGE_SIZE)
                    await self._receive_payload(loop, data)
                    self.waiters.popleft().set_result(
                        PageChunk(event.vaddr, event.nr_pages, data))
                elif isinstance(event, CloseReply):
                    self.waiters.popleft().set_result(event)
                elif isinstance(event, ConnectionClosed):
                    raise BrokenResourceError(
                        f"page server closed the connection ({self.name}) with "
                        f"{event.unanswered} requests unanswered" if event.unanswered
                        else f"page server closed the connection ({self.name})")
        except (LazyMigError, OSError) as exc:
            if not isinstance(exc, LazyMigError):
                exc = BrokenResourceError(f"page server connection ({self.name}) lost: {exc}")
            self._fail(exc)

    async def _receive_payload(self, loop: asyncio.AbstractEventLoop, data: bytearray) -> None:
        view = memoryview(data)
        filled = 0
        codec = self.codec
        while codec.buffered and codec.payload_remaining:  # bytes that came with the header
            chunk = codec.next_event()
            assert isinstance(chunk, PageData)
            view[filled:filled + len(chunk.data)] = chunk.data
            filled += len(chunk.data)
        while filled < len(data):
            n = await loop.sock_recv_into(self.sock, view[filled:])
            if n == 0:
                codec.receive_data(b"")
                codec.next_event()  # raises: EOF in the middle of page data
            codec.payload_received_directly(n)
            filled += n

    def abort(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self._fail(ClosedResourceError("page source closed"))
        self.sock.close()


class RemotePageSource:
    """Pages from a page server over TCP (``lazymig lazy-pages --page-server``).

    Use :meth:`connect`; close with :meth:`aclose` (orderly CLOSE) or
    :meth:`abort`.
    """

    def __init__(self, channels: list[_Channel]) -> None:
        self._channels = channels
        self.requests = 0

    @classmethod
    async def connect(cls, address: str, port: int, *, wire: WireVersion = WireVersion.V2,
                      channels: int = 1, max_pages: int = DEFAULT_MAX_PAGES,
                      connect_timeout: float = 10.0) -> RemotePageSource:
        """Connect to the page server; ``channels=2`` adds a connection for urgent requests."""
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        loop = asyncio.get_running_loop()
        opened: list[_Channel] = []
        try:
            for i in range(channels):
                infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
                family, type_, proto, _, addr = infos[0]
                sock = socket.socket(family, type_, proto)
                sock.setblocking(False)
                try:
                    async with asyncio.timeout(connect_timeout):
                        await loop.sock_connect(sock, addr)
                except (OSError, TimeoutError) as exc:
                    sock.close()
                    raise BrokenResourceError(
                        f"cannot connect to the page server at {address}:{port}: {exc or 'timeout'}"
                        " (is `lazymig dump --lazy-pages` or `criu dump --lazy-pages` "
                        "listening there?)") from exc
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Until an orderly CLOSE, any close of this socket (abort, a crash, a kill)
                # must not read as a finished transfer: reset it (see the module doc).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                channel = _Channel(sock, wire, max_pages, "urgent" if i else "main")
                channel.start()
                opened.append(channel)
        except BaseException:
            for channel in opened:
                channel.abort()
            raise
        log.info("connected to page server %s:%d (%s, %d channel%s)", address, port,
                 wire.value, channels, "s" if channels > 1 else "")
        return cls(opened)

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        channel = self._channels[-1] if urgent else self._channels[0]
        self.requests += 1
        reply = await channel.request(GetRequest(pid, vaddr, nr_pages))
        assert isinstance(reply, PageChunk)
        return reply

    async def aclose(self) -> None:
        """Send CLOSE on every channel, wait for the statuses, then close the sockets."""
        try:
            for channel in self._channels:
                reply = await channel.request(CloseRequest())
                assert isinstance(reply, CloseReply)
                if reply.status != 0:
                    log.warning("page server answered CLOSE with status %d", reply.status)
                # CLOSE was answered: now end with the EOF that CRIU waits for.
                channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
                channel.sock.shutdown(socket.SHUT_WR)
        finally:
            for channel in self._channels:
                if channel.reader is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        channel.reader.cancel()
                        await channel.reader
                channel.sock.close()

    def abort(self) -> None:
        """Reset every connection (a page server must not take this for a finished transfer)."""
        for channel in self._channels:
            channel.abort()


class LocalPageSource:
    """Pages read from the images directory (CRIU's local lazy mode).

    Used when the dump wrote lazy pages to disk (PE_LAZY|PE_PRESENT entries);
    a GET is clamped at the end of a lazy range exactly as a page server would.
    Reads run in a worker thread, never on the event loop.
    """

    def __init__(self, images: ImagesDir) -> None:
        self._store = ImagesPageStore(images)

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        available = self._store.available(pid, vaddr, nr_pages)
        if available == 0:
            raise LazyMigError(f"no lazy page of pid {pid} at {vaddr:#x} in the images")
        segment = self._store.segment(pid, vaddr, available)
        assert segment.offset is not None
        data = bytearray(segment.length)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, os.preadv, segment.fd, [data], segment.offset)
        if got != len(data):
            raise LazyMigError(f"pages image ends early (pid {pid}, {vaddr:#x})")
        return PageChunk(vaddr, available, data)

    async def aclose(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._store.close()
