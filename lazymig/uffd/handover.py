"""The I/O of the restorer-daemon connection (its codec: :mod:`lazymig.proto.handover`).

:class:`HandoverSession` owns one end's UNIX socket and the fds in transit, and
drives a :class:`~lazymig.proto.handover.HandoverConnection` for either end: the
restorer (lazymig's restorer, :func:`~lazymig.uffd.attach.attach`, and the
guardian that takes over its end), and the daemon, for which
:class:`RestorerConnection` turns the conversation into processes handed over,
adopted and settled.

The socket is used raw, never through a buffered stream: a byte that carries a
uffd must be read with ``recvmsg`` and room for its SCM_RIGHTS, or the kernel
drops the fd. Every read asks for no more than the codec's
:attr:`~lazymig.proto.handover.HandoverConnection.read_size`, so it ends at a
message boundary. Reads and writes try the syscall first and only wait on the
loop's reader/writer callbacks when it would block (asyncio's own
``sock_recv_into`` pattern), so they work on asyncio's loop and on uvloop.

The guardian (:mod:`lazymig.guardian`) imports this module in a fresh interpreter
while the restore finishes: it loads no asyncio until an ``async`` method runs.
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from lazymig.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LocalProtocolError,
    RemoteProtocolError,
)
from lazymig.proto.handover import (
    ConnectionClosed,
    Event,
    Forked,
    Guarded,
    GuardianPresent,
    HandoverConnection,
    NeedData,
    RestoreFinished,
    Role,
    Segment,
    State,
    TaskHandover,
    TransferComplete,
    ZombieTask,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncGenerator

    from lazymig.uffd.uffd import Uffd

__all__ = ["HandoverSession", "RestorerConnection"]

log = logging.getLogger(__name__)

_FD_ROOM: Final = socket.CMSG_SPACE(4 * array.array("i").itemsize)
"""Room for more fds than a message carries: a surplus is refused, not dropped unseen."""
_UFFD_LINK: Final = "anon_inode:[userfaultfd]"
"""What /proc/self/fd/N reads for a userfaultfd."""


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class HandoverSession:
    """One end of a restorer-daemon connection: the socket (owned) and its codec.

    Args:
        sock: a connected UNIX stream socket, now the session's.
        role: which end we are.
        finished: the restorer's "restore finished" went out already (a guardian
            taking over the restorer's end).

    Received fds are the session's until an event hands them out (the caller then
    owns them); those no event took are closed with the session, or at once when
    the peer breaks the protocol.
    """

    def __init__(self, sock: socket.socket, role: Role, *, finished: bool = False) -> None:
        self._sock: socket.socket | None = sock
        self.connection = HandoverConnection(role, finished=finished)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> Self:
        """The restorer's session with the daemon listening at ``path`` (non-blocking).

        Raises:
            BrokenResourceError: no daemon listens there.
        """
        import asyncio  # noqa: PLC0415 (see the module docstring)

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, os.fspath(path))
        except OSError as exc:
            sock.close()
            raise BrokenResourceError(
                f"cannot reach the lazy-pages daemon at {path}: {exc.strerror} "
                "(start `lazymig lazy-pages` first)") from exc
        return cls(sock, Role.RESTORER)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        """The socket's fd (to pass on to a guardian), -1 once closed."""
        return -1 if self._sock is None else self._sock.fileno()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ClosedResourceError("the handover session was closed")
        return self._sock

    @property
    def _peer(self) -> str:
        return "lazy-pages daemon" if self.connection.role is Role.RESTORER else "restorer"

    # -- receiving --------------------------------------------------------------------------

    def _read(self) -> None:
        """One ``recvmsg`` (raises BlockingIOError if nothing is there), fed to the codec."""
        data, ancdata, flags, _ = self._socket().recvmsg(self.connection.read_size, _FD_ROOM)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        self.connection.receive_data(data, fds.tolist(),
                                     truncated=bool(flags & socket.MSG_CTRUNC))

    def _next(self) -> Event | None:
        """The codec's next event, or None for NEED_DATA; a protocol error closes the fds
        it held."""
        try:
            event = self.connection.next_event()
        except RemoteProtocolError:
            _close_all(self.connection.take_unclaimed_fds())
            raise
        if isinstance(event, NeedData):
            return None
        if isinstance(event, TaskHandover) and self.connection.role is Role.DAEMON:
            self._check_uffd(event)
        return event

    def _check_uffd(self, event: TaskHandover) -> None:
        # A peer's pipe or file would be read as uffd events.
        link = str(Path(f"/proc/self/fd/{event.fd}").readlink())
        if link != _UFFD_LINK:
            os.close(event.fd)
            self.connection.restorer_state = State.ERROR
            raise RemoteProtocolError(f"task {event.pid}: the fd handed over is not a "
                                      f"userfaultfd but {link}", field="uffd")

    async def next_event(self) -> Event:
        """The peer's next event (a :class:`ConnectionClosed` at EOF, again and again).

        Raises:
            RemoteProtocolError: the peer broke the protocol (the fds it sent are closed).
            OSError: the connection broke (a reset).
        """
        from lazymig._aio import retry_until_ready  # noqa: PLC0415 (see the module docstring)

        while (event := self._next()) is None:
            await retry_until_ready(self.fileno(), self._read)
        return event

    def receive(self) -> list[Event]:
        """Read once (blocking unless the socket is not), then every event that completed;
        for a caller that polls the socket itself (the guardian)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._read()
        events: list[Event] = []
        while (event := self._next()) is not None:
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
        return events

    # -- sending ------------------------------------------------------------------------------

    @staticmethod
    def _rights(segment: Segment) -> list[tuple[int, int, bytes]]:
        if not segment.fds:
            return []
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", segment.fds).tobytes())]

    def send_nowait(self, event: Event) -> None:
        """Send ``event`` at once: for a few bytes into a socket buffer that has room (the
        daemon's words), or on a blocking socket (attach()).

        Raises:
            LocalProtocolError: we may not say that now.
            BrokenResourceError: the connection is gone, or (non-blocking) full.
        """
        sock = self._socket()
        for segment in self.connection.send(event):
            view = memoryview(segment.data)
            rights = self._rights(segment)
            try:
                while view:
                    view = view[sock.sendmsg([view], rights):]
                    rights = []  # the fds went with the first byte
            except OSError as exc:
                raise BrokenResourceError(f"{self._peer} connection lost: {exc}") from exc
        if isinstance(event, ConnectionClosed):
            self.close()

    async def send(self, event: Event) -> None:
        """Send ``event``, waiting for room in the socket buffer.

        Raises:
            LocalProtocolError: we may not say that now.
            BrokenResourceError: the connection is gone.
        """
        from lazymig._aio import retry_until_ready  # noqa: PLC0415 (see the module docstring)

        sock = self._socket()
        for segment in self.connection.send(event):
            view = memoryview(segment.data)
            rights = self._rights(segment)
            try:
                while view:
                    attempt = functools.partial(sock.sendmsg, [view], rights)
                    sent = await retry_until_ready(sock.fileno(), attempt, writable=True)
                    view, rights = view[sent:], []
            except OSError as exc:
                raise BrokenResourceError(f"{self._peer} connection lost: {exc}") from exc
        if isinstance(event, ConnectionClosed):
            self.close()

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every received fd no event handed out. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            _close_all(self.connection.take_unclaimed_fds())
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RestorerConnection:
    """The daemon's end of one restorer's connection, in terms of processes.

    It says GUARDED at once (a guardian that reads EOF before that word takes the
    daemon for one that never reports completion, CRIU's, and stands aside), then:

    * :meth:`handovers` yields each task handed over (a
      :class:`~lazymig.proto.handover.TaskHandover`, whose uffd the daemon now owns,
      or a :class:`~lazymig.proto.handover.ZombieTask`) until "restore finished";
    * the daemon reports each process it adopted from this connection (those handed
      over, and the children they fork) with :meth:`adopted`, and each that settled
      with :meth:`settled`;
    * :meth:`until_settled` listens for the guardian's answer meanwhile: once there,
      each forked child's uffd goes to it (FORKED), since it holds the uffds should
      the daemon die; once every process is settled, it says TRANSFER_COMPLETE if
      each got all its pages (or exited), and returns. CRIU's restorer has closed
      its end already: the words go nowhere.

    Args:
        sock: the accepted connection (now this object's).
        peer: the restorer's pid (SO_PEERCRED), for the log.
    """

    def __init__(self, sock: socket.socket, peer: int) -> None:
        sock.setblocking(False)
        self.peer = peer
        self.session = HandoverSession(sock, Role.DAEMON)
        self._unsettled: dict[int, Uffd | None] = {}  # key -> a forked child's uffd, or None
        self._ok = True
        self._settled_one: asyncio.Event | None = None  # while until_settled runs
        try:
            self.session.send_nowait(Guarded())
        except BrokenResourceError as exc:  # gone already: what it sent is still there
            log.debug("restorer %d: %s (no guardian there)", peer, exc)

    async def handovers(self) -> AsyncGenerator[TaskHandover | ZombieTask, None]:
        """Every task handed over, until "restore finished".

        Raises:
            RemoteProtocolError: the restorer broke the protocol, or closed the
                connection before "restore finished" (its restore failed).
            OSError: the connection broke.
        """
        while True:
            event = await self.session.next_event()
            if isinstance(event, RestoreFinished):
                return
            if isinstance(event, ConnectionClosed):
                raise RemoteProtocolError("restorer closed the connection before restore "
                                          "finished")
            assert isinstance(event, TaskHandover | ZombieTask)  # the codec's rules
            yield event

    def adopted(self, key: int, forked: Uffd | None = None) -> None:
        """The daemon took process ``key`` from this connection; ``forked``: the uffd of a
        child one of them forked (borrowed), which a guardian then holds too."""
        self._unsettled[key] = forked
        if forked is not None and self.session.connection.restorer_state is State.GUARDING:
            self._forked(forked)

    def settled(self, key: int, *, ok: bool) -> None:
        """Process ``key`` reached its final state; ``ok``: it got every page (or exited)."""
        if self._unsettled.pop(key, False) is False:
            return  # not one of ours
        self._ok = self._ok and ok
        if self._settled_one is not None:
            self._settled_one.set()

    def _forked(self, uffd: Uffd) -> None:
        if uffd.closed or self.session.closed:
            return
        try:
            self.session.send_nowait(Forked(uffd.fd))
        except (BrokenResourceError, LocalProtocolError) as exc:  # it went away meanwhile
            log.debug("restorer %d: its guardian's connection: %s", self.peer, exc)

    async def until_settled(self) -> None:
        """After "restore finished": serve the guardian until every process adopted here
        is settled, then say TRANSFER_COMPLETE if each got all its pages (see the class
        docstring). A guardian that breaks the protocol has its connection closed."""
        import asyncio  # noqa: PLC0415 (see the module docstring)

        settled_one = self._settled_one = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                listening = tg.create_task(self._listen())
                while self._unsettled:  # forks may add processes meanwhile
                    settled_one.clear()
                    await settled_one.wait()
                listening.cancel()
        finally:
            self._settled_one = None
        if self._ok and not self.session.closed:
            try:
                self.session.send_nowait(TransferComplete())
            except (BrokenResourceError, LocalProtocolError) as exc:
                log.debug("restorer %d: %s (no guardian there)", self.peer, exc)

    async def _listen(self) -> None:
        """The guardian's answer (CRIU's restorer says nothing and closes)."""
        try:
            event = await self.session.next_event()
        except RemoteProtocolError as exc:
            log.warning("restorer %d: %s; closing its connection (its processes are still "
                        "served)", self.peer, exc)
            self.session.close()
            return
        except OSError:
            return
        if isinstance(event, GuardianPresent):
            for uffd in self._unsettled.values():
                if uffd is not None:
                    self._forked(uffd)
            # Nothing more may come but EOF: anything else breaks the protocol.
            await self._listen()

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
