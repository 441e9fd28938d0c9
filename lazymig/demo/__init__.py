"""``lazymig demo``: a lazy migration on loopback, from a live process to a new one.

1. A source process fills a data region with a known pattern and prints its
   CRC-32 (:mod:`lazymig.demo.workload`).
2. :class:`~lazymig.dump.LazyDump` freezes it, writes its images and serves its
   lazy pages from page pipes over TCP (127.0.0.1).
3. A :class:`~lazymig.uffd.LazyPagesDaemon` connects to that page server, and a
   destination process (:mod:`lazymig.demo.destination`) maps the same region,
   hands it to the daemon with CRIU's handshake and reads it: the pages come
   on demand and in the background, and the CRC-32 must match.

The destination takes over the data region only (re-creating a whole process
is ``lazymig restore``'s job), so the rest of the source's lazy memory is
never asked for: the demo ends the page server itself and then the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lazymig.demo.region import PAGE
from lazymig.dump.dumper import LazyDump
from lazymig.proto.images import ImagesDir
from lazymig.proto.wire import WireVersion
from lazymig.uffd.daemon import SOCKET_NAME, DaemonReport, LazyPagesDaemon
from lazymig.uffd.source import RemotePageSource

__all__ = ["DEMO_ADDRESS", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)

DEMO_ADDRESS = 0x6E0000000000
"""Where both processes map the region (far from where Linux puts mappings)."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo measured."""

    size_mib: int
    source_crc: str
    destination_crc: str
    frozen_seconds: float
    """From the freeze until the page server listened."""
    read_seconds: float
    """The destination reading its whole region (faults and background)."""
    daemon: DaemonReport

    @property
    def ok(self) -> bool:
        return self.source_crc == self.destination_crc and self.daemon.ok


def _clip(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    clipped = []
    for vaddr, nr in ranges:
        lo, hi = max(vaddr, start), min(vaddr + nr * PAGE, end)
        if lo < hi:
            clipped.append((lo, (hi - lo) // PAGE))
    return clipped


async def _line(proc: asyncio.subprocess.Process, prefix: str) -> list[str]:
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode().split()
    if not line or line[0] != prefix:
        raise RuntimeError(f"demo process {proc.pid} did not say {prefix} (exit {proc.returncode})")
    return line[1:]


async def run_demo(size_mib: int = 64, *, wire: WireVersion = WireVersion.V2,
                   workdir: str | None = None) -> DemoResult:
    """Run the demo once and return its measurements (see the module docstring)."""
    pages = size_mib * (1 << 20) // PAGE
    region = (DEMO_ADDRESS, DEMO_ADDRESS + pages * PAGE)
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="lazymig-demo-", dir=workdir) as tmp:
        # Not an asyncio subprocess: the loop's child watcher would reap the ptrace
        # stops the freezer waits for.
        source = subprocess.Popen(  # noqa: ASYNC220 (fork+exec, does not wait)
            [py, "-m", "lazymig.demo.workload", hex(DEMO_ADDRESS), str(pages)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert source.stdout is not None
            ready = await asyncio.get_running_loop().run_in_executor(
                None, source.stdout.readline)
            if not ready.startswith("READY "):
                raise RuntimeError(f"the demo's source process failed (exit {source.poll()})")
            source_crc = ready.split()[1]
            dump = LazyDump(source.pid, tmp, address="127.0.0.1", port=0, wire=wire,
                            progress_interval=None)
            await dump.start()
            # The demo migrates the region only: the page server's and the dump's notices
            # that the rest of the source was never asked for are expected: muted.
            with _quiet("lazymig.dump.server", "lazymig.dump.dumper"):
                try:
                    report, destination_crc, seconds = await _migrate(
                        dump, source.pid, Path(tmp), region, pages, wire)
                finally:
                    await dump.aclose()
        finally:
            source.kill()
            source.wait()
    assert dump.written is not None
    return DemoResult(size_mib, source_crc, destination_crc,
                      frozen_seconds=dump.frozen_seconds, read_seconds=float(seconds),
                      daemon=report)


async def _migrate(dump: LazyDump, pid: int, images_dir: Path, region: tuple[int, int],
                   pages: int, wire: WireVersion) -> tuple[DaemonReport, str, str]:
    """Daemon + destination against the dump's page server; stop serving at the end."""
    images = ImagesDir(images_dir)
    pages_source = await RemotePageSource.connect("127.0.0.1", dump.port, wire=wire)
    daemon = LazyPagesDaemon(
        pages_source,
        lambda image_pid: _clip(
            [(r.vaddr, r.nr_pages) for r in images.lazy_ranges(image_pid)], *region),
        socket_path=images_dir / SOCKET_NAME, expect_tasks=1)
    async with asyncio.TaskGroup() as tg:
        serving = tg.create_task(dump.serve())
        running = tg.create_task(daemon.run())
        await daemon.ready.wait()
        destination = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lazymig.demo.destination", str(daemon.socket_path),
            str(pid), hex(region[0]), str(pages), stdout=asyncio.subprocess.PIPE)
        destination_crc, seconds = await _line(destination, "CHECKSUM")
        await destination.wait()
        report = await running
        serving.cancel()  # the rest of the source's memory is not migrated
    return report, destination_crc, seconds


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def format_result(result: DemoResult) -> str:
    """A short human report of a demo run."""
    proc = result.daemon.processes[0] if result.daemon.processes else None
    lat = result.daemon.fault_latencies()
    p50 = lat[len(lat) // 2] * 1e6 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6 if lat else 0.0
    lines = [
        f"lazymig demo: {result.size_mib} MiB migrated lazily over 127.0.0.1",
        f"  source checksum        {result.source_crc}",
        f"  destination checksum   {result.destination_crc}  "
        f"({'match' if result.ok else 'MISMATCH'})",
        f"  source frozen until the page server listened: {result.frozen_seconds:.3f} s",
        f"  destination read its whole region in {result.read_seconds:.3f} s",
    ]
    if proc is not None:
        lines.append(f"  pages copied {proc.pages_copied} / {proc.pages_total}, "
                     f"{proc.faults} on demand (fault round trip p50 {p50:.0f} us, "
                     f"p99 {p99:.0f} us), the rest in the background")
    lines.append(f"  daemon throughput {result.daemon.throughput() / 1e9:.2f} GB/s")
    return "\n".join(lines)
