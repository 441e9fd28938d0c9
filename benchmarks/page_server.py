"""The dump side's cost and its page server's throughput, beside the machine's limits.

    .venv/bin/python benchmarks/page_server.py [MiB ...]      (default: 64 1024 4096)

For each size a C workload fills that much memory with a pattern; LazyDump
freezes it, writes its images and starts the page server (timed: the source's
freeze until the server listens); a bare client in another process fetches
every lazy page over loopback and discards it (serving throughput); then CLOSE
ends the transfer and the source. Beside it, in the same run: the machine's
own path (tee from a full pipe, read into a buffer, send into a loopback socket)
and a bare loopback TCP stream.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine
import report

from lazymig.dump import LazyDump
from lazymig.testing.workload import Workload, build_c_workload

HERE = Path(__file__).resolve().parent


async def one(binary: Path, mib: int, images_dir: str) -> str:
    # An idle workload: it checks its region once an hour (the first check is later).
    workload = Workload([str(binary), "--mib", str(mib), "--interval-ms", "3600000"],
                        ready_timeout=120)
    try:
        dump = LazyDump(workload.pid, images_dir, address="127.0.0.1", port=0,
                        progress_interval=None)
        await dump.start()
        fds = open_fds()
        reader = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "_page_reader.py"), images_dir, str(workload.pid),
            str(dump.port), stdout=asyncio.subprocess.PIPE)
        serving = asyncio.create_task(dump.serve())
        assert reader.stdout is not None
        out = json.loads(await reader.stdout.readline())
        await reader.wait()
        result = await serving
        assert dump.written is not None
        gbps = out["bytes"] / out["seconds"] / 1e9
        return (f"  {mib:5d} MiB: frozen until listening {dump.frozen_seconds:6.3f} s, "
                f"{dump.written.lazy_pages} lazy pages in page pipes ({fds} fds open), "
                f"served {out['bytes'] / 2**20:.0f} MiB at {gbps:.2f} GB/s; "
                f"source {result.source.value}")
    finally:
        workload.stop()


def open_fds() -> int:
    """File descriptors this process holds (the page pipes among them)."""
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [64, 1024, 4096]
    print(f"machine: {machine.describe()}")
    path, tcp = machine.pipe_to_socket_gbps(), machine.loopback_tcp_gbps()
    print(f"  limit  tee + read + send to a loopback socket  {path:.2f} GB/s")
    print(f"  limit  loopback TCP stream                     {tcp:.2f} GB/s")
    with tempfile.TemporaryDirectory() as build:
        binary = build_c_workload(build)
        for mib in sizes:
            machine.warm_memory(2 * mib << 20)
            with tempfile.TemporaryDirectory(dir="/dev/shm") as images_dir:
                print(await one(binary, mib, images_dir))


if __name__ == "__main__":
    with report.recorded("page_server"):
        asyncio.run(main())
