"""lazymig.uffd.uffd against the real kernel, with a faulting child process.

The child (tests/uffd_child.py) maps memory, registers it on a uffd made by
lazymig's ``Uffd.open`` and sends the fd here over SCM_RIGHTS; this process
serves its faults with ``Uffd`` on the test's event loop (asyncio and uvloop).
Nothing here touches registered memory. Every test is bounded by
``asyncio.timeout``; none asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import mmap
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import TIMEOUT, Child, uffd_events

from lazymig._aio import wait_fd
from lazymig.proto.constants import PAGE_SIZE as P
from lazymig.proto.uffd import Event, Feature, Fork, Ioctl, Pagefault, Remap, Remove, Unmap
from lazymig.uffd.uffd import DEFAULT_FEATURES, Uffd, UffdError

ZERO_SHA = hashlib.sha256(bytes(P)).hexdigest()


def pattern(addr: int) -> bytes:
    """The page the default policy copies to ``addr``: one byte, from the address."""
    return bytes([(addr // P) % 251 + 1]) * P


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Policy = Callable[[Uffd, Pagefault], None]


def copy_pattern(uffd: Uffd, fault: Pagefault) -> None:
    uffd.copy(fault.address, pattern(fault.address))


class Server:
    """Serves every uffd it is given on the running loop, like a tiny daemon:
    faults go to ``policy``, FORK events' fds are adopted and served too, and
    every event is logged (``log``) and queued for the test (``next``)."""

    def __init__(self, policy: Policy = copy_pattern) -> None:
        self.policy = policy
        self.log: list[tuple[Uffd, Event]] = []
        self.queue: asyncio.Queue[tuple[Uffd, Event] | BaseException] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.uffds: list[Uffd] = []

    def serve(self, uffd: Uffd) -> None:
        self.uffds.append(uffd)
        self.tasks.append(asyncio.create_task(self._run(uffd)))

    async def _run(self, uffd: Uffd) -> None:
        try:
            while True:
                for event in await uffd_events(uffd):
                    if isinstance(event, Pagefault):
                        self.policy(uffd, event)
                    elif isinstance(event, Fork):
                        self.serve(Uffd.from_fd(event.ufd, pid=uffd.pid))
                    self.log.append((uffd, event))
                    self.queue.put_nowait((uffd, event))
        except Exception as exc:  # hand it to the test instead of the loop
            self.queue.put_nowait(exc)

    async def next(self, kind: type[Any]) -> tuple[Uffd, Any]:
        """The next logged event of type ``kind`` (others are skipped)."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item[1], kind):
                return item

    def faults(self, uffd: Uffd | None = None) -> list[int]:
        return [e.address for u, e in self.log
                if isinstance(e, Pagefault) and (uffd is None or u is uffd)]

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for uffd in self.uffds:
            uffd.close()


@contextlib.asynccontextmanager
async def session(npages: int = 8, policy: Policy = copy_pattern, serve: bool = True,
                  features: int = DEFAULT_FEATURES) -> AsyncIterator[tuple[Child, Server]]:
    async with asyncio.timeout(TIMEOUT):
        child = await Child.start(npages, features)
        server = Server(policy)
        try:
            if serve:
                server.serve(child.uffd)
            yield child, server
        finally:
            await child.stop()
            await server.aclose()
            child.uffd.close()


# ----------------------------------------------------------------------------- faults


@pytest.mark.asyncio
async def test_faults_are_served_with_copy() -> None:
    async with session() as (child, server):
        assert child.ioctls & (Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE) == (
            Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE)
        reply = await child.call(op="read", addr=child.page(0), n=4)
        assert reply["sha"] == [sha(pattern(child.page(i))) for i in range(4)]
        assert server.faults() == [child.page(i) for i in range(4)]
        # present now: reading again faults no more
        await child.call(op="read", addr=child.page(0), n=4)
        assert len(server.faults()) == 4


@pytest.mark.asyncio
async def test_copy_takes_buffers_and_addresses_and_many_pages() -> None:
    keep: list[object] = []

    def policy(uffd: Uffd, fault: Pagefault) -> None:
        i = (fault.address - base) // P
        data = pattern(fault.address)
        if i == 0:
            assert uffd.copy(fault.address, data) == P
        elif i == 1:
            assert uffd.copy(fault.address, bytearray(data)) == P
        elif i == 2:  # a read-only slice of a bigger bytes object
            assert uffd.copy(fault.address, memoryview(b"?" * P + data)[P:]) == P
        elif i == 3:
            m = mmap.mmap(-1, P)
            m.write(data)
            assert uffd.copy(fault.address, m) == P
            m.close()
        elif i == 4:  # a raw address, with wake=False then an explicit wake
            buf = ctypes.create_string_buffer(data, P)
            keep.append(buf)
            assert uffd.copy(fault.address, ctypes.addressof(buf), P, wake=False) == P
            uffd.wake(fault.address, P)
        else:  # pages 5..7 in one ioctl
            many = b"".join(pattern(base + j * P) for j in range(5, 8))
            assert uffd.copy(base + 5 * P, many) == 3 * P

    async with session(policy=policy) as (child, server):
        base = child.addr
        reply = await child.call(op="read", addr=base, n=8)
        assert reply["sha"] == [sha(pattern(child.page(i))) for i in range(8)]
        assert server.faults() == [child.page(i) for i in range(6)]


@pytest.mark.asyncio
async def test_zeropage_and_write_faults() -> None:
    def policy(uffd: Uffd, fault: Pagefault) -> None:
        if fault.write:
            copy_pattern(uffd, fault)
        else:
            assert uffd.zeropage(fault.address, P) == P

    async with session(policy=policy) as (child, server):
        assert (await child.call(op="read", addr=child.page(1)))["sha"] == [ZERO_SHA]
        await child.call(op="write", addr=child.page(2), byte=0x5A)
        _, fault = await server.next(Pagefault)
        _, fault = await server.next(Pagefault)
        assert fault.write and fault.address == child.page(2)
        assert (await child.call(op="read", addr=child.page(2)))["sha"] == [sha(b"\x5a" * P)]


@pytest.mark.asyncio
async def test_double_copy_is_eexist_and_partial_copy_is_short() -> None:
    async with session() as (child, server):
        await child.call(op="read", addr=child.page(1))
        agains: list[Callable[[], object]] = [
            lambda: child.uffd.copy(child.page(1), pattern(0)),
            lambda: child.uffd.zeropage(child.page(1), P),
        ]
        for again in agains:
            with pytest.raises(UffdError) as info:
                again()
            assert info.value.errno == errno.EEXIST
            assert info.value.recoverable and not info.value.process_gone
            assert info.value.pid == child.pid
        # pages 0 and 1 in one ioctl: page 0 lands, page 1 is there: a short count
        done = child.uffd.copy(child.page(0), pattern(child.page(0)) * 2)
        assert done == P
        reply = await child.call(op="read", addr=child.page(0), n=2)
        assert reply["sha"] == [sha(pattern(child.page(0))), sha(pattern(child.page(1)))]
        assert server.faults() == [child.page(1)]


# ----------------------------------------------------------------------------- events


@pytest.mark.asyncio
async def test_fork_event_delivers_a_new_uffd() -> None:
    async with session() as (child, server):
        await child.call(op="read", addr=child.page(0))  # present before the fork
        await child.send(op="fork", addr=child.page(0), n=2)
        parent_uffd, fork = await server.next(Fork)
        assert parent_uffd is child.uffd and fork.ufd >= 0
        grandchild = await child.recv()
        assert grandchild["from"] == "grandchild"
        assert grandchild["sha"] == [sha(pattern(child.page(0))), sha(pattern(child.page(1)))]
        reply = await child.recv()
        assert reply["from"] == "child" and reply["status"] == 0
        forked = server.uffds[1]
        assert forked.fd == fork.ufd and forked.pid == child.pid
        assert server.faults(forked) == [child.page(1)]  # page 0 came with the fork
        assert server.faults(child.uffd) == [child.page(0)]


@pytest.mark.asyncio
async def test_remove_event_then_fault_again() -> None:
    served: set[int] = set()

    def policy(uffd: Uffd, fault: Pagefault) -> None:
        if fault.address in served:  # dropped by DONTNEED: not lazy any more
            uffd.zeropage(fault.address, P)
        else:
            served.add(fault.address)
            copy_pattern(uffd, fault)

    async with session(policy=policy) as (child, server):
        await child.call(op="read", addr=child.page(0))
        await child.call(op="madvise", addr=child.page(0), n=2)
        _, remove = await server.next(Remove)
        assert remove == Remove(child.page(0), child.page(2))
        assert (await child.call(op="read", addr=child.page(0)))["sha"] == [ZERO_SHA]
        assert server.faults() == [child.page(0), child.page(0)]


@pytest.mark.asyncio
async def test_unmap_event() -> None:
    async with session() as (child, server):
        await child.call(op="munmap", addr=child.page(2), n=3)
        _, unmap = await server.next(Unmap)
        assert unmap == Unmap(child.page(2), child.page(5))


@pytest.mark.asyncio
async def test_remap_event_and_faults_at_the_new_address() -> None:
    async with session() as (child, server):
        await child.call(op="read", addr=child.page(0))
        new = (await child.call(op="mremap", addr=child.page(0), n=2))["addr"]
        _, remap = await server.next(Remap)
        assert remap == Remap(from_=child.page(0), to=new, length=2 * P)
        reply = await child.call(op="read", addr=new, n=2)
        # page 0 moved with its content; page 1 faults at its new address
        assert reply["sha"] == [sha(pattern(child.page(0))), sha(pattern(new + P))]
        assert server.faults() == [child.page(0), new + P]


@pytest.mark.asyncio
async def test_ioctls_say_eagain_while_an_event_is_unread() -> None:
    async with session(serve=False) as (child, _):
        uffd = child.uffd
        await child.send(op="madvise", addr=child.page(1), n=1)  # blocks until read
        await wait_fd(uffd.fd)
        calls: list[Callable[[], object]] = [
            lambda: uffd.zeropage(child.page(0), P),
            lambda: uffd.copy(child.page(0), pattern(0)),
        ]
        for call in calls:
            with pytest.raises(UffdError) as info:
                call()
            assert info.value.errno == errno.EAGAIN and info.value.recoverable
        assert uffd.read_events() == [Remove(child.page(1), child.page(2))]
        await child.recv()  # madvise returned: the mm is no longer "changing"
        assert uffd.zeropage(child.page(0), P) == P
        assert (await child.call(op="read", addr=child.page(0)))["sha"] == [ZERO_SHA]


@pytest.mark.asyncio
async def test_concurrent_faults_from_threads_with_thread_ids() -> None:
    n = 4
    features = DEFAULT_FEATURES | Feature.THREAD_ID
    async with session(serve=False, features=features) as (child, _):
        await child.send(op="read_threads", addr=child.addr, n=n)
        faults: list[Pagefault] = []
        while len(faults) < n:  # all n threads wait at once: nothing is served yet
            for event in await uffd_events(child.uffd):
                assert isinstance(event, Pagefault)
                faults.append(event)
        assert sorted(f.address for f in faults) == [child.page(i) for i in range(n)]
        data = b"".join(pattern(child.page(i)) for i in range(n))
        assert child.uffd.copy(child.addr, data) == n * P  # one copy wakes all four
        reply = await child.recv()
        assert reply["sha"] == [sha(pattern(child.page(i))) for i in range(n)]
        by_page = {(f.address - child.addr) // P: f.ptid for f in faults}
        assert [by_page[i] for i in range(n)] == reply["tids"]


# ----------------------------------------------------------------------------- process exit


@pytest.mark.asyncio
async def test_calls_after_the_process_exited_say_process_gone() -> None:
    async with session() as (child, _):
        await child.call(op="read", addr=child.page(0))
        await child.exit()
        uffd = child.uffd
        gone: dict[str, Callable[[], object]] = {
            "copy": lambda: uffd.copy(child.page(1), pattern(0)),
            "zeropage": lambda: uffd.zeropage(child.page(2), P),
            "unregister": lambda: uffd.unregister(child.addr, P),
            "register": lambda: uffd.register(child.addr, P),
        }
        for name, call in gone.items():
            with pytest.raises(UffdError) as info:
                call()
            assert info.value.process_gone, (name, info.value)
            assert not info.value.recoverable
            assert info.value.pid == child.pid
        assert uffd.read_events() == []
