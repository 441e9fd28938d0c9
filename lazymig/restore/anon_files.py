"""Rebuilding event-loop files inside the process being restored: eventfds, epoll
instances, timerfds, signalfds, inotify instances and unix socketpairs (dumped
by :mod:`lazymig.dump.anon_files`).

:func:`~lazymig.restore.files.restore_files` drives an :class:`AnonFiles`:

1. before any description is made, each socketpair is made again
   (``socketpair`` injected, both ends moved above every dumped fd); the
   restorer takes a copy of each end (pidfd_getfd), sets its buffer sizes,
   timeouts and SO_PASSCRED, sends each end's queued data from its peer and
   shuts down what was shut down;
2. per open file description, :meth:`AnonFiles.open` makes it: ``eventfd2``
   and a ``write`` of the counter, ``epoll_create1``, ``timerfd_create`` and
   ``timerfd_settime`` with the time that was left (the frozen time does not
   count, as with CRIU) and the unread expirations (TFD_IOC_SET_TICKS),
   ``signalfd4``, ``inotify_init1`` and each watch again under its number (a
   watch's number is the kernel's next one: watches are added and removed
   until it is the dumped one, as CRIU does), or a dup of the socket's staged
   end;
3. :meth:`AnonFiles.finish`, once every fd is in place, closes the staged
   ends and adds each epoll's registrations (``epoll_ctl(EPOLL_CTL_ADD)``
   under the fd number it was registered under, with its events and data),
   an epoll watched by another first.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lazymig.errors import ImageError, LazyMigOSError
from lazymig.linux.syscalls import (
    SYS_EPOLL_CREATE1,
    SYS_EPOLL_CTL,
    SYS_EVENTFD2,
    SYS_FCNTL,
    SYS_INOTIFY_ADD_WATCH,
    SYS_INOTIFY_INIT1,
    SYS_INOTIFY_RM_WATCH,
    SYS_IOCTL,
    SYS_SIGNALFD4,
    SYS_SOCKETPAIR,
    SYS_TIMERFD_CREATE,
    SYS_TIMERFD_SETTIME,
    SYS_WRITE,
)
from lazymig.linux.vm import copy_fd, read_memory
from lazymig.proto.constants import EFD_SEMAPHORE, TIMEVAL
from lazymig.proto.images import FileEntry, fdinfo_pb2

if TYPE_CHECKING:
    from lazymig.dump.files import DumpedFiles
    from lazymig.restore.files import SyscallTarget

__all__ = ["ANON_TYPES", "AnonFiles", "anon_refusal"]

ANON_TYPES: Final = frozenset({fdinfo_pb2.EVENTFD, fdinfo_pb2.EVENTPOLL, fdinfo_pb2.TIMERFD,
                               fdinfo_pb2.SIGNALFD, fdinfo_pb2.INOTIFY, fdinfo_pb2.UNIXSK})
"""The ``file_entry`` types this module restores."""
_FIELD: Final = {fdinfo_pb2.EVENTFD: "efd", fdinfo_pb2.EVENTPOLL: "epfd",
                 fdinfo_pb2.TIMERFD: "tfd", fdinfo_pb2.SIGNALFD: "sgfd",
                 fdinfo_pb2.INOTIFY: "ify", fdinfo_pb2.UNIXSK: "usk"}
_MAX_WD: Final = 1 << 16
"""The highest watch number made again (each one below it costs two syscalls)."""
_EPOLL_CTL_ADD: Final = 1
_EPOLL_EVENT: Final = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64
_TFD_TIMER_ABSTIME: Final = 1
_TFD_IOC_SET_TICKS: Final = 0x40085400  # _IOW('T', 0, __u64)
_SEND_SHUTDOWN: Final = 2


def anon_refusal(files: DumpedFiles, f: FileEntry) -> str | None:
    """Why description ``f`` (of a type in :data:`ANON_TYPES`) cannot be restored
    as it was, or None. Raises ImageError for an entry the images contradict."""
    if not f.HasField(_FIELD[f.type]):
        raise ImageError(f"files.img entry {f.id} of type {fdinfo_pb2.fd_types.Name(f.type)} "
                         f"has no {_FIELD[f.type]} field")
    if f.type == fdinfo_pb2.UNIXSK:
        peer = _peer(files, f)
        if peer is None or not files.fds_of(peer.id):
            return (f"it is a unix socket whose peer (socket:[{f.usk.peer}]) was not open in "
                    "the same process")
    if f.type == fdinfo_pb2.INOTIFY:
        for w in f.ify.wd:
            if w.wd > _MAX_WD:
                return f"it is an inotify instance with a watch numbered {w.wd}"
            if not w.f_handle.path or not Path(w.f_handle.path).exists():
                return (f"it is an inotify instance watching {w.f_handle.path or 'a file'}, "
                        "which is not on this host")
    if f.type == fdinfo_pb2.EVENTPOLL:
        mine = {e.fd for e in files.fds}
        lost = sorted({t.tfd for t in f.epfd.tfd} - mine)
        if lost:
            raise ImageError(f"epoll {f.id} watches fds {lost}, which fdinfo does not hold")
    return None


def _peer(files: DumpedFiles, f: FileEntry) -> FileEntry | None:
    return next((p for p in files.files if p.type == fdinfo_pb2.UNIXSK
                 and p.usk.ino == f.usk.peer and p.usk.peer == f.usk.ino), None)


class AnonFiles:
    """The event-loop files of ``files`` being made in ``target`` (see the module
    docstring); the socketpairs are made at once, their ends at fds >= ``top``
    (:attr:`top` is the next free number after them)."""

    def __init__(self, target: SyscallTarget, files: DumpedFiles, top: int) -> None:
        self._target = target
        self._files = files
        self._staged: dict[int, int] = {}  # socket inode -> its end in the target
        self._epolls: list[FileEntry] = []
        self.top = top
        for f in files.files:
            if f.type != fdinfo_pb2.UNIXSK or f.usk.ino in self._staged \
                    or not files.fds_of(f.id):
                continue
            peer = _peer(files, f)
            if peer is None:
                raise ImageError(f"unix socket {f.usk.ino} has no peer in files.img")
            self._make_pair(f, peer)

    def _make_pair(self, a: FileEntry, b: FileEntry) -> None:
        target = self._target
        at = target.data(b"\0" * 8)
        target.call(SYS_SOCKETPAIR, socket.AF_UNIX, a.usk.type | socket.SOCK_CLOEXEC, 0, at,
                    what="socketpair")
        for entry, low in zip((a, b), struct.unpack("<2i", read_memory(target.pid, at, 8)),
                              strict=True):
            self._staged[entry.usk.ino] = target.call(
                SYS_FCNTL, low, fcntl.F_DUPFD_CLOEXEC, self.top, what="fcntl(F_DUPFD)")
            self.top = self._staged[entry.usk.ino] + 1
            target.close(low)
        with self._borrowed(a) as sa, self._borrowed(b) as sb:
            for entry, sock in ((a, sa), (b, sb)):
                _set_opts(sock, entry)
            for entry, sender in ((a, sb), (b, sa)):
                self._fill(entry, sender)
            for entry, sock in ((a, sa), (b, sb)):
                if entry.usk.shutdown & _SEND_SHUTDOWN:
                    sock.shutdown(socket.SHUT_WR)

    @contextmanager
    def _borrowed(self, f: FileEntry) -> Iterator[socket.socket]:
        """A socket object on the restorer's own copy of the staged end of ``f``."""
        sock = socket.socket(fileno=copy_fd(self._target.pid, self._staged[f.usk.ino]))
        try:
            yield sock
        finally:
            sock.close()

    def _fill(self, f: FileEntry, sender: socket.socket) -> None:
        """Queue on ``f`` what was queued on it, sent by its peer ``sender``."""
        for packet, data in self._files.sk_queues:
            if packet.id_for != f.id:
                continue
            view = memoryview(data)
            while True:
                try:
                    view = view[sender.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    raise LazyMigOSError(0, f"restoring unix socket {f.usk.ino}: its queued "
                                            f"data does not fit ({len(view)} bytes left)",
                                         pid=self._target.pid) from None
                if not view or f.usk.type != socket.SOCK_STREAM:
                    break

    def open(self, f: FileEntry) -> int:
        """A new fd in the target on a new description like ``f`` (the caller dup3s
        it where it belongs and closes it)."""
        target, flags = self._target, 0
        nonblock = os.O_NONBLOCK
        if f.type == fdinfo_pb2.EVENTFD:
            flags = f.efd.flags
            fd = target.call(SYS_EVENTFD2, 0, os.O_CLOEXEC | (flags & (nonblock | EFD_SEMAPHORE)),
                             what="eventfd2")
            if f.efd.counter:
                target.call(SYS_WRITE, fd, target.data(struct.pack("<Q", f.efd.counter)), 8,
                            what="write(eventfd)")
            return fd
        if f.type == fdinfo_pb2.TIMERFD:
            return self._timerfd(f)
        if f.type == fdinfo_pb2.INOTIFY:
            return self._inotify(f)
        if f.type == fdinfo_pb2.SIGNALFD:
            return target.call(SYS_SIGNALFD4, -1, target.data(struct.pack("<Q", f.sgfd.sigmask)),
                               8, os.O_CLOEXEC | (f.sgfd.flags & nonblock), what="signalfd4")
        if f.type == fdinfo_pb2.EVENTPOLL:
            self._epolls.append(f)
            fd, flags = target.call(SYS_EPOLL_CREATE1, os.O_CLOEXEC,
                                    what="epoll_create1"), f.epfd.flags
        else:
            fd = target.call(SYS_FCNTL, self._staged[f.usk.ino], fcntl.F_DUPFD_CLOEXEC, 0,
                             what="fcntl(F_DUPFD) of a socket")
            flags = f.usk.flags
        if flags & nonblock:
            target.call(SYS_FCNTL, fd, fcntl.F_SETFL, nonblock, what="fcntl(F_SETFL)")
        return fd

    def _timerfd(self, f: FileEntry) -> int:
        t, target = f.tfd, self._target
        fd = target.call(SYS_TIMERFD_CREATE, t.clockid,
                         os.O_CLOEXEC | (t.flags & os.O_NONBLOCK), what="timerfd_create")
        left = t.vsec * 1_000_000_000 + t.vnsec
        if left or t.isec or t.insec:
            if t.settime_flags & _TFD_TIMER_ABSTIME:  # fdinfo shows the time left
                left += time.clock_gettime_ns(t.clockid)
            value = divmod(max(left, 1), 1_000_000_000)
            spec = struct.pack("<4q", t.isec, t.insec, *value)
            target.call(SYS_TIMERFD_SETTIME, fd, t.settime_flags, target.data(spec), 0,
                        what="timerfd_settime")
        if t.ticks:
            target.call(SYS_IOCTL, fd, _TFD_IOC_SET_TICKS, target.data(struct.pack("<Q", t.ticks)),
                        what="ioctl(TFD_IOC_SET_TICKS)")
        return fd

    def _inotify(self, f: FileEntry) -> int:
        target = self._target
        fd = target.call(SYS_INOTIFY_INIT1, os.O_CLOEXEC | (f.ify.flags & os.O_NONBLOCK),
                         what="inotify_init1")
        removed = False
        for w in sorted(f.ify.wd, key=lambda w: w.wd):
            path = target.data(os.fsencode(w.f_handle.path) + b"\0")
            while (got := target.call(SYS_INOTIFY_ADD_WATCH, fd, path, w.mask,
                                      what=f"inotify_add_watch({w.f_handle.path})")) < w.wd:
                target.call(SYS_INOTIFY_RM_WATCH, fd, got, what="inotify_rm_watch")
                removed = True
            if got != w.wd:
                raise LazyMigOSError(0, f"restoring inotify watch {w.wd} on {w.f_handle.path}: "
                                        f"the kernel gave it number {got}",
                                     pid=target.pid)
        if removed:  # each removal queued an IN_IGNORED the process never caused
            ours = copy_fd(target.pid, fd)
            try:
                while select.select([ours], [], [], 0)[0]:
                    os.read(ours, 1 << 16)
            finally:
                os.close(ours)
        return fd

    def finish(self) -> None:
        """Close the staged socket ends; add every epoll's registrations, now that
        every fd is in place."""
        for fd in self._staged.values():
            self._target.close(fd)
        self._staged.clear()
        of_fd = {e.fd: e.id for e in self._files.fds}
        epolls = {f.id: f for f in self._epolls}

        def depth(f: FileEntry) -> int:  # an epoll watched by another is filled first
            inner = [epolls[of_fd[t.tfd]] for t in f.epfd.tfd if of_fd[t.tfd] in epolls]
            return 1 + max((depth(e) for e in inner), default=0)

        for f in sorted(self._epolls, key=depth):
            epfd = self._files.fds_of(f.id)[0][0]
            for t in f.epfd.tfd:
                self._target.call(SYS_EPOLL_CTL, epfd, _EPOLL_CTL_ADD, t.tfd,
                                  self._target.data(_EPOLL_EVENT.pack(t.events, t.data)),
                                  what=f"epoll_ctl(ADD fd {t.tfd}) on epoll fd {epfd}")


def _set_opts(sock: socket.socket, f: FileEntry) -> None:
    """The dumped buffer sizes (the kernel doubles what it is given), timeouts and
    SO_PASSCRED of ``f`` on ``sock``."""
    opts = f.usk.opts
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, opts.so_sndbuf // 2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.so_rcvbuf // 2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack(TIMEVAL, opts.so_snd_tmo_sec, opts.so_snd_tmo_usec))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack(TIMEVAL, opts.so_rcv_tmo_sec, opts.so_rcv_tmo_usec))
    if opts.so_passcred:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
