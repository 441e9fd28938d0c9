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
import logging
import os
import socket
import ssl
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, cast

from lazymig.dump.store import ImagesPageStore
from lazymig.errors import (
    AuthenticationError,
    BrokenResourceError,
    ClosedResourceError,
    LazyMigError,
)
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
from lazymig.tls import TlsOption, client_context

__all__ = ["LocalPageSource", "PageChunk", "PageSource", "RemotePageSource"]

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
"""struct linger {on, 0 s}: close() sends a reset (RST) instead of a FIN."""
_LINGER_OFF = struct.pack("ii", 0, 0)


@dataclass(frozen=True, slots=True)
class PageChunk:
    """Pages as received: ``nr_pages`` pages at dump-time address ``vaddr``.

    ``data`` may live in a buffer the source reuses: call :meth:`release` once
    the pages are copied (the daemon does), and do not touch ``data`` after.
    """

    vaddr: int
    nr_pages: int
    data: memoryview
    _pool: list[bytearray] | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Give the buffer back to the source for a later reply."""
        if self._pool is not None and len(self._pool) < _POOL_SIZE:
            self._pool.append(self.data.obj)  # type: ignore[arg-type]


_POOL_SIZE = 4
"""Reply buffers kept per connection (each as big as the largest reply)."""


class PageSource(Protocol):
    """Lazy pages by image pid and dump-time address."""

    def request(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                ) -> asyncio.Future[PageChunk]:
        """Ask for up to ``nr_pages`` pages at ``vaddr``; the future gets them (maybe
        fewer, never zero) or the error that broke the source. Never blocks: the
        daemon's fault path chains a callback on the future instead of a task."""
        ...

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        """``await request(...)``."""
        ...

    async def aclose(self) -> None:
        """End the session cleanly (CRIU: PS_IOV_CLOSE and its status)."""
        ...

    def abort(self) -> None:
        """Drop the session at once, without the closing exchange."""
        ...


class _Channel(asyncio.BufferedProtocol):
    """One TCP connection to a page server, with pipelined GETs.

    A ``BufferedProtocol``: the loop calls us back with data, no task or future
    per read. While a reply's page data arrives, :meth:`get_buffer` hands the
    loop the caller's page buffer itself, so the kernel writes pages straight
    where the daemon will UFFDIO_COPY them from.
    """

    def __init__(self, wire: WireVersion, max_pages: int, name: str) -> None:
        self.name = name
        self.codec = PageServerConnection(Role.CLIENT, wire, max_pages=max_pages)
        self.waiters: deque[asyncio.Future[PageChunk] | asyncio.Future[CloseReply]] = deque()
        self.transport: asyncio.WriteTransport | None = None
        self.broken: BaseException | None = None
        self._scratch = bytearray(64 * 1024)
        self._reply: GetReply | None = None  # the GET reply whose pages are arriving
        self._data = memoryview(bytearray())
        # Reused reply buffers: a fresh multi-MiB bytearray costs a page fault per 4 KiB
        # on its first fill, as much as the copy itself.
        self._pool: list[bytearray] = []
        self._buffer_size = max_pages * PAGE_SIZE
        self._filled = 0
        self._direct = False  # the last get_buffer() handed out the page buffer
        self.lost = asyncio.get_running_loop().create_future()

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport writes (uvloop's does not subclass asyncio's ABCs: no isinstance).
        self.transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Until an orderly CLOSE, any close of this socket (abort, a crash, a kill)
        # must not read as a finished transfer: reset it (see the module doc).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._reply is not None and self.codec.buffered == 0:
            self._direct = True
            return self._data[self._filled:]
        self._direct = False
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct:
                self.codec.payload_received_directly(nbytes)
                self._filled += nbytes
                self._deliver_if_complete()
            else:
                self.codec.receive_data(memoryview(self._scratch)[:nbytes])
                self._process()
        except LazyMigError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool:
        try:
            self.codec.receive_data(b"")
            self._process()
        except LazyMigError as exc:
            self._fail(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BrokenResourceError(
            f"page server connection ({self.name}) lost" + (f": {exc}" if exc else "")))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- replies

    def _process(self) -> None:
        codec = self.codec
        while True:
            if self._reply is not None:
                event = codec.next_event()
                if event is NEED_DATA:
                    return
                assert isinstance(event, PageData)
                self._data[self._filled:self._filled + len(event.data)] = event.data
                self._filled += len(event.data)
                self._deliver_if_complete()
                continue
            event = codec.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, GetReply):
                self._reply = event
                buffer = self._pool.pop() if self._pool else bytearray(self._buffer_size)
                self._data = memoryview(buffer)[:event.nr_pages * PAGE_SIZE]
                self._filled = 0
            elif isinstance(event, CloseReply):
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(event)  # type: ignore[arg-type]
            elif isinstance(event, ConnectionClosed):
                raise BrokenResourceError(
                    f"page server closed the connection ({self.name}) with "
                    f"{event.unanswered} requests unanswered" if event.unanswered
                    else f"page server closed the connection ({self.name})")

    def _deliver_if_complete(self) -> None:
        reply = self._reply
        if reply is None or self._filled < len(self._data):
            return
        self._reply = None
        waiter = self.waiters.popleft()
        if not waiter.done():
            chunk = PageChunk(reply.vaddr, reply.nr_pages, self._data, self._pool)
            waiter.set_result(chunk)  # type: ignore[arg-type]

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.broken)
                waiter.exception()  # retrieved: the owner learns it from its own waiter

    # -- requests

    def send(self, event: GetRequest | CloseRequest) -> asyncio.Future[PageChunk | CloseReply]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[PageChunk | CloseReply] = loop.create_future()
        if self.broken is not None or self.transport is None or self.transport.is_closing():
            waiter.set_exception(BrokenResourceError(
                f"page server connection ({self.name}) is broken"))
            return waiter
        self.transport.write(self.codec.send(event))
        self.waiters.append(waiter)  # type: ignore[arg-type]
        return waiter

    def abort(self) -> None:
        self._fail(ClosedResourceError("page source closed"))
        if self.transport is not None:
            self.transport.abort()


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
                      connect_timeout: float = 10.0, tls: TlsOption | None = None
                      ) -> RemotePageSource:
        """Connect to the page server; ``channels=2`` adds a connection for urgent requests.

        ``tls`` (a :class:`~lazymig.tls.TlsConfig` or a client ``ssl.SSLContext``)
        runs every channel over TLS, as CRIU's ``--tls``: the server's certificate
        must name ``address`` unless the config says ``verify_cn=False``.
        """
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        # Loading the system's CAs reads hundreds of files: not on the loop.
        context = None if tls is None else await asyncio.to_thread(client_context, tls)
        loop = asyncio.get_running_loop()
        opened: list[_Channel] = []
        try:
            for i in range(channels):
                name = "urgent" if i else "main"
                try:
                    async with asyncio.timeout(connect_timeout):
                        _, channel = await loop.create_connection(
                            lambda name=name: _Channel(wire, max_pages, name),
                            address, port, ssl=context,
                            server_hostname=None if context is None else address)
                except ssl.SSLCertVerificationError as exc:
                    raise AuthenticationError(
                        f"the page server at {address}:{port} was refused: "
                        f"{exc.verify_message}") from exc
                except ssl.SSLError as exc:
                    raise AuthenticationError(
                        f"TLS handshake with the page server at {address}:{port} failed: "
                        f"{exc.reason or exc} (does it use --tls, and trust our "
                        "certificate's CA?)") from exc
                except (OSError, TimeoutError) as exc:
                    raise BrokenResourceError(
                        f"cannot connect to the page server at {address}:{port}: "
                        f"{exc or 'timeout'} (is `lazymig dump --lazy-pages` or "
                        "`criu dump --lazy-pages` listening there?)") from exc
                opened.append(channel)
        except BaseException:
            for channel in opened:
                channel.abort()
            raise
        log.info("connected to page server %s:%d (%s, %d channel%s%s)", address, port,
                 wire.value, channels, "s" if channels > 1 else "", ", TLS" if tls else "")
        return cls(opened)

    def request(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                ) -> asyncio.Future[PageChunk]:
        channel = self._channels[-1] if urgent else self._channels[0]
        self.requests += 1
        return channel.send(GetRequest(pid, vaddr, nr_pages))  # type: ignore[return-value]

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        return await self.request(pid, vaddr, nr_pages, urgent=urgent)

    async def aclose(self) -> None:
        """Send CLOSE on every channel, wait for the statuses, then close the sockets."""
        try:
            for channel in self._channels:
                reply = await channel.send(CloseRequest())
                assert isinstance(reply, CloseReply)
                if reply.status != 0:
                    log.warning("page server answered CLOSE with status %d", reply.status)
                # CLOSE was answered: now end with the EOF that CRIU waits for.
                assert channel.transport is not None
                sock = channel.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
                if channel.transport.can_write_eof():
                    channel.transport.write_eof()
                # else TLS, which has no half-close: close() below ends with close_notify
        finally:
            for channel in self._channels:
                if channel.transport is not None:
                    channel.transport.close()
                await channel.lost

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

    def request(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                ) -> asyncio.Future[PageChunk]:
        return asyncio.ensure_future(self.get(pid, vaddr, nr_pages, urgent=urgent))

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
        return PageChunk(vaddr, available, memoryview(data))

    async def aclose(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._store.close()
