"""A sans-IO codec for the restorer-daemon connection, for either end.

Every word of the conversation lives here: CRIU's handover and the four
guardian words lazymig adds on the same UNIX stream socket. Bring your own I/O
(h11's model, as :mod:`lazymig.proto.pageserver`): feed what one read returned,
with the fds that came with it, to :meth:`HandoverConnection.receive_data`
(``b""`` means EOF), pull events out of :meth:`~HandoverConnection.next_event`
until it says :data:`NEED_DATA`, and turn the events you send into
:class:`Segment`\\ s (one ``sendmsg`` each) with :meth:`~HandoverConnection.send`.
:mod:`lazymig.uffd.handover` is the I/O.

The restorer's words (``criu restore --lazy-pages``, lazymig's restorer,
:func:`~lazymig.uffd.attach.attach`), per restored task, in pstree order:

1. a native int32: the task's pid as the images name it (virtual pid);
2. for a zombie that pid is negated and nothing follows (:class:`ZombieTask`);
   otherwise one ``sendmsg`` of a single data byte (0) carrying the task's
   userfaultfd as SCM_RIGHTS (:class:`TaskHandover`);

then the u32 "restore finished" marker (0x52535446, the bytes ``46 54 53 52``,
:class:`RestoreFinished`). CRIU's restorer then closes; lazymig's hands its end
to a guardian (:mod:`lazymig.guardian`), which answers ``LZHI``
(:class:`GuardianPresent`) once the daemon said ``LZGD``.

The daemon's words (lazymig's only: CRIU's daemon says nothing): ``LZGD``
(:class:`Guarded`) as it accepts, ``LZFK`` with a forked child's uffd as
SCM_RIGHTS (:class:`Forked`, only to a connection that answered ``LZHI``), and
``LZOK`` (:class:`TransferComplete`) once every process handed over on the
connection got all its pages; then it closes.

Each direction has its own state (:attr:`HandoverConnection.restorer_state`,
:attr:`~HandoverConnection.daemon_state`), moved only along :data:`TRANSITIONS`.
Fds: those that came with a read belong to its last byte (the kernel ends a
read at the message that carries them), which must be a carrier byte or the
end of ``LZFK``; anything else is a :class:`~lazymig.errors.RemoteProtocolError`.
Received fds are the connection's until an event hands them out; after an error
:meth:`~HandoverConnection.take_unclaimed_fds` gives back the rest, to close.
Whatever breaks the protocol leaves the connection in :attr:`State.ERROR`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from lazymig.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "NEED_DATA",
    "PID_MAX_LIMIT",
    "RESTORE_FINISHED",
    "TRANSITIONS",
    "ConnectionClosed",
    "Event",
    "Forked",
    "Guarded",
    "GuardianPresent",
    "HandoverConnection",
    "NeedData",
    "RestoreFinished",
    "Role",
    "Segment",
    "State",
    "TaskHandover",
    "TransferComplete",
    "ZombieTask",
]

RESTORE_FINISHED: Final = 0x52535446
"""CRIU's "ReSTore Finished" marker."""
PID_MAX_LIMIT: Final = 4 * 1024 * 1024
"""The kernel's upper bound on pid_max (PID_MAX_LIMIT on 64-bit)."""

_WORD: Final = 4
_CARRIER: Final = b"\0"
"""The single data byte that carries a task's uffd in its SCM_RIGHTS."""
_GUARDED: Final = b"LZGD"
_GUARDIAN: Final = b"LZHI"
_FORKED: Final = b"LZFK"
_TRANSFER_COMPLETE: Final = b"LZOK"
_MAX_BUFFER: Final = 4096
"""Unparsed bytes a connection holds at most (a message is 5 bytes at most)."""
_INT32 = struct.Struct("=i")
_UINT32 = struct.Struct("=I")
_FINISHED_WORD: Final = _UINT32.pack(RESTORE_FINISHED)


class NeedData:
    """The type of :data:`NEED_DATA` (to narrow by: ``isinstance(event, NeedData)``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
"""Returned by :meth:`HandoverConnection.next_event` when more bytes are needed."""


class Role(enum.Enum):
    """Which end of the connection we are."""

    DAEMON = "daemon"
    """``lazymig lazy-pages`` (or ``criu lazy-pages``): receives the handover."""
    RESTORER = "restorer"
    """``criu restore``, lazymig's restorer, ``attach()``; and the guardian that takes
    over the restorer's end after "restore finished"."""


class State(enum.Enum):
    """Where one direction of the conversation stands."""

    HANDING_OVER = "handing over"
    """Restorer: sending tasks (a pid word, then its uffd or nothing for a zombie)."""
    FINISHED = "finished"
    """Restorer: said "restore finished"; only a guardian's LZHI may follow."""
    GUARDING = "guarding"
    """Restorer: a guardian holds this end and said LZHI."""
    SILENT = "silent"
    """Daemon: said nothing yet (CRIU's daemon stays so)."""
    GUARDED = "guarded"
    """Daemon: said LZGD; forked children's uffds (LZFK) may follow, then LZOK."""
    COMPLETE = "complete"
    """Daemon: said LZOK: every process handed over here got its pages."""
    CLOSED = "closed"
    """That side closed (EOF)."""
    ERROR = "error"
    """A protocol error happened in that direction; the connection is unusable."""


# Events: frozen and slotted; don't subclass them.


@dataclass(frozen=True, slots=True)
class TaskHandover:
    """Restorer → daemon: a live task's pid, and its uffd as SCM_RIGHTS.

    Received, ``fd`` is the receiver's to own (and close); sent, it is only borrowed
    (the peer gets a copy of its own)."""

    pid: int
    fd: int


@dataclass(frozen=True, slots=True)
class ZombieTask:
    """Restorer → daemon: a zombie task: it has no memory, so no uffd follows."""

    pid: int


@dataclass(frozen=True, slots=True)
class RestoreFinished:
    """Restorer → daemon: every task was handed over."""


@dataclass(frozen=True, slots=True)
class GuardianPresent:
    """Guardian → daemon, ``LZHI``, in answer to :class:`Guarded`: a guardian holds this
    connection (so forked children's uffds may come here)."""


@dataclass(frozen=True, slots=True)
class Guarded:
    """Daemon → restorer, ``LZGD``, on accepting: this daemon will say
    :class:`TransferComplete` when it is (CRIU's daemon says nothing)."""


@dataclass(frozen=True, slots=True)
class Forked:
    """Daemon → guardian, ``LZFK`` with a uffd as SCM_RIGHTS: a restored process forked;
    hold the child's uffd too (its ranges must keep trapping should the daemon die).
    ``fd`` is owned as in :class:`TaskHandover`."""

    fd: int


@dataclass(frozen=True, slots=True)
class TransferComplete:
    """Daemon → guardian, ``LZOK``: every process handed over on this connection got all
    its pages (or exited); the uffds may be let go."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """EOF at a message boundary (sent: we are closing our end)."""


Event: TypeAlias = (TaskHandover | ZombieTask | RestoreFinished | GuardianPresent | Guarded
                    | Forked | TransferComplete | ConnectionClosed)

_RESTORER_EVENTS: Final = (TaskHandover, ZombieTask, RestoreFinished, GuardianPresent)
_DAEMON_EVENTS: Final = (Guarded, Forked, TransferComplete)


@dataclass(frozen=True, slots=True)
class Segment:
    """What one ``sendmsg`` sends: ``data`` with ``fds`` as SCM_RIGHTS (borrowed).

    A task's pid word and the byte carrying its uffd are two segments: a receiver
    that reads the word without room for fds (CRIU's ``recv``) would drop an fd sent
    with it."""

    data: bytes
    fds: tuple[int, ...] = ()


TRANSITIONS: Mapping[tuple[State, type[Event]], State] = {
    (State.HANDING_OVER, TaskHandover): State.HANDING_OVER,
    (State.HANDING_OVER, ZombieTask): State.HANDING_OVER,
    (State.HANDING_OVER, RestoreFinished): State.FINISHED,
    (State.HANDING_OVER, ConnectionClosed): State.CLOSED,
    (State.FINISHED, GuardianPresent): State.GUARDING,
    (State.FINISHED, ConnectionClosed): State.CLOSED,
    (State.GUARDING, ConnectionClosed): State.CLOSED,
    (State.SILENT, Guarded): State.GUARDED,
    (State.SILENT, ConnectionClosed): State.CLOSED,
    (State.GUARDED, Forked): State.GUARDED,
    (State.GUARDED, TransferComplete): State.COMPLETE,
    (State.GUARDED, ConnectionClosed): State.CLOSED,
    (State.COMPLETE, ConnectionClosed): State.CLOSED,
}
"""(a side's state, the event it says) -> its next state; what is not here is a
protocol error (h11's ``_state.py`` way). Two more rules span both sides: LZHI
only answers LZGD, and LZFK goes only to a connection that said LZHI (an fd sent
into a socket nobody reads would keep the child's uffd, and its ranges, alive)."""


def _check_pid(pid: int) -> None:
    if not 0 < pid <= PID_MAX_LIMIT:
        raise LocalProtocolError(f"pid {pid} is outside 1..{PID_MAX_LIMIT}", field="pid")


class HandoverConnection:
    """The protocol state of one restorer-daemon connection (see the module docstring).

    Args:
        role: which end we are.
        finished: the restorer's "restore finished" was said already: a guardian
            taking over the restorer's end starts here.

    Example::

        daemon = HandoverConnection(Role.DAEMON)
        for segment in daemon.send(Guarded()):
            sock.sendmsg([segment.data])
        data, fds, _, _ = socket.recv_fds(sock, daemon.read_size, 4)
        daemon.receive_data(data, fds)
        event = daemon.next_event()   # TaskHandover(pid, fd), ZombieTask(pid), ...
    """

    __slots__ = ("_buf", "_eof", "_fds", "_pending_pid", "_truncated", "_unclaimed",
                 "daemon_state", "restorer_state", "role")

    def __init__(self, role: Role, *, finished: bool = False) -> None:
        self.role = role
        self.restorer_state = State.FINISHED if finished else State.HANDING_OVER
        self.daemon_state = State.SILENT
        self._buf = bytearray()
        self._fds: list[tuple[int, list[int]]] = []  # (offset in _buf of their byte, fds)
        self._unclaimed: list[int] = []  # fds refused: the caller's to close
        self._eof = False
        self._truncated = False
        self._pending_pid: int | None = None  # a live task's word is in; its carrier next

    # -- the two sides ------------------------------------------------------------------

    @property
    def our_state(self) -> State:
        return self.daemon_state if self.role is Role.DAEMON else self.restorer_state

    @property
    def their_state(self) -> State:
        return self.restorer_state if self.role is Role.DAEMON else self.daemon_state

    def _move(self, side: Role, event: Event, error: type[ProtocolError]) -> None:
        """Move ``side`` along :data:`TRANSITIONS` for ``event``, or raise ``error``."""
        state = self.daemon_state if side is Role.DAEMON else self.restorer_state
        following = TRANSITIONS.get((state, type(event)))
        if following is None:
            raise error(f"the {side.value} may not say {type(event).__name__} when "
                        f"{state.value}", field="word")
        if isinstance(event, GuardianPresent) and self.daemon_state is not State.GUARDED:
            raise error("LZHI answers LZGD, which the daemon has not said", field="word")
        if isinstance(event, Forked) and self.restorer_state is not State.GUARDING:
            raise error("LZFK before a guardian said LZHI: nobody would read the uffd",
                        field="word")
        if side is Role.DAEMON:
            self.daemon_state = following
        else:
            self.restorer_state = following

    # -- receiving ------------------------------------------------------------------------

    @property
    def read_size(self) -> int:
        """How many bytes to read next so that a read ends at a message boundary (where
        the kernel also ends one that brings fds): 1 for the byte carrying a uffd, else
        what is left of a 4-byte word."""
        if self._pending_pid is not None:
            return 1
        return max(1, _WORD - len(self._buf))

    def receive_data(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = (), *,
                     truncated: bool = False) -> None:
        """Feed what one read returned: ``data`` (``b""`` means EOF) and the fds that came
        with it (now the connection's: see :meth:`take_unclaimed_fds`); ``truncated``:
        the kernel dropped fds that found no room (MSG_CTRUNC)."""
        if fds:
            # Before any check: whatever happens next, they are ours to give back.
            if data:
                self._fds.append((len(self._buf) + len(data) - 1, list(fds)))
            else:
                self._unclaimed.extend(fds)
                self._truncated = True  # fds with no byte to carry them
        if truncated:
            self._truncated = True
        if not data:
            self._eof = True
        elif self._eof:
            self._truncated = True  # data after EOF: nothing sane sends it
        else:
            self._buf += data

    def take_unclaimed_fds(self) -> list[int]:
        """The fds received that no event handed out (after an error, or at the end):
        the caller closes them."""
        fds = [*self._unclaimed, *(fd for _, group in self._fds for fd in group)]
        self._unclaimed.clear()
        self._fds.clear()
        return fds

    def next_event(self) -> Event | NeedData:
        """The next event the peer sent, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the peer broke the protocol; the connection is then in
                :attr:`State.ERROR` (and every later call raises too).
        """
        theirs = Role.RESTORER if self.role is Role.DAEMON else Role.DAEMON
        if self.their_state is State.ERROR:
            raise RemoteProtocolError("the connection broke the protocol already")
        if self.their_state is State.CLOSED:
            return ConnectionClosed()
        try:
            if self._truncated:
                raise RemoteProtocolError("fds or data came where no message carries them "
                                          "(fds without a byte, fds the kernel truncated, "
                                          "data after EOF)", field="fds")
            event = self._parse()
            if not isinstance(event, NeedData):
                try:
                    self._move(theirs, event, RemoteProtocolError)
                except RemoteProtocolError:
                    if isinstance(event, TaskHandover | Forked):  # its fd is not handed out
                        self._unclaimed.append(event.fd)
                    raise
            return event
        except BaseException as exc:
            if self.role is Role.DAEMON:
                self.restorer_state = State.ERROR
            else:
                self.daemon_state = State.ERROR
            if isinstance(exc, LocalProtocolError):  # never: their words are checked as theirs
                raise RemoteProtocolError(str(exc), field=exc.field) from None
            raise

    def _refuse(self, fds: list[int], message: str, field: str) -> RemoteProtocolError:
        """``fds`` go back to the caller (take_unclaimed_fds); the error to raise."""
        self._unclaimed.extend(fds)
        return RemoteProtocolError(message, field=field)

    def _take(self, size: int) -> tuple[bytes, list[int]]:
        """The next ``size`` bytes and the fds that came with their last byte (those that
        came with another byte are refused)."""
        chunk = bytes(self._buf[:size])
        del self._buf[:size]
        mine: list[int] = []
        rest: list[tuple[int, list[int]]] = []
        stray: list[int] = []
        for offset, group in self._fds:
            if offset == size - 1:
                mine = group
            elif offset < size:
                stray += group
            else:
                rest.append((offset - size, group))
        self._fds = rest
        if stray:
            raise self._refuse([*stray, *mine], f"fds came with a byte of {chunk!r} that "
                                                "carries none", "fds")
        return chunk, mine

    def _need(self, size: int) -> bool:
        """Whether ``size`` bytes are buffered; at EOF with fewer, what is there is cut off."""
        if len(self._buf) >= size:
            return True
        if len(self._buf) > _MAX_BUFFER:
            raise RemoteProtocolError(f"more than {_MAX_BUFFER} unread bytes")
        if self._eof and self._pending_pid is not None:
            raise RemoteProtocolError(f"closed after task {self._pending_pid}'s pid, before "
                                      "sending its uffd", field="uffd")
        if self._eof and self._buf:
            raise RemoteProtocolError(f"closed after {len(self._buf)} of {size} bytes",
                                      field="word")
        return False

    def _parse(self) -> Event | NeedData:
        if self._pending_pid is not None:
            if not self._need(1):
                return NEED_DATA
            byte, fds = self._take(1)
            pid, self._pending_pid = self._pending_pid, None
            if byte != _CARRIER or len(fds) != 1:
                raise self._refuse(fds, f"task {pid}: expected one byte 0 carrying one uffd, "
                                        f"got {byte!r} with {len(fds)} fds", "uffd")
            return TaskHandover(pid, fds[0])
        if not self._need(_WORD):
            return ConnectionClosed() if self._eof else NEED_DATA
        word, fds = self._take(_WORD)
        if self.role is Role.DAEMON:
            if fds:
                raise self._refuse(fds, f"fds came with the word {word!r}", "fds")
            return self._restorer_word(word)
        if word == _FORKED:
            if len(fds) != 1:
                raise self._refuse(fds, f"LZFK came with {len(fds)} fds, not its uffd", "fds")
            return Forked(fds[0])
        if fds:
            raise self._refuse(fds, f"fds came with the word {word!r}", "fds")
        if word == _GUARDED:
            return Guarded()
        if word == _TRANSFER_COMPLETE:
            return TransferComplete()
        raise RemoteProtocolError(f"the daemon sent {word!r}, which it never would",
                                  field="word")

    def _restorer_word(self, word: bytes) -> Event | NeedData:
        if self.restorer_state is not State.HANDING_OVER:
            if word == _GUARDIAN:
                return GuardianPresent()
            raise RemoteProtocolError(f"the restorer sent {word!r} after restore finished",
                                      field="word")
        if word == _FINISHED_WORD:
            return RestoreFinished()
        (pid,) = _INT32.unpack(word)
        if 0 < pid <= PID_MAX_LIMIT:
            self._pending_pid = pid
            return self._parse()  # its carrier, if it came
        if -PID_MAX_LIMIT <= pid < 0:
            return ZombieTask(-pid)
        raise RemoteProtocolError(f"handover word {pid} is neither a pid nor the end marker",
                                  field="pid")

    # -- sending ----------------------------------------------------------------------------

    def send(self, event: Event) -> list[Segment]:
        """What sending ``event`` takes: one :class:`Segment` per ``sendmsg``.

        Raises:
            LocalProtocolError: we may not say that now (or a pid is out of range); our
                side is then in :attr:`State.ERROR`.
        """
        if self.our_state is State.ERROR:
            raise LocalProtocolError("the connection broke the protocol already")
        ours = (_RESTORER_EVENTS if self.role is Role.RESTORER else _DAEMON_EVENTS)
        try:
            if not isinstance(event, (*ours, ConnectionClosed)):
                raise LocalProtocolError(f"the {self.role.value} does not say "
                                         f"{type(event).__name__}", field="word")
            segments = self._encode(event)
            self._move(self.role, event, LocalProtocolError)
        except BaseException:
            if self.role is Role.DAEMON:
                self.daemon_state = State.ERROR
            else:
                self.restorer_state = State.ERROR
            raise
        return segments

    @staticmethod
    def _encode(event: Event) -> list[Segment]:
        if isinstance(event, TaskHandover):
            _check_pid(event.pid)
            return [Segment(_INT32.pack(event.pid)), Segment(_CARRIER, (event.fd,))]
        if isinstance(event, ZombieTask):
            _check_pid(event.pid)
            return [Segment(_INT32.pack(-event.pid))]
        if isinstance(event, RestoreFinished):
            return [Segment(_FINISHED_WORD)]
        if isinstance(event, GuardianPresent):
            return [Segment(_GUARDIAN)]
        if isinstance(event, Guarded):
            return [Segment(_GUARDED)]
        if isinstance(event, Forked):
            return [Segment(_FORKED, (event.fd,))]
        if isinstance(event, TransferComplete):
            return [Segment(_TRANSFER_COMPLETE)]
        return []  # ConnectionClosed: the I/O closes
