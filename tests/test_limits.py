"""Limits and hostile peers, over real TCP and real UNIX sockets: while one client asks
for things it must not get, another (lazymig's own RemotePageSource, or an attach()
child through the daemon) is served, and gets every page intact.

Each test records what it tried in the reliability table (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import (
    DUMP,
    GET,
    OTHER,
    PID,
    SEED,
    MiniClient,
    expected,
    finish,
    layout,
    pipe_layout,
    raw,
    run_daemon,
    spawn,
    stop,
    until,
)
from lazydump import write_lazy_dump
from reliability import Recorder
from tls_pki import Pki
from workloads import expected_page

from lazymig.dump.pagepipe import PagePipes
from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore, PipePageStore
from lazymig.errors import ImageError, LocalProtocolError, RemoteProtocolError
from lazymig.linux.vm import AnonMapping
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.handover import Role as HandoverRole
from lazymig.proto.handover import TaskHandover
from lazymig.proto.images import ImagesDir, PagemapEntry
from lazymig.proto.pageserver import GetRequest, PageServerConnection, Role, State
from lazymig.proto.wire import WireVersion
from lazymig.tls import TlsConfig
from lazymig.uffd.handover import HandoverSession
from lazymig.uffd.source import RemotePageSource

WIRE = WireVersion.V2
TOP = (1 << 64) - PAGE_SIZE
FIRST, SECOND = DUMP[PID]


@contextlib.asynccontextmanager
async def small_server(directory: Path, tls: TlsConfig | None = None
                       ) -> AsyncIterator[PageServer]:
    """The dump of test_page_server (two pids, three lazy ranges) on a server with small
    limits: 4 connections, 0.5 s to read a reply."""
    store = ImagesPageStore(write_lazy_dump(directory, DUMP))
    try:
        async with PageServer(store, address="127.0.0.1", port=0, max_connections=4,
                              stall_timeout=0.5, tls=tls) as server:
            yield server
    finally:
        store.close()


@pytest_asyncio.fixture
async def images_server(tmp_path: Path) -> AsyncIterator[PageServer]:
    async with small_server(tmp_path) as server:
        yield server


async def fetch_everything(port: int, rounds: int, tls: TlsConfig | None = None) -> int:
    """A daemon-side client fetching every lazy page ``rounds`` times, checking each byte."""
    source = await RemotePageSource.connect("127.0.0.1", port, wire=WIRE, tls=tls)
    pages = 0
    try:
        for _ in range(rounds):
            for pid, ranges in DUMP.items():
                for vaddr, nr in ranges:
                    chunk = await source.get(pid, vaddr, nr)
                    assert (chunk.vaddr, chunk.nr_pages) == (vaddr, nr)
                    assert bytes(chunk.data) == expected(pid, vaddr, nr)
                    chunk.release()
                    pages += nr
    finally:
        await source.aclose()
    return pages


OUTSIDE = {
    "the gap between two lazy ranges": (PID, FIRST[0] + FIRST[1] * PAGE_SIZE, 1),
    "the page before a range": (PID, FIRST[0] - PAGE_SIZE, 1),
    "the page after a range": (PID, SECOND[0] + SECOND[1] * PAGE_SIZE, 1),
    "the top of the address space": (PID, TOP, 1),
    "an address that wraps": (PID, TOP, 2),
    "a pid above pid_max": (2**40, FIRST[0], 1),
    "pid 0": (0, FIRST[0], 1),
    "nr_pages over the limit": (PID, FIRST[0], 2**20 + 1),
    "nr_pages 0": (PID, FIRST[0], 0),
    "another pid's range": (PID, DUMP[OTHER][0][0], 1),
}


@pytest.mark.asyncio
async def test_gets_outside_the_dump_are_refused_while_a_client_is_served(
        images_server: PageServer, reliability: Recorder,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        serving = tg.create_task(images_server.serve())
        good = tg.create_task(fetch_everything(images_server.port, rounds=20))
        for pid, vaddr, nr in OUTSIDE.values():
            hostile = await MiniClient.connect(images_server.port, WIRE)
            hostile.writer.write(raw(WIRE, GET, nr, vaddr, pid))
            assert await hostile.closed_by_server()  # no reply header, no page byte
            hostile.writer.close()
        # A GET that starts in a range and runs past its end gets that range's pages only.
        clamped = await MiniClient.connect(images_server.port, WIRE)
        last = SECOND[0] + (SECOND[1] - 1) * PAGE_SIZE
        assert await clamped.get(PID, last, 100) == (1, expected(PID, last, 1))
        clamped.writer.close()  # no CLOSE: only the good client ends the transfer
        pages = await good
    assert serving.result() is True
    assert images_server.stats.refused_connections == len(OUTSIDE)
    assert caplog.text.count("connection closed") == len(OUTSIDE)
    reliability.record(
        "Limits and hostile peers", "GETs outside the dumped lazy ranges (images store)",
        tried=f"{len(OUTSIDE)} kinds over TCP ({', '.join(OUTSIDE)}), plus a GET running past "
              f"a range's end, while another client fetched {pages} pages",
        held="each refused with a logged reason and only its connection closed; the clamped "
             "GET got the range's last page only; the other client got every byte intact")


@pytest.mark.asyncio
async def test_live_page_pipes_serve_only_lazy_pages(memory: AnonMapping,
                                                     reliability: Recorder) -> None:
    base = memory.address
    pipes = PagePipes.collect(os.getpid(), pipe_layout(base), pipe_size=16 * PAGE_SIZE)
    store = PipePageStore(os.getpid(), pipes)
    refused = {"a non-lazy page": 20, "the middle of the non-lazy run": 22,
               "a page never dumped": 53, "the non-lazy run at the end": 61}
    try:
        async with PageServer(store, address="127.0.0.1", port=0) as server, \
                asyncio.timeout(30), asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve())
            good = await MiniClient.connect(server.port, WIRE)
            for page in refused.values():
                hostile = await MiniClient.connect(server.port, WIRE)
                hostile.writer.write(raw(WIRE, GET, 1, base + page * PAGE_SIZE, os.getpid()))
                assert await hostile.closed_by_server()
                hostile.writer.close()
                # Between two refusals, a lazy page still arrives intact.
                vaddr = base + (page % 20) * PAGE_SIZE
                assert await good.get(os.getpid(), vaddr, 1) == (1, expected_page(vaddr, SEED))
            # Lazy pages 18, 19 are followed by non-lazy 20..22: the reply stops at 19.
            got, data = await good.get(os.getpid(), base + 18 * PAGE_SIZE, 10)
            assert got == 2
            assert data == expected_page(base + 18 * PAGE_SIZE, SEED) + expected_page(
                base + 19 * PAGE_SIZE, SEED)
            for start, nr in store.lazy_ranges(os.getpid()):
                at, end = start, start + nr * PAGE_SIZE
                while at < end:  # a reply stops at the end of a page pipe, too
                    got, data = await good.get(os.getpid(), at, (end - at) // PAGE_SIZE)
                    assert data == b"".join(expected_page(at + i * PAGE_SIZE, SEED)
                                            for i in range(got))
                    at += got * PAGE_SIZE
            assert await good.close() == 0
        assert serving.result() is True
    finally:
        store.close()
    reliability.record(
        "Limits and hostile peers", "GETs outside the lazy pages of a live dump (page pipes)",
        tried=f"{len(refused)} GETs for non-lazy or undumped pages of a live process, and a GET "
              "running from lazy pages into non-lazy ones",
        held="refused; the reply stopped at the last lazy page; lazy pages served intact")


@pytest.mark.asyncio
async def test_connections_over_the_limit_are_refused(
        images_server: PageServer, reliability: Recorder,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    limit = images_server.max_connections
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        serving = tg.create_task(images_server.serve())
        idle = [await MiniClient.connect(images_server.port, WIRE) for _ in range(limit)]
        await until(lambda: images_server.open_connections == limit)
        extra = [await MiniClient.connect(images_server.port, WIRE) for _ in range(3)]
        for client in extra:
            assert await client.closed_by_server()
            client.writer.close()
        # Slots come back when connections end: a real client then gets everything.
        for client in idle[:2]:
            client.writer.close()
        await until(lambda: images_server.open_connections == limit - 2)
        pages = await fetch_everything(images_server.port, rounds=2)
        for client in idle[2:]:
            client.writer.close()
    assert serving.result() is True
    assert caplog.text.count("(max_connections)") == len(extra)
    reliability.record(
        "Limits and hostile peers", "connections per page server",
        tried=f"{limit} idle connections held open (max_connections={limit}), 3 more attempted",
        held=f"the 3 were closed at once with a logged reason; once 2 idle ones left, a "
             f"client connected and got its {pages} pages")


def client_context(pki: Pki) -> ssl.SSLContext:
    """A hostile but authenticated client: the test CA's client certificate."""
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    return ctx


@pytest.mark.asyncio
@pytest.mark.parametrize("over", ["tcp", "tls"])
async def test_a_client_that_stops_reading_is_dropped(
        tmp_path: Path, pki: Pki, over: str, reliability: Recorder,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    flood = 20000
    server_tls, client_tls = (pki.config(pki.server), pki.config(pki.client)) \
        if over == "tls" else (None, None)
    async with small_server(tmp_path, server_tls) as server, asyncio.timeout(30), \
            asyncio.TaskGroup() as tg:
        serving = tg.create_task(server.serve())
        _, hostile = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_context(pki) if over == "tls" else None)
        # Pipeline GETs and never read a reply (the stream buffers what the kernel won't take).
        hostile.write(raw(WIRE, GET, FIRST[1], FIRST[0], PID) * flood)
        await until(lambda: "stall_timeout" in caplog.text)
        pages = await fetch_everything(server.port, rounds=5, tls=client_tls)
        hostile.transport.abort()
    assert serving.result() is True
    assert server.stats.refused_connections == 1
    reliability.record(
        "Limits and hostile peers",
        f"requests in flight: a client that never reads its replies ({over.upper()})",
        tried=f"{flood} GETs of {FIRST[1]} pages pipelined without reading (stall_timeout 0.5 s)",
        held=f"the server read no further than it could answer, dropped the client with a "
             f"logged reason after 0.5 s; another client then got its {pages} pages")


@pytest.mark.parametrize("role", list(Role))
def test_requests_in_flight_are_bounded_in_the_codec(role: Role,
                                                     reliability: Recorder) -> None:
    limit = 4
    codec = PageServerConnection(role, WIRE, max_in_flight=limit)
    gets = [GetRequest(PID, FIRST[0], 1)] * (limit + 1)
    if role is Role.CLIENT:
        for get in gets[:limit]:
            codec.send(get)
        with pytest.raises(LocalProtocolError, match="max_in_flight"):
            codec.send(gets[-1])
    else:
        codec.receive_data(b"".join(raw(WIRE, GET, 1, FIRST[0], PID) for _ in gets))
        assert [codec.next_event() for _ in range(limit)] == gets[:limit]
        with pytest.raises(RemoteProtocolError, match="max_in_flight"):
            codec.next_event()
    assert codec.state is State.ERROR
    reliability.record(
        "Limits and hostile peers", f"requests in flight per connection ({role.value} codec)",
        tried=f"{limit + 1} requests unanswered with max_in_flight={limit}",
        held="the one over the limit raised an error naming max_in_flight")


def test_a_pagemap_larger_than_its_pages_image_is_refused(tmp_path: Path,
                                                          reliability: Recorder) -> None:
    images = write_lazy_dump(tmp_path, {1: [(0x7F0000000000, 4)]})
    # The pagemap now claims 2**32 lazy pages (16 TiB) over a 16 KiB pages image, and the
    # mm a VMA that holds them: the server must not size anything by that claim.
    huge = 2**32
    mm = images.mm(1)
    mm.vmas[0].end = mm.vmas[0].start + huge * PAGE_SIZE
    images.write_mm(1, mm)
    images.write_pagemap(1, 1, [PagemapEntry(0x7F0000000000, huge, PE.LAZY | PE.PRESENT)])
    with pytest.raises(ImageError, match=f"16384 bytes where the pagemap of pid 1 says "
                                         f"{huge * PAGE_SIZE}"):
        ImagesPageStore(ImagesDir(tmp_path))
    reliability.record(
        "Limits and hostile peers", "image sizes: a pagemap claiming more than its pages image",
        tried="a pagemap and mm claiming 2^32 lazy pages over a 16 KiB pages image "
              "(entries over 64 MiB are refused by every image reader)",
        held="refused with an ImageError naming both sizes, before anything was sized by it")


@pytest.mark.asyncio
async def test_a_restorer_handing_over_something_else_is_refused(
        page_server: tuple[Path, PageServer], reliability: Recorder,
        caplog: pytest.LogCaptureFixture) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source, expect_tasks=1)
        (pid, [(vaddr, nr)]), (other, _), *_ = layout(2).items()
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX) as hostile:
                hostile.setblocking(False)
                await loop.sock_connect(hostile, str(daemon.socket_path))
                # A pipe where a uffd belongs (the session does not own the socket here).
                session = HandoverSession(hostile, HandoverRole.RESTORER)
                await session.send(TaskHandover(other, read_end))
                while await loop.sock_recv(hostile, 64):  # what it says, until it hangs up
                    pass
        finally:
            os.close(read_end)
            os.close(write_end)
        child = await spawn(daemon.socket_path, pid, vaddr, nr, "touch")
        code, out = await finish(child)
        report = await running
        await stop(serving)
    assert code == 0, out
    assert "MISMATCH" not in out
    assert report.restore_error is not None
    assert "not a userfaultfd but pipe:" in report.restore_error
    assert [(p.pid, p.state) for p in report.processes] == [(pid, "complete")]
    reliability.record(
        "Limits and hostile peers", "a restorer handing over a pipe instead of a userfaultfd",
        tried="a pipe fd sent with CRIU's handover while an attach() child restored its pages",
        held="refused (the fd is checked to be a userfaultfd), the failure reported; the "
             "child got every page intact")


@pytest.mark.asyncio
@pytest.mark.parametrize("malformed", ["word", "fd"])
async def test_malformed_handover_closes_that_connection_not_the_daemon(
        page_server: tuple[Path, PageServer], malformed: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A peer breaking the handover protocol on one connection: that connection is closed
    with a logged reason (and any fd it sent with it), while the daemon goes on serving
    an attach() child that hands its process over properly. (After "restore finished":
    tests/test_handover.py, test_a_guardian_breaking_the_protocol_is_closed.)"""
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source, expect_tasks=1)
        (pid, [(vaddr, nr)]), *_ = layout(1).items()
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX) as hostile:
                hostile.setblocking(False)
                await loop.sock_connect(hostile, str(daemon.socket_path))
                if malformed == "word":
                    await loop.sock_sendall(hostile, b"\xff\xff\xff\x7f")  # pid 2**31-1
                else:
                    # A zombie's word with an fd: no byte of it carries one.
                    socket.send_fds(hostile, [struct.pack("=i", -7)], [read_end])
                while await loop.sock_recv(hostile, 64):  # what it says, until it hangs up
                    pass
        finally:
            os.close(read_end)
        # The daemon closed its copy of the pipe's read end: the write end sees no reader.
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
        os.close(write_end)
        child = await spawn(daemon.socket_path, pid, vaddr, nr, "touch")
        code, out = await finish(child)
        report = await running
        await stop(serving)
    assert code == 0, out
    assert "MISMATCH" not in out
    assert [(p.pid, p.state) for p in report.processes] == [(pid, "complete")]
    assert report.restore_error is not None  # that restore failed; the other was served
    assert "restorer connection dropped before restore finished" in caplog.text
