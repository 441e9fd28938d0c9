"""CPython with a ThreadPoolExecutor busy hashing, for tests/test_threads.py.

    python pool.py [--workers W] [--interval-ms I]

It computes, single-threaded, the SHA-256 chains of 32 seeds (each digest
hashed again 200 times over 64 KiB of seeded data: hashlib releases the GIL
for such inputs, so the workers really run at once). Then W workers recompute
them without end, and the main thread prints, every I ms, a line in the
format of pattern.c's:

    CHECK n=.. sum=.. bad=.. done=.. workers=..

``sum`` is fixed (the expected chains folded together), ``bad`` the number of
chains a worker got wrong so far, ``done`` the chains computed so far and
``workers`` the number of pool threads that have finished one. It begins with
``READY pid=.. addr=0x0 size=0 seed=0x0 locked=0x0 locked_size=0``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import threading
import time

SEEDS = 32
ROUNDS = 200
BLOCK = 64 * 1024


def chain(seed: int) -> bytes:
    data = seed.to_bytes(8, "little") * (BLOCK // 8)
    digest = hashlib.sha256(data).digest()
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest + data).digest()
    return digest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--interval-ms", type=int, default=100)
    args = parser.parse_args()
    expected = [chain(s) for s in range(SEEDS)]
    total = 0
    for d in expected:
        total ^= int.from_bytes(d[:8], "little")
    lock = threading.Lock()
    counts = {"bad": 0, "done": 0}
    workers: set[int] = set()

    def task(seed: int) -> None:
        ok = chain(seed) == expected[seed]
        with lock:
            counts["done"] += 1
            counts["bad"] += not ok
            workers.add(threading.get_ident())

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.workers)
    pending: set[concurrent.futures.Future[None]] = set()
    print(f"READY pid={os.getpid()} addr=0x0 size=0 seed=0x0 locked=0x0 locked_size=0",
          flush=True)
    next_seed, n, deadline = 0, 0, time.monotonic()
    while True:
        while len(pending) < 2 * args.workers:
            pending.add(pool.submit(task, next_seed % SEEDS))
            next_seed += 1
        done, pending = concurrent.futures.wait(pending, timeout=0.01)
        for f in done:
            f.result()
        if time.monotonic() >= deadline:
            deadline = max(deadline + args.interval_ms / 1000, time.monotonic())
            with lock:
                line = (f"CHECK n={n} sum={total:#018x} bad={counts['bad']} "
                        f"done={counts['done']} workers={len(workers)}")
            print(line, flush=True)
            n += 1


if __name__ == "__main__":
    main()
