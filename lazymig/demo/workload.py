"""The demo's process: a data region of known content at a fixed address.

    python -m lazymig.demo.workload ADDRESS PAGES

Maps PAGES pages at ADDRESS, fills page ``i`` with a pattern derived from
``i``, prints ``READY <crc32>``, then every half second reads the whole region
and prints ``CHECK <crc32>`` (sleeping to absolute deadlines, so a freeze does
not shift its schedule). Migrated, it keeps printing the same CRC from its new
pid: its memory arrived intact.
"""

from __future__ import annotations

import sys
import time

from lazymig.demo.region import fill_pattern, map_region, region_crc32


def main() -> None:
    address, pages = int(sys.argv[1], 0), int(sys.argv[2])
    map_region(address, pages)
    fill_pattern(address, pages)
    print(f"READY {region_crc32(address, pages):08x}", flush=True)
    deadline = time.monotonic()
    while True:
        deadline += 0.5
        time.sleep(max(0.0, deadline - time.monotonic()))
        print(f"CHECK {region_crc32(address, pages):08x}", flush=True)


if __name__ == "__main__":
    main()
