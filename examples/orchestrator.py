"""Migrate a running process lazily, from one asyncio program, with lazymig's Python API.

    .venv/bin/python examples/orchestrator.py [--mib 64] [--images-dir DIR] [--no-uvloop]

It starts a workload (a Python process holding MIB MiB of data, printing the
data's CRC-32 every half second), then migrates it on this machine with
``lazymig.migrate``: the workload is frozen and dumped, its lazy pages are
served over 127.0.0.1, a lazy-pages daemon fills them into the restored
process (under its pid, in a pid namespace of its own) on demand and in the
background. The transfer's progress is printed as it goes, then the numbers;
the restored process must print the workload's CRC. Needs root (ptrace,
userfaultfd). Exits 0 when it does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from typing import IO

import lazymig

WORKLOAD = """
import sys, time, zlib
data = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(data), 4096):
    data[i:i + 8] = i.to_bytes(8, "little")  # a different word on every page
print("CRC", zlib.crc32(data), flush=True)
while True:
    time.sleep(0.5)
    print("CRC", zlib.crc32(data), flush=True)
"""


async def next_crc(lines: IO[str]) -> int:
    """The CRC on the next line of a workload's output (read in a worker thread)."""
    line = await asyncio.wait_for(asyncio.to_thread(lines.readline), timeout=60)
    if not line.startswith("CRC"):
        raise RuntimeError(f"the workload printed {line!r}")
    return int(line.split()[1])


async def main(mib: int, images_dir: str | None) -> bool:
    # A plain Popen: the workload will be traced, and asyncio's child watcher would
    # reap its ptrace stops.
    workload = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(mib)],  # noqa: ASYNC220
                                stdout=subprocess.PIPE, text=True)
    read_fd, write_fd = os.pipe()  # the restored process's stdout
    restored_output = os.fdopen(read_fd)
    try:
        assert workload.stdout is not None
        crc = await next_crc(workload.stdout)
        print(f"workload pid {workload.pid}: {mib} MiB, CRC {crc:08x}")

        async with lazymig.migrate(workload.pid, images_dir=images_dir,
                                   stdio=(0, write_fd, 2)) as migration:
            os.close(write_fd)
            write_fd = -1
            print(f"restored as pid {migration.process.pid}, "
                  f"down {migration.downtime:.3f} s; memory follows:")
            async for p in migration.progress(interval=0.2):
                print(f"  {p.fraction:6.1%}  {p.pages_on_demand:6d} pages on demand "
                      f"{p.pages_background:7d} in the background  "
                      f"{p.bytes_per_second / 1e6:7.1f} MB/s")
            restored_crc = await next_crc(restored_output)
        result = await migration.done

        fault = result.progress
        p50 = fault.fault_p50 * 1e6 if fault.fault_p50 is not None else 0.0
        p99 = fault.fault_p99 * 1e6 if fault.fault_p99 is not None else 0.0
        print(f"source {result.dump.source.value}; {result.dump.lazy_pages} lazy pages, "
              f"{fault.faults} faults (p50 {p50:.0f} us, p99 {p99:.0f} us)")
        print(f"restored CRC {restored_crc:08x}: {'match' if restored_crc == crc else 'MISMATCH'}")
        await migration.process.kill()  # the example is over
        return restored_crc == crc
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        restored_output.close()
        workload.kill()
        workload.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="workload data size (MiB)")
    parser.add_argument("--images-dir", help="keep the images here (default: a temp dir)")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                        help="asyncio's own loop instead of uvloop")
    args = parser.parse_args()
    ok = lazymig.run(main(args.mib, args.images_dir), use_uvloop=None if args.uvloop else False)
    sys.exit(0 if ok else 1)
