"""One process (no threads) holding every kind of shared memory lazymig migrates.

    python shmem.py FILE

* ``anon``: ``mmap.mmap(-1, 4 MiB)`` (MAP_SHARED | MAP_ANONYMOUS, the
  ``/dev/zero (deleted)`` object), every third page never touched (a hole),
  its second MiB made read-only (three VMAs of one object, at offsets 0, 1
  and 2 MiB);
* ``shm``: a ``multiprocessing.shared_memory.SharedMemory`` of 1 MiB (a
  /dev/shm file mapped MAP_SHARED, its fds kept open);
* ``memfd`` and ``memfd2``: one 2 MiB memfd mapped twice (two VMAs, one object),
  its fd kept open (``memfd_fd``);
* a memfd only open on a fd (``sealed_fd``): 8196 bytes written, the offset
  at 5000, sealed against shrinking and growing;
* ``file``: FILE (64 KiB) mapped MAP_SHARED.

Page 0 of each is the counter page; every other page holds a pattern. Every
20 ms the process checks all of it (pattern pages, but not the holes: reading
would fault them in; the counter it wrote last; that ``memfd2`` and
``memfd_fd`` see what it wrote through ``memfd``; the sealed memfd's data,
offset and seals), writes the next counter into every counter page and
``n=N pid=PID`` at the start of FILE, and prints ``CHECK n=N ok=0|1
pid=PID``. It prints ``READY`` first, with each region's
``name=address:length``, the shared memory's name and the memfds' fds.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import time
from multiprocessing import resource_tracker, shared_memory

PAGE = 4096
MIB = 1 << 20
PROT_READ, PROT_WRITE, MAP_SHARED = 1, 2, 1

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def pattern(seed: int, length: int, holes: bool = False) -> bytes:
    """Page i holds a word of (seed, i) repeated; page 0 and, with ``holes``,
    every third page are zero."""
    out = bytearray(length)
    for i in range(1, length // PAGE):
        if not (holes and i % 3 == 2):
            out[i * PAGE:(i + 1) * PAGE] = ((seed << 32 | i) * 0x9E3779B1 & (2**64 - 1)
                                            ).to_bytes(8, "little") * (PAGE // 8)
    return bytes(out)


def data_runs(length: int, holes: bool) -> list[tuple[int, int]]:
    """(offset, length) of the pattern pages of :func:`pattern`'s output."""
    if not holes:
        return [(PAGE, length - PAGE)]
    runs: list[tuple[int, int]] = []
    for i in range(1, length // PAGE):
        if i % 3 == 2:
            continue
        if runs and sum(runs[-1]) == i * PAGE:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((i * PAGE, PAGE))
    return runs


def view(address: int, length: int) -> memoryview:
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def shared_map(fd: int, length: int) -> int:
    address = libc.mmap(None, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(address)


def say(*words: str) -> None:
    """One line in one write(2): print() may write a line and its newline apart
    (PYTHONUNBUFFERED), and a dump between them splits it."""
    os.write(1, (" ".join(words) + "\n").encode())


def main() -> None:
    path = sys.argv[1]
    anon = mmap.mmap(-1, 4 * MIB)
    anon_at = ctypes.addressof(ctypes.c_char.from_buffer(anon))
    want_anon = pattern(1, 4 * MIB, holes=True)
    for i in range(1, 4 * MIB // PAGE):
        if i % 3 != 2:
            anon[i * PAGE:(i + 1) * PAGE] = want_anon[i * PAGE:(i + 1) * PAGE]
    if libc.mprotect(anon_at + MIB, MIB, PROT_READ) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")

    # No resource tracker: it is a child process (the test unlinks the segment).
    resource_tracker.register = lambda name, rtype: None
    shm = shared_memory.SharedMemory(create=True, size=MIB)
    assert shm.buf is not None
    shm_at = ctypes.addressof(ctypes.c_char.from_buffer(shm.buf))
    want_shm = pattern(2, MIB)
    shm.buf[:] = want_shm

    memfd = os.memfd_create("lazymig-shmem", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 2 * MIB)
    memfd_at, memfd2_at = shared_map(memfd, 2 * MIB), shared_map(memfd, 2 * MIB)
    want_memfd = pattern(3, 2 * MIB)
    view(memfd_at, 2 * MIB)[:] = want_memfd

    sealed = os.memfd_create("lazymig-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    want_sealed = pattern(4, 3 * PAGE)[PAGE:] + b"tail"
    os.write(sealed, want_sealed)
    os.lseek(sealed, 5000, os.SEEK_SET)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.ftruncate(fd, 64 * 1024)
    file_at = shared_map(fd, 64 * 1024)
    os.close(fd)

    regions = {"anon": (anon_at, 4 * MIB), "shm": (shm_at, MIB), "memfd": (memfd_at, 2 * MIB),
               "memfd2": (memfd2_at, 2 * MIB), "file": (file_at, 64 * 1024)}
    say("READY", *(f"{k}={a:#x}:{n:#x}" for k, (a, n) in regions.items()),
        f"shm_name={shm.name}", f"memfd_fd={memfd}", f"sealed_fd={sealed}")
    wanted = [(anon_at, want_anon), (shm_at, want_shm), (memfd_at, want_memfd),
              (memfd2_at, want_memfd)]
    # (offset, length) of the pattern pages: holes are not read (reading faults them in)
    runs = {a: [(o, n) for o, n in data_runs(len(w), a == anon_at)] for a, w in wanted}
    n = 0
    while True:
        counter = n.to_bytes(8, "little")
        ok = all(view(a + o, ln) == w[o:o + ln] for a, w in wanted for o, ln in runs[a])
        ok = ok and all(bytes(view(a, 8)) == counter for a, _ in wanted)
        n += 1
        counter = n.to_bytes(8, "little")
        for a in (anon_at, shm_at, memfd_at):
            view(a, 8)[:] = counter
        ok = ok and bytes(view(memfd2_at, 8)) == counter  # one object behind both views
        ok = ok and os.pread(memfd, 8, 0) == counter  # and behind its fd
        ok = ok and os.pread(sealed, len(want_sealed) + 1, 0) == want_sealed
        ok = ok and os.lseek(sealed, 0, os.SEEK_CUR) == 5000
        ok = ok and fcntl.fcntl(sealed, fcntl.F_GET_SEALS) == \
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        line = f"n={n} pid={os.getpid()}\n".encode()
        view(file_at, 64)[:] = line.ljust(64, b"\0")
        say(f"CHECK n={n} ok={int(ok)} pid={os.getpid()}")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
