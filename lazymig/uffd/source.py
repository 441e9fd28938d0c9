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

A lost connection is not the end of a session (QEMU's postcopy recovery): the
source connects again with backoff, sends again, in order, every request that
was not fully answered, and meanwhile queues new ones; a connection whose
requests get nothing back for a while (a dead link sends no reset) counts as
lost. Only when that fails for long enough (:class:`ReconnectPolicy`) do the
waiting requests fail. A server that refuses us (a TLS alert, or hanging up on
the very first connection before sending a byte) is not retried.

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
import mmap
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from lazymig.errors import (
    AuthenticationError,
    BrokenResourceError,
    ClosedResourceError,
    ConfigurationError,
    LazyMigError,
)
from lazymig.linux.uffd import buffer_address
from lazymig.proto.constants import LINGER_OFF, LINGER_RESET, PAGE_SIZE
from lazymig.proto.images import ImagesDir
from lazymig.proto.pageserver import (
    DEFAULT_MAX_PAGES,
    GET_CMD,
    NEED_DATA,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    PageServerConnection,
    Role,
    check_get,
    get_reply_error,
)
from lazymig.proto.wire import WireVersion

if TYPE_CHECKING:
    from lazymig.tls import TlsOption

__all__ = [
    "NO_RECONNECT",
    "FailedPageSource",
    "LocalPageSource",
    "PageChunk",
    "PageSink",
    "PageSource",
    "ReconnectPolicy",
    "RemotePageSource",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class PageChunk:
    """Pages as received: ``nr_pages`` pages at dump-time address ``vaddr``, the answer
    to :meth:`PageSource.get` (the daemon's own requests go to a :class:`PageSink`)."""

    vaddr: int
    nr_pages: int
    data: memoryview
    address: int
    """Where ``data`` starts in this process's memory (valid while ``data`` lives): a
    UFFDIO_COPY takes it as is."""

    def release(self) -> None:
        """Done with the pages (kept for callers that released pooled buffers)."""


def _chunk(vaddr: int, nr_pages: int, data: bytearray | memoryview) -> PageChunk:
    """A :class:`PageChunk` of ``data``: a bytearray as is, anything else copied."""
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    with buffer_address(buffer) as (address, _):  # a bytearray that is never resized
        return PageChunk(vaddr, nr_pages, memoryview(buffer), address)


class PageSink(Protocol):
    """Who gets the pages of a :meth:`PageSource.fetch` (the daemon, per process).

    Called straight from the loop callback that completed the reply, once per request,
    with the source in a consistent state (the request already answered): the fault
    path's whole round trip, with no future and no loop iteration in between. The
    call may send requests, or end the source."""

    def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                      urgent: bool) -> None:
        """``got`` (1 to ``nr_pages``) pages asked for at ``vaddr`` are at ``address`` in
        this process's memory, until this returns (copy them now: the buffer is reused)."""
        ...

    def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                     error: BaseException) -> None:
        """The request will never be answered: the source failed for good (``error``).
        Called later from the loop, not from the call that failed the source."""
        ...


class PageSource(Protocol):
    """Lazy pages by image pid and dump-time address."""

    def fetch(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink, *,
              urgent: bool = False) -> None:
        """Ask for up to ``nr_pages`` pages at ``vaddr``; ``sink`` gets them (maybe fewer,
        never zero) or the error that broke the source. Never blocks. The daemon's way:
        no future, the reply copied as it completes (see :class:`PageSink`)."""
        ...

    def poll(self, budget: float) -> bool:
        """Wait for the replies to the urgent requests made so far without yielding to
        the loop: spin for up to ``budget`` seconds, handing each reply to its sink from
        here. True if they all arrived; False at once if this source cannot (the loop
        delivers them then, as always). The fault path's way to skip the wake-up from
        epoll_wait, which on a VM whose idle vCPUs halt costs more than the round trip."""
        ...

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        """The pages at ``vaddr`` (maybe fewer than ``nr_pages``, never zero), in a buffer
        of their own."""
        ...

    async def aclose(self) -> None:
        """End the session cleanly (CRIU: PS_IOV_CLOSE and its status)."""
        ...

    def abort(self) -> None:
        """Drop the session at once, without the closing exchange."""
        ...


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How :class:`RemotePageSource` survives a lost connection (QEMU's postcopy recovery).

    When the connection to the page server breaks (reset, EOF, or no reply for
    ``stall_timeout`` seconds while requests wait), the source connects again,
    first at once, then after delays doubling from ``first_delay`` up to
    ``max_delay``; it sends again, in order, every request that was not fully
    answered, and requests made meanwhile simply wait. It gives up (every
    waiting request then fails with :class:`BrokenResourceError`) after
    ``attempts`` connections in a row that brought no reply, or ``timeout``
    seconds after the loss, whichever comes first.
    """

    attempts: int = 8
    """Connections in a row without a reply before giving up; 0 never reconnects."""
    timeout: float = 30.0
    """Seconds from the loss of the connection until giving up."""
    first_delay: float = 0.05
    max_delay: float = 1.0
    stall_timeout: float | None = 10.0
    """Seconds without a received byte, while requests wait, after which the connection
    counts as lost (a dead link gives no reset); None waits for the kernel to notice."""

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.timeout < 0 or self.first_delay < 0 or \
                self.max_delay < self.first_delay:
            raise ConfigurationError(f"impossible reconnection policy: {self}")
        if self.stall_timeout is not None and self.stall_timeout <= 0:
            raise ConfigurationError("stall_timeout must be positive (or None)")


NO_RECONNECT = ReconnectPolicy(attempts=0, stall_timeout=None)
"""Fail every waiting request as soon as the connection is lost."""


class _Get:
    """A GET and who waits for it (a sink, or a future); it outlives the connection it
    was sent on (sent again after a reconnection)."""

    __slots__ = ("future", "nr_pages", "pid", "sink", "urgent", "vaddr")

    def __init__(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink | None,
                 urgent: bool, future: asyncio.Future[PageChunk] | None) -> None:
        self.pid, self.vaddr, self.nr_pages = pid, vaddr, nr_pages
        self.sink, self.urgent, self.future = sink, urgent, future


class _Close:
    """A CLOSE and the future of its status."""

    __slots__ = ("event", "future")

    def __init__(self, event: CloseRequest, future: asyncio.Future[CloseReply]) -> None:
        self.event, self.future = event, future


_Request = _Get | _Close


class _Channel(asyncio.BufferedProtocol):
    """One TCP connection to a page server, with pipelined GETs.

    A ``BufferedProtocol``: the loop calls us back with data, no task or future
    per read. GET replies are the hot path and skip the codec: while a GET waits
    at the head, :meth:`get_buffer` hands the loop this connection's reply buffer,
    no further than that reply can reach, so the kernel writes the header and the
    pages where the sink UFFDIO_COPYs them from; the header is checked once
    (:func:`~lazymig.proto.pageserver.get_reply_error`). Any other reply (CLOSE's
    status) goes through the codec (:mod:`lazymig.proto.pageserver`, the spec).
    Its unanswered requests go back to its :class:`_Lane` when the connection ends.
    """

    def __init__(self, lane: _Lane, wire: WireVersion, max_pages: int) -> None:
        self.lane = lane
        self.codec = PageServerConnection(Role.CLIENT, wire, max_pages=max_pages)
        self.waiters: deque[_Request] = deque()
        self.transport: asyncio.WriteTransport | None = None
        self.error: BaseException | None = None  # why we ended it, if we did
        self.fatal = False  # a protocol violation: reconnecting would not help
        self.stalled_out = False  # ended by the lane's stall watchdog, not by the peer
        self.last_progress = time.monotonic()
        self._header = wire.header_struct
        self._pack = self._header.pack
        self._unpack = self._header.unpack_from
        self._hsize = self._header.size
        # The reply buffer: an anonymous map (only the pages replies used are resident),
        # a header and the largest reply. [_start, _end) is received and not yet handled.
        self._buffer = mmap.mmap(-1, self._hsize + max_pages * PAGE_SIZE)
        self._view = memoryview(self._buffer)
        with buffer_address(self._buffer) as (self._base, _):
            pass  # an mmap never moves: its address holds while it lives
        self._start = 0
        self._end = 0
        self._scratch = memoryview(bytearray(4096))  # what the codec reads (CLOSE's status)
        self._to_codec = False  # the last get_buffer() handed out the scratch buffer
        self.lost = asyncio.get_running_loop().create_future()
        self.replies = 0  # replies handed to their waiters (see poll)
        self._fd = -1  # the plain TCP socket's fd, for poll (-1: TLS, or not connected)

    @property
    def usable(self) -> bool:
        return self.error is None and self.transport is not None and \
            not self.transport.is_closing()

    # -- asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport writes (uvloop's does not subclass asyncio's ABCs: no isinstance).
        self.transport = cast(asyncio.WriteTransport, transport)
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Until an orderly CLOSE, any close of this socket (abort, a crash, a kill)
        # must not read as a finished transfer: reset it (see the module doc).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        if transport.get_extra_info("sslcontext") is None:
            self._fd = sock.fileno()  # TLS records are the transport's to read

    def get_buffer(self, sizehint: int) -> memoryview:
        waiters = self.waiters
        if waiters and type(head := waiters[0]) is _Get and not self.codec.buffered:
            self._to_codec = False
            # Up to the end of the head's reply at most: what follows is the next reply's,
            # which belongs at the start of the buffer.
            return self._view[self._end:self._start + self._hsize + head.nr_pages * PAGE_SIZE]
        self._to_codec = True
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.last_progress = time.monotonic()
        self.lane.source.answered = True
        try:
            if self._to_codec:
                self.codec.receive_data(self._scratch[:nbytes])
                self._process()
            else:
                self._end += nbytes
                self._replies()
        except BrokenResourceError as exc:  # the server closed the session on us
            self.end(exc)
        except LazyMigError as exc:
            self.end(exc, fatal=True)

    def eof_received(self) -> bool:
        try:
            if self.waiters and type(self.waiters[0]) is _Get:
                raise BrokenResourceError(
                    f"page server closed the connection ({self.lane.name}) with "
                    f"{len(self.waiters)} requests unanswered" + (
                        f" ({self._end - self._start} bytes of a reply received)"
                        if self._end > self._start else ""))
            self.codec.receive_data(b"")
            self._process()
        except LazyMigError as exc:  # EOF, possibly mid-reply: the connection is lost
            self.end(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ssl.SSLError) and not isinstance(
                exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) and self.error is None:
            # A TLS alert: the server refused us, and would again.
            self.error = AuthenticationError(
                f"the page server ended the TLS session ({self.lane.name}): "
                f"{exc.reason or exc} (does it trust our certificate's CA?)")
            self.fatal = True
        if self.error is None:
            self.error = BrokenResourceError(
                f"page server connection ({self.lane.name}) lost" + (f": {exc}" if exc else ""))
        if not self.lost.done():
            self.lost.set_result(None)
        self.lane.connection_ended(self)

    def end(self, error: BaseException, *, fatal: bool = False) -> None:
        """End this connection now (RST); the lane decides about its requests."""
        if self.error is None:
            self.error, self.fatal = error, fatal
        if self.transport is not None:
            self.transport.abort()

    # -- replies

    def _replies(self) -> None:
        """Hand every complete GET reply in the buffer to its waiter, in order.

        The fault path: the header checked once, the pages left where they arrived.
        A waiter's sink may end this connection or fail its lane (clearing the
        waiters): what is left in the buffer then goes unread."""
        waiters, hsize = self.waiters, self._hsize
        while self.error is None and waiters:
            head = waiters[0]
            start = self._start
            if type(head) is not _Get:  # CLOSE's status: the codec's, with what follows
                if self._end > start:
                    self.codec.receive_data(self._view[start:self._end])
                self._start = self._end = 0
                self._process()
                return
            if self._end - start < hsize:
                break
            _, got, vaddr, pid = self._unpack(self._buffer, start)
            if pid != head.pid or vaddr != head.vaddr or not 0 < got <= head.nr_pages:
                error = get_reply_error(head.pid, head.vaddr, head.nr_pages, pid, vaddr, got)
                assert error is not None
                raise error
            end = start + hsize + got * PAGE_SIZE
            if self._end < end:
                break
            waiters.popleft()
            self.replies += 1
            self._start = end
            self.lane.progress()
            sink = head.sink
            if sink is not None:
                sink.pages_arrived(vaddr, head.nr_pages, got, self._base + start + hsize,
                                   head.urgent)
            else:
                self._resolve(head.future, _chunk(vaddr, got, self._view[start + hsize:end]))
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start:  # the beginning of the next reply (after a short one): to the front
            rest = self._end - self._start
            self._view[:rest] = self._view[self._start:self._end]
            self._start, self._end = 0, rest

    def _process(self) -> None:
        """What the codec has: CLOSE's status, or what breaks the protocol."""
        codec = self.codec
        while self.error is None:
            event = codec.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, CloseReply):
                if not self.waiters:  # its lane failed every request meanwhile
                    return
                request = self.waiters.popleft()
                self.replies += 1
                self.lane.progress()
                self._resolve(request.future, event)
            elif isinstance(event, ConnectionClosed):
                raise BrokenResourceError(
                    f"page server closed the connection ({self.lane.name}) with "
                    f"{len(self.waiters)} requests unanswered" if self.waiters
                    else f"page server closed the connection ({self.lane.name})")
            else:  # the codec expects no other reply: it raised already
                raise AssertionError(f"lazymig bug: {event} on a page-server client")

    @staticmethod
    def _resolve(future: asyncio.Future[Any] | None, result: object) -> None:
        if future is not None and not future.done():
            future.set_result(result)

    # -- requests

    def submit(self, request: _Request) -> None:
        transport = self.transport
        assert transport is not None
        if not self.waiters:
            self.last_progress = time.monotonic()  # the stall clock starts now
        if isinstance(request, _Get):
            transport.write(self._pack(GET_CMD, request.nr_pages, request.vaddr, request.pid))
        else:
            transport.write(self.codec.send(request.event))
        self.waiters.append(request)

    def poll(self, budget: float) -> bool:
        """Spin up to ``budget`` seconds for the replies to every request sent so far,
        reading the socket here (see :meth:`RemotePageSource.poll`). True once they
        all went to their waiters."""
        fd = self._fd
        if fd < 0 or self.transport is None or self.transport.is_closing():
            return False
        goal = self.replies + len(self.waiters)
        deadline = time.perf_counter() + budget
        readv, clock, yield_cpu = os.readv, time.perf_counter, os.sched_yield
        while self.error is None and self.replies < goal:
            try:
                got = readv(fd, [self.get_buffer(-1)])
            except BlockingIOError:
                if clock() > deadline:
                    return False
                yield_cpu()  # the page server may be waiting for this vCPU
                continue
            except OSError:
                return False  # the transport reads it again, and ends the connection
            if not got:
                return False  # EOF: the transport's to see
            self.buffer_updated(got)
        return True

    def stalled(self, stall_timeout: float) -> bool:
        return bool(self.waiters) and time.monotonic() - self.last_progress > stall_timeout


class _Lane:
    """A logical channel to the page server (main or urgent) that outlives connections.

    It holds the requests not answered yet: on the current connection, or queued
    while there is none. When a connection is lost it reconnects (per the
    source's :class:`ReconnectPolicy`) and sends them again, oldest first.
    """

    def __init__(self, source: RemotePageSource, name: str) -> None:
        self.source = source
        self.name = name
        self.channel: _Channel | None = None
        self.queued: deque[_Request] = deque()  # waiting for a connection
        self.failed: BaseException | None = None
        self.closing = False  # CLOSE answered, or aborted: a lost connection is the end
        self._reconnecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._episode_start: float | None = None  # when the connection was lost
        self._episode_attempts = 0  # connections since then that brought no reply

    def send(self, request: _Request) -> None:
        """Send ``request`` now, or once connected again; if the lane failed, it fails."""
        if self.failed is not None:
            self.queued.append(request)
            self._fail_queued()
        elif self.channel is not None and self.channel.usable:
            self.channel.submit(request)
        else:
            self.queued.append(request)  # sent once connected again

    def attach(self, channel: _Channel) -> None:
        """Make ``channel`` the current connection and send it every waiting request."""
        self.channel = channel
        waiting = [r for r in self.queued if r.future is None or not r.future.done()]
        self.queued.clear()
        for request in waiting:
            channel.submit(request)
        if not waiting:
            self.progress()
        self._arm_watchdog()

    def progress(self) -> None:
        """A reply arrived: the connection works, a later loss starts a new episode."""
        self._episode_start = None
        self._episode_attempts = 0

    def connection_ended(self, channel: _Channel) -> None:
        if channel is not self.channel:
            return
        self.channel = None
        # Unanswered requests go first, before those queued since: replies come in order.
        self.queued.extendleft(reversed(channel.waiters))
        channel.waiters.clear()
        assert channel.error is not None
        policy = self.source.reconnect
        if self.closing or channel.fatal or policy.attempts == 0:
            self.fail(channel.error)
            return
        if not self.source.answered and not channel.stalled_out:
            # Reconnection resumes a session that worked: a server that hangs up on
            # the very first connection without sending a byte refused us (a TLS
            # name check, a request it will never serve), and would again.
            self.fail(BrokenResourceError(
                f"the page server at {self.source.address}:{self.source.port} closed the "
                f"connection ({self.name}) before answering anything: it will not serve this "
                f"client (see its log): {channel.error}"))
            return
        loop = asyncio.get_running_loop()
        if self._episode_start is None:
            self._episode_start = loop.time()
        log.warning("page server connection (%s) lost: %s; reconnecting (%d requests "
                    "will be sent again)", self.name, channel.error, len(self.queued))
        self._reconnecting = loop.create_task(self._reconnect(channel.error))

    async def _reconnect(self, error: BaseException) -> None:
        try:
            await self._reconnect_with_backoff(error)
        except Exception as exc:  # a bug here must fail the requests, not strand them
            log.exception("page server connection (%s): reconnecting failed", self.name)
            self._reconnecting = None
            self.fail(exc)

    async def _reconnect_with_backoff(self, error: BaseException) -> None:
        policy = self.source.reconnect
        loop = asyncio.get_running_loop()
        assert self._episode_start is not None
        deadline = self._episode_start + policy.timeout
        delay = 0.0
        while True:
            remaining = deadline - loop.time()
            if self._episode_attempts >= policy.attempts or remaining <= 0:
                self._reconnecting = None
                self.fail(BrokenResourceError(
                    f"page server connection ({self.name}) lost and not recovered after "
                    f"{self._episode_attempts} attempts in {policy.timeout - remaining:.1f} s: "
                    f"{error} (raise --reconnect-attempts/--reconnect-timeout to wait longer)"))
                return
            await asyncio.sleep(min(delay, remaining))
            delay = min(max(delay * 2, policy.first_delay), policy.max_delay)
            self._episode_attempts += 1
            try:
                channel = await self.source._open_connection(
                    self, within=max(0.001, min(self.source.connect_timeout,
                                                 deadline - loop.time())))
            except AuthenticationError as exc:
                if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                    self._reconnecting = None  # not the server we trust: no use trying again
                    self.fail(exc)
                    return
                log.info("page server connection (%s): attempt %d failed: %s", self.name,
                         self._episode_attempts, exc)  # a handshake cut short, maybe
                error = exc
                continue
            except BrokenResourceError as exc:
                log.info("page server connection (%s): attempt %d failed: %s", self.name,
                         self._episode_attempts, exc)
                error = exc
                continue
            self._reconnecting = None
            self.source.reconnects += 1
            log.warning("page server connection (%s) re-established (attempt %d); sending %d "
                        "unanswered requests again", self.name, self._episode_attempts,
                        len(self.queued))
            self.attach(channel)
            return

    def _arm_watchdog(self) -> None:
        stall = self.source.reconnect.stall_timeout
        if stall is None or self.closing or self.failed is not None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(stall / 4, self._check_stall, stall)

    def _check_stall(self, stall: float) -> None:
        self._watchdog = None
        channel = self.channel
        if channel is not None and channel.stalled(stall):
            channel.stalled_out = True
            channel.end(BrokenResourceError(
                f"no reply from the page server for {stall:g} s on the {self.name} connection"))
            return  # connection_ended reconnects; attach() re-arms
        if channel is not None:
            self._arm_watchdog()

    def fail(self, error: BaseException) -> None:
        """No more connections: every waiting request gets ``error``."""
        if self.failed is None:
            self.failed = error if isinstance(error, LazyMigError) else BrokenResourceError(
                f"page server connection ({self.name}) failed: {error}")
            if not self.closing:
                log.error("%s", self.failed)
                if self.source.on_failure is not None:  # even with no request waiting
                    self.source.on_failure(self.failed)
        self._stop_timers()
        if self.channel is not None:
            self.queued.extend(self.channel.waiters)
            self.channel.waiters.clear()
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Every queued request gets the lane's error: a future at once, a sink later
        (from the loop, not in the middle of whatever failed the lane)."""
        error = self.failed
        assert error is not None
        requests = list(self.queued)
        self.queued.clear()
        for request in requests:
            future = request.future
            if future is not None:
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # retrieved: the owner learns it from its own waiter
            elif type(request) is _Get and request.sink is not None:
                asyncio.get_running_loop().call_soon(
                    request.sink.pages_failed, request.vaddr, request.nr_pages,
                    request.urgent, error)

    def _stop_timers(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None

    def abort(self, error: BaseException) -> None:
        self.closing = True
        self.fail(error)
        if self.channel is not None:
            self.channel.end(error)


class RemotePageSource:
    """Pages from a page server over TCP (``lazymig lazy-pages --page-server``).

    Use :meth:`connect`; close with :meth:`aclose` (orderly CLOSE) or
    :meth:`abort`. A lost connection is re-established per ``reconnect``
    (:class:`ReconnectPolicy`); :attr:`reconnects` counts how often it was.
    """

    def __init__(self, address: str, port: int, *, wire: WireVersion, channels: int,
                 max_pages: int, connect_timeout: float, reconnect: ReconnectPolicy,
                 tls_context: ssl.SSLContext | None = None) -> None:
        if channels not in (1, 2):
            raise ConfigurationError("channels must be 1 or 2")
        self.address = address
        self.port = port
        self.wire = wire
        self.max_pages = max_pages
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.tls_context = tls_context
        self.requests = 0
        self.reconnects = 0
        """Connections re-established after a loss."""
        self.answered = False
        """The server ever sent a byte: the session worked once (and may be resumed)."""
        self.on_failure: Callable[[BaseException], None] | None = None
        """Called once a connection is lost for good (reconnection gave up), even when no
        request waits that would tell: a daemon fetching only on faults learns it so."""
        self._lanes = [_Lane(self, "urgent" if i else "main") for i in range(channels)]

    @property
    def failure(self) -> BaseException | None:
        """Why the source failed for good (a connection lost and not recovered, or closed
        by the server before it answered anything), else None."""
        return next((lane.failed for lane in self._lanes if lane.failed is not None), None)

    @classmethod
    async def connect(cls, address: str, port: int, *, wire: WireVersion = WireVersion.V2,
                      channels: int = 1, max_pages: int = DEFAULT_MAX_PAGES,
                      connect_timeout: float = 10.0, tls: TlsOption | None = None,
                      reconnect: ReconnectPolicy = ReconnectPolicy()) -> RemotePageSource:
        """Connect to the page server; ``channels=2`` adds a connection for urgent requests.

        ``tls`` (a :class:`~lazymig.tls.TlsConfig` or a client ``ssl.SSLContext``)
        runs every channel over TLS, as CRIU's ``--tls``: the server's certificate
        must name ``address`` unless the config says ``verify_cn=False``.

        The first connection is tried once (a page server that is not there is a
        mistake to report at once); later losses follow ``reconnect``.
        """
        # Loading the system's CAs reads hundreds of files: not on the loop.
        context = None
        if tls is not None:
            from lazymig.tls import client_context  # noqa: PLC0415 (start-up: only with TLS)
            context = await asyncio.to_thread(client_context, tls)
        source = cls(address, port, wire=wire, channels=channels, max_pages=max_pages,
                     connect_timeout=connect_timeout, reconnect=reconnect, tls_context=context)
        try:
            for lane in source._lanes:
                lane.attach(await source._open_connection(lane, within=connect_timeout))
        except BaseException:
            source.abort()
            raise
        log.info("connected to page server %s:%d (%s, %d channel%s%s)", address, port,
                 wire.value, channels, "s" if channels > 1 else "", ", TLS" if tls else "")
        return source

    async def _open_connection(self, lane: _Lane, *, within: float) -> _Channel:
        """Connection set-up, first or again: TCP connect and, with TLS, its handshake (the
        page-server protocol has none of its own). Raises BrokenResourceError saying
        what to check, or AuthenticationError for TLS."""
        loop = asyncio.get_running_loop()
        address, port, context = self.address, self.port, self.tls_context
        try:
            async with asyncio.timeout(within):
                _, channel = await loop.create_connection(
                    lambda: _Channel(lane, self.wire, self.max_pages), address, port,
                    ssl=context, server_hostname=None if context is None else address)
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
                f"cannot connect to the page server at {self.address}:{self.port}: "
                f"{exc or 'timeout'} (is `lazymig dump --lazy-pages` or "
                "`criu dump --lazy-pages` listening there?)") from exc
        return channel

    def fetch(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink, *,
              urgent: bool = False) -> None:
        check_get(pid, vaddr, nr_pages, self.max_pages)
        self.requests += 1
        (self._lanes[-1] if urgent else self._lanes[0]).send(
            _Get(pid, vaddr, nr_pages, sink, urgent, None))

    def poll(self, budget: float) -> bool:
        """See :meth:`PageSource.poll`: the urgent connection's socket is read here,
        behind the loop's back (its transport finds nothing, or the end, next time).
        Plain TCP only: TLS records are the transport's to decrypt."""
        channel = self._lanes[-1].channel
        if channel is None:
            return False  # reconnecting: nothing comes by spinning
        return channel.poll(budget) if channel.waiters else True

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        check_get(pid, vaddr, nr_pages, self.max_pages)
        self.requests += 1
        future: asyncio.Future[PageChunk] = asyncio.get_running_loop().create_future()
        (self._lanes[-1] if urgent else self._lanes[0]).send(
            _Get(pid, vaddr, nr_pages, None, urgent, future))
        return await future

    async def aclose(self) -> None:
        """Send CLOSE on every channel, wait for the statuses, then close the sockets.

        A connection lost meanwhile is re-established and CLOSE sent again: the
        page server releases its source only after a clean CLOSE.
        """
        try:
            for lane in self._lanes:
                while True:
                    future: asyncio.Future[CloseReply] = \
                        asyncio.get_running_loop().create_future()
                    lane.send(_Close(CloseRequest(), future))
                    reply = await future
                    channel = lane.channel
                    if channel is not None and channel.usable:
                        break
                    # Lost between the reply and our EOF: the server saw no clean end.
                if reply.status != 0:
                    log.warning("page server answered CLOSE with status %d", reply.status)
                lane.closing = True
                lane.fail(ClosedResourceError("page source closed"))
                # CLOSE was answered: now end with the EOF that CRIU waits for.
                assert channel.transport is not None
                sock = channel.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
                if channel.transport.can_write_eof():
                    channel.transport.write_eof()
                # else TLS, which has no half-close: close() below ends with close_notify
        finally:
            for lane in self._lanes:
                lane.closing = True
                lane.fail(ClosedResourceError("page source closed"))
                if lane.channel is not None:
                    assert lane.channel.transport is not None
                    lane.channel.transport.close()
                    await lane.channel.lost

    def abort(self) -> None:
        """Reset every connection (a page server must not take this for a finished transfer)."""
        for lane in self._lanes:
            lane.abort(ClosedResourceError("page source closed"))


class LocalPageSource:
    """Pages read from the images directory (CRIU's local lazy mode).

    Used when the dump wrote lazy pages to disk (PE_LAZY|PE_PRESENT entries);
    a GET is clamped at the end of a lazy range exactly as a page server would.
    Reads run in a worker thread, never on the event loop.
    """

    def __init__(self, images: ImagesDir) -> None:
        from lazymig.dump.store import ImagesPageStore  # noqa: PLC0415 (start-up: local mode only)
        self._store = ImagesPageStore(images)

    def fetch(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink, *,
              urgent: bool = False) -> None:
        def done(future: asyncio.Future[PageChunk]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                sink.pages_failed(vaddr, nr_pages, urgent, error)
                return
            chunk = future.result()
            sink.pages_arrived(vaddr, nr_pages, chunk.nr_pages, chunk.address, urgent)

        asyncio.ensure_future(self.get(pid, vaddr, nr_pages, urgent=urgent)).add_done_callback(
            done)

    def poll(self, budget: float) -> bool:
        """Never: a read in a worker thread completes through the loop."""
        return False

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        segment = self._store.lookup(pid, vaddr, nr_pages)
        if segment is None:
            raise LazyMigError(f"no lazy page of pid {pid} at {vaddr:#x} in the images")
        available = segment.length // PAGE_SIZE
        assert segment.offset is not None
        data = bytearray(segment.length)
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, os.preadv, segment.fd, [data], segment.offset)
        if got != len(data):
            raise LazyMigError(f"pages image ends early (pid {pid}, {vaddr:#x})")
        return _chunk(vaddr, available, data)

    async def aclose(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._store.close()


class FailedPageSource:
    """A source that failed before it served anything (a daemon whose start-up failed:
    the page server unreachable, its certificates refused): every request fails with
    ``error``. A :class:`~lazymig.uffd.daemon.LazyPagesDaemon` given one kills the
    processes handed over to it as soon as it can name them, rather than letting them
    run on pages that will never come, or hang on them."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fetch(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink, *,
              urgent: bool = False) -> None:
        asyncio.get_running_loop().call_soon(sink.pages_failed, vaddr, nr_pages, urgent,
                                             self.error)

    def poll(self, budget: float) -> bool:
        """Never: its failures come through the loop."""
        return False

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        raise BrokenResourceError(f"no page source: {self.error}") from self.error

    async def aclose(self) -> None:
        pass

    def abort(self) -> None:
        pass
