"""Event-loop files: eventfds, epoll instances, timerfds, signalfds and the unix
socketpairs a process holds both ends of, checked and dumped as CRIU does.

Every event-loop runtime holds some of these (node/libuv: epoll and eventfds;
CPython's asyncio: epoll and a socketpair as its self-pipe; Go and tokio:
epoll and an eventfd or a pipe). :mod:`lazymig.dump.files` hands them here.
All is read from /proc/PID/fdinfo, kcmp(2) and sock_diag, nothing is injected:

* an eventfd: its counter and EFD_SEMAPHORE (``eventfd-count``,
  ``eventfd-semaphore``; a ``file_entry`` of type EVENTFD, the semaphore flag
  as bit 0 of ``eventfd_file_entry.flags``, which an eventfd's status flags
  never use);
* an epoll instance: each registration (``tfd: N events: X data: Y``), as an
  EVENTPOLL entry with an ``eventpoll_tfd_entry`` each. The file registered
  under N must be the one open on fd N now (kcmp ``KCMP_EPOLL_TFD``): a file
  closed while a dup of it stays open elsewhere remains registered under its
  old number, and such a registration is refused, naming it;
* a timerfd: clock, flags, the time left and the interval, and the
  expirations not read yet (TIMERFD);
* a signalfd: its signal mask (SIGNALFD);
* an inotify instance (``tail -f``, file watchers): each watch
  (``inotify wd: N ino: ... sdev: ... mask: ... f_handle: ...``) with its
  number, mask and the path its file handle opens now (INOTIFY, an
  ``inotify_wd_entry`` each, the path in ``f_handle.path`` as CRIU's irmap
  puts it). A watch on a file that has no path any more is refused. Events
  queued and not read yet are not kept (CRIU drops them too);
* a unix socket whose peer is another fd of the same process, unnamed and
  connected (``socket.socketpair()``: stream, datagram or seqpacket): type,
  state, peer, shutdown state, buffer sizes and timeouts (UNIXSK), and the
  data queued on it (``sk-queues.img``, read with MSG_PEEK at a peek offset,
  as CRIU does; in-flight fds in it are refused). Any other socket is left to
  :mod:`lazymig.dump.files`, which refuses it.

One of these open in another process too (an eventfd or an epoll inherited
by a child, a socketpair between two processes) is refused: that process
would keep its own and lose the migrated one's state.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import os
import re
import socket
import stat
import struct
from collections.abc import Iterator, Sequence
from typing import Final

from lazymig.errors import LazyMigOSError, UnsupportedTargetError
from lazymig.linux.fhandle import handle_path, kernel_dev
from lazymig.linux.kcmp import same_epoll_target, same_file
from lazymig.linux.procfs import fd_links, processes, read_fdinfo
from lazymig.linux.sockdiag import UnixSocket, unix_socket
from lazymig.linux.vm import copy_fd
from lazymig.proto.constants import EFD_SEMAPHORE, TIMEVAL
from lazymig.proto.images import (
    EventfdFileEntry,
    EventpollFileEntry,
    FhEntry,
    FileEntry,
    FownEntry,
    InotifyFileEntry,
    InotifyWdEntry,
    SignalfdEntry,
    SkOptsEntry,
    SkPacketEntry,
    TimerfdEntry,
    UnixSkEntry,
    fdinfo_pb2,
    sk_opts_pb2,
)

__all__ = ["AnonFds", "inspect_anon"]

_KINDS: Final = {
    "anon_inode:[eventfd]": fdinfo_pb2.EVENTFD,
    "anon_inode:[eventpoll]": fdinfo_pb2.EVENTPOLL,
    "anon_inode:[timerfd]": fdinfo_pb2.TIMERFD,
    "anon_inode:[signalfd]": fdinfo_pb2.SIGNALFD,
    "anon_inode:inotify": fdinfo_pb2.INOTIFY,
}
_SOCKET_TYPES: Final = {socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET}
_ESTABLISHED: Final = 1
_TFD_LINE: Final = re.compile(r"(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)")
_PAIR: Final = re.compile(r"\(\s*(\d+),\s*(\d+)\)")
_ZERO_FOWN: Final = FownEntry(uid=0, euid=0, signum=0, pid_type=0, pid=0)
_STREAM_CHUNK: Final = 1 << 18
_FH_WORDS: Final = struct.Struct("<16Q")  # fh_entry.handle: MAX_HANDLE_SZ bytes, as CRIU
_SO_PEEK_OFF: Final = 42  # asm-generic/socket.h (not in Python's socket module)


@dataclasses.dataclass(frozen=True, slots=True)
class _Registration:
    tfd: int
    events: int
    data: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Watch:
    """One inotify watch, as fdinfo shows it, and the path its handle opens."""

    wd: int
    ino: int
    s_dev: int
    mask: int
    ignored_mask: int
    handle_type: int
    handle: bytes
    path: str | None

    @classmethod
    def parse(cls, pid: int, value: str) -> _Watch:
        """From the value of an ``inotify wd`` fdinfo line (``1 ino:290a07 ...``)."""
        wd, _, rest = value.partition(" ")
        f = dict(item.split(":", 1) for item in rest.split())
        handle = bytes.fromhex(f["f_handle"])
        s_dev, handle_type = int(f["sdev"], 16), int(f["fhandle-type"], 16)
        return cls(int(wd), int(f["ino"], 16), s_dev, int(f["mask"], 16),
                   int(f["ignored_mask"], 16), handle_type, handle,
                   handle_path(pid, s_dev, handle_type, handle))

    def entry(self, file_id: int) -> InotifyWdEntry:
        words = _FH_WORDS.unpack(self.handle.ljust(_FH_WORDS.size, b"\0"))
        return InotifyWdEntry(
            id=file_id, i_ino=self.ino, mask=self.mask, ignored_mask=self.ignored_mask,
            s_dev=self.s_dev, wd=self.wd,
            f_handle=FhEntry(bytes=len(self.handle), type=self.handle_type, handle=words,
                             path=self.path))


@dataclasses.dataclass(slots=True)
class AnonFds:
    """The fds of process ``pid`` this module dumps, and why some cannot be."""

    pid: int
    kinds: dict[int, fdinfo_pb2.fd_types] = dataclasses.field(default_factory=dict)
    """{fd: ``fd_types`` value} of every fd dumped here."""
    reasons: list[str] = dataclasses.field(default_factory=list)
    """Refusals (each names its fd)."""
    info: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    """{fd: its fdinfo fields} of the anonymous-inode files."""
    epolls: dict[int, list[_Registration]] = dataclasses.field(default_factory=dict)
    """{epoll fd: its registrations, in fdinfo's order}."""
    watches: dict[int, list[_Watch]] = dataclasses.field(default_factory=dict)
    """{inotify fd: its watches}."""
    sockets: dict[int, UnixSocket] = dataclasses.field(default_factory=dict)
    """{fd: what sock_diag tells} of the socketpairs' ends."""

    def file_entry(self, fd: int, file_id: int, flags: int) -> FileEntry:
        """The ``file_entry`` of the open file description on ``fd`` (status
        ``flags`` from fdinfo, without O_CLOEXEC)."""
        kind, info = self.kinds[fd], self.info.get(fd, {})
        entry = FileEntry(type=kind, id=file_id)
        if kind == fdinfo_pb2.EVENTFD:
            semaphore = EFD_SEMAPHORE if info.get("eventfd-semaphore") == "1" else 0
            entry.efd.CopyFrom(EventfdFileEntry(id=file_id, flags=flags | semaphore,
                                                fown=_ZERO_FOWN,
                                                counter=int(info["eventfd-count"], 16)))
        elif kind == fdinfo_pb2.EVENTPOLL:
            entry.epfd.CopyFrom(EventpollFileEntry(id=file_id, flags=flags, fown=_ZERO_FOWN))
            for r in self.epolls[fd]:
                entry.epfd.tfd.add(id=file_id, tfd=r.tfd, events=r.events, data=r.data)
        elif kind == fdinfo_pb2.TIMERFD:
            value, interval = (_pair(info[k]) for k in ("it_value", "it_interval"))
            entry.tfd.CopyFrom(TimerfdEntry(
                id=file_id, flags=flags, fown=_ZERO_FOWN, clockid=int(info["clockid"]),
                ticks=int(info["ticks"]), settime_flags=int(info["settime flags"], 8),
                vsec=value[0], vnsec=value[1], isec=interval[0], insec=interval[1]))
        elif kind == fdinfo_pb2.SIGNALFD:
            entry.sgfd.CopyFrom(SignalfdEntry(id=file_id, flags=flags, fown=_ZERO_FOWN,
                                              sigmask=int(info["sigmask"], 16)))
        elif kind == fdinfo_pb2.INOTIFY:
            entry.ify.CopyFrom(InotifyFileEntry(
                id=file_id, flags=flags, fown=_ZERO_FOWN,
                wd=[w.entry(file_id) for w in self.watches[fd]]))
        else:
            sk = self.sockets[fd]
            entry.usk.CopyFrom(UnixSkEntry(
                id=file_id, ino=sk.ino, type=sk.type, state=sk.state, flags=flags, uflags=0,
                backlog=0, peer=sk.peer, fown=_ZERO_FOWN, opts=self._socket_opts(fd), name=b"",
                shutdown=sk_opts_pb2.sk_shutdown.Name(sk.shutdown)))
        return entry

    def _socket_opts(self, fd: int) -> SkOptsEntry:
        with _borrowed(self.pid, fd) as sock:
            size = struct.calcsize(TIMEVAL)
            snd = struct.unpack(TIMEVAL, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                                         size))
            rcv = struct.unpack(TIMEVAL, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                                         size))
            return SkOptsEntry(
                so_sndbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                so_rcvbuf=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                so_snd_tmo_sec=snd[0], so_snd_tmo_usec=snd[1],
                so_rcv_tmo_sec=rcv[0], so_rcv_tmo_usec=rcv[1],
                so_passcred=bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)))

    def socket_queues(self, file_ids: dict[int, int]) -> list[tuple[SkPacketEntry, bytes]]:
        """The data queued on each socket dumped here (``file_ids``: {fd: file id}),
        left in place. Blocking; the process must be frozen.

        Raises UnsupportedTargetError for a queue holding fds in flight.
        """
        out: list[tuple[SkPacketEntry, bytes]] = []
        done: set[int] = set()
        for fd, sk in sorted(self.sockets.items()):
            if sk.ino in done:  # dup'd: one description, one queue
                continue
            done.add(sk.ino)
            for data in _peek_queue(self.pid, fd, sk.type):
                out.append((SkPacketEntry(id_for=file_ids[fd], length=len(data)), data))
        return out


def _pair(value: str) -> tuple[int, int]:
    found = _PAIR.fullmatch(value)
    if found is None:
        raise LazyMigOSError(0, f"timerfd fdinfo: cannot parse {value!r}")
    return int(found[1]), int(found[2])


@contextlib.contextmanager
def _borrowed(pid: int, fd: int) -> Iterator[socket.socket]:
    """A socket object on this process's own copy of fd ``fd`` of ``pid``
    (pidfd_getfd: the same open file description)."""
    sock = socket.socket(fileno=copy_fd(pid, fd))
    try:
        yield sock
    finally:
        sock.close()


def _peek_queue(pid: int, fd: int, sk_type: int) -> list[bytes]:
    """The messages (the bytes, for a stream) queued on socket ``fd`` of ``pid``,
    read with MSG_PEEK from peek offset 0 on, the socket's own offset put back."""
    out: list[bytes] = []
    with _borrowed(pid, fd) as sock:
        size = _STREAM_CHUNK if sk_type == socket.SOCK_STREAM else \
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        saved = sock.getsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF)
        sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
        try:
            while True:
                try:
                    data, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(253 * 4),
                                                       socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if anc:
                    _close_passed(anc)
                    raise UnsupportedTargetError(pid, [
                        f"fd {fd} is a unix socket with fds or credentials in flight in its "
                        "queue: they are not migrated"])
                if flags & socket.MSG_TRUNC:
                    raise UnsupportedTargetError(pid, [
                        f"fd {fd} is a unix socket with a message of more than {size} bytes "
                        "queued"])
                if not data and sk_type == socket.SOCK_STREAM:
                    break  # end of stream: the peer shut down writing
                out.append(data)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, saved)
    return out


def _close_passed(anc: list[tuple[int, int, bytes]]) -> None:
    """Close the fds a peek at SCM_RIGHTS put into this process."""
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                os.close(fd)


def inspect_anon(pid: int, fds: Sequence[tuple[int, str, os.stat_result]]) -> AnonFds:
    """Which of ``fds`` ((fd, /proc link, stat) of every fd of ``pid``) this module
    dumps, with what it needs and its refusals; reads only /proc, kcmp and
    sock_diag. Sockets it does not take are left out (not refused)."""
    out = AnonFds(pid)
    candidates: dict[int, UnixSocket] = {}
    for fd, link, st in fds:
        kind = _KINDS.get(link)
        if kind is not None:
            try:
                lines = read_fdinfo(pid, fd)
            except FileNotFoundError:
                continue  # closed meanwhile (only possible before the freeze)
            out.kinds[fd] = kind
            out.info[fd] = dict(lines)
            if kind == fdinfo_pb2.EVENTPOLL:
                out.epolls[fd] = [_Registration(int(m[1]), int(m[2], 16), int(m[3], 16))
                                  for k, v in lines if k == "tfd" and (m := _TFD_LINE.match(v))]
            elif kind == fdinfo_pb2.INOTIFY:
                out.watches[fd] = [_Watch.parse(pid, v) for k, v in lines if k == "inotify wd"]
                out.reasons += [f"fd {fd} is an inotify instance watching inode {w.ino:#x} of "
                                f"device {':'.join(map(str, kernel_dev(w.s_dev)))}, which has "
                                "no path any more: its watch cannot be made again"
                                for w in out.watches[fd] if w.path is None]
        elif stat.S_ISSOCK(st.st_mode):
            with contextlib.suppress(LazyMigOSError):  # no sock_diag: files.py refuses it
                sk = unix_socket(st.st_ino)
                if sk is not None and sk.name is None and sk.type in _SOCKET_TYPES \
                        and sk.state == _ESTABLISHED:
                    candidates[fd] = sk
    inodes = {sk.ino for sk in candidates.values()}
    for fd, sk in candidates.items():
        if sk.peer in inodes:
            out.kinds[fd] = fdinfo_pb2.UNIXSK
            out.sockets[fd] = sk
    open_fds = {fd for fd, _, _ in fds}
    for epfd, registrations in sorted(out.epolls.items()):
        out.reasons += _stale_registrations(pid, epfd, registrations, open_fds)
    out.reasons += _shared(pid, out, {fd: link for fd, link, _ in fds})
    return out


def _stale_registrations(pid: int, epfd: int, registrations: list[_Registration],
                         open_fds: set[int]) -> list[str]:
    """Refusals for the registrations of epoll ``epfd`` whose file is not the one on
    the fd number it was registered under."""
    reasons = []
    seen: dict[int, int] = {}
    for r in registrations:
        toff = seen.get(r.tfd, 0)
        seen[r.tfd] = toff + 1
        try:
            same = r.tfd in open_fds and same_epoll_target(pid, r.tfd, epfd, r.tfd, toff)
        except LazyMigOSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise
            same = False
        if not same:
            now = "is now another file" if r.tfd in open_fds else "is closed"
            reasons.append(
                f"fd {epfd} is an epoll instance watching a file registered as fd {r.tfd}, "
                f"which {now} (the file stays registered while a dup of it is open): only "
                "registrations of the fds open on them are migrated")
    return reasons


def _shared(pid: int, anon: AnonFds, links: dict[int, str]) -> list[str]:
    """Refusals for the files of ``anon`` that another process has open too."""
    wanted: dict[str, list[int]] = {}
    for fd in anon.kinds:
        wanted.setdefault(links[fd], []).append(fd)
    if not wanted:
        return []
    reasons: dict[int, str] = {}
    for other in processes():
        if other == pid:
            continue
        try:
            theirs = fd_links(other)
        except OSError:  # gone, a kernel thread, not ours to look at
            continue
        for their_fd, link in theirs:
            with contextlib.suppress(OSError):  # gone meanwhile: kcmp fails
                for fd in wanted.get(link, ()):
                    if fd not in reasons and (fd in anon.sockets or same_file(
                            pid, fd, other, their_fd)):
                        reasons[fd] = (f"fd {fd} ({links[fd]}) is also open in process "
                                       f"{other}: that process would keep it on the source "
                                       "host")
    return [reasons[fd] for fd in sorted(reasons)]
