"""Benchmark child: attach a region to the daemon, then time touches of random pages.

    python _toucher.py SOCKET PID BASE NR_PAGES TOUCHES touch|wait

Prints one JSON line: the per-touch latencies (seconds). With ``wait`` it
first waits for a line on stdin (the daemon has finished the background fetch).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import random
import sys
import time

from lazymig.uffd.attach import attach

MAP_FIXED_NOREPLACE = 0x100000


def main() -> None:
    sock, pid, base, nr, touches = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0),
                                    int(sys.argv[4]), int(sys.argv[5]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
    if libc.mmap(base, nr * 4096, 3, flags, -1, 0) != base:
        sys.exit("mmap failed")
    attach(sock, pid, [(base, nr * 4096)])
    if sys.argv[6] == "wait":
        sys.stdin.readline()
    latencies = []
    for page in random.Random(1).sample(range(nr), min(touches, nr)):
        start = time.perf_counter()
        _ = ctypes.c_char.from_address(base + page * 4096).value
        latencies.append(time.perf_counter() - start)
    print(json.dumps({"latencies": latencies}), flush=True)


if __name__ == "__main__":
    main()
