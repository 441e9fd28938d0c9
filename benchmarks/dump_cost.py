"""Time from freeze to page pipes for a workload of 64 MiB, 1 GiB and 4 GiB.

For each size: start lazymig/testing/pattern.c, freeze it, scan it, plan its
pages into 1 MiB page pipes and fill the non-lazy ones (``plan``: what
``LazyDump`` does before its page server listens), then fill the lazy pipes
(``late fill``: done while serving; the target vmsplices its pages itself, no
copy), kill it. ``frozen`` = freeze + scan + plan; the freeze includes the
smaps read made just before the seize (not downtime).
Printed beside what the machine does in the same run: a plain memcpy, and a
copying pipe path (fresh mmap + vmsplice + splice to /dev/null of 1 MiB chunks,
what collecting cost per byte when the pages were copied first).

    .venv/bin/python benchmarks/dump_cost.py [MiB ...]      (default: 64 1024 4096)

Needs root (ptrace) and about twice the largest size in free memory.

On a VM whose host backs guest memory lazily (Firecracker here), the first run
that touches a size's worth of never-used guest memory pays the host's faults:
measured on Linux 6.18 / 2 vCPUs when the pages were still copied, 4 GiB took
9.8 s the first time and 3.2 s when repeated. Repeat a size (``4096 4096``) to
see the warm number. (Without the copy, on a quiet machine: 1 GiB 0.13 s,
4 GiB 0.41 s from freeze to filled pipes, about half of it the kernel's page
table walks for smaps and the pagemap.)
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import report

from lazymig.dump.freeze import FrozenProcess
from lazymig.dump.late_fill import LateFill
from lazymig.linux.vm import AnonMapping, set_pipe_size, vmsplice
from lazymig.testing.workload import Workload, build_c_workload

MIB = 1 << 20


def memcpy_gbps(total: int = 1 << 30) -> float:
    """GB/s of copying 4 MiB blocks between two bytearrays."""
    src = bytearray(os.urandom(4 * MIB))
    dst = memoryview(bytearray(4 * MIB))
    start = time.perf_counter()
    for _ in range(total // len(src)):
        dst[:] = src
    return total / (time.perf_counter() - start) / 1e9


def pipe_path_gbps(total: int = 1 << 30) -> float:
    """GB/s of fresh-mmap + vmsplice into a 1 MiB pipe + splice to /dev/null."""
    r, w = os.pipe()
    set_pipe_size(w, MIB)
    null = os.open(os.devnull, os.O_WRONLY)
    start = time.perf_counter()
    try:
        for _ in range(total // MIB):
            with AnonMapping(MIB, populate=True) as m:
                done = 0
                while done < MIB:
                    done += vmsplice(w, m.address + done, MIB - done)
            left = MIB
            while left:
                left -= os.splice(r, null, left)
    finally:
        for fd in (r, w, null):
            os.close(fd)
    return total / (time.perf_counter() - start) / 1e9


async def dump_once(exe: Path, mib: int) -> dict[str, float]:
    with Workload([str(exe), "--mib", str(mib), "--interval-ms", "600000"],
                  ready_timeout=120) as w:
        t0 = time.perf_counter()
        fp = await FrozenProcess.freeze(w.pid)
        t1 = time.perf_counter()
        scan = await fp.scan()
        t2 = time.perf_counter()
        pipes = await fp.collect_pages(scan, pipe_size=MIB, defer_lazy=True)
        t3 = time.perf_counter()
        await LateFill(pipes).run(fp)
        t4 = time.perf_counter()
        fds = pipes.nr_fds
        pipes.close()
        await fp.release(kill=True)
    return {"freeze": t1 - t0, "scan": t2 - t1, "plan": t3 - t2, "frozen": t3 - t0,
            "fill": t4 - t3, "bytes": scan.lazy_pages * 4096, "fds": fds}


async def main(sizes: list[int]) -> None:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"Linux {platform.release()}, {os.cpu_count()} CPUs, {mem / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}")
    print(f"memcpy (4 MiB blocks):                       {memcpy_gbps():6.2f} GB/s")
    print(f"mmap+vmsplice+splice (1 MiB, no source copy): {pipe_path_gbps():6.2f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c_workload(tmp)
        print(f"{'size':>8} {'freeze':>8} {'scan':>8} {'plan':>8} {'frozen':>8} "
              f"{'late fill':>10} {'GB/s':>6} {'fds':>6}")
        for mib in sizes:
            r = await dump_once(exe, mib)
            print(f"{mib:>5}MiB {r['freeze'] * 1e3:>6.1f}ms {r['scan'] * 1e3:>6.1f}ms "
                  f"{r['plan'] * 1e3:>6.1f}ms {r['frozen'] * 1e3:>6.0f}ms "
                  f"{r['fill'] * 1e3:>8.0f}ms {r['bytes'] / r['fill'] / 1e9:>6.2f} {r['fds']:>6}")


if __name__ == "__main__":
    with report.recorded("dump_cost"):
        asyncio.run(main([int(a) for a in sys.argv[1:]] or [64, 1024, 4096]))
