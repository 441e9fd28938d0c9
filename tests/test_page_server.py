"""The asyncio page server over real TCP, checked by a minimal independent client.

The client below is written from the protocol description (criu-lazy-pages-facts
section 1), not with lazymig's codec, so that both cannot share a mistake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import ADD_F, DUMP, GET, OTHER, PID, MiniClient, expected, raw
from lazydump import write_lazy_dump

from lazymig.dump.server import PageServer, _on_this_host, _Unserved
from lazymig.dump.store import ImagesPageStore
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.wire import WireVersion


@pytest.fixture(params=list(WireVersion))
def wire(request: pytest.FixtureRequest) -> WireVersion:
    return request.param  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def server(tmp_path: Path, wire: WireVersion) -> AsyncIterator[PageServer]:
    store = ImagesPageStore(write_lazy_dump(tmp_path, DUMP))
    async with PageServer(store, address="127.0.0.1", port=0, wire=wire) as srv:
        yield srv
    store.close()


async def all_pages(client: MiniClient) -> None:
    for pid, ranges in DUMP.items():
        for vaddr, nr in ranges:
            assert await client.get(pid, vaddr, nr) == (nr, expected(pid, vaddr, nr))


@pytest.mark.asyncio
async def test_serves_every_lazy_page_then_completes(server: PageServer,
                                                     wire: WireVersion) -> None:
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        client = await MiniClient.connect(server.port, wire)
        # A page asked twice is served twice (a forked child, a retry).
        vaddr = DUMP[PID][0][0] + PAGE_SIZE
        assert await client.get(PID, vaddr, 1) == (1, expected(PID, vaddr, 1))
        assert await client.get(PID, vaddr, 1) == (1, expected(PID, vaddr, 1))
        # A reply is clamped at the end of the segment holding vaddr.
        assert await client.get(PID, vaddr, 100) == (7, expected(PID, vaddr, 7))
        await all_pages(client)
        assert not server.complete
        assert await client.close() == 0
    assert serving.result() is True
    assert server.complete
    assert server.stats.pages_unserved == 0
    assert server.stats.pages_sent == 1 + 1 + 7 + 13


@pytest.mark.asyncio
async def test_a_dump_on_disk_sends_its_pages_from_the_file_even_on_this_host(
        server: PageServer, wire: WireVersion, caplog: pytest.LogCaptureFixture) -> None:
    """sendfile, not a copy through a buffer, for a reader on loopback too: the copy
    costs the server more than the page-sized fragments cost the reader
    (docs/benchmarks.md, "page server for a dump on disk")."""
    caplog.set_level(logging.INFO, logger="lazymig.dump.server")
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        client = await MiniClient.connect(server.port, wire)
        await all_pages(client)
        assert await client.close() == 0
    assert serving.result() is True
    assert "(pages sent from their file)" in caplog.text, caplog.text


@pytest.mark.asyncio
async def test_close_before_everything_was_served_keeps_serving(
        server: PageServer, wire: WireVersion, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        first = await MiniClient.connect(server.port, wire)
        await first.get(PID, DUMP[PID][0][0], 1)
        assert await first.close() == 0
        await asyncio.sleep(0.05)
        assert not serving.done()  # the source must not be released yet
        second = await MiniClient.connect(server.port, wire)
        await all_pages(second)
        assert await second.close() == 0
    assert server.complete
    assert "never served" in caplog.text


@pytest.mark.asyncio
async def test_close_once_one_process_got_every_page_ends_the_transfer(
        server: PageServer, wire: WireVersion, caplog: pytest.LogCaptureFixture) -> None:
    """A tree's restore whose root got every page while a short-lived child exited
    before it asked for its own: a clean CLOSE ends the transfer (the source can go)."""
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        client = await MiniClient.connect(server.port, wire)
        for vaddr, nr in DUMP[PID]:
            assert await client.get(PID, vaddr, nr) == (nr, expected(PID, vaddr, nr))
        assert await client.close() == 0
    assert serving.result() is True and server.complete
    left = sum(nr for _, nr in DUMP[OTHER])
    assert f"closed the session with {left} lazy pages never served, of processes that " \
        "exited" in caplog.text


HOSTILE = {
    "garbage": lambda w: b"\xff" * 64,
    "huge nr_pages": lambda w: raw(w, GET, 2**20, DUMP[PID][0][0], PID),
    "unaligned": lambda w: raw(w, GET, 1, DUMP[PID][0][0] + 5, PID),
    "unmapped": lambda w: raw(w, GET, 1, 0x1000, PID),
    "unknown pid": lambda w: raw(w, GET, 1, DUMP[PID][0][0], 999),
    "other pid's page": lambda w: raw(w, GET, 1, DUMP[OTHER][0][0], PID),
    "half a header": lambda w: raw(w, GET, 1, DUMP[PID][0][0], PID)[:10],
    "image command": lambda w: raw(w, ADD_F, 1, 0x1000, (PID << 8) | 1),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("attack", list(HOSTILE))
async def test_hostile_requests_end_only_their_connection(
        server: PageServer, wire: WireVersion, attack: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        bystander = await MiniClient.connect(server.port, wire)
        await bystander.get(PID, DUMP[PID][0][0], 1)
        hostile = await MiniClient.connect(server.port, wire)
        hostile.writer.write(HOSTILE[attack](wire))
        if attack == "half a header":
            hostile.writer.write_eof()
        assert await hostile.closed_by_server()
        hostile.writer.close()
        # The server and the other client are unaffected.
        await all_pages(bystander)
        assert await bystander.close() == 0
    assert serving.result() is True
    assert "connection closed" in caplog.text
    assert server.stats.refused_connections == 1


def test_unserved_bookkeeping_marks_only_the_ranges_a_get_touches() -> None:
    """The never-served count, over many ranges (found by bisection), gaps and repeats."""
    class Store:
        def pids(self) -> list[int]:
            return [7]

        def lazy_ranges(self, pid: int) -> list[tuple[int, int]]:
            return [(0x10000 + i * 0x10000, 4) for i in range(100)]  # 4 pages, 12 of gap

    unserved = _Unserved(Store())  # type: ignore[arg-type]
    assert unserved.remaining == 400
    unserved.mark(7, 0x10000 + 50 * 0x10000 + PAGE_SIZE, 2)
    assert unserved.remaining == 398
    unserved.mark(7, 0x10000 + 50 * 0x10000, 4)  # two pages again, two new
    assert unserved.remaining == 396
    unserved.mark(7, 0x10000 + 98 * 0x10000, 0x20000 // PAGE_SIZE)  # across the gap: 8
    assert unserved.remaining == 388
    unserved.mark(8, 0x10000, 4)  # an unknown pid changes nothing
    unserved.mark(7, 0x8000, 2)  # before the first range: nothing
    assert unserved.remaining == 388
    for i in range(100):
        unserved.mark(7, 0x10000 + i * 0x10000, 4)
    assert unserved.remaining == 0


@pytest.mark.parametrize(("peer", "here"), [
    (("127.0.0.1", 4000), True),
    (("127.10.0.3", 4000), True),
    (("::1", 4000, 0, 0), True),
    (("::ffff:127.0.0.1", 4000, 0, 0), True),
    (("10.231.0.2", 4000), False),
    (("fe80::1", 4000, 0, 2), False),
    (("::ffff:10.0.0.1", 4000, 0, 0), False),
    ("/run/some.sock", False),
])
def test_only_a_loopback_client_gets_its_pages_from_a_buffer(peer: object, here: bool) -> None:
    """Spliced pages reach a reader on this host as a fragment per page (twice its
    receive cost); a reader across a network gets its NIC's packets either way."""
    assert _on_this_host(peer) is here
