"""Load: 64 processes attached to one daemon at once, all faulting at the same moment.

Every page of every process arrives through a fault (no background fetch), over one
TCP connection to lazymig's page server. Fault latency percentiles go to the
reliability record; they are measured, not asserted (a shared, noisy machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import finish, layout, run_daemon, spawn
from lazydump import write_lazy_dump
from reliability import Recorder

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.uffd.source import RemotePageSource

PROCESSES = 64
PAGES = 256  # 1 MiB each


@pytest_asyncio.fixture
async def server_of_64(tmp_path: Path) -> AsyncIterator[tuple[Path, PageServer]]:
    store = ImagesPageStore(write_lazy_dump(tmp_path, layout(PROCESSES, PAGES)))
    async with PageServer(store, address="127.0.0.1", port=0) as server:
        yield tmp_path, server
    store.close()


@pytest.mark.asyncio
async def test_64_processes_fault_at_once(server_of_64: tuple[Path, PageServer],
                                          reliability: Recorder) -> None:
    images_dir, server = server_of_64
    async with asyncio.timeout(240):
        serving = asyncio.create_task(server.serve())
        source = await RemotePageSource.connect("127.0.0.1", server.port)
        daemon, running = await run_daemon(images_dir, source, expect_tasks=PROCESSES,
                                           background=False)
        children = [await spawn(daemon.socket_path, pid, vaddr, nr, "wait")
                    for pid, [(vaddr, nr)] in layout(PROCESSES, PAGES).items()]
        for child in children:  # all attached, none has touched its memory yet
            assert child.stdout is not None
            assert await child.stdout.readline() == b"attached\n"
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
        results = await asyncio.gather(*(finish(c) for c in children))
        report = await running
        assert await serving is True  # every page served, the session closed cleanly
    bad = [(code, out) for code, out in results if code != 0 or "MISMATCH" in out]
    assert not bad, bad[:3]
    assert report.ok, report
    assert [p.state for p in report.processes] == ["complete"] * PROCESSES
    assert sum(p.pages_copied for p in report.processes) == PROCESSES * PAGES
    latencies = report.fault_latency()
    assert len(latencies) >= PROCESSES * PAGES // daemon.fault_prefetch
    spread = ", ".join(f"{name} {(latencies.percentile(q) or 0.0) * 1e6:.0f} µs"
                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)))
    print(f"\n{len(latencies)} faults from {PROCESSES} processes: {spread}")
    reliability.record(
        "Load", f"{PROCESSES} processes faulting at once on one daemon",
        tried=f"{PROCESSES} attach() children of {PAGES} pages each released together, every "
              f"page through a fault (no background fetch), one TCP connection",
        held=f"all {PROCESSES} complete, every byte checked; {len(latencies)} faults, "
             f"latency {spread} (measured, not asserted)")
