"""The machine's own limits, measured in the same run as a benchmark.

Every lazymig benchmark prints its numbers beside these, so a reader can tell
how close to the hardware (and kernel) a number is on this shared, noisy VM.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import platform
import socket
import tempfile
import time

import uvloop

from lazymig.linux.uffd import buffer_address
from lazymig.linux.vm import AnonMapping, pipe_max_size, tee
from lazymig.uffd.uffd import Uffd

MIB = 1 << 20


def describe() -> str:
    """One line: kernel, CPUs, memory."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"Linux {platform.release()}, {os.cpu_count()} CPUs, {mem / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}")


def warm_memory(size: int) -> None:
    """Touch and free ``size`` bytes first. On this VM the first use of guest memory
    the host has not backed yet costs several times more than the copy itself (1 GiB
    of UFFDIO_COPY: 0.4 GB/s cold, 4 GB/s warm), which would measure the hypervisor."""
    with AnonMapping(size, populate=True):
        pass


def memcpy_gbps(total: int = 1 << 30) -> float:
    """GB/s of a plain memory copy of 4 MiB blocks."""
    src = bytearray(os.urandom(4 * MIB))
    dst = bytearray(4 * MIB)
    view = memoryview(dst)
    start = time.perf_counter()
    for _ in range(total // len(src)):
        view[:] = src
    return total / (time.perf_counter() - start) / 1e9


def _drain(sock: socket.socket, total: int) -> int:
    """Fork a process that reads and discards ``total`` bytes from ``sock``; its pid."""
    child = os.fork()
    if child == 0:
        try:
            buf = bytearray(1 * MIB)
            got = 0
            while got < total:
                n = sock.recv_into(buf)
                if n == 0:
                    break
                got += n
        finally:
            os._exit(0)
    return child


def loopback_tcp_gbps(total: int = 1 << 30) -> float:
    """GB/s of a bare TCP stream over loopback (sendall of 1 MiB blocks, recv_into)."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    block = os.urandom(MIB)
    reader = _drain(peer, total)
    start = time.perf_counter()
    for _ in range(total // MIB):
        client.sendall(block)
    os.waitpid(reader, 0)
    elapsed = time.perf_counter() - start
    for sock in (client, peer, server):
        sock.close()
    return total / elapsed / 1e9


def loopback_rtt_us(rounds: int = 5000, cpus: tuple[int, int] | None = None) -> float:
    """Median microseconds of a 32-byte request / 4 KiB reply round trip over loopback,
    answered by another process (what one GET of one page costs at best).

    ``cpus`` pins the asking and the answering process (else the scheduler places
    them): on this VM a wake-up across vCPUs costs several times a round trip on
    one, because an idle vCPU halts and must be woken by the host.
    """
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer, _ = server.accept()
    affinity = os.sched_getaffinity(0)
    child = os.fork()
    if child == 0:  # the echo side: nothing but recv and send
        try:
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            page = bytes(4096)
            for _ in range(rounds):
                if len(peer.recv(32, socket.MSG_WAITALL)) < 32:
                    break
                peer.sendall(page)
        finally:
            os._exit(0)
    peer.close()
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    samples = []
    buf = bytearray(4096)
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            client.sendall(bytes(32))
            client.recv_into(buf, 4096, socket.MSG_WAITALL)
            samples.append(time.perf_counter() - start)
    finally:
        os.sched_setaffinity(0, affinity)
    os.waitpid(child, 0)
    client.close()
    server.close()
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def pipe_to_socket_gbps(total: int = 1 << 30) -> float:
    """GB/s of the page server's own path with nothing else: tee a full pipe into a
    scratch pipe, read that into a buffer and send it into a loopback socket, a
    reader discarding."""
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    size = min(MIB, pipe_max_size())
    src_r, src_w = os.pipe()
    scratch_r, scratch_w = os.pipe()
    for fd in (src_w, scratch_w):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    os.write(src_w, os.urandom(size))
    buf = memoryview(bytearray(size))
    reader = _drain(peer, total)
    start = time.perf_counter()
    sent = 0
    while sent < total:
        teed = tee(src_r, scratch_w, size)
        while teed:
            got = os.readv(scratch_r, [buf[:teed]])
            client.sendall(buf[:got])
            teed -= got
            sent += got
    os.waitpid(reader, 0)
    elapsed = time.perf_counter() - start
    for fd in (src_r, src_w, scratch_r, scratch_w):
        os.close(fd)
    for sock in (client, peer, server):
        sock.close()
    return total / elapsed / 1e9


def uffd_copy_gbps(total: int = 256 * MIB, chunk: int = 4 * MIB) -> float:
    """GB/s of bare UFFDIO_COPY into missing pages of a registered region of this process."""
    with AnonMapping(total) as region, AnonMapping(chunk, populate=True) as src:
        src.view()[:] = os.urandom(chunk)
        with Uffd.open() as uffd:
            uffd.register(region.address, total)
            start = time.perf_counter()
            for offset in range(0, total, chunk):
                uffd.copy(region.address + offset, src.address, chunk)
            elapsed = time.perf_counter() - start
            uffd.unregister(region.address, total)
    return total / elapsed / 1e9


def transfer_floor_gbps(total: int = 1 << 30, chunk: int = 4 * MIB) -> float:
    """GB/s of the background transfer's copies with nothing else: a process reads a
    tmpfs file into a buffer and sends it over loopback (the page server's work),
    another receives into a buffer and UFFDIO_COPYs it into missing pages of a
    registered region (the daemon's). Four copies of every byte on two processes:
    the floor of that design on this machine, whatever the code around it."""
    with tempfile.TemporaryFile(dir="/dev/shm") as file:
        block = os.urandom(chunk)
        for _ in range(total // chunk):
            file.write(block)
        file.flush()
        server = socket.create_server(("127.0.0.1", 0))
        receiver = socket.create_connection(server.getsockname())
        sender, _ = server.accept()
        child = os.fork()
        if child == 0:
            try:
                out = memoryview(bytearray(chunk))
                for offset in range(0, total, chunk):
                    sender.sendall(out[:os.preadv(file.fileno(), [out], offset)])
            finally:
                os._exit(0)
        buf = bytearray(chunk)
        view = memoryview(buf)
        # No events: nothing forks or unmaps here, and a FORK event would hang a fork.
        with AnonMapping(total) as region, Uffd.open(0) as uffd, \
                buffer_address(buf) as (address, _):
            uffd.register(region.address, total)
            start = time.perf_counter()
            for offset in range(0, total, chunk):
                got = 0
                while got < chunk:
                    got += receiver.recv_into(view[got:])
                uffd.copy(region.address + offset, address, chunk)
            elapsed = time.perf_counter() - start
            uffd.unregister(region.address, total)
        os.waitpid(child, 0)
        for sock in (receiver, sender, server):
            sock.close()
    return total / elapsed / 1e9


class _Answer(asyncio.Protocol):
    """Replies ``reply`` bytes to every 32-byte request (a page server with nothing else)."""

    def __init__(self, reply: int) -> None:
        self._reply = bytes(reply)
        self._pending = 0
        self.transport: asyncio.WriteTransport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._pending += len(data)
        assert self.transport is not None
        while self._pending >= 32:
            self._pending -= 32
            self.transport.write(self._reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


def uvloop_answerer(reply: int) -> tuple[int, int]:
    """Fork a process answering on loopback with uvloop (:class:`_Answer`); (pid, port)."""
    listener = socket.create_server(("127.0.0.1", 0))
    child = os.fork()
    if child == 0:
        try:
            async def serve() -> None:
                conn, _ = listener.accept()
                protocol = _Answer(reply)
                await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, conn)
                await protocol.lost
            uvloop.run(serve())
        finally:
            os._exit(0)
    port = listener.getsockname()[1]
    listener.close()
    return child, port


def uvloop_rtt_us(rounds: int = 5000) -> float:
    """Median microseconds of a 32-byte request / 4 KiB reply between two processes that
    both run uvloop (Protocols, no task per request): Python's own floor for one GET."""
    child, port = uvloop_answerer(4096)

    async def ask() -> list[float]:
        loop = asyncio.get_running_loop()
        samples: list[float] = []
        done: asyncio.Future[None] = loop.create_future()

        class Ask(asyncio.Protocol):
            got = 0
            start = 0.0

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
                transport.get_extra_info("socket").setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.start = time.perf_counter()
                self.transport.write(bytes(32))

            def data_received(self, data: bytes) -> None:
                self.got += len(data)
                if self.got < 4096:
                    return
                self.got = 0
                samples.append(time.perf_counter() - self.start)
                if len(samples) == rounds:
                    self.transport.close()
                    done.set_result(None)
                    return
                self.start = time.perf_counter()
                self.transport.write(bytes(32))

        await loop.create_connection(Ask, "127.0.0.1", port)
        await done
        return samples

    samples = sorted(uvloop.run(ask()))
    os.waitpid(child, 0)
    return samples[len(samples) // 2] * 1e6
