"""The lazy-pages daemon end to end: real uffds in child processes, a real page server
over TCP, the CRIU handshake over a real UNIX socket.

Each child (tests/lazy_child.py) maps memory at the dump's addresses, attaches it
to the daemon and checks every byte it reads against the dump's pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import PAGES, Child, finish, layout, run_daemon, spawn, stop
from lazydump import page_pattern, write_lazy_dump
from reliability import Recorder

from lazymig.dump.server import PageServer
from lazymig.linux.uffd import buffer_address
from lazymig.proto.handover import RestoreFinished, TaskHandover
from lazymig.proto.images import ImagesDir
from lazymig.uffd.daemon import DaemonReport, LazyPagesDaemon
from lazymig.uffd.handover import HandoverSession
from lazymig.uffd.source import LocalPageSource, PageChunk, PageSink, RemotePageSource
from lazymig.uffd.uffd import DEFAULT_FEATURES, Uffd


@dataclass
class Setup:
    images_dir: Path
    dump: dict[int, list[tuple[int, int]]]
    server: PageServer | None
    socket_path: Path


@pytest.mark.asyncio
@pytest.mark.parametrize("scenario", ["touch", "zero", "fork", "remove", "unmap", "remap"])
async def test_one_process(page_server: tuple[Path, PageServer], scenario: str) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        # Without background fetch or prefetch every page arrives through its own
        # fault, so the memory map changes below happen while pages are still lazy.
        daemon, running = await run_daemon(images_dir, source, fault_prefetch=1,
                                           background=scenario == "touch")
        (pid, [(vaddr, nr)]), *_ = layout(1).items()
        child = await spawn(daemon.socket_path, pid, vaddr, nr, scenario)
        code, out = await finish(child)
        assert code == 0, out
        report = await running
        await stop(serving)
    assert report.ok, report
    assert "MISMATCH" not in out
    processes = {p.state for p in report.processes}
    assert processes <= {"complete", "exited"}
    if scenario == "fork":
        assert len(report.processes) == 2  # the child's uffd came with the FORK event
    if scenario == "zero":
        assert report.processes[0].zero_pages == 16


@pytest.mark.asyncio
@pytest.mark.parametrize("scenario", ["sequential", "touch"])
async def test_faults_prefetch_only_for_a_sequential_reader(
        page_server: tuple[Path, PageServer], scenario: str) -> None:
    """Readahead: a fault close behind the previous one fetches its 16-page block, an
    isolated fault its own page only."""
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source, fault_prefetch=16,
                                           background=False)
        (pid, [(vaddr, nr)]), *_ = layout(1).items()
        code, out = await finish(await spawn(daemon.socket_path, pid, vaddr, nr, scenario))
        assert code == 0, out
        report = await running
        await stop(serving)
    assert report.ok, report
    [proc] = report.processes
    assert proc.pages_on_demand == proc.pages_copied == nr  # every page came with a fault
    assert proc.faults_behind_background == 0  # no background: nothing ahead of a fault
    if scenario == "sequential":
        # Page 0 alone (nothing before it), page 1 with the rest of block 0, then one
        # fault per block, each right behind the previous one.
        assert (proc.faults, proc.prefetched_faults) == (nr // 16 + 1, nr // 16)
    else:  # random order: many faults far from the previous one got a page each
        isolated = proc.faults - proc.prefetched_faults
        assert isolated > 0
        assert proc.pages_on_demand <= isolated + 16 * proc.prefetched_faults


@pytest.mark.asyncio
async def test_many_processes_at_once(page_server: tuple[Path, PageServer]) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(60):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port, channels=2)
        daemon, running = await run_daemon(images_dir, source, expect_tasks=32)
        children = [await spawn(daemon.socket_path, pid, vaddr, nr, "touch")
                    for pid, [(vaddr, nr)] in layout(32).items()]
        results = await asyncio.gather(*(finish(c) for c in children))
        report = await running
        # every lazy page was served once, and the daemon closed the session cleanly
        assert await serving is True
    assert all(code == 0 for code, _ in results), results
    assert report.ok
    assert len(report.processes) == 32
    assert sum(p.pages_copied for p in report.processes) == 32 * PAGES


@pytest.mark.asyncio
async def test_background_fetch_fills_everything_without_faults(
        page_server: tuple[Path, PageServer]) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source)
        (pid, [(vaddr, nr)]), *_ = layout(1).items()
        child = await spawn(daemon.socket_path, pid, vaddr, nr, "wait")
        assert child.stdout is not None
        assert await child.stdout.readline() == b"attached\n"
        report = await running  # complete before the child touched anything
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        code, out = await finish(child)
        await stop(serving)
    assert code == 0, out
    assert report.ok
    assert report.processes[0].faults == 0
    assert report.processes[0].pages_copied == PAGES


@pytest.mark.asyncio
async def test_local_images_source(tmp_path: Path) -> None:
    write_lazy_dump(tmp_path, layout(2))
    async with asyncio.timeout(30):
        daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                           expect_tasks=2)
        children = [await spawn(daemon.socket_path, pid, vaddr, nr, "touch")
                    for pid, [(vaddr, nr)] in layout(2).items()]
        results = [await finish(c) for c in children]
        report = await running
    assert all(code == 0 for code, _ in results), results
    assert report.ok


@pytest.mark.asyncio
async def test_process_exit_mid_transfer_retires_only_that_process(
        page_server: tuple[Path, PageServer]) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source, expect_tasks=2,
                                           background=False)
        (pid1, [(v1, n1)]), (pid2, [(v2, n2)]) = list(layout(2).items())
        quitter = await spawn(daemon.socket_path, pid1, v1, n1, "exit-early")
        worker = await spawn(daemon.socket_path, pid2, v2, n2, "touch")
        assert (await finish(quitter))[0] == 0
        code, out = await finish(worker)
        assert code == 0, out
        # Without background fetch the quitter's pages stay lazy: the daemon must notice
        # its exit by itself (its faulting thread is gone) and finish.
        report = await running
        await stop(serving)
    states = {p.pid: p.state for p in report.processes}
    assert states == {pid1: "exited", pid2: "complete"}


async def slow_child_mid_transfer(images_dir: Path, server: PageServer,
                                  scenario: str = "slow") -> tuple[
        asyncio.Task[bool], LazyPagesDaemon, asyncio.Task[DaemonReport],
        asyncio.subprocess.Process]:
    """A page server, a daemon fetching on faults only, and a child touching one page
    every 5 ms, returned once some of its pages have arrived."""
    serving = asyncio.create_task(server.serve())
    source = await RemotePageSource.connect("127.0.0.1", server.port)
    daemon, running = await run_daemon(images_dir, source, background=False)
    (pid, [(vaddr, nr)]), *_ = layout(1).items()
    child = await spawn(daemon.socket_path, pid, vaddr, nr, scenario)
    assert child.stdout is not None
    assert await child.stdout.readline() == b"attached\n"
    await child.stdout.readline()  # some pages have arrived
    return serving, daemon, running, child


@pytest.mark.asyncio
async def test_server_death_kills_instead_of_zero_filling(
        page_server: tuple[Path, PageServer], reliability: Recorder) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving, _, running, child = await slow_child_mid_transfer(images_dir, server)
        serving.cancel()  # the page server dies mid-transfer, its connections with it
        server.close()
        code, out = await finish(child)
        report = await running
    assert code == -signal.SIGKILL, out
    assert "MISMATCH" not in out
    assert not report.ok
    assert report.processes[0].state == "killed"
    assert report.processes[0].pages_copied < PAGES
    reliability.record(
        "Faults injected", "page server killed mid-transfer",
        tried=f"the page server stopped after {report.processes[0].pages_copied} of {PAGES} "
              "pages reached an attach() child",
        held="the child was killed (its faulting thread known), never read a zero page")


READER = """
import ctypes, sys
from lazymig.linux.vm import process_vm_readv
buf = ctypes.create_string_buffer(4096)  # process_vm_readv faults (a /proc/PID/mem read: EIO)
assert process_vm_readv(int(sys.argv[1]), ctypes.addressof(buf), int(sys.argv[2], 16), 4096) == 4096
print("read", flush=True)
sys.stdin.read()  # stays alive until the test lets it go
"""


@pytest.mark.asyncio
async def test_server_death_kills_a_process_whose_threads_are_unknown(
        page_server: tuple[Path, PageServer], reliability: Recorder) -> None:
    """CRIU's uffds carry no thread ids: the daemon names the process from its
    userfaultfd-registered mappings when the restore finished, and kills it when
    pages can never arrive, instead of holding it or letting it read zeros."""
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving, _, running, child = await slow_child_mid_transfer(
            images_dir, server, "slow-anonymous")
        serving.cancel()
        server.close()
        code, out = await finish(child)
        report = await running
    assert code == -signal.SIGKILL, out
    assert "MISMATCH" not in out
    assert [(p.state, p.host_pid) for p in report.processes] == [("killed", child.pid)]
    reliability.record(
        "Faults injected", "page server killed, process without thread ids (as criu restore)",
        tried="the page server stopped mid-transfer under a process whose uffd carries no "
              "thread ids",
        held="the daemon had named the process (smaps VmFlags um, NSpid) and killed it: "
             "it never read a zero page")


@pytest.mark.asyncio
async def test_a_reader_of_its_memory_is_not_killed_with_it(
        page_server: tuple[Path, PageServer]) -> None:
    """Another process reading a restored process's lazy pages (a debugger, a memory
    check) faults on them with its own thread id; when the transfer fails, only the
    restored process is killed."""
    images_dir, server = page_server
    (_, [(vaddr, nr)]), *_ = layout(1).items()
    async with asyncio.timeout(30):
        serving, _, running, child = await slow_child_mid_transfer(images_dir, server)
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-c", READER, str(child.pid), hex(vaddr + (nr - 1) * 4096),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert reader.stdin is not None and reader.stdout is not None
        assert await reader.stdout.readline() == b"read\n"  # a fault the daemon served
        serving.cancel()
        server.close()
        code, out = await finish(child)
        report = await running
        assert reader.returncode is None  # still alive
        reader.stdin.close()
        assert await reader.wait() == 0
    assert code == -signal.SIGKILL, out
    assert report.processes[0].state == "killed"


@pytest.mark.asyncio
async def test_a_failed_restore_ends_the_daemon_and_keeps_the_source(
        page_server: tuple[Path, PageServer]) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source)
        (pid, _), *_ = layout(1).items()
        # A restorer hands over one process, then dies before "restore finished".
        with Uffd.open() as uffd, await HandoverSession.connect(daemon.socket_path) as restorer:
            await restorer.send(TaskHandover(pid, uffd.fd))
        report = await running
        await asyncio.sleep(0.1)  # the page server sees the reset
        assert not serving.done()  # not a finished transfer: the source is kept
        await stop(serving)
    assert not report.ok
    assert report.restore_error is not None
    assert [p.state for p in report.processes] == ["abandoned"]
    assert not server.complete


@pytest.mark.asyncio
async def test_restorers_of_other_users_are_refused(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    write_lazy_dump(tmp_path, layout(1))
    async with asyncio.timeout(10):
        # Only uid 4242 may hand over processes: this test (root) may not.
        daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                           allowed_uids=[4242])
        assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX) as restorer:
            restorer.setblocking(False)
            await loop.sock_connect(restorer, str(daemon.socket_path))
            assert await loop.sock_recv(restorer, 1) == b""  # closed on us
        await stop(running)
    assert f"refused a restorer connection from pid {os.getpid()}, uid 0" in caplog.text
    assert daemon.report.processes == []


@pytest.mark.asyncio
async def test_a_cancelled_daemon_kills_what_it_leaves_unfinished(
        page_server: tuple[Path, PageServer]) -> None:
    images_dir, server = page_server
    async with asyncio.timeout(30):
        serving, daemon, running, child = await slow_child_mid_transfer(images_dir, server)
        await stop(running)  # the daemon is stopped mid-transfer
        code, out = await finish(child)
        await asyncio.sleep(0.1)
        assert not serving.done()  # a reset, not a finished transfer: the source is kept
        await stop(serving)
    assert code == -signal.SIGKILL, out
    assert "MISMATCH" not in out
    assert daemon.report.processes[0].state == "killed"


@pytest.mark.asyncio
async def test_a_stopped_daemon_holds_a_process_it_cannot_name_until_it_exits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its image's lazy ranges reach beyond every registered mapping of the process (so
    no process fits them), and its uffd has no thread ids: stopped, the daemon cannot
    kill it, so it keeps holding its uffd (a missing page traps: here it is still
    served, never zeros), says what to do, and ends once the process is gone."""
    async with asyncio.timeout(60):
        child = await Child.start(16, int(DEFAULT_FEATURES))
        try:
            pid = 4321
            write_lazy_dump(tmp_path, {pid: [(0x10000000, 1), (child.addr, child.npages)]})
            daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                               background=False)
            with await HandoverSession.connect(daemon.socket_path) as conn:
                await conn.send(TaskHandover(pid, child.uffd.fd))
                await conn.send(RestoreFinished())
                child.uffd.close()
                await child.call(op="read", addr=child.addr, n=1)  # the daemon serves
                for _ in range(1000):  # named (or not) once the restore finished
                    if "could not be identified" in caplog.text:
                        break
                    await asyncio.sleep(0.01)
                running.cancel()
                await asyncio.sleep(1.5)
                assert not running.done()  # held: it does not end
                assert "Kill it yourself" in caplog.text
                page = child.addr + 5 * 4096
                read = await child.call(op="read", addr=page, n=1)
                assert read["sha"] == [hashlib.sha256(page_pattern(pid, page)).hexdigest()]
                await child.stop()
                with pytest.raises(asyncio.CancelledError):
                    await running
        finally:
            await child.stop()
    assert [p.state for p in daemon.report.processes] == ["exited"]


class HeldSource:
    """A page source the test answers by hand, with the dump's pattern: the test picks
    the moment each reply's UFFDIO_COPY happens."""

    def __init__(self) -> None:
        self.asked: asyncio.Queue[tuple[int, int, int, PageSink, bool]] = asyncio.Queue()

    def fetch(self, pid: int, vaddr: int, nr_pages: int, sink: PageSink, *,
              urgent: bool = False) -> None:
        self.asked.put_nowait((pid, vaddr, nr_pages, sink, urgent))

    @staticmethod
    def answer(pid: int, vaddr: int, nr_pages: int, sink: PageSink, urgent: bool) -> None:
        data = bytearray(b"".join(page_pattern(pid, vaddr + i * 4096) for i in range(nr_pages)))
        with buffer_address(data) as (address, _):
            sink.pages_arrived(vaddr, nr_pages, nr_pages, address, urgent)

    async def get(self, pid: int, vaddr: int, nr_pages: int, *, urgent: bool = False
                  ) -> PageChunk:
        raise AssertionError("the daemon fetches")

    def poll(self, budget: float) -> bool:
        return False  # the test answers when it decides

    async def aclose(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.asyncio
async def test_a_copy_refused_while_the_map_changes_is_fetched_again(tmp_path: Path) -> None:
    """With the background off, a fault whose UFFDIO_COPY fails with EAGAIN (a REMOVE
    event is unread) is not left waiting: its thread is woken, faults again, and that
    fault fetches the page again."""
    dump = layout(1, 16)
    write_lazy_dump(tmp_path, dump)
    source = HeldSource()
    async with asyncio.timeout(30):
        daemon, running = await run_daemon(tmp_path, source, fault_prefetch=1,
                                           background=False)
        (pid, [(vaddr, nr)]), = dump.items()
        child = await spawn(daemon.socket_path, pid, vaddr, nr, "eagain")
        first = await source.asked.get()  # the child's thread faulted on its first page
        assert first[1] == vaddr
        proc = daemon._processes[0]
        assert child.stdin is not None
        child.stdin.write(b"go\n")  # its main thread then raises a REMOVE event
        await child.stdin.drain()
        # Blocking the loop on purpose: the daemon must not read the event before the copy.
        readable, _, _ = select.select([proc.uffd.fd], [], [], 10)
        assert readable, "no REMOVE event came"
        HeldSource.answer(*first)
        assert proc.pages_copied == 0  # EAGAIN: the copy was refused, the page requeued

        async def answer_the_rest() -> None:
            while True:
                HeldSource.answer(*await source.asked.get())

        answering = asyncio.create_task(answer_the_rest())
        code, out = await finish(child)
        await stop(answering)
        report = await running
    assert code == 0, out
    assert "faulted page: matches" in out
    assert report.ok, report
    assert report.processes[0].pages_copied >= 1


@pytest.mark.asyncio
async def test_a_chunk_whose_first_page_is_there_already_is_copied_whole(
        tmp_path: Path) -> None:
    """A background chunk whose first page is present already (a forked child has its
    parent's present pages; a fault's copy can win the race) fails UFFDIO_COPY with
    EEXIST for the whole chunk: the pages after it must still be copied, never left
    for the zero page."""
    async with asyncio.timeout(60):
        child = await Child.start(16, int(DEFAULT_FEATURES))
        try:
            pid = 4321
            write_lazy_dump(tmp_path, {pid: [(child.addr, child.npages)]})
            for i in (0, 8):  # present before the daemon has it: two chunks' first pages
                child.uffd.copy(child.page(i), page_pattern(pid, child.page(i)))
            daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                               background=True)
            with await HandoverSession.connect(daemon.socket_path) as conn:
                await conn.send(TaskHandover(pid, child.uffd.fd))
                await conn.send(RestoreFinished())
                child.uffd.close()
                report = await running
            assert report.ok, report
            for i in range(child.npages):
                read = await child.call(op="read", addr=child.page(i), n=1)
                assert read["sha"] == [hashlib.sha256(page_pattern(pid, child.page(i)))
                                       .hexdigest()], f"page {i} is not what was dumped"
        finally:
            await child.stop()


async def _named(daemon: LazyPagesDaemon, index: int) -> int | None:
    """The host pid the daemon named its ``index``-th process by, once it tried (None: it
    could not, or not within 5 s)."""
    for _ in range(250):
        processes = daemon.report.processes
        if len(processes) > index and processes[index].host_pid is not None:
            return processes[index].host_pid
        await asyncio.sleep(0.02)
    return None


@pytest.mark.asyncio
@pytest.mark.parametrize("forks", ["one_by_one", "back_to_back"])
async def test_forked_children_are_never_taken_for_another_process(
        tmp_path: Path, forks: str) -> None:
    """A process forks two children while its pages are lazy, before its restore
    finished (so before the daemon named it), and exits; the children read their pages
    after it. Each child's uffd must be taken for that child or for no one: never for
    its parent, whose image pid it asks under (the daemon once did so, and the parent's
    exit then closed the child's uffd: the child read zeros), nor for its sibling (two
    searches that ran side by side once gave both uffds the older child)."""
    async with asyncio.timeout(60):
        child = await Child.start(16, int(DEFAULT_FEATURES))
        orphans: list[int] = []
        try:
            pid = child.pid  # the image pid names the parent, as criu restore's do
            write_lazy_dump(tmp_path, {pid: [(child.addr, child.npages)]})
            daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                               background=False, fault_prefetch=1)
            with await HandoverSession.connect(daemon.socket_path) as conn:
                await conn.send(TaskHandover(pid, child.uffd.fd))
                child.uffd.close()
                for k in (1, 2):
                    orphans.append((await child.call(op="fork_orphan", addr=child.addr,
                                                      n=child.npages))["pid"])
                    if forks == "one_by_one":  # the daemon has looked for it
                        await _named(daemon, k)
                for k in (1, 2):  # back to back: both there before either is named
                    await _named(daemon, k)
                await child.exit()  # the children go on without it
                for _ in range(500):  # the daemon saw the parent go
                    if daemon.report.processes[0].state != "running":
                        break
                    await asyncio.sleep(0.02)
                dumped = [hashlib.sha256(page_pattern(pid, child.page(i))).hexdigest()
                          for i in range(child.npages)]
                for _ in orphans:  # each reads its pages once its parent is gone
                    read = await child.recv()
                    assert read["sha"] == dumped, f"forked child {read['pid']} read zeros"
                await conn.send(RestoreFinished())
                report = await running
            assert report.ok, report
            assert [p.state for p in report.processes] == ["exited", "complete", "complete"]
            # Named in the order they were forked, the parent having one thread.
            assert [p.host_pid for p in report.processes[1:]] == orphans, (orphans, pid)
        finally:
            for orphan in orphans:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(orphan, signal.SIGKILL)
            await child.stop()
