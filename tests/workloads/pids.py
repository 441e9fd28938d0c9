"""A parent that remembers its child's pid, for tests/test_pids.py.

The parent forks one child; each runs a second thread. Every id is asked of the
kernel when it is reported (``getpid()``, ``gettid()`` in the thread itself: the
thread answers through a queue, the child through a ``MAP_SHARED`` page, which
a migration keeps shared), never taken from a cache.

The parent reads commands on stdin and answers one line on stdout:

* ``ids``: ``IDS parent=P ptid=T child=C ctid=U remembered=R``: its pid and its
  thread's tid, the child's pid and its thread's tid as the child reports them,
  and the child's pid as the parent remembers it from ``fork()``;
* ``kill``: ``kill(remembered, SIGTERM)`` then ``waitpid(remembered)``:
  ``KILLED status=S`` (the wait status), or ``KILLED error=NAME`` (errno of the
  first call that failed);
* ``quit``: exits 0.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import signal
import struct
import sys
import threading
import time

SHARED = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: request, answer, pid, tid
_WORDS = struct.Struct("<4q")


def child_thread() -> None:
    while True:
        request, answered, _, _ = _WORDS.unpack_from(SHARED)
        if request != answered:
            _WORDS.pack_into(SHARED, 0, request, request, os.getpid(), threading.get_native_id())
        time.sleep(0.002)


def ask_child() -> tuple[int, int]:
    request = _WORDS.unpack_from(SHARED)[0] + 1
    SHARED[0:8] = struct.pack("<q", request)
    while True:
        _, answered, pid, tid = _WORDS.unpack_from(SHARED)
        if answered == request:
            return pid, tid
        time.sleep(0.002)


def main() -> None:
    child = os.fork()
    if child == 0:
        os.dup2(os.open(os.devnull, os.O_RDWR), 0)  # the child shares no pipe with the parent
        os.dup2(0, 1)
        threading.Thread(target=child_thread, daemon=True).start()
        while True:
            signal.pause()
    asks: queue.Queue[queue.Queue[int]] = queue.Queue()

    def parent_thread() -> None:
        while True:
            asks.get().put(threading.get_native_id())

    threading.Thread(target=parent_thread, daemon=True).start()

    def ids() -> str:
        answer: queue.Queue[int] = queue.Queue()
        asks.put(answer)
        ptid = answer.get()
        pid, tid = ask_child()
        return f"parent={os.getpid()} ptid={ptid} child={pid} ctid={tid} remembered={child}"

    print("READY " + ids(), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "ids":
            print("IDS " + ids(), flush=True)
        elif command == "kill":
            try:
                os.kill(child, signal.SIGTERM)
                _, status = os.waitpid(child, 0)
                print(f"KILLED status={status}", flush=True)
            except OSError as exc:
                print(f"KILLED error={errno.errorcode[exc.errno or 0]}", flush=True)
        elif command == "quit":
            return


if __name__ == "__main__":
    main()
