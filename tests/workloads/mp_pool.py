"""CPython ``multiprocessing`` workers, for tests/test_multiprocessing.py.

    python mp_pool.py

The parent makes, before any fork:

* ``REGION``, ``mmap(-1, 256 KiB)`` (shared anonymous memory) filled with a
  seeded pattern once;
* a ``multiprocessing.shared_memory`` segment (a /dev/shm file), in which it
  writes the round number before each round;
* ``COUNTER``, a ``multiprocessing.Value`` (a deleted /dev/shm file, open on an
  fd and mapped, and a POSIX semaphore: ``/dev/shm/sem.* (deleted)``);
* ``RESULTS``, a ``multiprocessing.Queue`` (a pipe, its semaphore and lock);
* a pipe into which a ``multiprocessing.Process`` child writes ``BLOB``
  (16 KiB) and then sleeps, keeping its end open: the bytes wait in the pipe.

A ``Pool(2)`` (fork) then works in rounds: each task hashes one 4 KiB page of
``REGION``, reads the round number from the segment, adds 1 to ``COUNTER``
under its lock, prints ``W page`` and puts ``(page, round, digest)`` on
``RESULTS``. The parent gets every result from the queue, checks it against
the digests it computed itself, and prints ``ROUND n ok=1 count=C`` (ok=0
and what differs on a wrong result). Every process writes to the same fd 1,
opened by the caller without O_APPEND: lines stay whole only while they
share its offset.

On SIGUSR1 the parent reads the pipe and prints ``PIPE bytes=N sha=HEX``.
It begins with ``READY region=ADDR size=N shm=NAME sha=HEX`` (``sha``: BLOB's).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import multiprocessing as mp
import os
import random
import signal
import struct
import time
from multiprocessing import shared_memory
from multiprocessing.sharedctypes import Synchronized
from typing import Any

PAGE = 4096
PAGES = 64
TASKS = 8
BLOB = random.Random(7).randbytes(16 * 1024)

REGION = mmap.mmap(-1, PAGES * PAGE)

WORKER: dict[str, Any] = {}
"""What a Pool worker got from its initializer."""


def init(shm_name: str, counter: Synchronized[int], results: mp.Queue[Any]) -> None:
    WORKER.update(shm=shared_memory.SharedMemory(name=shm_name), counter=counter,
                  results=results)


def work(page: int) -> int:
    digest = hashlib.sha256(REGION[page * PAGE:(page + 1) * PAGE]).hexdigest()
    (round_no,) = struct.unpack_from("<Q", WORKER["shm"].buf, 0)
    with WORKER["counter"].get_lock():
        WORKER["counter"].value += 1
    say(f"W {page}")
    WORKER["results"].put((page, round_no, digest))
    return page


def write_blob(w: int) -> None:
    os.write(w, BLOB)
    while True:  # keeps its end open: the bytes wait in the pipe
        time.sleep(1)


def main() -> None:
    REGION.write(random.Random(13).randbytes(PAGES * PAGE))
    expected = [hashlib.sha256(REGION[p * PAGE:(p + 1) * PAGE]).hexdigest()
                for p in range(PAGES)]
    shm = shared_memory.SharedMemory(create=True, size=PAGE)
    assert shm.buf is not None
    counter: Synchronized[int] = mp.Value("q", 0)
    results: mp.Queue[Any] = mp.Queue()
    r, w = os.pipe()
    writer = mp.Process(target=write_blob, args=(w,), daemon=True)
    writer.start()
    asked: list[int] = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    say(f"READY region={_address(REGION):#x} size={PAGES * PAGE} shm={shm.name} "
        f"sha={hashlib.sha256(BLOB).hexdigest()}")
    try:
        with mp.Pool(2, initializer=init, initargs=(shm.name, counter, results)) as pool:
            done = 0
            for round_no in range(1, 1 << 62):
                struct.pack_into("<Q", shm.buf, 0, round_no)
                pages = [(round_no * TASKS + i) % PAGES for i in range(TASKS)]
                pool.map(work, pages)
                got = sorted(results.get(timeout=30) for _ in pages)
                want = sorted((p, round_no, expected[p]) for p in pages)
                done += len(pages)
                ok = got == want and counter.value == done
                say(f"ROUND {round_no} ok={int(ok)} count={counter.value}"
                    + ("" if ok else f" got={got} want={want}"))
                if asked:
                    asked.clear()
                    data = b""
                    while len(data) < len(BLOB):
                        data += os.read(r, len(BLOB) - len(data))
                    say(f"PIPE bytes={len(data)} sha={hashlib.sha256(data).hexdigest()}")
                time.sleep(0.05)
    finally:
        shm.close()
        shm.unlink()


def say(line: str) -> None:
    """One write(2) per line: the processes' lines interleave whole."""
    os.write(1, f"{line}\n".encode())


def _address(m: mmap.mmap) -> int:
    """Where ``m`` is mapped."""
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
