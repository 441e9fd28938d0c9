"""pattern.py: the Python twin of pattern.c (same options subset, same output lines).

Maps ``--mib`` MiB of private anonymous memory, fills each 8-byte word at address
``a`` with ``a ^ seed``, prints ``READY pid=... addr=0x... size=... seed=0x...
locked=0x0 locked_size=0``, then every ``--interval-ms`` (absolute deadlines on
CLOCK_MONOTONIC) prints ``CHECK n=<i> sum=0x<sum of words mod 2**64> bad=<n>``,
where ``bad`` counts pages whose content no longer matches the formula.
Standard library only, so it runs under any CPython 3.11.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
import time

PAGE = 4096
_WORDS = PAGE // 8


def page_bytes(address: int, seed: int) -> bytes:
    """The expected content of the page at ``address``."""
    return struct.pack(f"<{_WORDS}Q", *[(address + 8 * i) ^ seed for i in range(_WORDS)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument("--seed", type=lambda s: int(s, 0), default=0x5EED5EED5EED5EED)
    parser.add_argument("--interval-ms", type=int, default=100)
    args = parser.parse_args(argv)

    size = args.mib << 20
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    addr = ctypes.addressof(anchor)
    for off in range(0, size, PAGE):
        region[off:off + PAGE] = page_bytes(addr + off, args.seed)
    expected_sum = sum(memoryview(region).cast("Q")) & ((1 << 64) - 1)

    print(f"READY pid={os.getpid()} addr={addr:#x} size={size} seed={args.seed:#x} "
          "locked=0x0 locked_size=0", flush=True)
    interval = args.interval_ms / 1000
    deadline = time.clock_gettime(time.CLOCK_MONOTONIC)
    n = 0
    while True:
        deadline += interval
        delay = deadline - time.clock_gettime(time.CLOCK_MONOTONIC)
        if delay > 0:
            time.sleep(delay)
        total = sum(memoryview(region).cast("Q")) & ((1 << 64) - 1)
        bad = 0
        if total != expected_sum:
            bad = sum(1 for off in range(0, size, PAGE)
                      if region[off:off + PAGE] != page_bytes(addr + off, args.seed))
        # One write(2) per line: print() under PYTHONUNBUFFERED writes the text and
        # the newline apart, and a dump between the two left a lone newline for
        # the restored copy to write (an empty line on the restorer's stdout).
        sys.stdout.write(f"CHECK n={n} sum={total:#018x} bad={bad}\n")
        sys.stdout.flush()
        n += 1


if __name__ == "__main__":
    sys.exit(main())
