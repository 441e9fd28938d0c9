"""A child process whose memory a lazy-pages daemon fills (run by the daemon tests).

    python lazy_child.py SOCKET PID ADDRESS NR_PAGES SCENARIO

Maps NR_PAGES of private anonymous memory at ADDRESS, attaches it to the
daemon under image pid PID, runs SCENARIO and checks every byte it reads
against the dump's pattern (tests/lazydump.page_pattern). Prints one line per
check and exits 0 when all matched, 1 on a mismatch. It faults in its own
memory, so it must never be the daemon's process.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lazydump import page_pattern

from lazymig.demo.region import map_region
from lazymig.uffd.attach import attach

PAGE = 4096
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

libc = ctypes.CDLL(None, use_errno=True)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def check(pid: int, vaddr: int, at: int | None = None) -> bool:
    """Read the page at ``at`` (default ``vaddr``) and compare it with the dump's page."""
    return ctypes.string_at(vaddr if at is None else at, PAGE) == page_pattern(pid, vaddr)


def verify(pid: int, base: int, pages: list[int], label: str) -> None:
    bad = [i for i in pages if not check(pid, base + i * PAGE)]
    print(f"{label}: {len(pages) - len(bad)}/{len(pages)} pages match", flush=True)
    if bad:
        print(f"MISMATCH at pages {bad[:10]}", flush=True)
        sys.exit(1)


def main() -> None:
    sock, pid, base, nr, scenario = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0),
                                     int(sys.argv[4]), sys.argv[5])
    extra = 16 if scenario == "zero" else 0  # pages beyond the dump's lazy range
    map_region(base, nr + extra)
    attach(sock, pid, [(base, (nr + extra) * PAGE)], finish=scenario != "no-finish",
           thread_ids=scenario != "slow-anonymous")
    print("attached", flush=True)
    order = list(range(nr))
    random.Random(nr).shuffle(order)
    if scenario in ("touch", "no-finish"):
        verify(pid, base, order, "touched")
    elif scenario == "sequential":
        verify(pid, base, list(range(nr)), "in order")
    elif scenario == "zero":
        zeros = sum(ctypes.string_at(base + (nr + i) * PAGE, PAGE) == bytes(PAGE)
                    for i in range(extra))
        print(f"beyond the dump: {zeros}/{extra} pages are zero", flush=True)
        if zeros != extra:
            sys.exit(1)
        verify(pid, base, order, "touched")
    elif scenario in ("slow", "slow-anonymous"):  # a page every 5 ms: time to break things
        for i in order:
            verify(pid, base, [i], f"page {i}")
            time.sleep(0.005)
    elif scenario == "some-then-wait":  # a working set, then nothing more
        verify(pid, base, order[:8], "touched")
        sys.stdin.readline()
        verify(pid, base, order, "after waiting")
    elif scenario == "wait":
        sys.stdin.readline()  # let the background fetch do everything first
        verify(pid, base, order, "after background")
    elif scenario == "fork":
        verify(pid, base, order[: nr // 4], "before fork")
        child = os.fork()
        verify(pid, base, order, "child" if child == 0 else "parent")
        if child == 0:
            os._exit(0)
        _, status = os.waitpid(child, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    elif scenario == "remove":
        half = nr // 2
        libc.madvise(base, half * PAGE, MADV_DONTNEED)  # these pages must read as zeros now
        zeros = sum(ctypes.string_at(base + i * PAGE, PAGE) == bytes(PAGE) for i in range(half))
        print(f"removed: {zeros}/{half} pages are zero", flush=True)
        if zeros != half:
            sys.exit(1)
        verify(pid, base, list(range(half, nr)), "kept")
    elif scenario == "unmap":
        libc.munmap(base, (nr // 2) * PAGE)
        verify(pid, base, list(range(nr // 2, nr)), "still mapped")
    elif scenario == "remap":
        new = base + 2**32
        moved = libc.mremap(base, nr * PAGE, nr * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, new)
        if moved != new:
            sys.exit(f"mremap failed: errno {ctypes.get_errno()}")
        bad = [i for i in order if not check(pid, base + i * PAGE, at=new + i * PAGE)]
        print(f"remapped: {nr - len(bad)}/{nr} pages match", flush=True)
        sys.exit(1 if bad else 0)
    elif scenario == "eagain":  # a fault served while a REMOVE event is unread
        page = ctypes.create_string_buffer(PAGE)
        # memcpy through ctypes releases the GIL while the thread waits for its page.
        reader = threading.Thread(target=libc.memcpy, args=(page, base, PAGE))
        reader.start()
        sys.stdin.readline()
        libc.madvise(base + (nr - 1) * PAGE, PAGE, MADV_DONTNEED)  # blocks until read
        reader.join()
        same = page.raw == page_pattern(pid, base)
        print(f"faulted page: {'matches' if same else 'MISMATCH'}", flush=True)
        sys.exit(0 if same else 1)
    elif scenario == "exit-early":
        verify(pid, base, order[:2], "touched two")
        os._exit(0)
    else:
        sys.exit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main()
