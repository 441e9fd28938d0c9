"""Lazy page pipes filled after the page server listens, on real processes.

A GET that arrives before its pipe is filled waits for it and has it filled
first; a fill that fails aborts the dump and leaves the source stopped with
its memory intact. Checked against the workload's known pattern, through the
real page server and test_page_server's independent client.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dump_images import c_workload, proc_state, runs_unchanged
from test_page_server import MiniClient

from lazymig.dump import LazyDump
from lazymig.dump.freeze import FrozenProcess
from lazymig.dump.late_fill import LateFill
from lazymig.dump.server import PageServer
from lazymig.dump.store import PipePageStore
from lazymig.errors import LazyMigOSError
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.wire import WireVersion
from lazymig.testing.workload import Workload, expected_page

MiB = 1 << 20

__all__ = ["c_workload"]  # the fixture, shared with test_dump_images

pytestmark = [pytest.mark.root, pytest.mark.skipif(
    os.geteuid() != 0, reason="ptrace of arbitrary processes needs root")]


@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "16", "--interval-ms", "50"]) as w:
        yield w


@pytest.mark.asyncio
async def test_a_get_before_its_pipe_is_filled_waits_and_is_filled_first(
        workload: Workload) -> None:
    ready = workload.ready
    last = ready.addr + ready.size - PAGE_SIZE
    async with await FrozenProcess.freeze(workload.pid) as fp:
        scan = await fp.scan()
        pipes = await fp.collect_pages(scan, pipe_size=MiB, defer_lazy=True)
        late = LateFill(pipes, batch_bytes=MiB)  # one pipe per batch
        store = PipePageStore(workload.pid, pipes, late)
        try:
            assert len(pipes.unfilled(lazy=True)) >= 16  # nothing lazy is filled yet
            async with PageServer(store, address="127.0.0.1", port=0) as server:
                serving = asyncio.create_task(server.serve())
                client = await MiniClient.connect(server.port, WireVersion.V2)
                getting = asyncio.create_task(client.get(workload.pid, last, 1))
                for _ in range(10_000):  # until the server got the GET and waits for the pipe
                    if late.waiting:
                        break
                    await asyncio.sleep(0.001)
                else:
                    pytest.fail("the GET never reached the page server")
                assert not getting.done() and late.fill_order == ()
                filling = asyncio.create_task(late.run(fp))
                got, data = await getting
                assert (got, data) == (1, expected_page(last, ready.seed))
                await filling
                assert late.complete and late.hurried == 1
                # The pipe the GET waited for went first, then the fill went on in order.
                order = late.fill_order
                assert order[0] == max(order) and sorted(order) == list(range(len(order)))
                # Every other page is served from the pipes filled afterwards.
                for vaddr in (ready.addr, ready.addr + ready.size // 2):
                    got, data = await client.get(workload.pid, vaddr, 4)
                    assert data == b"".join(expected_page(vaddr + i * PAGE_SIZE, ready.seed)
                                            for i in range(got))
                client.writer.close()
                serving.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await serving
        finally:
            store.close()
    workload.drain()
    assert workload.next_check().bad == 0


@pytest.mark.asyncio
async def test_a_failed_fill_aborts_and_leaves_the_source_stopped_and_intact(
        tmp_path: Path, workload: Workload, caplog: pytest.LogCaptureFixture) -> None:
    before = workload.next_check()
    ready = workload.ready
    lazy_dump = LazyDump(workload.pid, tmp_path, address="127.0.0.1", port=0, pipe_size=MiB)
    await lazy_dump.start()
    # The late fill has not run yet (no await since start() created it). Leave it
    # fds for its set-up and a few pipes, not for the 16 it needs: pipe2 fails
    # with EMFILE, a real failure in the middle of the fill.
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = sum(1 for _ in os.scandir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 12, limits[1]))
    try:
        with pytest.raises(LazyMigOSError) as failed:
            await lazy_dump.serve()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    assert failed.value.errno == errno.EMFILE and "page pipe" in str(failed.value)
    assert proc_state(workload.pid) == ("T", 0)
    assert f"pid {workload.pid} left stopped with its memory intact" in caplog.text
    assert read_memory(workload.pid, ready.addr + ready.size - PAGE_SIZE, PAGE_SIZE) == \
        expected_page(ready.addr + ready.size - PAGE_SIZE, ready.seed)
    with pytest.raises(OSError):  # nobody serves it any more
        await MiniClient.connect(lazy_dump.port, WireVersion.V2)
    os.kill(workload.pid, signal.SIGCONT)
    runs_unchanged(workload, before.sum)
