"""A tree of processes for tests/test_trees.py.

Usage: ``tree.py``. The parent forks:

* ``group``: its own process group (``setpgid(0, 0)``);
* ``session``: its own session (``setsid``), which forks ``grandchild`` in it;
* ``zombie``: exits at once with status 7, and is not reaped until asked.

The parent and ``group`` share a ``MAP_SHARED`` anonymous page: ``group``
counts in its word 0 and copies word 1 into word 2; ``shared N`` makes the
parent write N into word 1 and print ``SHARED w0 w1 w2``.

Every process fills 64 pages with its marker (``tree-<name>-`` repeated) and
rewrites one of them now and then. The parent prints ``READY name=pid ...``
once all of them run, then reads lines from stdin: ``reap`` waits for the
zombie by pid and prints ``REAPED status=S``; ``end`` kills the children,
waits for each by pid and exits 0.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import sys
import time

PAGES = 64


def fill(name: str) -> bytearray:
    marker = f"tree-{name}-".encode()
    return bytearray((marker * (PAGES * 4096 // len(marker) + 1))[:PAGES * 4096])


def detach_fds(ready_r: int) -> None:
    """A child shares no pipe with its parent but the ready one's write end (the
    tests talk to the parent alone on its stdin and stdout)."""
    os.close(ready_r)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


SHARED = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS, before any fork
"""Shared with the ``group`` child: it counts in word 0 and copies the parent's
word 1 into word 2 (so each side sees the other's writes)."""


def busy(name: str, ready_w: int) -> None:
    memory = fill(name)
    os.write(ready_w, b"x")
    os.close(ready_w)
    i = 0
    while True:
        memory[(i % PAGES) * 4096] = memory[(i % PAGES) * 4096]  # dirty a page, same bytes
        if name == "group":
            SHARED[0:8] = struct.pack("<Q", i)
            SHARED[16:24] = SHARED[8:16]
        i += 1
        time.sleep(0.01)


def main() -> None:
    ready_r, ready_w = os.pipe()
    pids: dict[str, int] = {}
    if (pid := os.fork()) == 0:
        detach_fds(ready_r)
        os.setpgid(0, 0)
        busy("group", ready_w)
    pids["group"] = pid
    if (pid := os.fork()) == 0:
        detach_fds(ready_r)
        os.setsid()
        if (grand := os.fork()) == 0:
            busy("grandchild", ready_w)
        os.write(ready_w, f"g{grand:08d}".encode())
        # (the grandchild's pid is written before this child's own "x")
        busy("session", ready_w)
    pids["session"] = pid
    if (pid := os.fork()) == 0:
        os._exit(7)
    pids["zombie"] = pid
    os.close(ready_w)
    got = b""
    while chunk := os.read(ready_r, 64):  # until every write end is closed
        got += chunk
    os.close(ready_r)
    start = got.index(b"g") + 1
    pids["grandchild"] = int(got[start:start + 8])
    memory = fill("parent")
    while os.waitid(os.P_PID, pids["zombie"], os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        time.sleep(0.01)  # a zombie already, not reaped
    def reap(*_args: object) -> None:
        try:  # by pid: it works where the restored tree got its pids back
            _, status = os.waitpid(pids["zombie"], 0)
            how = "pid"
        except ChildProcessError:
            _, status = os.waitpid(-1, 0)
            how = "any"
        print(f"REAPED status={status} by={how}", flush=True)

    def quit_(*_args: object) -> None:
        reaped = 0
        with contextlib.suppress(ChildProcessError):
            while True:
                os.waitpid(-1, 0)
                reaped += 1
        print(f"QUIT reaped={reaped}", flush=True)
        os._exit(0)

    signal.signal(signal.SIGUSR1, reap)
    signal.signal(signal.SIGUSR2, quit_)
    print("READY " + " ".join(f"{k}={v}" for k, v in pids.items()), flush=True)
    for line in sys.stdin:
        memory[0] = memory[0]
        if line.strip() == "reap":
            reap()
        elif line.strip() == "quit":
            quit_()
        elif line.startswith("shared "):  # write N into word 1, print the three words
            SHARED[8:16] = struct.pack("<Q", int(line.split()[1]))
            print("SHARED " + " ".join(str(w) for w in struct.unpack("<3Q", SHARED[0:24])),
                  flush=True)
        elif line.strip() == "end":
            for name in ("group", "session"):
                os.kill(pids[name], signal.SIGKILL)
                os.waitpid(pids[name], 0)
            return
    while True:  # no stdin (a restore's own): signals only
        signal.pause()

if __name__ == "__main__":
    main()
