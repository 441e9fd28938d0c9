"""The page server's and the daemon's client's throughput over TLS, beside plain TCP
and the machine's limits.

    .venv/bin/python benchmarks/tls.py [MiB ...]      (default: 256 1024)

In one run, for each size:

* server: ``LazyDump`` of a C workload serving a bare client in another process
  (benchmarks/_page_reader.py) over plain TCP (pages read from the scratch
  pipe into a buffer and sent with their header) and over TLS (certificates
  from a CA made for the run; the same buffer encrypted by Python's ssl on
  the event loop; the client decrypts with Python's ssl too);
* client: the daemon's ``RemotePageSource`` (asyncio's loop and uvloop) pulling
  a dump on disk from ``lazymig page-server`` in another process, 4 MiB GETs,
  two in flight, plain and over TLS.

Beside it:
a loopback TCP stream, and a bare TLS stream between two Python ssl sockets
with the cipher the session negotiates (the ceiling for user-space TLS here).
kTLS is not measured: this kernel has no tls module (CONFIG_TLS is off) and
Python 3.11's ssl cannot enable it.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import machine
import report
import uvloop
from lazydump import write_lazy_dump
from tls_pki import Pki, make_pki

from lazymig.dump import LazyDump
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.workload import Workload, build_c_workload
from lazymig.uffd.source import RemotePageSource

HERE = Path(__file__).resolve().parent
CHUNK = 256 * 1024


def tls_stream_gbps(pki: Pki, total: int = 1 << 30) -> tuple[float, str]:
    """GB/s of one TLS stream over loopback between two threads (encrypt + decrypt)."""
    server_ctx = pki.config(pki.server).context(server=True)
    client_ctx = pki.config(pki.client).context(server=False)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cipher: list[str] = []

    def send() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            cipher.append(str((tls.cipher() or ("?",))[0]))
            data = memoryview(bytes(CHUNK))
            for _ in range(total // CHUNK):
                tls.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                server_hostname="127.0.0.1") as tls:
        buf = bytearray(CHUNK)
        started = time.perf_counter()
        left = total
        while left:
            left -= tls.recv_into(buf, min(left, CHUNK))
        elapsed = time.perf_counter() - started
    sender.join()
    listener.close()
    return total / elapsed / 1e9, cipher[0]


async def serve_once(binary: Path, mib: int, pki: Pki | None) -> tuple[float, float]:
    """(GB/s served, frozen seconds) of one LazyDump, plain or over TLS."""
    workload = Workload([str(binary), "--mib", str(mib), "--interval-ms", "3600000"],
                        ready_timeout=120)
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as images_dir:
            dump = LazyDump(workload.pid, images_dir, address="127.0.0.1", port=0,
                            progress_interval=None,
                            tls=pki.config(pki.server) if pki else None)
            await dump.start()
            tls_args = ([str(pki.ca), str(pki.client.cert), str(pki.client.key)]
                        if pki else [])
            reader = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "_page_reader.py"), images_dir, str(workload.pid),
                str(dump.port), *tls_args, stdout=asyncio.subprocess.PIPE)
            serving = asyncio.create_task(dump.serve())
            assert reader.stdout is not None
            out = json.loads(await reader.stdout.readline())
            await reader.wait()
            await serving
            return out["bytes"] / out["seconds"] / 1e9, dump.frozen_seconds
    finally:
        workload.stop()


def start_page_server(images: Path, port: int, pki: Pki | None, *,
                      keep_serving: bool = False) -> subprocess.Popen[bytes]:
    """``lazymig page-server`` on ``images`` (TLS with the server's certificate if ``pki``;
    with ``keep_serving``, on after a client's connection ends)."""
    tls = (["--tls", "--tls-cacert", str(pki.ca), "--tls-cert", str(pki.server.cert),
            "--tls-key", str(pki.server.key)] if pki else [])
    tls += ["--keep-serving"] if keep_serving else []
    r, w = os.pipe()
    server = subprocess.Popen(
        [sys.executable, "-m", "lazymig", "page-server", "--lazy-pages", "-D", str(images),
         "--address", "127.0.0.1", "--port", str(port), *tls, "--status-fd", str(w)],
        pass_fds=(w,))
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 1) == b"\0", "lazymig page-server did not start"
    finally:
        os.close(r)
    return server


class _Pull:
    """A page sink that keeps two of ``asks`` in flight, as the daemon's background does."""

    def __init__(self, source: RemotePageSource, pid: int, asks: list[tuple[int, int]]) -> None:
        self.source, self.pid, self.asks = source, pid, asks[::-1]
        self.got = 0
        self.in_flight = 0
        self.done = asyncio.get_running_loop().create_future()
        for _ in range(2):
            self._next()

    def _next(self) -> None:
        if self.asks:
            self.in_flight += 1
            self.source.fetch(self.pid, *self.asks.pop(), self)
        elif not self.in_flight and not self.done.done():
            self.done.set_result(None)

    def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                      urgent: bool) -> None:
        self.in_flight -= 1
        self.got += got
        self._next()

    def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                     error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


async def pull(port: int, pid: int, vaddr: int, nr_pages: int, pki: Pki | None) -> float:
    """GB/s of RemotePageSource fetching every page (4 MiB GETs, two in flight)."""
    source = await RemotePageSource.connect(
        "127.0.0.1", port, tls=pki.config(pki.client) if pki else None)
    started = time.perf_counter()
    asks = [(vaddr + i * PAGE_SIZE, min(1024, nr_pages - i)) for i in range(0, nr_pages, 1024)]
    sink = _Pull(source, pid, asks)
    await sink.done
    got = sink.got
    elapsed = time.perf_counter() - started
    await source.aclose()
    assert got == nr_pages  # one VMA, one segment: no reply is short
    return got * PAGE_SIZE / elapsed / 1e9


def client_line(scratch: Path, mib: int, pki: Pki) -> str:
    pid, vaddr, nr_pages = 1000, 0x7F0000000000, mib * 256
    images = scratch / f"dump-{mib}"
    images.mkdir()
    write_lazy_dump(images, {pid: [(vaddr, nr_pages)]})
    numbers = []
    for loop, run in (("asyncio", asyncio.run), ("uvloop", uvloop.run)):
        for tls in (None, pki):
            port = free_port()
            server = start_page_server(images, port, tls)
            try:
                gbps = run(pull(port, pid, vaddr, nr_pages, tls))
            finally:
                server.wait(30)
            numbers.append(f"{loop} {'TLS' if tls else 'plain'} {gbps:.2f}")
    return f"  {mib:5d} MiB pulled by RemotePageSource (GB/s): " + ", ".join(numbers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [256, 1024]
    print(f"machine: {machine.describe()}")
    with tempfile.TemporaryDirectory() as scratch:
        pki = make_pki(Path(scratch) / "pki")
        tcp = machine.loopback_tcp_gbps()
        tls, cipher = tls_stream_gbps(pki)
        print(f"  limit  loopback TCP stream                       {tcp:.2f} GB/s")
        print(f"  limit  Python ssl stream over loopback       {tls:.2f} GB/s ({cipher})")
        binary = build_c_workload(scratch)
        for mib in sizes:
            machine.warm_memory(2 * mib << 20)
            plain, _ = asyncio.run(serve_once(binary, mib, None))
            machine.warm_memory(2 * mib << 20)
            over_tls, _ = asyncio.run(serve_once(binary, mib, pki))
            print(f"  {mib:5d} MiB served: plain {plain:.2f} GB/s, TLS {over_tls:.2f} GB/s "
                  f"({over_tls / tls:.0%} of the ssl stream)")
        with tempfile.TemporaryDirectory(dir="/dev/shm") as dumps:
            for mib in sizes:
                print(client_line(Path(dumps), mib, pki))


if __name__ == "__main__":
    with report.recorded("tls"):
        main()
