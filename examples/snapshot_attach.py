"""Restore a large memory snapshot lazily into a fresh process: lazymig's cooperative attach.

    .venv/bin/python examples/snapshot_attach.py [--mib 64] [--no-uvloop]

For programs that manage their own memory (a VM-style snapshot restore, a
cache warm-up): the fresh process does not wait for the whole snapshot.

1. ``lazymig.write_snapshot`` writes a snapshot of a memory region on disk
   (here a generated one: every 8-byte word holds its own address).
2. ``lazymig.serve_images`` serves its pages over TCP, as a remote host would.
3. ``lazymig.lazy_pages`` runs a lazy-pages daemon that pulls from it.
4. A fresh process (this script, ``--child``) maps the region at the
   snapshot's address, calls ``lazymig.attach`` and starts reading at once:
   each page it touches first is fetched on demand, the rest arrive in the
   background. It checks every page and prints how long its first read took.

Needs root (userfaultfd). Exits 0 when every page arrived intact.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import mmap
import sys
import tempfile
import time

import lazymig

ADDRESS = 0x6C0000000000
"""Where the snapshot's region lives (the fresh process maps it there too)."""
IMAGE_PID = 1
"""The id the snapshot's pages are served under."""
PAGE = mmap.PAGESIZE


def pattern(first: int, size: int) -> bytes:
    """The snapshot's contents: each 8-byte word holds its own address."""
    return array.array("Q", range(first, first + size, 8)).tobytes()


def child(socket_path: str, size: int) -> int:
    """The fresh process: map, attach, read everything and check it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    map_fixed_noreplace = 0x100000
    got = libc.mmap(ADDRESS, size, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | map_fixed_noreplace, -1, 0)
    if got != ADDRESS:
        raise OSError(ctypes.get_errno(), "cannot map the snapshot's region")
    lazymig.attach(socket_path, IMAGE_PID, [(ADDRESS, size)])
    started = time.monotonic()
    ctypes.string_at(ADDRESS, PAGE)  # the first read: its page comes on demand
    first = time.monotonic() - started
    bad = 0
    chunk = 1 << 20
    for offset in range(0, size, chunk):
        n = min(chunk, size - offset)
        bad += ctypes.string_at(ADDRESS + offset, n) != pattern(ADDRESS + offset, n)
    total = time.monotonic() - started
    print(f"fresh process: first page read after {first * 1e6:.0f} us, all {size >> 20} MiB "
          f"in {total:.3f} s, {bad} MiB differ from the snapshot", flush=True)
    return 1 if bad else 0


async def main(mib: int) -> bool:
    size = mib << 20
    with tempfile.TemporaryDirectory(prefix="lazymig-snapshot-") as snapshot:
        await lazymig.write_snapshot(snapshot, [(ADDRESS, pattern(ADDRESS, size))],
                                     pid=IMAGE_PID)
        print(f"snapshot of {mib} MiB at {ADDRESS:#x} written to {snapshot}")
        async with lazymig.serve_images(snapshot) as server, \
                lazymig.lazy_pages(snapshot, page_server=server.address) as daemon:
            print(f"page server on {server.address}, daemon on {daemon.socket_path}")
            fresh = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--child", str(daemon.socket_path), str(size))
            status = await fresh.wait()
        report, served = await daemon.done, await server.done
    progress = lazymig.TransferProgress.of(report)
    print(f"daemon: {progress.pages_on_demand} pages on demand, {progress.pages_background} "
          f"in the background, {progress.bytes_per_second / 1e6:.0f} MB/s; "
          f"page server: {served.pages_served}/{served.pages_total} pages served")
    return status == 0 and report.ok


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2], int(sys.argv[3])))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="snapshot size (MiB)")
    parser.add_argument("--no-uvloop", dest="uvloop", action="store_false",
                        help="asyncio's own loop instead of uvloop")
    args = parser.parse_args()
    ok = lazymig.run(main(args.mib), use_uvloop=None if args.uvloop else False)
    sys.exit(0 if ok else 1)
