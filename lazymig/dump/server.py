"""The asyncio page server: answers PS_IOV_GET by splicing lazy pages into the socket.

It speaks CRIU's page-server protocol (:mod:`lazymig.proto.pageserver`) in the
chosen wire layout, so ``criu lazy-pages --page-server`` can pull from it as
well as lazymig's daemon. Sockets are used raw (no Transport). The store tees
the pages of a reply out of its page pipe (or names them in a file), and the
plain link splices them from there (or sends the file) into the socket, so
they never enter Python; to a reader on this host it sends a page pipe's pages
from a buffer instead (see :class:`_PlainLink`).

Per connection: requests are handled in order; a malformed request or a GET
outside the dumped lazy ranges ends *that* connection with a logged reason, and
so does a client that leaves its replies unread for ``stall_timeout`` seconds.
Connections beyond ``max_connections`` are closed as soon as they are accepted.
When the server ends is :class:`ServeUntil`'s choice. For a live dump
(``COMPLETE``) it keeps accepting connections (a daemon that reconnects, a
second restore of the same dump) until the transfer is complete: every lazy
page has been served at least once *and* a client closed the session cleanly
(CLOSE, then EOF). Only then may the frozen source be released. For a dump on
disk there is no source to protect: it ends when a client closed its session
cleanly (``SESSION``, as CRIU's ``page-server --lazy-pages``), or serves one
restore after another until it is stopped (``STOPPED``).

With TLS (:mod:`lazymig.tls`) every connection starts with a handshake in
which both ends show certificates; a client refused there is logged with the
reason and the server goes on serving others. Page bytes then have to pass
through user space to be encrypted: they are read from the store's segment
into one reused buffer per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import ipaddress
import logging
import mmap
import os
import socket
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from lazymig._aio import retry_until_ready, wait_fd
from lazymig._listen import listen_tcp
from lazymig.dump.store import ImagesPageStore, LazyPageStore, PageSegment
from lazymig.errors import (
    AuthenticationError,
    BrokenResourceError,
    LazyMigError,
    RemoteProtocolError,
)
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.pageserver import (
    DEFAULT_MAX_PAGES,
    NEED_DATA,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    GetReply,
    GetRequest,
    PageServerConnection,
    Role,
)
from lazymig.proto.runs import PageRuns
from lazymig.proto.wire import WireVersion
from lazymig.tls import ServerTls, TlsOption, TlsSocket

__all__ = ["PageServer", "PageServerStats", "ServeUntil"]

log = logging.getLogger(__name__)

_RECV_SIZE = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 16
"""Connections served at once: a daemon uses one or two, a reconnecting one briefly more."""
DEFAULT_STALL_TIMEOUT = 60.0
"""Seconds a client may leave its replies unread before it is dropped (frees its slot)."""
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_REPLY_CHUNK = 1 << 20
"""Page bytes read and sent per sendmsg (to a peer on this host)."""
_TLS_CHUNK = 256 * 1024
"""Page bytes read and encrypted per TLS send (16 records of 16 KiB)."""
_KEEPALIVE = ((socket.TCP_KEEPIDLE, 5), (socket.TCP_KEEPINTVL, 2), (socket.TCP_KEEPCNT, 3))
"""A client silent for 5 s is probed every 2 s; 3 probes unanswered (its host or link is
gone: a live daemon's kernel answers them however idle it is) end the connection."""
_ACCEPT_SHORTAGES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
"""accept() errors that say "not now" rather than "never": the server tries again."""
_ACCEPT_RETRY = 0.5
"""Seconds between those tries."""
_END_GRACE = 5.0
"""Seconds the other connections get to end by themselves once a session's end ends the
server (a lazymig daemon closes its two channels one after the other)."""


class ServeUntil(enum.Enum):
    """When :meth:`PageServer.serve` returns."""

    COMPLETE = "complete"
    """Every lazy page was served and a client closed its session cleanly (a live dump:
    its frozen source may go only then)."""
    SESSION = "session"
    """A client closed its session cleanly, whatever it left unserved (a dump on disk, as
    CRIU's ``page-server --lazy-pages``: the restored processes exited or dropped the
    rest)."""
    STOPPED = "stopped"
    """Never by itself: one restore after another from one dump on disk, until cancelled."""


@dataclass(slots=True)
class PageServerStats:
    """Counters an orchestrator can read while the server runs."""

    lazy_pages: int = 0
    """Lazy pages in the store."""
    pages_unserved: int = 0
    """Lazy pages not served yet."""
    pages_sent: int = 0
    """Pages sent, repeats included."""
    requests: int = 0
    connections: int = 0
    refused_connections: int = 0
    """Connections ended by a protocol error or a stall, refused at the TLS handshake, or
    refused over the limit."""
    started: float = field(default_factory=time.monotonic)

    @property
    def bytes_sent(self) -> int:
        return self.pages_sent * PAGE_SIZE

    def throughput(self) -> float:
        """Average bytes/s since the server started."""
        return self.bytes_sent / max(time.monotonic() - self.started, 1e-9)


class _Unserved:
    """Which lazy pages have never been served, per pid: one bitmap per range (a GET
    touches only the ranges it overlaps)."""

    def __init__(self, store: LazyPageStore) -> None:
        self._ranges: dict[int, tuple[PageRuns, list[bytearray]]] = {}
        self._left: dict[int, int] = {}  # pid -> its pages never served
        self.remaining = 0
        for pid in store.pids():
            runs = PageRuns(store.lazy_ranges(pid))
            self._ranges[pid] = (runs, [bytearray(b"\1") * nr for _, nr in runs])
            self._left[pid] = runs.pages
            self.remaining += runs.pages

    def some_process_served(self) -> bool:
        """Whether every lazy page of some process that had any was served."""
        return any(left == 0 and self._ranges[pid][0].pages
                   for pid, left in self._left.items())

    def mark(self, pid: int, vaddr: int, nr_pages: int) -> None:
        if self.remaining == 0 or pid not in self._ranges:
            return
        runs, bitmaps = self._ranges[pid]
        end = vaddr + nr_pages * PAGE_SIZE
        for i in runs.overlapping(vaddr, end):
            start, bits = runs.start(i), bitmaps[i]
            first = (max(start, vaddr) - start) // PAGE_SIZE
            last = (min(runs.end(i), end) - start) // PAGE_SIZE
            served = bits.count(1, first, last)
            self.remaining -= served
            self._left[pid] -= served
            bits[first:last] = bytes(last - first)


class PageServer:
    """Serve a store's lazy pages over TCP until the transfer is complete.

    Args:
        store: the lazy pages (page pipes of a live dump, or a dump on disk).
        address: where to listen (CRIU's ``--address``; all addresses by default).
        port: TCP port (CRIU's ``--port``; 0 picks a free one, see :attr:`port`).
        wire: the header layout to speak.
        max_pages: the largest GET accepted.
        max_connections: connections served at once; more are closed on accept.
        stall_timeout: seconds a client may leave a reply unread before it is dropped.
        tls: serve over TLS with mutual certificate checks (CRIU's ``--tls``):
            a :class:`~lazymig.tls.TlsConfig`, a server-side ``ssl.SSLContext``
            (used as is) or a :class:`~lazymig.tls.ServerTls`. Certificates
            are loaded here, so a bad path fails before anything is served.
        listener: a socket already listening at ``address``/``port``
            (:func:`lazymig._listen.listen_tcp`), which the server then owns;
            clients that connected before :meth:`serve` are served then.
        until: when :meth:`serve` returns (:class:`ServeUntil`; by default once the
            transfer is complete).

    Example::

        async with PageServer(store, port=9876) as server:
            await server.ready          # listening
            complete = await server.serve()
    """

    def __init__(self, store: LazyPageStore, *, address: str = "0.0.0.0", port: int = 27,
                 wire: WireVersion = WireVersion.V2, max_pages: int = DEFAULT_MAX_PAGES,
                 tls: TlsOption | ServerTls | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 listener: socket.socket | None = None,
                 until: ServeUntil = ServeUntil.COMPLETE) -> None:
        self.store = store
        self._files = isinstance(store, ImagesPageStore)
        self.until = until
        self.address = address
        self.port = port
        self.wire = wire
        self.max_pages = max_pages
        self.max_connections = max_connections
        self.stall_timeout = stall_timeout
        self.tls = None if tls is None else ServerTls.build(tls, address)
        self._listener: socket.socket | None = None
        self._given = listener
        self._unserved = _Unserved(store)
        self._exited_unserved = False  # complete with pages of exited processes left
        self.stats = PageServerStats(lazy_pages=self._unserved.remaining,
                                     pages_unserved=self._unserved.remaining)
        self._complete: asyncio.Event | None = None
        self._ended_by: object = None  # the peer whose clean close ended the server
        self._connections: set[asyncio.Task[None]] = set()

    # -- lifecycle

    def listen(self) -> None:
        """Bind and listen (CRIU's setup_tcp_server: SO_REUSEADDR, the given address)."""
        if self._listener is not None:
            return
        sock = self._given if self._given is not None else listen_tcp(self.address, self.port)
        self._given = None
        self._listener = sock
        self.port = sock.getsockname()[1]
        if self.tls is None and not _is_loopback(self.address):
            log.warning("page server listens on %s:%d without TLS: anyone who can reach it "
                        "can read the dumped memory", self.address, self.port)
        log.info("page server listening on %s:%d (%s%s), %d lazy pages", self.address,
                 self.port, self.wire.value, ", TLS" if self.tls else "", self.stats.lazy_pages)

    @property
    def complete(self) -> bool:
        """Every lazy page was served and a client closed the session cleanly."""
        return (self._complete is not None and self._complete.is_set()
                and (self._unserved.remaining == 0 or self._exited_unserved))

    async def serve(self) -> bool:
        """Accept connections until :attr:`until` says the server is done; return
        :attr:`complete` then (False: a session ended with pages never served, which
        only ``ServeUntil.SESSION`` accepts).

        Cancelling it stops the server; the store stays intact (nothing is lost).
        """
        self.listen()
        assert self._listener is not None
        self._complete = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            accepting = tg.create_task(self._accept_loop(loop, tg))
            await self._complete.wait()
            accepting.cancel()
            others = [t for t in self._connections if t is not asyncio.current_task()]
            if others and self.until is ServeUntil.SESSION:
                # A daemon's other channel is closing too: let it finish its CLOSE.
                await asyncio.wait(others, timeout=_END_GRACE)
            # Other connections are stale (a client that reconnected after its link died
            # leaves one behind that may never see a reset): they must not hold us here.
            for task in list(self._connections):
                task.cancel()
        if self.complete:
            log.info("lazy pages transfer complete: %d pages served (%d sent), %.1f MB/s",
                     self.stats.lazy_pages - self._unserved.remaining, self.stats.pages_sent,
                     self.stats.throughput() / 1e6)
        else:
            log.info("page client %s ended the session with %d of %d lazy pages never "
                     "served (its processes exited or dropped them): the page server for "
                     "this dump on disk ends, as CRIU's does (--keep-serving serves the next "
                     "restore)", self._ended_by, self._unserved.remaining,
                     self.stats.lazy_pages)
        return self.complete

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop, tg: asyncio.TaskGroup) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(self._listener)
            except ConnectionAbortedError:  # the client gave up before we took it
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_SHORTAGES:
                    raise
                # Out of fds or memory for now: the client waits in the backlog.
                log.error("page server cannot accept a client now (%s); trying again in "
                          "%g s", exc, _ACCEPT_RETRY)
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            self.stats.connections += 1
            if len(self._connections) >= self.max_connections:
                self.stats.refused_connections += 1
                log.warning("page client %s refused: %d connections are open, the limit "
                            "(max_connections)", peer, len(self._connections))
                conn.close()
                continue
            task = tg.create_task(self._serve_connection(conn, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    @property
    def open_connections(self) -> int:
        """Connections being served now (at most ``max_connections``)."""
        return len(self._connections)

    def close(self) -> None:
        """Stop listening (idempotent). The store is the caller's to close."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def __aenter__(self) -> PageServer:
        self.listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- one connection

    async def _serve_connection(self, sock: socket.socket, peer: object) -> None:
        with sock:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keep_alive(sock)
            # Pages of a file go by sendfile to any reader: copied into a buffer, they
            # would cost the server more than their 4 KiB fragments cost a reader on this
            # host (benchmarks.md, "page server for a dump on disk").
            copy = self.tls is not None or (_on_this_host(peer) and not self._files)
            log.info("page client %s connected (pages %s)", peer,
                     "sent from a buffer" if copy else
                     "sent from their file" if self._files else "spliced")
            tls: TlsSocket | None = None
            clean = False
            session = _Session()
            try:
                if self.tls is not None:
                    tls = await TlsSocket.accept(sock, self.tls)  # takes the socket over
                link = (_PlainLink(sock, self.stall_timeout, copy=copy) if tls is None
                        else _TlsLink(tls, self.stall_timeout))
                clean = await self._handle(link, session)
            except AuthenticationError as exc:
                self.stats.refused_connections += 1
                log.error("page client %s refused: %s", peer, exc)
                return
            except (LazyMigError, OSError) as exc:
                if self._ends_session(session):
                    log.info("page client %s: connection ended: %s", peer, exc)
                    self._session_closed(peer)
                    return
                self.stats.refused_connections += 1
                log.error("page client %s: connection closed: %s", peer, exc)
                return
            finally:
                if tls is not None:
                    tls.close(clean=clean)
            if clean:
                self._session_closed(peer)
            elif self._ends_session(session):
                log.info("page client %s ended its session without CLOSE", peer)
                self._session_closed(peer)
            else:
                log.warning("page client %s disconnected without CLOSE", peer)

    def _ends_session(self, session: _Session) -> bool:
        """Whether a connection that ended without CLOSE + EOF still ends its session.

        For a dump on disk, as for CRIU's page server, any end of a connection that
        asked for pages does (criu lazy-pages resets the connection when its process
        exits with a GET in flight: its CLOSE may never arrive); with
        ``ServeUntil.STOPPED`` that only gets it logged. A live dump needs the clean end
        before it lets its source go.
        """
        if self.until is ServeUntil.COMPLETE:
            return False
        return session.close_answered or session.requests > 0

    def _session_closed(self, peer: object) -> None:
        """A client ended its session with CLOSE, then EOF: end the server if
        :attr:`until` says so."""
        assert self._complete is not None
        left = self._unserved.remaining
        if self.until is ServeUntil.STOPPED:
            log.info("page client %s ended the session (%d of %d lazy pages never served "
                     "so far); serving on for the next restore", peer, left,
                     self.stats.lazy_pages)
        elif left == 0 or self.until is ServeUntil.SESSION:
            if not self._complete.is_set():
                self._ended_by = peer
                self._complete.set()
        elif self._unserved.some_process_served():
            # A tree whose restore got every page of one process at least, the rest
            # never asked for: a short-lived child that exited (its parent lives on).
            log.info("page client %s closed the session with %d lazy pages never served, "
                     "of processes that exited before they asked (another process got "
                     "every page): the transfer is complete", peer, left)
            if not self._complete.is_set():
                self._ended_by = peer
                self._exited_unserved = True
                self._complete.set()
        else:
            log.warning("page client %s closed the session with %d lazy pages never "
                        "served; keeping the source and waiting for another client",
                        peer, left)

    async def _handle(self, link: _Link, session: _Session) -> bool:
        """Serve requests until EOF; True when the session ended with CLOSE + EOF."""
        codec = PageServerConnection(Role.SERVER, self.wire, max_pages=self.max_pages)
        buf = bytearray(_RECV_SIZE)
        closed_cleanly = False
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                n = await link.recv_into(buf)
                codec.receive_data(memoryview(buf)[:n])
            elif isinstance(event, GetRequest):
                session.requests += 1
                await self._answer_get(link, codec, event)
            elif isinstance(event, CloseRequest):
                await link.sendall(codec.send(CloseReply(0)))
                closed_cleanly = session.close_answered = True
            elif isinstance(event, ConnectionClosed):
                return closed_cleanly
            else:
                raise RemoteProtocolError(
                    f"{type(event).__name__} is not served in lazy mode", field="cmd")

    async def _answer_get(self, link: _Link, codec: PageServerConnection,
                          get: GetRequest) -> None:
        self.stats.requests += 1
        found = self.store.lookup(get.pid, get.vaddr, get.nr_pages)
        if found is None:
            raise RemoteProtocolError(
                f"GET of {get.nr_pages} pages at {get.vaddr:#x} for pid {get.pid}: "
                "not a lazy page of this dump", field="vaddr")
        # A live dump's page pipe that is not filled yet gives an awaitable (rare).
        segment = found if isinstance(found, PageSegment) else await found
        nr_pages = segment.length >> PAGE_SHIFT
        try:
            await link.send_reply(codec.send(GetReply(get.pid, get.vaddr, nr_pages)), segment)
            codec.payload_sent_directly(segment.length)
            segment.close(drained=True)
        finally:
            segment.close()  # after an error: whatever is left in it goes
        self._unserved.mark(get.pid, get.vaddr, nr_pages)
        self.stats.pages_sent += nr_pages
        self.stats.pages_unserved = self._unserved.remaining


@dataclass(slots=True)
class _Session:
    """What one connection's client has done so far."""

    requests: int = 0
    """GETs it sent."""
    close_answered: bool = False
    """It sent CLOSE and got the status."""


class _Link(Protocol):
    """One client connection's byte stream, plain or TLS."""

    async def recv_into(self, buf: bytearray) -> int:
        """Bytes from the client into ``buf``; 0 at its end."""
        ...

    async def sendall(self, data: bytes) -> None:
        ...

    async def send_reply(self, header: bytes, segment: PageSegment) -> None:
        """A GET reply: ``header``, then every byte of ``segment``."""
        ...


class _PlainLink:
    """A raw socket. Across a network, pages are spliced into it from the store's
    pipe (or sent from its file): they never enter Python. To a reader on this
    host (``copy``) a page pipe's pages are read into one reused buffer and sent
    with their header in one sendmsg instead: spliced, every page would reach
    that reader as a 4 KiB fragment of its own, which doubles its receive cost
    (a reader across a network receives its NIC's packets, whatever we send).
    A file's pages are never copied (the server chooses: see
    :meth:`PageServer._serve_connection`): tee + read + send cost more than
    sendfile, and the reader's extra cost is smaller than that saving."""

    def __init__(self, sock: socket.socket, stall_timeout: float, *, copy: bool) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._stall_timeout = stall_timeout
        self._buf = _ReplyBuffer() if copy else None

    async def recv_into(self, buf: bytearray) -> int:
        # Try first: the next request is often there already, and uvloop's
        # sock_recv_into always waits on the loop (an epoll_ctl pair per request).
        return await retry_until_ready(self._sock.fileno(),
                                       functools.partial(self._sock.recv_into, buf))

    async def sendall(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def send_reply(self, header: bytes, segment: PageSegment) -> None:
        if self._buf is None:
            await self._send(header, b"", more=segment.length > 0)
            await _splice_all(segment, self._sock.fileno(), self._stall_timeout)
            return
        head = header
        for chunk in self._buf.chunks(segment):
            await self._send(head, chunk)
            head = b""
        if head:  # a reply without pages
            await self._send(head, b"")

    async def _send(self, head: bytes, body: bytes | memoryview, *, more: bool = False) -> None:
        """``head`` then ``body``: one sendmsg, and waits (no copies) for what it left.
        ``more``: pages follow (MSG_MORE holds the header back for them: one segment
        on the wire, without toggling TCP_CORK around every reply)."""
        try:
            sent = self._sock.sendmsg([head, body], [], socket.MSG_MORE if more else 0)
        except BlockingIOError:
            sent = 0
        for part in (head, body):
            if sent < len(part):
                await _unless_stalled(self._loop.sock_sendall(self._sock, memoryview(part)[sent:]),
                                      self._stall_timeout)
            sent = max(sent - len(part), 0)


class _TlsLink:
    """A TLS session: pages are read from the segment into one reused buffer and
    encrypted from there."""

    def __init__(self, tls: TlsSocket, stall_timeout: float) -> None:
        self._tls = tls
        self._buf = _ReplyBuffer(_TLS_CHUNK)
        self._stall_timeout = stall_timeout

    async def recv_into(self, buf: bytearray) -> int:
        return await self._tls.recv_into(buf)

    async def sendall(self, data: bytes) -> None:
        await self._tls.sendall(data)

    async def send_reply(self, header: bytes, segment: PageSegment) -> None:
        # The header goes in a TLS record of its own: CRIU's client reads it with one
        # gnutls_record_recv and then waits for the socket to be readable for the pages,
        # which would never come if they sat decrypted in GnuTLS's buffer already.
        await _unless_stalled(self._tls.sendall(header), self._stall_timeout)
        for chunk in self._buf.chunks(segment):
            await _unless_stalled(self._tls.sendall(chunk), self._stall_timeout)


class _ReplyBuffer:
    """One connection's buffer for the pages of its replies (an anonymous map: its
    pages are not touched until a reply needs them)."""

    def __init__(self, size: int = _REPLY_CHUNK) -> None:
        self._view = memoryview(mmap.mmap(-1, size))

    def chunks(self, segment: PageSegment) -> Iterator[memoryview]:
        """The segment's bytes, a buffer at a time (each valid until the next)."""
        remaining, offset = segment.length, segment.offset
        while remaining:
            # The pipe holds exactly the segment's bytes, the file is in the page cache:
            # neither read waits.
            chunk = self._view[:min(remaining, len(self._view))]
            got = (os.readv(segment.fd, [chunk]) if offset is None
                   else os.preadv(segment.fd, [chunk], offset))
            if got == 0:
                raise LazyMigError("page store ran dry while sending (segment shorter than said)")
            yield chunk[:got]
            remaining -= got
            if offset is not None:
                offset += got


async def _unless_stalled(sending: Awaitable[None], stall_timeout: float) -> None:
    """Await ``sending``; a client that lets it wait ``stall_timeout`` s is broken."""
    try:
        async with asyncio.timeout(stall_timeout):
            await sending
    except TimeoutError:
        raise BrokenResourceError(f"page client left its replies unread for "
                                  f"{stall_timeout:g} s (stall_timeout)") from None


async def _splice_all(segment: PageSegment, sock_fd: int, stall_timeout: float) -> None:
    """Move the segment's bytes into the non-blocking socket, waiting when it is full
    (but not longer than ``stall_timeout`` at a time: the client stopped reading).

    A pipe segment goes by splice; a file segment by sendfile (splice needs a
    pipe on one side). The timeout is armed only when the socket is full, so
    the hot path pays nothing for it.
    """
    remaining = segment.length
    offset = segment.offset
    while remaining:
        try:
            moved = (os.splice(segment.fd, sock_fd, remaining, flags=_SPLICE_FLAGS)
                     if offset is None else os.sendfile(sock_fd, segment.fd, offset, remaining))
        except (BlockingIOError, InterruptedError):
            await _unless_stalled(wait_fd(sock_fd, writable=True), stall_timeout)
            continue
        if moved == 0:
            raise LazyMigError("page store ran dry while sending (segment shorter than said)")
        remaining -= moved
        if offset is not None:
            offset += moved


def _keep_alive(sock: socket.socket) -> None:
    """TCP keepalive: a client whose host died or whose link is cut turns into a
    connection error within seconds instead of a connection that waits for ever."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _on_this_host(peer: object) -> bool:
    """``peer`` (an address from accept) is a loopback one: the reader runs here."""
    return isinstance(peer, tuple) and isinstance(peer[0], str) and _is_loopback(peer[0])


def _is_loopback(address: str) -> bool:
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return address == "localhost"
