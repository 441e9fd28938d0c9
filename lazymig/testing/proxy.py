"""A fault-injecting TCP proxy for asyncio tests: cut, delay and refuse connections on demand.

:class:`FaultProxy` sits between a client and a real TCP server and forwards
bytes both ways over real sockets, so that a test can break the network under
code that must survive it (the lazy-pages daemon reconnecting to its page
server) without touching either end. In the spirit of asyncpg's
``TCPFuzzingProxy``::

    async with FaultProxy("127.0.0.1", server_port) as proxy:
        client = await connect(*proxy.address)
        ...
        proxy.cut()                       # every connection reset at once
        await proxy.wait_until(lambda s: s.connections >= 2)   # the client came back

A cut resets both halves of every current connection (``SO_LINGER`` 0, then
close: the kernel sends RST), so each end sees ``ECONNRESET`` or EOF exactly as
when a link or a middlebox drops the flow. It works under asyncio's loop and
under uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import socket
from collections.abc import Callable
from types import TracebackType

from lazymig.proto.constants import LINGER_RESET

__all__ = ["Direction", "FaultProxy", "ProxyStats"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
# Chunks held per direction before the proxy stops reading: back-pressure, and
# the bound on what a delay keeps in memory.
_QUEUED_CHUNKS = 64


class Direction(enum.StrEnum):
    """Which way bytes travel through the proxy."""

    UPSTREAM = "upstream"
    """From the client that connected to the proxy towards the upstream server."""
    DOWNSTREAM = "downstream"
    """From the upstream server back to the client."""


@dataclasses.dataclass
class ProxyStats:
    """Counters of a :class:`FaultProxy`, updated as it works."""

    connections: int = 0
    """Client connections accepted and connected upstream, in total."""
    active: int = 0
    """Connections open right now."""
    upstream_failures: int = 0
    """Client connections reset because the upstream server could not be reached."""
    cuts: int = 0
    """Times :meth:`FaultProxy.cut` ran (directly or from :meth:`FaultProxy.cut_after`)."""
    bytes_upstream: int = 0
    """Bytes forwarded from clients to the upstream server."""
    bytes_downstream: int = 0
    """Bytes forwarded from the upstream server to clients."""

    def bytes(self, direction: Direction) -> int:
        """Bytes forwarded so far in ``direction``."""
        return self.bytes_upstream if direction is Direction.UPSTREAM else self.bytes_downstream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with RST rather than FIN, dropping what it still holds."""
    if writer.transport.is_closing():
        writer.transport.abort()  # already closing (the peer reset it, or a FIN went out)
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    writer.transport.abort()


@dataclasses.dataclass(eq=False)
class _Link:
    """One proxied connection: the client's stream, the upstream stream (once connected),
    and the task pumping them."""

    task: asyncio.Task[None]
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)
        self.task.cancel()


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` that injects network faults.

    Use it as an async context manager: on entry it listens on an ephemeral
    port of ``listen_host`` (:attr:`port`, :attr:`address`); on exit it stops
    listening and resets every connection still open. Faults:

    * :meth:`cut` resets every current connection at once;
    * :meth:`cut_after` resets them once a given number of further bytes went
      one way (a cut in the middle of a message);
    * :meth:`delay` holds every chunk for a while before forwarding it;
    * :meth:`refuse` stops listening, so that new connections are refused
      (``ECONNREFUSED``), and starts again on the same port.

    :attr:`stats` counts connections, cuts and bytes each way, and
    :meth:`wait_until` waits for a condition on them.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 listen_host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.stats = ProxyStats()
        self._port = 0
        self._server: asyncio.Server | None = None
        self._closed = False
        self._delay = 0.0
        self._cut_budget: dict[Direction, int] = {}
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        """The port the proxy listens on (valid once entered)."""
        if not self._port:
            raise RuntimeError("FaultProxy.port is known only inside 'async with FaultProxy(...)'")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` for clients to connect to."""
        return self.listen_host, self.port

    async def __aenter__(self) -> FaultProxy:
        await self._listen()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._closed = True
        await self._stop_listening()
        for link in list(self._links):
            link.reset()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)

    # -- faults ---------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every current connection, both halves, at once.

        Data still queued in the proxy is dropped; each end then reads
        ``ECONNRESET`` (or EOF) and writes fail. New connections are accepted
        as before (see :meth:`refuse`).
        """
        log.info("cutting %d connection(s)", len(self._links))
        for link in list(self._links):
            link.reset()
        self.stats.cuts += 1
        self._notify()

    def cut_after(self, nbytes: int, direction: Direction | str = Direction.DOWNSTREAM) -> None:
        """Cut every connection once ``nbytes`` more bytes were forwarded in ``direction``.

        The count runs over all connections from now on; at most ``nbytes``
        pass, and the chunk that crosses the limit is truncated there, so the
        cut lands in the middle of whatever message was travelling. One-shot:
        call it again to arm another cut. ``nbytes=0`` cuts on the next chunk.
        """
        if nbytes < 0:
            raise ValueError(f"cut_after needs nbytes >= 0, got {nbytes}")
        self._cut_budget[Direction(direction)] = nbytes

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before forwarding it (0 turns the latency off).

        Order is kept and throughput is not limited beyond the queue bound: this
        is latency, as on a long link, not a slow link.
        """
        if seconds < 0:
            raise ValueError(f"delay needs seconds >= 0, got {seconds}")
        self._delay = seconds

    async def refuse(self, refusing: bool = True) -> None:
        """Refuse new connections (stop listening) or accept them again on the same port.

        Established connections are not touched; combine with :meth:`cut` for
        an outage. While refusing, a client's ``connect()`` fails with
        ``ECONNREFUSED``.
        """
        if refusing:
            await self._stop_listening()
        elif self._server is None and not self._closed:
            await self._listen()

    async def wait_until(self, predicate: Callable[[ProxyStats], bool]) -> None:
        """Wait until ``predicate(stats)`` is true (checked after each change of the counters).

        Bound the wait with ``asyncio.timeout`` at the call site.
        """
        while not predicate(self.stats):
            await self._changed.wait()

    # -- machinery ------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accepted, self.listen_host, self._port, reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]
        log.debug("proxy %s:%d -> %s:%d listening", self.listen_host, self._port,
                  self.upstream_host, self.upstream_port)

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than the streams callback's: a link is ended by
        # cancelling its task, and asyncio reports a cancelled callback task as
        # an unhandled error.
        task = asyncio.get_running_loop().create_task(self._run_link(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_link(self, client_reader: asyncio.StreamReader,
                        client: asyncio.StreamWriter) -> None:
        if self._closed or self._server is None:  # accepted just before refuse() or exit
            _reset(client)
            return
        task = asyncio.current_task()
        assert task is not None
        link = _Link(task, client)
        self._links.add(link)  # a cut() from now on resets it, even while it connects
        try:
            try:
                upstream_reader, link.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port)
            except OSError as exc:
                log.info("upstream %s:%d unreachable (%s): resetting the client",
                         self.upstream_host, self.upstream_port, exc)
                _reset(client)
                self.stats.upstream_failures += 1
                self._notify()
                return
            upstream = link.upstream
            self.stats.connections += 1
            self.stats.active += 1
            self._notify()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pump(link, Direction.UPSTREAM, client_reader,
                                                 upstream))
                    group.create_task(self._pump(link, Direction.DOWNSTREAM, upstream_reader,
                                                 client))
                client.close()
                upstream.close()
            finally:
                self.stats.active -= 1
                self._notify()
        finally:
            self._links.discard(link)

    async def _pump(self, link: _Link, direction: Direction, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Forward one direction: a receiver queues timestamped chunks, a forwarder sends them."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUED_CHUNKS)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._receive(link, reader, queue))
            await self._forward(link, direction, queue, writer)

    async def _receive(self, link: _Link, reader: asyncio.StreamReader,
                       queue: asyncio.Queue[tuple[float, bytes] | None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                link.reset()  # a reset on one side is passed on to the other
                return
            if not data:
                await queue.put(None)
                return
            await queue.put((loop.time() + self._delay, data))

    async def _forward(self, link: _Link, direction: Direction,
                       queue: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (item := await queue.get()) is not None:
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            data, cut_now = self._spend(direction, data)
            try:
                if data:
                    writer.write(data)
                    self._count(direction, len(data))
                    await writer.drain()
            except OSError:
                link.reset()
                return
            if cut_now:
                self.cut()
                return
        if writer.can_write_eof():
            try:
                writer.write_eof()  # half-close passed on: the other direction goes on
            except OSError:
                link.reset()

    def _spend(self, direction: Direction, data: bytes) -> tuple[bytes, bool]:
        """Take ``data`` from the armed cut budget: what may still pass, and whether to cut."""
        budget = self._cut_budget.get(direction)
        if budget is None:
            return data, False
        if len(data) < budget:
            self._cut_budget[direction] = budget - len(data)
            return data, False
        del self._cut_budget[direction]
        return data[:budget], True

    def _count(self, direction: Direction, nbytes: int) -> None:
        if direction is Direction.UPSTREAM:
            self.stats.bytes_upstream += nbytes
        else:
            self.stats.bytes_downstream += nbytes
        self._notify()
