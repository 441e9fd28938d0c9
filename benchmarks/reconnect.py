"""What a lost connection costs the daemon's page-server client, beside the machine's limits.

    .venv/bin/python benchmarks/reconnect.py [MiB] [CUT_EVERY_MIB] 2>/dev/null
                                                 (default: 256 8; the page server
                                                 logs every cut on stderr)

``RemotePageSource`` pulls a dump on disk from ``lazymig page-server`` (another
process) through a FaultProxy, 1 MiB GETs, two in flight, on asyncio's loop
and on uvloop: once untouched, once with every connection cut after each
CUT_EVERY_MIB MiB that come back (mid-reply). Printed: throughput both ways,
and the pause per cut, from the cut to the first reply on the new connection
(reconnect at once, send the unanswered GETs again, first reply back).

Beside it, measured in the same run: a loopback round trip and a loopback TCP
connect + accept, the floor of any reconnection. Expect the pause to be about
the time to fetch again what was in flight (two 1 MiB replies), not the
connect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import machine
import report
import uvloop
from lazydump import write_lazy_dump
from tls import free_port, start_page_server

from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.proxy import Direction, FaultProxy
from lazymig.uffd.source import ReconnectPolicy, RemotePageSource

PID, VADDR = 1000, 0x7F0000000000
GET_PAGES = 256  # 1 MiB
FAST = ReconnectPolicy(attempts=100, timeout=60, first_delay=0.001, max_delay=0.01)


def connect_accept_us(rounds: int = 2000) -> float:
    """Microseconds of one loopback TCP connect + accept (blocking sockets)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        started = time.perf_counter()
        for _ in range(rounds):
            with socket.create_connection(address):
                listener.accept()[0].close()
        return (time.perf_counter() - started) / rounds * 1e6


async def pull(port: int, nr_pages: int, cut_every: int | None) -> tuple[float, list[float]]:
    """(GB/s, pauses in seconds) of pulling every page through a FaultProxy."""
    async with FaultProxy("127.0.0.1", port) as proxy:
        source = await RemotePageSource.connect(*proxy.address, reconnect=FAST)
        cut_at: list[float] = []
        pauses: list[float] = []

        async def cutter() -> None:
            assert cut_every is not None
            while True:
                cuts = proxy.stats.cuts
                proxy.cut_after(cut_every, Direction.DOWNSTREAM)
                await proxy.wait_until(lambda s: s.cuts > cuts)  # noqa: B023 (awaited at once)
                cut_at.append(time.perf_counter())

        cutting = asyncio.create_task(cutter()) if cut_every else None
        asks = [(VADDR + i * PAGE_SIZE, min(GET_PAGES, nr_pages - i))
                for i in range(0, nr_pages, GET_PAGES)]
        started = time.perf_counter()
        sink = _Pull(source, asks, cut_at, pauses)
        await sink.done
        elapsed = time.perf_counter() - started
        if cutting is not None:
            cutting.cancel()
        await source.aclose()
        return nr_pages * PAGE_SIZE / elapsed / 1e9, pauses


class _Pull:
    """A page sink that keeps two of ``asks`` in flight (the daemon's background) and
    notes, after each cut, when the first reply came."""

    def __init__(self, source: RemotePageSource, asks: list[tuple[int, int]],
                 cut_at: list[float], pauses: list[float]) -> None:
        self.source, self.asks, self.cut_at, self.pauses = source, asks[::-1], cut_at, pauses
        self.in_flight = 0
        self.done = asyncio.get_running_loop().create_future()
        for _ in range(2):
            self._next()

    def _next(self) -> None:
        if self.asks:
            self.in_flight += 1
            self.source.fetch(PID, *self.asks.pop(), self)
        elif not self.in_flight and not self.done.done():
            self.done.set_result(None)

    def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                      urgent: bool) -> None:
        now = time.perf_counter()
        if len(self.cut_at) > len(self.pauses):  # the first reply since the last cut
            self.pauses.append(now - self.cut_at[len(self.pauses)])
        self.in_flight -= 1
        self._next()

    def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                     error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


def run(loop: str, main: Coroutine[Any, Any, tuple[float, list[float]]]
        ) -> tuple[float, list[float]]:
    runner: Callable[[Coroutine[Any, Any, tuple[float, list[float]]]],
                     tuple[float, list[float]]] = uvloop.run if loop == "uvloop" else asyncio.run
    return runner(main)


def main() -> None:
    logging.getLogger("lazymig").setLevel(logging.ERROR)  # a line per cut otherwise
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    cut_mib = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    print(f"machine: {machine.describe()}")
    print(f"  limit  loopback round trip        {machine.loopback_rtt_us():8.1f} us")
    print(f"  limit  loopback connect + accept  {connect_accept_us():8.1f} us")
    print(f"  limit  loopback TCP stream        {machine.loopback_tcp_gbps():8.2f} GB/s")
    nr_pages = mib * 256
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
        write_lazy_dump(Path(scratch), {PID: [(VADDR, nr_pages)]})
        for loop in ("asyncio", "uvloop"):
            for cut_every in (None, cut_mib << 20):
                port = free_port()
                # A cut connection ends a dump-on-disk server's session (as CRIU's):
                # this one must wait for the daemon's reconnection.
                server = start_page_server(Path(scratch), port, None, keep_serving=True)
                try:
                    gbps, pauses = run(loop, pull(port, nr_pages, cut_every))
                finally:
                    server.kill()
                    server.wait(30)
                if cut_every is None:
                    print(f"  {loop:7s} {mib} MiB through the proxy, no cut: {gbps:.2f} GB/s")
                else:
                    print(f"  {loop:7s} {mib} MiB, cut every {cut_mib} MiB: {gbps:.2f} GB/s, "
                          f"{len(pauses)} cuts, pause per cut median "
                          f"{statistics.median(pauses) * 1e3:.2f} ms, "
                          f"max {max(pauses) * 1e3:.2f} ms")


if __name__ == "__main__":
    with report.recorded("reconnect"):
        main()
