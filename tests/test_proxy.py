"""FaultProxy over real loopback sockets: forwarding, cuts, cuts mid-message, latency, refusal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from lazymig.testing.proxy import Direction, FaultProxy

PAYLOAD = os.urandom(300_000)


class Upstream:
    """A real TCP server that echoes what it reads and records how each connection ended."""

    def __init__(self) -> None:
        self.endings: asyncio.Queue[str] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            self.endings.put_nowait("eof")
            writer.close()
        except OSError as exc:
            self.endings.put_nowait(type(exc).__name__)
            writer.close()


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    up.server = await asyncio.start_server(up._echo, "127.0.0.1", 0)
    async with up.server:
        yield up


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    echoed = await reader.read()
    writer.close()
    await writer.wait_closed()
    return echoed


async def read_until_broken(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Read until the connection ends; return what came and how it ended (EOF or the error)."""
    got = bytearray()
    try:
        while data := await reader.read(65536):
            got += data
    except OSError as exc:
        return bytes(got), type(exc).__name__
    return bytes(got), "eof"


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    """A loopback port that nothing listens on (bound, not listening, while in use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.mark.asyncio
async def test_forwards_both_ways_and_counts(upstream: Upstream) -> None:
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        assert proxy.address == ("127.0.0.1", proxy.port)
        assert await roundtrip(proxy.port, PAYLOAD) == PAYLOAD
        assert await roundtrip(proxy.port, b"second") == b"second"
        await proxy.wait_until(lambda s: s.active == 0)
        assert proxy.stats.connections == 2
        assert proxy.stats.bytes(Direction.UPSTREAM) == len(PAYLOAD) + 6
        assert proxy.stats.bytes(Direction.DOWNSTREAM) == len(PAYLOAD) + 6
        assert proxy.stats.cuts == 0
    assert [upstream.endings.get_nowait() for _ in range(2)] == ["eof", "eof"]


@pytest.mark.asyncio
async def test_cut_resets_both_sides_of_every_connection(upstream: Upstream) -> None:
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        clients = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        for reader, writer in clients:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert proxy.stats.active == 3
        proxy.cut()
        hows = []
        for reader, writer in clients:
            got, how = await read_until_broken(reader)
            assert got == b""
            hows.append(how)
            writer.close()
        assert set(hows) <= {"ConnectionResetError", "eof"}
        await proxy.wait_until(lambda s: s.active == 0)
        # The upstream side saw the cut as well: every echo handler ended.
        endings = [await upstream.endings.get() for _ in range(3)]
        assert set(endings) <= {"ConnectionResetError", "eof"}
        # RST, not FIN: someone saw the reset (which end reads it first is the kernel's choice).
        assert "ConnectionResetError" in hows + endings
        # A cut does not stop the proxy: the next connection goes through.
        assert await roundtrip(proxy.port, b"after") == b"after"
        assert proxy.stats.cuts == 1


@pytest.mark.asyncio
async def test_cut_after_truncates_mid_message(upstream: Upstream) -> None:
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        proxy.cut_after(100_001, Direction.DOWNSTREAM)
        writer.write(PAYLOAD)
        got, how = await read_until_broken(reader)
        writer.close()
        assert how in ("ConnectionResetError", "eof")
        assert 0 < len(got) <= 100_001
        assert got == PAYLOAD[: len(got)]
        assert proxy.stats.cuts == 1
        assert proxy.stats.bytes_downstream == 100_001
        # One-shot: the next connection is not cut.
        assert await roundtrip(proxy.port, PAYLOAD) == PAYLOAD


@pytest.mark.asyncio
async def test_cut_after_upstream_direction(upstream: Upstream) -> None:
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        proxy.cut_after(10, "upstream")
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"0123456789abcdef")
        got, _ = await read_until_broken(reader)
        writer.close()
        assert got == b"0123456789"[: len(got)]
        assert proxy.stats.bytes_upstream == 10
        assert proxy.stats.cuts == 1


@pytest.mark.asyncio
async def test_delay_adds_latency_and_keeps_order(upstream: Upstream) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        proxy.delay(0.2)
        start = loop.time()
        assert await roundtrip(proxy.port, PAYLOAD) == PAYLOAD
        # A lower bound only (the machine may be slow, never fast): two crossings, 0.2 s each.
        assert loop.time() - start >= 0.4
        proxy.delay(0)
        assert await roundtrip(proxy.port, b"quick") == b"quick"


@pytest.mark.asyncio
async def test_refuse_then_accept_again_on_the_same_port(upstream: Upstream) -> None:
    async with asyncio.timeout(30), FaultProxy("127.0.0.1", upstream.port) as proxy:
        port = proxy.port
        reader, writer = await asyncio.open_connection(*proxy.address)
        await proxy.refuse(True)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*proxy.address)
        # The connection made before refusing still works.
        writer.write(b"alive")
        assert await reader.readexactly(5) == b"alive"
        writer.close()
        await proxy.refuse(False)
        assert proxy.port == port
        assert await roundtrip(port, b"back") == b"back"
        assert proxy.stats.connections == 2


@pytest.mark.asyncio
async def test_unreachable_upstream_resets_the_client() -> None:
    with socket_port() as dead_port:
        async with asyncio.timeout(30), FaultProxy("127.0.0.1", dead_port) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            got, how = await read_until_broken(reader)
            writer.close()
            assert got == b""
            assert how in ("ConnectionResetError", "eof")
            await proxy.wait_until(lambda s: s.upstream_failures == 1)
            assert proxy.stats.connections == 0


@pytest.mark.asyncio
async def test_exit_resets_open_connections(upstream: Upstream) -> None:
    async with asyncio.timeout(30):
        async with FaultProxy("127.0.0.1", upstream.port) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
        got, how = await read_until_broken(reader)
        writer.close()
        assert (got, how in ("ConnectionResetError", "eof")) == (b"", True)


def test_port_outside_the_context_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        _ = FaultProxy("127.0.0.1", 1).port
    with pytest.raises(ValueError, match="nbytes"):
        FaultProxy("127.0.0.1", 1).cut_after(-1)
    with pytest.raises(ValueError, match="seconds"):
        FaultProxy("127.0.0.1", 1).delay(-1)
