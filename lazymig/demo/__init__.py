"""``lazymig demo``: a live process migrated lazily on loopback, the seed workflow.

1. A process fills a data region with a known pattern, prints its CRC-32,
   then ticks every 2 ms while it checks the region again, 1 MiB a tick
   (:mod:`lazymig.demo.workload`).
2. :func:`lazymig.migrate` does the rest through the orchestrator API: it
   freezes the process, writes its images and serves its lazy pages over TCP
   on 127.0.0.1 (``lazymig dump --lazy-pages``), runs a lazy-pages daemon
   connected to that page server (``lazymig lazy-pages --page-server``) and
   restores the process from the images (``lazymig restore --lazy-pages``): it
   runs at once (under its pid, in a pid namespace of its own: the source holds
   it meanwhile) while its memory arrives on demand and in the background,
   shown as a progress bar.
3. The restored process must print the source's CRC; once every page is in,
   the page server's transfer is complete and the source is killed.

The downtime is measured as ``benchmarks/downtime.py`` measures it: from the
dump's start until the restored process's first output (its first tick), seen
as it comes. Guest memory is touched first, as the benchmarks do: on a VM the
first use of memory the host has not backed yet costs several times the copy
itself. lazymig is imported before the clock, as an orchestrator has it; the
three CLI commands, each a fresh process, add their interpreter start-ups
(the benchmark measures both ways).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from lazymig.demo.region import PAGE
from lazymig.errors import LazyMigError
from lazymig.linux.vm import AnonMapping
from lazymig.orchestrate import MigrationResult, TransferProgress, migrate
from lazymig.proto.wire import WireVersion

__all__ = ["DEMO_ADDRESS", "DemoResult", "format_result", "run_demo"]

DEMO_ADDRESS = 0x6E0000000000
"""Where the region lives (far from where Linux puts mappings)."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo measured."""

    size_mib: int
    source_crc: str
    restored_crc: str
    migration: MigrationResult
    downtime: float
    """Seconds from the dump's start until the restored process's first output."""
    warmed: bool
    """Guest memory was touched first (:func:`warm_memory`)."""

    @property
    def ok(self) -> bool:
        return self.source_crc == self.restored_crc and self.migration.transfer.ok


async def _read_word(stream: IO[str], prefix: str) -> str:
    """The word after ``prefix`` on the next line starting with it, read off the loop."""
    async with asyncio.timeout(60):
        while True:
            line = await asyncio.to_thread(stream.readline)
            if not line:
                raise EOFError(f"the demo process closed its output before {prefix}")
            if line.startswith(prefix):
                return line.split()[1]


@dataclass
class _Output:
    """What the restored process printed, as a thread reads it."""

    first_at: float | None = None
    """CLOCK_MONOTONIC when its first line came."""
    checks: list[str] = field(default_factory=list)


def _watch(stream: IO[str], out: _Output, checks: int) -> None:
    """Read ``stream`` until ``checks`` CHECK lines or EOF (in a thread: the first line's
    time must not wait for the loop)."""
    for line in stream:
        if out.first_at is None:
            out.first_at = time.monotonic()
        if line.startswith("CHECK"):
            out.checks.append(line.split()[1])
            if len(out.checks) == checks:
                return


def warm_memory(size: int) -> None:
    """Touch and free ``size`` bytes, as the benchmarks do before each run
    (benchmarks/machine.py), so that the demo measures the same thing."""
    with AnonMapping(size, populate=True):
        pass


async def run_demo(size_mib: int = 256, *, wire: WireVersion = WireVersion.V2,
                   workdir: str | None = None, warm: bool = True,
                   on_progress: Callable[[TransferProgress], None] | None = None) -> DemoResult:
    """Run the demo once and return its measurements (see the module docstring).

    ``on_progress`` gets a snapshot of the transfer every 50 ms and a last one.
    ``warm=False`` leaves guest memory as it is: on a VM whose host has not backed
    it yet (a fresh one; or one that reports free pages back), the demo then also
    measures the host's first touch of every page it allocates.
    """
    pages = size_mib * (1 << 20) // PAGE
    if warm:
        await asyncio.to_thread(warm_memory, 3 * pages * PAGE)
    with tempfile.TemporaryDirectory(prefix="lazymig-demo-", dir=workdir) as tmp:
        # Not an asyncio subprocess: the loop's child watcher would reap the ptrace
        # stops the freezer waits for.
        source = subprocess.Popen(  # noqa: ASYNC220 (fork+exec, does not wait)
            [sys.executable, "-m", "lazymig.demo.workload", hex(DEMO_ADDRESS), str(pages)],
            stdout=subprocess.PIPE, text=True)
        out_r, out_w = os.pipe()
        restored_out = os.fdopen(out_r, "r")
        devnull = os.open(os.devnull, os.O_RDONLY)
        migration = None
        output = _Output()
        # The second CHECK is of a pass the restored process made all by itself.
        watching = asyncio.create_task(asyncio.to_thread(_watch, restored_out, output, 2))
        try:
            assert source.stdout is not None
            source_crc = await _read_word(source.stdout, "READY")
            started = time.monotonic()
            async with migrate(source.pid, images_dir=tmp, wire=wire,
                               stdio=(devnull, out_w, 2)) as migration:
                os.close(out_w)
                out_w = -1
                async for snapshot in migration.progress(interval=0.05):
                    if on_progress is not None:
                        on_progress(snapshot)
            result = await migration.done
            async with asyncio.timeout(60):
                await watching
            if output.first_at is None or len(output.checks) < 2:
                raise EOFError("the restored demo process closed its output before its "
                               "second CHECK")
        finally:
            if out_w >= 0:
                os.close(out_w)
            if migration is not None:
                with contextlib.suppress(LazyMigError):  # it may not have been restored
                    await migration.process.kill()
            with contextlib.suppress(Exception):  # its error, if any, is raised already
                await watching  # EOF now: every writer is gone
            restored_out.close()
            os.close(devnull)
            source.kill()
            source.wait()
    return DemoResult(size_mib, source_crc, output.checks[-1], result,
                      downtime=output.first_at - started, warmed=warm)


def format_result(result: DemoResult) -> str:
    """A short human report of a demo run."""
    m = result.migration
    progress = m.progress
    rest = m.downtime - m.dump.frozen_seconds - m.restored.seconds
    lines = [
        f"lazymig demo: pid {m.dump.pid} migrated lazily over 127.0.0.1 "
        f"(a {result.size_mib} MiB data region among its memory) to pid {m.restored.pid}",
        f"  source checksum     {result.source_crc}",
        f"  restored checksum   {result.restored_crc}  "
        f"({'match' if result.ok else 'MISMATCH'})",
        f"  downtime {result.downtime:.3f} s, from the dump's start until the restored process "
        "printed again",
        f"    = dump {m.dump.frozen_seconds:.3f} s (frozen until the page server listened) + "
        f"daemon start and checks {rest:.3f} s + "
        f"restore {m.restored.seconds:.3f} s + {result.downtime - m.downtime:.3f} s to its "
        "first output",
        "    as benchmarks/downtime.py measures it; lazymig's API in this process, imported "
        "before the clock (the CLI's three commands add a Python start-up each)",
        f"  {m.restored.nonlazy_pages} pages restored from the images, "
        f"{m.restored.lazy_pages} lazy pages served over TCP "
        f"({m.dump.pages_sent} sent); source {m.dump.source.value}",
        f"  {progress.pages_on_demand} pages on demand ({progress.faults} faults, round trip "
        f"p50 {_us(progress.fault_p50)}, p99 {_us(progress.fault_p99)}), "
        f"{progress.pages_background} in the background; "
        f"{progress.bytes_per_second / 1e9:.2f} GB/s",
        f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (numbers move with "
        "it); " + (f"guest memory touched first ({3 * result.size_mib} MiB), as the benchmarks "
                   "do" if result.warmed else "guest memory not touched first (--cold)"),
    ]
    return "\n".join(lines)


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f} us"
