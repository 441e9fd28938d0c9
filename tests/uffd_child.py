"""The faulting side of the userfaultfd tests, run as a separate process.

A thread that faults on a registered range sleeps in the kernel until the fault
is served; if it were a thread of the test process it would hold the GIL and
the handler could never run. So the tests start this script::

    python uffd_child.py SOCK_FD NPAGES [FEATURES]

It maps NPAGES anonymous private pages, opens a userfaultfd with lazymig's
``Uffd.open(FEATURES)``, registers the mapping (MISSING mode), and sends one
SCM_RIGHTS message on the SOCK_SEQPACKET socket SOCK_FD: JSON
``{"addr", "npages", "pid", "ioctls"}`` plus the uffd. Then it closes its own
uffd, as CRIU's restorer does, and obeys JSON commands, one per message, each
answered by one JSON message (``{"error": ...}`` on failure):

* ``{"op": "read", "addr", "n"}``: read n pages at addr (this is what faults);
  answers ``{"sha": [sha256 hex of each page]}``.
* ``{"op": "read_threads", "addr", "n"}``: n threads each copy one page with
  libc memcpy (which drops the GIL, so all n can wait on faults at once);
  answers ``{"sha": [...], "tids": [native thread id of each reader]}``.
* ``{"op": "write", "addr", "byte"}``: memset one page (a write fault).
* ``{"op": "madvise", "addr", "n"}``: MADV_DONTNEED (a REMOVE event).
* ``{"op": "munmap", "addr", "n"}``: (an UNMAP event).
* ``{"op": "mremap", "addr", "n"}``: move the pages to a fresh address
  (a REMAP event); answers ``{"addr": new}``.
* ``{"op": "fork", "addr", "n"}``: fork; the grandchild reads n pages at addr,
  sends ``{"from": "grandchild", "sha": [...]}`` and exits; then the child
  answers ``{"from": "child", "pid": grandchild pid, "status": wait status}``.
* ``{"op": "fork_orphan", "addr", "n"}``: fork; answers ``{"pid": grandchild pid}``.
  The grandchild waits until this child has exited (a forked process that outlives
  its parent), then reads n pages at addr, sends ``{"pid": its pid, "sha": [...]}``
  and exits.
* ``{"op": "exit"}``: ``os._exit(0)`` at once, no answer.

It leaves with ``os._exit`` so that no interpreter clean-up ever unmaps
registered memory (an UNMAP event would wait for a reader).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazymig.proto.constants import PAGE_SIZE
from lazymig.uffd.uffd import DEFAULT_FEATURES, Uffd

PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE_ANON = 0x02 | 0x20
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _ok(ret: int | None, what: str) -> int:
    if ret is None or ret in (-1, ctypes.c_void_p(-1).value):
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mmap(npages: int, prot: int) -> int:
    return _ok(libc.mmap(None, npages * PAGE_SIZE, prot, MAP_PRIVATE_ANON, -1, 0), "mmap")


def _shas(addr: int, n: int) -> list[str]:
    return [hashlib.sha256(ctypes.string_at(addr + i * PAGE_SIZE, PAGE_SIZE)).hexdigest()
            for i in range(n)]


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def _serve(sock: socket.socket, cmd: dict[str, Any]) -> dict[str, Any]:
    op, addr, n = cmd["op"], cmd.get("addr", 0), cmd.get("n", 1)
    if op == "read":
        return {"sha": _shas(addr, n)}
    if op == "read_threads":
        bufs = [ctypes.create_string_buffer(PAGE_SIZE) for _ in range(n)]
        tids = [0] * n

        def reader(i: int) -> None:
            tids[i] = threading.get_native_id()
            libc.memcpy(bufs[i], addr + i * PAGE_SIZE, PAGE_SIZE)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"sha": [hashlib.sha256(b.raw).hexdigest() for b in bufs], "tids": tids}
    if op == "write":
        ctypes.memset(addr, cmd["byte"], PAGE_SIZE)
        return {}
    if op == "madvise":
        _ok(libc.madvise(addr, n * PAGE_SIZE, MADV_DONTNEED), "madvise")
        return {}
    if op == "munmap":
        _ok(libc.munmap(addr, n * PAGE_SIZE), "munmap")
        return {}
    if op == "mremap":
        target = _mmap(n, PROT_NONE)
        flags = MREMAP_MAYMOVE | MREMAP_FIXED
        new = _ok(libc.mremap(addr, n * PAGE_SIZE, n * PAGE_SIZE, flags, target), "mremap")
        return {"addr": new}
    if op == "fork":
        pid = os.fork()
        if pid == 0:
            try:
                _send(sock, {"from": "grandchild", "sha": _shas(addr, n)})
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return {"from": "child", "pid": pid, "status": status}
    if op == "fork_orphan":
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                while os.getppid() == parent:
                    time.sleep(0.01)
                _send(sock, {"pid": os.getpid(), "sha": _shas(addr, n)})
            finally:
                os._exit(1)
        return {"pid": pid}
    raise ValueError(f"unknown op {op!r}")


def _obey(sock: socket.socket) -> None:
    """Answer the commands on ``sock`` until told to exit (or the socket closes)."""
    while True:
        data = sock.recv(65536)
        if not data:
            os._exit(0)
        cmd = json.loads(data)
        if cmd["op"] == "exit":
            os._exit(0)
        try:
            reply = _serve(sock, cmd)
        except Exception as exc:
            reply = {"error": repr(exc)}
        _send(sock, reply)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    npages = int(sys.argv[2])
    features = int(sys.argv[3]) if len(sys.argv) > 3 else int(DEFAULT_FEATURES)
    addr = _mmap(npages, PROT_RW)
    uffd = Uffd.open(features, pid=os.getpid())
    ioctls = uffd.register(addr, npages * PAGE_SIZE)
    hello = {"addr": addr, "npages": npages, "pid": os.getpid(), "ioctls": int(ioctls)}
    socket.send_fds(sock, [json.dumps(hello).encode()], [uffd.fd])
    uffd.close()
    _obey(sock)


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:
        print(f"uffd_child: {exc!r}", file=sys.stderr)
    finally:
        os._exit(1)
