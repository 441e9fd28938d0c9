"""Connection loss mid-transfer: the daemon's page-server client reconnects and loses nothing.

A FaultProxy (real loopback sockets) sits between the page-server client and
lazymig's page server and cuts the connection, cuts it in the middle of
replies, refuses new connections or stops forwarding; the processes stay
alive. Checked at three levels:

* the client alone: every reply still arrives, byte for byte, in order;
  a source that cannot get back gives up within its bounds; CLOSE is sent
  again when its connection is cut, and the page server completes only then;
* the daemon filling children that attach() their memory, with the
  connection cut again and again while they fault, fork, DONTNEED and
  mremap: each child compares every page it reads with the dump's;
* ``lazymig dump`` → ``lazymig lazy-pages`` → restore, cut again and again:
  the restored process's region compared page by page once the daemon is done.

tests/test_reconnect_netns.py takes a veth link down and up instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from lazydump import page_pattern, write_lazy_dump
from test_daemon import finish, layout, run_daemon, spawn
from test_restore import _wait_ready, c_workload, cli, on_uvloop, restore_with_output
from workloads import Check, Workload, expected_page

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.errors import BrokenResourceError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.proxy import Direction, FaultProxy
from lazymig.uffd.source import ReconnectPolicy, RemotePageSource

__all__ = ["c_workload"]  # the fixture, shared with test_restore

PID = 777
BASE = 0x10000000
NR = 512
DUMP = {PID: [(BASE, NR // 2), (BASE + 2**30, NR // 2)]}
PATIENT = ReconnectPolicy(attempts=50, timeout=60, first_delay=0.01, max_delay=0.2,
                          stall_timeout=5)


def expected(pid: int, vaddr: int, nr_pages: int) -> bytes:
    return b"".join(page_pattern(pid, vaddr + i * PAGE_SIZE) for i in range(nr_pages))


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[PageServer, FaultProxy,
                                                        asyncio.Task[bool]]]:
    """A dump on disk served by lazymig's page server, behind a FaultProxy."""
    store = ImagesPageStore(write_lazy_dump(tmp_path, DUMP))
    async with PageServer(store, address="127.0.0.1", port=0) as server, \
            FaultProxy("127.0.0.1", server.port) as proxy:
        serving = asyncio.create_task(server.serve())
        try:
            yield server, proxy, serving
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    store.close()


async def cut_repeatedly(proxy: FaultProxy, budgets: Callable[[int], int],
                         direction: Direction = Direction.DOWNSTREAM) -> None:
    """Cut every connection after ``budgets(i)`` more bytes, again and again (until
    cancelled): each cut lands in the middle of whatever was travelling."""
    i = 0
    while True:
        proxy.cut_after(budgets(i), direction)
        await proxy.wait_until(lambda s, cuts=proxy.stats.cuts: s.cuts > cuts)
        i += 1


async def fetch_all(source: RemotePageSource, pages: int = 4) -> None:
    """Every page of DUMP, ``pages`` per GET, all pipelined; checked byte for byte."""
    requests = [(vaddr + off * PAGE_SIZE, min(pages, nr - off), i % 3 == 0)
                for i, (vaddr, nr) in enumerate(DUMP[PID]) for off in range(0, nr, pages)]
    chunks = await asyncio.gather(*(source.get(PID, vaddr, n, urgent=urgent)
                                    for vaddr, n, urgent in requests))
    for (vaddr, n, _), chunk in zip(requests, chunks, strict=True):
        assert (chunk.vaddr, chunk.nr_pages) == (vaddr, n)
        assert bytes(chunk.data) == expected(PID, vaddr, n)


@pytest.mark.asyncio
@pytest.mark.parametrize("channels", [1, 2])
async def test_every_reply_arrives_across_cuts_mid_reply(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]], channels: int) -> None:
    server, proxy, serving = served
    async with asyncio.timeout(60):
        source = await RemotePageSource.connect(*proxy.address, channels=channels,
                                                reconnect=PATIENT)
        # Five cuts, each after an odd number of bytes: inside a header or inside pages.
        cutter = asyncio.create_task(cut_repeatedly(proxy, lambda i: 40_000 + 12_345 * i))
        try:
            await fetch_all(source)
        finally:
            cutter.cancel()
        cuts = proxy.stats.cuts
        assert cuts >= 5
        assert source.reconnects >= cuts
        await source.aclose()
        # Every page was served at least once and the last connection closed cleanly.
        assert await serving is True


@pytest.mark.asyncio
async def test_close_is_sent_again_when_its_connection_is_cut(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    server, proxy, serving = served
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=PATIENT)
        await fetch_all(source, pages=64)
        proxy.cut_after(0, Direction.UPSTREAM)  # CLOSE never reaches the server
        await source.aclose()
        assert proxy.stats.cuts == 1 and source.reconnects == 1
        assert await serving is True
        # The aborted connection did not release the source: the clean one did.
        assert server.stats.refused_connections >= 1


@pytest.mark.asyncio
async def test_refused_for_a_while_then_back(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    server, proxy, serving = served
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=PATIENT)
        await proxy.refuse(True)
        proxy.cut()
        fetching = asyncio.create_task(fetch_all(source))  # requests wait meanwhile
        await asyncio.sleep(0.3)  # several attempts are refused
        assert not fetching.done()
        await proxy.refuse(False)
        await fetching
        assert source.reconnects == 1
        await source.aclose()
        assert await serving is True


@pytest.mark.asyncio
async def test_a_stalled_connection_is_replaced(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    """No reset comes from a dead link: requests that get no byte back for
    stall_timeout seconds mark the connection lost."""
    server, proxy, serving = served
    policy = ReconnectPolicy(attempts=50, timeout=60, first_delay=0.01, stall_timeout=0.3)
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=policy)
        proxy.delay(3600)  # a black hole: nothing is forwarded any more
        fetching = asyncio.create_task(fetch_all(source))
        await proxy.wait_until(lambda s: s.connections >= 3)  # replaced, and again
        proxy.delay(0)
        await fetching
        assert source.reconnects >= 2
        await source.aclose()
        assert await serving is True


@pytest.mark.asyncio
async def test_reconnection_gives_up_within_its_bounds(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    server, proxy, serving = served
    policy = ReconnectPolicy(attempts=3, timeout=30, first_delay=0.01, max_delay=0.05)
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=policy)
        await proxy.refuse(True)
        proxy.cut()
        with pytest.raises(BrokenResourceError, match="not recovered after 3 attempts"):
            await source.get(PID, BASE, 1)
        with pytest.raises(BrokenResourceError, match="not recovered"):
            await source.get(PID, BASE, 1)  # failed for good
        source.abort()
        await asyncio.sleep(0.05)
        assert not serving.done() and not server.complete  # the source is kept


@pytest.mark.asyncio
async def test_a_refusing_server_is_not_retried_forever(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    """A server that accepts and then drops every connection (here: a GET it will
    never serve) counts as attempts without a reply: the source gives up."""
    server, proxy, serving = served
    policy = ReconnectPolicy(attempts=4, timeout=30, first_delay=0.01, max_delay=0.05)
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=policy)
        with pytest.raises(BrokenResourceError, match="not recovered after 4 attempts"):
            await source.get(PID, 0x1000, 1)  # not a lazy page: the server hangs up
        assert proxy.stats.connections == 5  # the first and four attempts
        source.abort()
    assert not server.complete
