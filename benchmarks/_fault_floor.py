"""The floor of a fault served through a GET in Python: three processes, nothing else.

A child touches random pages of a region registered on a userfaultfd; a handler
on uvloop reads each fault, sends a 32-byte request over loopback TCP to an
answering process on uvloop (:func:`machine.uvloop_answerer`), and UFFDIO_COPYs
the reply. The daemon's fault path does the same plus its bookkeeping, so the
difference between the two is what lazymig's code costs; the rest is this
machine (its wake-ups across vCPUs) and Python.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import mmap
import os
import random
import socket
import time

import machine
import uvloop

from lazymig.linux import uffd as sys_uffd
from lazymig.linux.uffd import buffer_address
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.uffd import decode_events
from lazymig.uffd.uffd import Uffd


def _toucher(sock: socket.socket, nr: int, block: int, touches: int) -> None:
    region = mmap.mmap(-1, nr * PAGE_SIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    uffd = Uffd.open(0)  # no UNMAP event: the region may go away at exit unattended
    uffd.register(base, nr * PAGE_SIZE)
    socket.send_fds(sock, [base.to_bytes(8, "little")], [uffd.fd])
    sock.recv(1)
    pages = block // PAGE_SIZE
    latencies = []
    for b in random.Random(1).sample(range(nr // pages), touches):  # one fault per block
        start = time.perf_counter()
        region[(b * pages + pages // 2) * PAGE_SIZE]
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    sock.sendall(json.dumps(latencies[len(latencies) // 2]).encode())


def fault_floor_us(block: int, *, one_cpu: bool = False, nr: int = 65536,
                   touches: int = 1000) -> float:
    """Median fault round trip (seen by the faulting process) when each fault costs
    one GET of ``block`` bytes, handled by the minimal Python above; ``one_cpu``
    pins the three processes to one vCPU (no wake-up crosses vCPUs)."""
    affinity = os.sched_getaffinity(0)
    if one_cpu:
        os.sched_setaffinity(0, {min(affinity)})  # the children inherit it
    try:
        return _floor(block, nr, touches)
    finally:
        os.sched_setaffinity(0, affinity)


def _floor(block: int, nr: int, touches: int) -> float:
    server, port = machine.uvloop_answerer(block)
    a, b = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            _toucher(a, nr, block, touches)
        finally:
            os._exit(0)
    msg, fds, _, _ = socket.recv_fds(b, 8, 1)
    base, fd = int.from_bytes(msg, "little"), fds[0]
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setblocking(False)
    os.set_blocking(fd, False)
    buf = bytearray(block)
    view = memoryview(buf)

    async def handle() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        state = {"dst": 0, "got": 0, "served": 0}

        def on_fault() -> None:
            for event in decode_events(os.read(fd, 32 * 64)):
                offset = (event.address - base) & ~(block - 1)  # type: ignore[union-attr]
                state["dst"] = base + offset
                conn.send(bytes(32))

        def on_reply() -> None:
            try:
                state["got"] += conn.recv_into(view[state["got"]:])
            except BlockingIOError:
                return
            if state["got"] < block:
                return
            state["got"] = 0
            with buffer_address(buf) as (address, _):
                sys_uffd.copy(fd, state["dst"], address, block)
            state["served"] += 1
            if state["served"] == touches:
                done.set_result(None)

        loop.add_reader(fd, on_fault)
        loop.add_reader(conn.fileno(), on_reply)
        b.send(b"g")
        try:
            await done
        finally:
            loop.remove_reader(fd)
            loop.remove_reader(conn.fileno())

    uvloop.run(handle())
    median = float(json.loads(b.recv(100)))
    os.waitpid(child, 0)
    conn.close()
    os.waitpid(server, 0)
    os.close(fd)
    a.close()
    b.close()
    return median * 1e6
