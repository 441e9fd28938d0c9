"""A child that migrates several processes' memory in turn (run by tests/test_soak.py).

    python soak_child.py SOCKET NR_PAGES PID:ADDRESS [PID:ADDRESS ...]

For each image pid in turn: map NR_PAGES at its dump address, attach them to the
daemon (a new userfaultfd and handover each time, as a restore would), read
every page and check it against the dump's pattern, then unmap. Prints one
line per migration; exits 1 on the first mismatch.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lazydump import page_pattern

from lazymig.demo.region import map_region
from lazymig.uffd.attach import attach

PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def main() -> None:
    sock, nr = sys.argv[1], int(sys.argv[2])
    for spec in sys.argv[3:]:
        pid, base = (int(x, 0) for x in spec.split(":"))
        map_region(base, nr)
        attach(sock, pid, [(base, nr * PAGE)])
        bad = [i for i in range(nr)
               if ctypes.string_at(base + i * PAGE, PAGE) != page_pattern(pid, base + i * PAGE)]
        if bad:
            print(f"MISMATCH pid {pid} pages {bad[:10]}", flush=True)
            sys.exit(1)
        libc.munmap(base, nr * PAGE)
        print(f"migrated {pid}", flush=True)


if __name__ == "__main__":
    main()
