"""``lazymig demo``: a live process migrated lazily on loopback, the seed workflow.

1. A process fills a data region with a known pattern and prints its CRC-32
   every half second (:mod:`lazymig.demo.workload`).
2. :class:`~lazymig.dump.LazyDump` freezes it, writes its images and serves
   its lazy pages from page pipes over TCP on 127.0.0.1 (``lazymig dump
   --lazy-pages``).
3. A :class:`~lazymig.uffd.LazyPagesDaemon` connects to that page server
   (``lazymig lazy-pages --page-server``) and
   :func:`~lazymig.restore.restore` rebuilds the process from the images
   (``lazymig restore --lazy-pages``): it runs at once under a new pid while
   its memory arrives on demand and in the background.
4. The restored process must print the source's CRC; once every page is in,
   the page server's transfer is complete and the source is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from lazymig.demo.region import PAGE
from lazymig.dump.dumper import DumpResult, LazyDump
from lazymig.proto.wire import WireVersion
from lazymig.restore import RestoreResult, restore
from lazymig.uffd.daemon import DaemonReport, LazyPagesDaemon
from lazymig.uffd.source import RemotePageSource

__all__ = ["DEMO_ADDRESS", "DemoResult", "format_result", "run_demo"]

DEMO_ADDRESS = 0x6E0000000000
"""Where the region lives (far from where Linux puts mappings)."""


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo measured."""

    size_mib: int
    source_crc: str
    restored_crc: str
    dump: DumpResult
    restored: RestoreResult
    downtime: float
    """From the freeze until the restored process runs."""
    daemon: DaemonReport

    @property
    def ok(self) -> bool:
        return self.source_crc == self.restored_crc and self.daemon.ok


async def _read_line(stream: object, prefix: str) -> str:
    """The next line starting with ``prefix`` from a text pipe, read off the loop."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(60):
        while True:
            line: str = await loop.run_in_executor(None, stream.readline)  # type: ignore[attr-defined]
            if not line:
                raise RuntimeError(f"the demo process closed its output before {prefix}")
            if line.startswith(prefix):
                return line.split()[1]


async def run_demo(size_mib: int = 64, *, wire: WireVersion = WireVersion.V2,
                   workdir: str | None = None) -> DemoResult:
    """Run the demo once and return its measurements (see the module docstring)."""
    pages = size_mib * (1 << 20) // PAGE
    with tempfile.TemporaryDirectory(prefix="lazymig-demo-", dir=workdir) as tmp:
        # Not an asyncio subprocess: the loop's child watcher would reap the ptrace
        # stops the freezer waits for.
        source = subprocess.Popen(  # noqa: ASYNC220 (fork+exec, does not wait)
            [sys.executable, "-m", "lazymig.demo.workload", hex(DEMO_ADDRESS), str(pages)],
            stdout=subprocess.PIPE, text=True)
        out_r, out_w = os.pipe()
        restored_out = os.fdopen(out_r, "r")
        restored: RestoreResult | None = None
        try:
            source_crc = await _read_line(source.stdout, "READY")
            frozen_at = time.monotonic()
            async with LazyDump(source.pid, tmp, address="127.0.0.1", port=0, wire=wire,
                                progress_interval=None) as dump:
                pages_source = await RemotePageSource.connect("127.0.0.1", dump.port,
                                                              wire=wire)
                daemon = LazyPagesDaemon.from_images(pages_source, tmp)
                async with asyncio.TaskGroup() as tg:
                    serving = tg.create_task(dump.serve())
                    running = tg.create_task(daemon.run())
                    await daemon.ready.wait()
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    try:
                        restored = await restore(tmp, lazy_pages=True,
                                                 stdio=(devnull, out_w, 2))
                    finally:
                        os.close(devnull)
                    downtime = time.monotonic() - frozen_at
                    restored_crc = await _read_line(restored_out, "CHECK")
            dumped, report = serving.result(), running.result()
        finally:
            os.close(out_w)
            restored_out.close()
            if restored is not None:
                _kill(restored.pid)
            source.kill()
            source.wait()
    return DemoResult(size_mib, source_crc, restored_crc, dumped, restored, downtime, report)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def format_result(result: DemoResult) -> str:
    """A short human report of a demo run."""
    proc = result.daemon.processes[0] if result.daemon.processes else None
    lat = result.daemon.fault_latencies()
    p50 = lat[len(lat) // 2] * 1e6 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6 if lat else 0.0
    lines = [
        f"lazymig demo: pid {result.dump.pid} migrated lazily over 127.0.0.1 "
        f"(a {result.size_mib} MiB data region among its memory) to pid "
        f"{result.restored.pid}",
        f"  source checksum     {result.source_crc}",
        f"  restored checksum   {result.restored_crc}  "
        f"({'match' if result.ok else 'MISMATCH'})",
        f"  downtime {result.downtime:.3f} s (frozen until the page server listened "
        f"{result.dump.frozen_seconds:.3f} s, restore {result.restored.seconds:.3f} s)",
        f"  {result.restored.nonlazy_pages} pages restored from the images, "
        f"{result.restored.lazy_pages} lazy pages served over TCP "
        f"({result.dump.pages_sent} sent); source {result.dump.source.value}",
    ]
    if proc is not None:
        lines.append(f"  faults {proc.faults} (round trip p50 {p50:.0f} us, p99 {p99:.0f} us), "
                     f"the rest in the background at {result.daemon.throughput() / 1e9:.2f} GB/s")
    return "\n".join(lines)
