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
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import (
    cli,
    finish,
    free_port,
    layout,
    on_uvloop,
    restore_and_compare,
    run_daemon,
    spawn,
    stop,
    wait_ready,
)
from lazydump import page_pattern, write_lazy_dump
from reliability import Recorder

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.errors import BrokenResourceError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.proxy import Direction, FaultProxy
from lazymig.testing.workload import Workload
from lazymig.uffd.source import ReconnectPolicy, RemotePageSource

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
        cuts = proxy.stats.cuts
        proxy.cut_after(budgets(i), direction)
        await proxy.wait_until(lambda s: s.cuts > cuts)  # noqa: B023 (awaited at once)
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
    _server, proxy, serving = served
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
    _server, proxy, serving = served
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=PATIENT)
        (await source.get(PID, BASE, 1)).release()  # the session works
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
    _server, proxy, serving = served
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
        (await source.get(PID, BASE, 1)).release()  # the session works
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
    server, proxy, _serving = served
    policy = ReconnectPolicy(attempts=4, timeout=30, first_delay=0.01, max_delay=0.05)
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=policy)
        (await source.get(PID, BASE, 1)).release()  # the session works
        with pytest.raises(BrokenResourceError, match="not recovered after 4 attempts"):
            await source.get(PID, 0x1000, 1)  # not a lazy page: the server hangs up
        assert proxy.stats.connections == 5  # the first and four attempts
        source.abort()
    assert not server.complete


@pytest.mark.asyncio
async def test_a_server_hanging_up_on_the_first_connection_is_a_refusal(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    """Reconnection resumes a session that worked: a server that drops the very
    first connection before any reply refused this client (its log says why)."""
    server, proxy, _ = served
    async with asyncio.timeout(30):
        source = await RemotePageSource.connect(*proxy.address, reconnect=PATIENT)
        with pytest.raises(BrokenResourceError, match="before answering anything"):
            await source.get(PID, 0x1000, 1)
        assert proxy.stats.connections == 1
        source.abort()
    assert not server.complete


@pytest.mark.asyncio
async def test_a_stale_connection_does_not_hold_the_completed_server(
        served: tuple[PageServer, FaultProxy, asyncio.Task[bool]]) -> None:
    """A client whose link died leaves a connection the server may never hear from
    again: once another client completed the transfer, serve() returns anyway."""
    server, _proxy, serving = served
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        with socket.socket() as stale:
            stale.setblocking(False)
            await loop.sock_connect(stale, ("127.0.0.1", server.port))
            source = await RemotePageSource.connect("127.0.0.1", server.port)
            await fetch_all(source, pages=64)
            await source.aclose()
            assert await serving is True
            assert await loop.sock_recv(stale, 1) == b""  # and it was closed


# -- the daemon filling attach()ed children, cut again and again -----------------------

@pytest_asyncio.fixture
async def children_dump(tmp_path: Path) -> AsyncIterator[tuple[Path, PageServer, FaultProxy]]:
    """test_daemon's dump of one process, served behind a FaultProxy."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    store = ImagesPageStore(write_lazy_dump(images_dir, layout(1)))
    async with PageServer(store, address="127.0.0.1", port=0) as server, \
            FaultProxy("127.0.0.1", server.port) as proxy:
        yield images_dir, server, proxy
    store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("scenario", "background", "delay"), [
    ("touch", True, 0.0),    # faults and background chunks cut mid-reply
    ("slow", False, 0.0),    # one fault at a time: the faulting thread waits out each cut
    ("fork", False, 0.0),    # the forked child's requests cross the cuts too
    ("remap", False, 0.0),   # replies for pages that moved meanwhile
    # Background chunks over the first half are in flight (0.1 s each way) when the
    # child DONTNEEDs it; their replies, sent again after cuts, must not land there.
    ("remove", True, 0.1),
])
async def test_children_get_every_page_across_repeated_cuts(
        children_dump: tuple[Path, PageServer, FaultProxy], scenario: str, background: bool,
        delay: float, reliability: Recorder) -> None:
    images_dir, server, proxy = children_dump
    proxy.delay(delay)
    async with asyncio.timeout(60):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect(*proxy.address, reconnect=PATIENT)
        daemon, running = await run_daemon(images_dir, source, fault_prefetch=1,
                                           background=background)
        cutter = asyncio.create_task(cut_repeatedly(proxy, lambda i: 20_000 + 9_999 * i))
        try:
            (pid, [(vaddr, nr)]), *_ = layout(1).items()
            child = await spawn(daemon.socket_path, pid, vaddr, nr, scenario)
            code, out = await finish(child)
            report = await running
        finally:
            cutter.cancel()
        if scenario != "remove":  # all served, and the daemon's CLOSE got through
            assert await serving is True
        await stop(serving)
    # The child compared every page it read with the dump's (and DONTNEEDed ones with 0).
    assert code == 0, out
    assert "MISMATCH" not in out
    assert report.ok, report
    assert proxy.stats.cuts >= 2
    assert source.reconnects >= 2
    reliability.record(
        "Faults injected", f"TCP connection cut again and again during a migration ({scenario})",
        tried=f"{proxy.stats.cuts} cuts mid-message by a proxy (FaultProxy), "
              f"{'with' if background else 'without'} background fetch, {delay} s delay",
        held=f"{source.reconnects} reconnections; every page the child read matched the "
             "dump, no stale reply landed, the daemon ended complete")


# -- lazymig dump -> lazymig lazy-pages -> restore, cut again and again ------------------


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root")
@pytest.mark.asyncio
async def test_a_restored_process_gets_every_page_across_repeated_cuts(
        tmp_path: Path, c_workload: Path, reliability: Recorder) -> None:
    port = free_port()
    loop = on_uvloop()
    with Workload([str(c_workload), "--mib", "16", "--interval-ms", "50"]) as w:
        before = w.next_check()
        with cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", str(port), "-D", str(tmp_path), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
            async with FaultProxy("127.0.0.1", port) as proxy:
                with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                         str(proxy.port), "--reconnect-attempts", "50", "--reconnect-timeout",
                         "60", "-D", str(tmp_path), uvloop=loop) as (daemon, lr):
                    assert lr is not None
                    await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
                    cutter = asyncio.create_task(
                        cut_repeatedly(proxy, lambda i: 150_000 + 77_777 * i))
                    try:
                        await restore_and_compare(tmp_path, w.ready, before, daemon, dumper)
                    finally:
                        cutter.cancel()
                assert proxy.stats.cuts >= 3
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone only now
    reliability.record(
        "Faults injected", "TCP connection cut again and again: lazymig dump, daemon, restore",
        tried=f"{proxy.stats.cuts} cuts of the page-server connection of a restored 16 MiB "
              "C process",
        held="the restored memory equals the source's page by page; the source was "
             "killed only after the transfer completed")
