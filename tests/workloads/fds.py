"""A process holding open files, which reports their state once it runs under a new pid.

Usage: ``fds.py DIR [--setsid | --setpgid] [--pdeathsig] [--extra KIND]``. ``DIR`` holds ``log``
and ``data`` (made by the test). The process opens:

* ``log`` write-only for append, and appends ``opened\\n`` to it;
* ``data`` read-only and close-on-exec, reads 100 bytes, and dups it to fd 42
  (one open file description, so one offset; fd 42 is not close-on-exec);
* /dev/null write-only, non-blocking;
* a pipe (non-blocking read end, 1 MiB capacity) holding ``in-flight``;
* the read end of a second pipe holding ``tail`` whose write end is closed;
* ``DIR`` itself, O_PATH (a dirfd for openat);
* with ``--extra KIND``, one more fd of a kind lazymig refuses (fanotify,
  stale-epoll: an epoll watching a file under a fd number closed since,
  memfd, deleted, fifo: a named FIFO, lock: a file it holds a flock on).

It prints ``READY key=value ...``: its pid, pgid, sid, each fd's offset, status
flags and close-on-exec flag, and the fd numbers; then polls getpid() every
20 ms. Once the pid changed (it was restored) it prints the same state again in
a ``RESTORED key=value ...`` line, with what reading and writing each fd gave
(byte strings in hex; ``after\\n`` is appended to the log), then exits 0 on
SIGUSR1 (blocked from the start: a lazy migration must be complete first).
``fds.c`` does the same in C (without ``--extra``).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def extra_fd(kind: str, directory: str) -> int:
    if kind == "fanotify":  # FAN_CLASS_NOTIF, FAN_CLOEXEC; O_RDONLY events
        return int(ctypes.CDLL(None).fanotify_init(0x1, os.O_RDONLY))
    if kind == "stale-epoll":  # watches an eventfd registered as a fd closed since
        efd = os.eventfd(0)
        with select.epoll() as ep:
            ep.register(efd, select.EPOLLIN)
            os.dup(efd)
            os.close(efd)
            return os.dup(ep.fileno())
    if kind == "memfd":
        return os.memfd_create("lazymig-test")
    if kind == "fifo":
        path = Path(directory) / "fifo"
        os.mkfifo(path)
        return os.open(path, os.O_RDWR)  # O_RDWR: no wait for a peer
    if kind == "lock":
        fd = os.open(Path(directory) / "data", os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd
    if kind == "deleted":
        path = Path(directory) / "doomed"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, (64 << 20) + 4096)  # past what lazymig carries (sparse)
        path.unlink()
        return fd
    raise SystemExit(f"unknown --extra kind {kind}")


def flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def cloexec(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def main() -> None:
    directory = sys.argv[1]
    opts = sys.argv[2:]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # for the sigwait at the end
    if "--setsid" in opts:
        os.setsid()
    if "--setpgid" in opts:
        os.setpgid(0, 0)
    if "--pdeathsig" in opts:  # SIGTERM when the parent (thread) dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    log = os.open(Path(directory) / "log", os.O_WRONLY | os.O_APPEND)
    os.write(log, b"opened\n")
    ro = os.open(Path(directory) / "data", os.O_RDONLY | os.O_CLOEXEC)
    os.read(ro, 100)
    os.dup2(ro, 42)
    null = os.open("/dev/null", os.O_WRONLY | os.O_NONBLOCK)
    r, w = os.pipe()
    os.set_blocking(r, False)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    os.write(w, b"in-flight")
    tail, tail_w = os.pipe()
    os.write(tail_w, b"tail")
    os.close(tail_w)
    dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    extra = extra_fd(opts[opts.index("--extra") + 1], directory) if "--extra" in opts else -1
    def state() -> dict[str, int]:
        return {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
                "log_pos": os.lseek(log, 0, os.SEEK_CUR), "log_flags": flags(log),
                "log_cloexec": cloexec(log), "ro_pos": os.lseek(ro, 0, os.SEEK_CUR),
                "ro_flags": flags(ro), "ro_cloexec": cloexec(ro), "dup_cloexec": cloexec(42),
                "null_flags": flags(null), "r_flags": flags(r), "w_flags": flags(w),
                "r_cloexec": cloexec(r), "tail_flags": flags(tail), "dir_flags": flags(dirfd),
                "pipe_size": fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)}

    before = state()
    fds = {"log": log, "ro": ro, "null": null, "r": r, "w": w, "tail": tail, "dir": dirfd,
           "extra": extra}
    print("READY " + " ".join(f"{k}={v}" for k, v in (before | fds).items()), flush=True)
    while os.getpid() == before["pid"]:
        time.sleep(0.02)

    out: dict[str, int | str] = dict(state())
    os.write(log, b"after\n")
    out["ro_read"] = os.read(ro, 10).hex()
    out["dup_pos"] = os.lseek(42, 0, os.SEEK_CUR)
    out["null_write"] = os.write(null, b"xyz")
    out["pipe_data"] = os.read(r, 100).hex()
    os.write(w, b"echo")
    out["pipe_echo"] = os.read(r, 100).hex()
    out["tail_data"] = os.read(tail, 100).hex()
    out["tail_eof"] = int(os.read(tail, 100) == b"")
    data = os.open("data", os.O_RDONLY, dir_fd=dirfd)
    out["dir_read"] = os.read(data, 4).hex()
    print("RESTORED " + " ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    signal.sigwait({signal.SIGUSR1})


if __name__ == "__main__":
    main()
