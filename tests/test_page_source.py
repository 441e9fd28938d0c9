"""Page sources: the daemon's page-server client against lazymig's server, and local images."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import threading
from pathlib import Path

import pytest
from lazydump import page_pattern, write_lazy_dump

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.errors import BrokenResourceError, ClosedResourceError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.pageserver import GetReply, GetRequest, PageData, PageServerConnection, Role
from lazymig.proto.wire import WireVersion
from lazymig.uffd.source import NO_RECONNECT, LocalPageSource, RemotePageSource

PID = 321
DUMP = {PID: [(0x10000000, 64), (0x20000000, 5)]}


def expected(vaddr: int, nr_pages: int) -> bytes:
    return b"".join(page_pattern(PID, vaddr + i * PAGE_SIZE) for i in range(nr_pages))


@pytest.mark.asyncio
@pytest.mark.parametrize("wire", list(WireVersion))
@pytest.mark.parametrize("channels", [1, 2])
async def test_pipelined_gets_against_the_page_server(tmp_path: Path, wire: WireVersion,
                                                      channels: int) -> None:
    store = ImagesPageStore(write_lazy_dump(tmp_path, DUMP))
    async with asyncio.timeout(10), PageServer(store, address="127.0.0.1", port=0,
                                               wire=wire) as server:
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port, wire=wire,
                                                channels=channels)
        base = DUMP[PID][0][0]
        # Many requests in flight at once; replies come back in order, clamped.
        requests = [(base + i * 4 * PAGE_SIZE, 4) for i in range(16)]
        chunks = await asyncio.gather(
            *(source.get(PID, vaddr, n, urgent=i % 3 == 0)
              for i, (vaddr, n) in enumerate(requests)),
            source.get(PID, DUMP[PID][1][0], 100))
        for (vaddr, n), chunk in zip(requests, chunks, strict=False):
            assert (chunk.vaddr, chunk.nr_pages, bytes(chunk.data)) == (vaddr, n,
                                                                        expected(vaddr, n))
        assert chunks[-1].nr_pages == 5
        assert bytes(chunks[-1].data) == expected(DUMP[PID][1][0], 5)
        await source.aclose()
        assert await serving is True
    store.close()


@pytest.mark.asyncio
async def test_server_going_away_fails_every_waiting_request() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        # Reconnection (tests/test_reconnect.py) is off: the loss itself is checked here.
        connecting = asyncio.create_task(RemotePageSource.connect("127.0.0.1", port,
                                                                  reconnect=NO_RECONNECT))
        conn, _ = await loop.sock_accept(listener)
        source = await connecting
        pending = [asyncio.create_task(source.get(PID, 0x1000 * (i + 1), 1)) for i in range(3)]
        await asyncio.sleep(0.05)
        conn.close()  # the page server dies with three requests unanswered (RST)
        for task in pending:
            with pytest.raises(BrokenResourceError, match="page server"):
                await task
        with pytest.raises(BrokenResourceError):
            await source.get(PID, 0x1000, 1)
        source.abort()
    listener.close()


@pytest.mark.asyncio
async def test_connect_refused_says_what_to_do() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BrokenResourceError, match="is `lazymig dump --lazy-pages`"):
        await RemotePageSource.connect("127.0.0.1", port, connect_timeout=5)


@pytest.mark.asyncio
async def test_local_source_reads_the_images(tmp_path: Path) -> None:
    source = LocalPageSource(write_lazy_dump(tmp_path, DUMP))
    chunk = await source.get(PID, DUMP[PID][0][0] + 60 * PAGE_SIZE, 10)
    assert chunk.nr_pages == 4
    assert bytes(chunk.data) == expected(DUMP[PID][0][0] + 60 * PAGE_SIZE, 4)
    await source.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["abort", "fail"])
async def test_a_reply_callback_that_ends_the_source_mid_batch(ending: str) -> None:
    """Three replies arrive in one segment; the first one's sink ends the session
    (the daemon's may: a failed process, a cancelled daemon). The replies behind it
    in the same receive find no waiter: they are dropped, not an error; their sinks
    hear of the failure later, from the loop."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        connecting = asyncio.create_task(RemotePageSource.connect(
            "127.0.0.1", listener.getsockname()[1], reconnect=NO_RECONNECT))
        conn, _ = await loop.sock_accept(listener)
        source = await connecting
        arrived: list[tuple[int, bytes]] = []
        failed: list[int] = []
        both_failed = asyncio.Event()

        class Sink:
            def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                              urgent: bool) -> None:
                arrived.append((vaddr, ctypes.string_at(address, got * PAGE_SIZE)))
                if ending == "abort":
                    source.abort()
                else:  # the lane gives up on every waiting request, the connection stays
                    source._lanes[0].fail(BrokenResourceError("given up"))

            def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                             error: BaseException) -> None:
                assert isinstance(error, ClosedResourceError | BrokenResourceError)
                failed.append(vaddr)
                if len(failed) == 2:
                    both_failed.set()

        vaddrs = [0x1000 * (i + 1) for i in range(3)]
        for vaddr in vaddrs:
            source.fetch(PID, vaddr, 1, Sink())
        server = PageServerConnection(Role.SERVER, WireVersion.V2)
        received = b""
        while len(received) < 3 * 32:
            received += await loop.sock_recv(conn, 4096)
        server.receive_data(received)
        replies = b""
        for vaddr in vaddrs:
            assert server.next_event() == GetRequest(PID, vaddr, 1)
            replies += server.send(GetReply(PID, vaddr, 1)) + server.send(
                PageData(bytes([vaddr >> 12]) * PAGE_SIZE, last=True))
        await loop.sock_sendall(conn, replies)  # one segment: the client reads them at once
        await both_failed.wait()
        assert arrived == [(vaddrs[0], b"\x01" * PAGE_SIZE)]
        assert failed == vaddrs[1:]
        source.abort()
        conn.close()
    listener.close()


def _answer_in_a_thread(listener: socket.socket, requests: int) -> threading.Thread:
    """A page server in a thread of its own (blocking sockets, the codec): it must answer
    while the test's loop is held by ``poll``. Pages are filled with their page number."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            server = PageServerConnection(Role.SERVER, WireVersion.V2)
            answered = 0
            while answered < requests:
                data = conn.recv(4096)
                if not data:
                    return
                server.receive_data(data)
                while isinstance(event := server.next_event(), GetRequest):
                    conn.sendall(server.send(GetReply(event.pid, event.vaddr, event.nr_pages))
                                 + server.send(PageData(b"".join(
                                     bytes([(event.vaddr >> 12) + i]) * PAGE_SIZE
                                     for i in range(event.nr_pages)), last=True)))
                    answered += 1
            with contextlib.suppress(ConnectionResetError):  # the client's abort
                conn.recv(1)  # until the client goes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.asyncio
async def test_poll_hands_the_replies_over_without_the_loop() -> None:
    """The daemon's fault path: ``poll`` reads the socket itself, so every reply sent for
    is with its sink when it returns, with no await (no sleep in epoll_wait) in between,
    in order: the background request ahead of the urgent one first."""
    listener = socket.create_server(("127.0.0.1", 0))
    async with asyncio.timeout(10):
        server = _answer_in_a_thread(listener, 2)
        source = await RemotePageSource.connect("127.0.0.1", listener.getsockname()[1],
                                                reconnect=NO_RECONNECT)
        arrived: list[tuple[int, int, bool, bytes]] = []

        class Sink:
            def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                              urgent: bool) -> None:
                arrived.append((vaddr, got, urgent, ctypes.string_at(address, got * PAGE_SIZE)))

            def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                             error: BaseException) -> None:
                raise AssertionError(f"{vaddr:#x}: {error}")

        assert source.poll(1.0) is True  # nothing asked: nothing to wait for
        source.fetch(PID, 0x10000, 4, Sink())
        source.fetch(PID, 0x20000, 1, Sink(), urgent=True)
        assert arrived == []
        assert source.poll(5.0) is True
        assert arrived == [
            (0x10000, 4, False, b"".join(bytes([0x10 + i]) * PAGE_SIZE for i in range(4))),
            (0x20000, 1, True, b"\x20" * PAGE_SIZE)]
        source.abort()
        await asyncio.to_thread(server.join, 5)
        assert not server.is_alive()
    listener.close()


@pytest.mark.asyncio
async def test_a_local_source_never_polls(tmp_path: Path) -> None:
    """Its reads complete in a worker thread, through the loop: ``poll`` says so at once."""
    source = LocalPageSource(write_lazy_dump(tmp_path, DUMP))
    assert source.poll(10.0) is False
    await source.aclose()
