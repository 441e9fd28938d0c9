"""A process holding the files of an event loop, which checks them once it runs under
a new pid.

Usage: ``event_fds.py``. The process holds:

* an eventfd in semaphore mode, non-blocking, its counter at 7;
* a pipe with ``piped`` queued in it;
* a timerfd (CLOCK_MONOTONIC) armed to fire in 600 s and every 250 ms after, and a
  second one (CLOCK_BOOTTIME, non-blocking) that fired once, unread;
* a signalfd for SIGUSR1 and SIGUSR2 (both blocked);
* a stream socketpair with ``stream-data`` queued on one end, and ``back`` on
  the other; a datagram socketpair with ``one`` and ``two`` queued (two datagrams),
  its sending end shut down for writing;
* an epoll watching the eventfd (data 0x1111), the pipe's read end (0x2222,
  edge-triggered), the monotonic timerfd (0x3333), the signalfd (0x5555) and the
  stream socket (0x6666); a second epoll watching the first (0x4444).

It prints ``READY key=value ...`` (its pid and the timer's time left), then
polls getpid() every 20 ms. Once the pid changed (it was restored) it checks
them, printing ``RESTORED key=value ...``: the data values each epoll reports
ready, the reads the eventfd allows (semaphore: 7 reads of 1, then EAGAIN),
the timers (interval, time left, unread expirations), the signal a SIGUSR1 to
itself brings on the signalfd, what each socket holds and whether the shut
down end still sends; then it exits 0.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
CLOCK_MONOTONIC, CLOCK_BOOTTIME = 1, 7


class TimeSpec(ctypes.Structure):
    _fields_ = (("sec", ctypes.c_long), ("nsec", ctypes.c_long))


class ITimerSpec(ctypes.Structure):
    _fields_ = (("interval", TimeSpec), ("value", TimeSpec))


def timerfd(clock: int, flags: int, value: float, interval: float) -> int:
    fd = int(libc.timerfd_create(clock, flags | os.O_CLOEXEC))
    spec = ITimerSpec(TimeSpec(int(interval), int(interval % 1 * 1e9)),
                      TimeSpec(int(value), int(value % 1 * 1e9)))
    if fd < 0 or libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) < 0:
        raise OSError(ctypes.get_errno(), "timerfd")
    return fd


def time_left(fd: int) -> tuple[float, float]:
    spec = ITimerSpec()
    libc.timerfd_gettime(fd, ctypes.byref(spec))
    return (spec.value.sec + spec.value.nsec / 1e9, spec.interval.sec + spec.interval.nsec / 1e9)


def signalfd(*signals: int) -> int:
    mask = (ctypes.c_uint64 * 16)(sum(1 << (s - 1) for s in signals))
    fd = int(libc.signalfd(-1, mask, os.O_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "signalfd")
    return fd


def ready(ep: select.epoll) -> str:
    return ",".join(f"{data:x}" for data in sorted(d for d, _ in ep.poll(0)))


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    efd = os.eventfd(7, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r, w = os.pipe()
    os.write(w, b"piped")
    tfd = timerfd(CLOCK_MONOTONIC, 0, 600, 0.25)
    fired = timerfd(CLOCK_BOOTTIME, os.O_NONBLOCK, 0.001, 0)
    sfd = signalfd(signal.SIGUSR1, signal.SIGUSR2)
    a, b = socket.socketpair()
    b.send(b"stream-data")
    a.send(b"back")
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    d.send(b"one")
    d.send(b"two")
    d.shutdown(socket.SHUT_WR)
    inner, outer = select.epoll(), select.epoll()
    # select.epoll's register() takes no data: epoll_ctl through libc with our own.
    for fd, events, data in [(efd, select.EPOLLIN, 0x1111),
                             (r, select.EPOLLIN | select.EPOLLET, 0x2222),
                             (tfd, select.EPOLLIN, 0x3333), (sfd, select.EPOLLIN, 0x5555),
                             (a.fileno(), select.EPOLLIN, 0x6666)]:
        event = struct.pack("<IQ", events, data)
        if libc.epoll_ctl(inner.fileno(), 1, fd, event) < 0:
            raise OSError(ctypes.get_errno(), "epoll_ctl")
    libc.epoll_ctl(outer.fileno(), 1, inner.fileno(), struct.pack("<IQ", select.EPOLLIN, 0x4444))
    time.sleep(0.05)  # the one-shot timer fires
    pid = os.getpid()
    print(f"READY pid={pid} left={time_left(tfd)[0]:.3f}", flush=True)
    while os.getpid() == pid:
        time.sleep(0.02)
    out = {"pid": str(os.getpid()), "inner": ready(inner), "outer": ready(outer)}
    reads = 0
    try:
        while os.eventfd_read(efd) == 1:
            reads += 1
    except BlockingIOError:
        pass
    out["efd_reads"] = str(reads)
    left, interval = time_left(tfd)
    out["left"], out["interval"] = f"{left:.3f}", f"{interval:.3f}"
    out["fired"] = str(struct.unpack("<Q", os.read(fired, 8))[0])
    try:
        os.read(fired, 8)
    except BlockingIOError:
        out["fired_again"] = "EAGAIN"
    os.kill(os.getpid(), signal.SIGUSR1)
    out["signal"] = str(struct.unpack_from("<I", os.read(sfd, 128))[0])
    out["pipe"] = os.read(r, 100).decode()
    out["stream_a"], out["stream_b"] = a.recv(100).decode(), b.recv(100).decode()
    out["dgram"] = "+".join(c.recv(100).decode() for _ in range(2))
    try:
        d.send(b"x")
    except OSError as exc:
        out["shut"] = errno.errorcode[exc.errno or 0]
    out["after"] = ready(inner) or "none"  # everything was read
    print("RESTORED " + " ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
