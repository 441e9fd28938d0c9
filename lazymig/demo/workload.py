"""The demo's process: a data region of known content at a fixed address.

    python -m lazymig.demo.workload ADDRESS PAGES

Maps PAGES pages at ADDRESS, fills page ``i`` with a pattern derived from
``i``, prints ``READY <crc32>``, then prints ``TICK`` every 2 ms (sleeping to
absolute deadlines, so a freeze does not shift its schedule) and adds 1 MiB
more of the region to a running CRC-32 after each, printing ``CHECK <crc32>``
once a pass over the whole region is done. Migrated, it keeps printing the
same CRC from its new pid (its memory arrived intact), and its first ``TICK``
after the restore says when it ran again (a freeze in the middle of a 1 MiB
step delays that tick by the rest of the step).
"""

from __future__ import annotations

import sys
import time

from lazymig.demo.region import PAGE, fill_pattern, map_region, region_crc32

TICK_SECONDS = 0.002
STEP_PAGES = (1 << 20) // PAGE


def main() -> None:
    address, pages = int(sys.argv[1], 0), int(sys.argv[2])
    map_region(address, pages)
    fill_pattern(address, pages)
    print(f"READY {region_crc32(address, pages):08x}", flush=True)
    deadline = time.monotonic()
    crc, done = 0, 0
    while True:
        deadline = max(deadline + TICK_SECONDS, time.monotonic())
        time.sleep(max(0.0, deadline - time.monotonic()))
        print("TICK", flush=True)
        step = min(STEP_PAGES, pages - done)
        crc = region_crc32(address + done * PAGE, step, crc=crc)
        done += step
        if done == pages:
            print(f"CHECK {crc:08x}", flush=True)
            crc, done = 0, 0


if __name__ == "__main__":
    main()
