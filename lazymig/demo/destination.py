"""The demo's destination process: the same region, filled lazily by the daemon.

    python -m lazymig.demo.destination SOCKET PID ADDRESS PAGES

Maps the region at the source's address, hands it to the lazy-pages daemon
(cooperative attach, CRIU's handshake), then reads it all and prints
``CHECKSUM <crc32> <seconds>``: the pages arrive on demand and in the background.
"""

from __future__ import annotations

import sys
import time

from lazymig.demo.region import PAGE, map_region, region_crc32
from lazymig.uffd.attach import attach


def main() -> None:
    sock, pid, address, pages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0), \
        int(sys.argv[4])
    map_region(address, pages)
    attach(sock, pid, [(address, pages * PAGE)])
    start = time.perf_counter()
    crc = region_crc32(address, pages)
    print(f"CHECKSUM {crc:08x} {time.perf_counter() - start:.3f}", flush=True)


if __name__ == "__main__":
    main()
