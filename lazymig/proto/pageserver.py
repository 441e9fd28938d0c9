"""A sans-IO codec for one page-server connection, for either end.

Bring your own I/O (h11's model): feed received bytes to
:meth:`PageServerConnection.receive_data` (``b""`` means EOF), pull typed
events out of :meth:`~PageServerConnection.next_event` until it says
:data:`NEED_DATA`, and turn the events you want to send into bytes with
:meth:`~PageServerConnection.send`. The codec never touches a socket.

Roles:

* :attr:`Role.SERVER` is the dump side (``criu dump --lazy-pages``,
  ``criu page-server``): it receives requests (GET, OPEN2, ADD_F with data,
  PARENT, CLOSE ...) and sends replies.
* :attr:`Role.CLIENT` is the lazy-pages daemon or a dump pushing images: it
  sends requests and receives the replies, which come strictly in request
  order (requests may be pipelined). A GET reply may carry fewer pages than
  asked: CRIU clamps it at the end of a page-pipe segment.

Page data is not an event of its own message type: after an :class:`AddPages`
with PE.PRESENT or a :class:`GetReply` the bytes arrive as :class:`PageData`
chunks, the last one marked ``last``. An I/O layer that wants the payload in a
buffer of its own (to UFFDIO_COPY from it) may read it itself and report it
with :meth:`~PageServerConnection.payload_received_directly`, or have the
buffered part moved there with :meth:`~PageServerConnection.receive_payload_into`
instead of taking PageData events.

Whatever breaks the protocol raises :class:`~lazymig.errors.RemoteProtocolError`
(what the peer sent) or :class:`~lazymig.errors.LocalProtocolError` (what we
were asked to send), naming the offending field; the connection then stays in
:attr:`State.ERROR`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

from lazymig.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.wire import (
    PS_CMD_BITS,
    VALID_FLAGS,
    Cmd,
    DstType,
    Header,
    WireVersion,
    decode_dst_id,
    encode_dst_id,
    unpack_header,
)

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_PAGES",
    "GET_CMD",
    "NEED_DATA",
    "AddPages",
    "CloseReply",
    "CloseRequest",
    "ConnectionClosed",
    "Event",
    "GetReply",
    "GetRequest",
    "OpenReply",
    "OpenRequest",
    "PageData",
    "PageServerConnection",
    "ParentReply",
    "ParentRequest",
    "Role",
    "State",
    "check_get",
    "get_reply_error",
]

DEFAULT_MAX_PAGES: Final = (4 << 20) // PAGE_SIZE
"""Most pages one message may carry or ask for: 4 MiB, CRIU's MAX_XFER_LEN."""

DEFAULT_MAX_IN_FLIGHT: Final = 1024
"""Most requests awaiting a reply on one connection (pipelined GETs, OPEN2, PARENT).

lazymig's daemon keeps a few background chunks plus one GET per faulting thread in
flight; a peer that piles up more is refused rather than queued without bound.
"""

MAX_PID: Final = (1 << 31) - 1
GET_CMD: Final = int(Cmd.GET)
"""``cmd`` of a GET header (no flags): for an I/O layer packing GETs itself (see check_get)."""
_ADDRESS_LIMIT: Final = 1 << 64
_INT32 = struct.Struct("=i")


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`PageServerConnection.next_event` when more bytes are needed."""


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class State(enum.Enum):
    OPEN = "open"
    """Exchanging messages."""
    CLOSING = "closing"
    """CLOSE was sent or received: only its reply and then EOF may follow."""
    CLOSED = "closed"
    """EOF seen."""
    ERROR = "error"
    """A protocol error happened; the connection is unusable."""


# Events: frozen and slotted; don't subclass them.


@dataclass(frozen=True, slots=True)
class GetRequest:
    """PS_IOV_GET: send ``nr_pages`` pages at dump-time address ``vaddr`` of ``pid``."""

    pid: int
    vaddr: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class GetReply:
    """The header of a GET reply; ``nr_pages * PAGE_SIZE`` bytes of PageData follow."""

    pid: int
    vaddr: int
    nr_pages: int


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """PS_IOV_OPEN2 (``wants_reply``) or the legacy PS_IOV_OPEN of an image target."""

    dst_type: DstType
    id: int
    wants_reply: bool = True


@dataclass(frozen=True, slots=True)
class OpenReply:
    """The one-byte reply to OPEN2."""

    has_parent: bool


@dataclass(frozen=True, slots=True)
class ParentRequest:
    """PS_IOV_PARENT: does the image target have a parent image?"""

    dst_type: DstType
    id: int


@dataclass(frozen=True, slots=True)
class ParentReply:
    """The 4-byte reply to PARENT."""

    has_parent: bool


@dataclass(frozen=True, slots=True)
class AddPages:
    """A pagemap entry pushed to a page server (ADD_F; legacy ADD and HOLE map here).

    Page data (:class:`PageData`) follows iff ``flags`` has PE.PRESENT.
    """

    dst_type: DstType
    id: int
    vaddr: int
    nr_pages: int
    flags: PE


@dataclass(frozen=True, slots=True)
class PageData:
    """A chunk of page bytes; ``last`` marks the end of the current message."""

    data: bytes
    last: bool


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """PS_IOV_CLOSE (or FORCE_CLOSE): end of session, a 4-byte status is owed."""

    force: bool = False


@dataclass(frozen=True, slots=True)
class CloseReply:
    """The 4-byte status that answers CLOSE (0 means success)."""

    status: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """EOF at a message boundary; ``unanswered`` counts requests left without reply."""

    unanswered: int = 0


Event: TypeAlias = (GetRequest | GetReply | OpenRequest | OpenReply | ParentRequest
                    | ParentReply | AddPages | PageData | CloseRequest | CloseReply
                    | ConnectionClosed)

_REQUESTS = (GetRequest, OpenRequest, ParentRequest, AddPages, CloseRequest)
_REPLIES = (GetReply, OpenReply, ParentReply, CloseReply)


class PageServerConnection:
    """The protocol state of one page-server connection (see the module docstring).

    Args:
        role: which end we are.
        version: the header layout spoken on this connection.
        max_pages: the most pages a message may carry or ask for.
        max_in_flight: the most requests that may await a reply at once; a server
            refuses the request over it (RemoteProtocolError), a client does not
            send it (LocalProtocolError).

    Example::

        client = PageServerConnection(Role.CLIENT, WireVersion.V1)
        sock.sendall(client.send(GetRequest(pid=1234, vaddr=0x7F0000001000, nr_pages=1)))
        client.receive_data(sock.recv(65536))
        event = client.next_event()   # GetReply(...), then PageData(...)
    """

    __slots__ = ("_buf", "_eof", "_header_struct", "_in_payload", "_max_in_flight", "_max_pages",
                 "_out_payload", "_pos", "_unanswered", "role", "state", "version")

    def __init__(self, role: Role, version: WireVersion = WireVersion.V2, *,
                 max_pages: int = DEFAULT_MAX_PAGES,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if max_pages < 1 or max_pages > version.max_nr_pages:
            raise ValueError(f"max_pages must be between 1 and {version.max_nr_pages}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._max_in_flight = max_in_flight
        self.role = role
        self.version = version
        self._header_struct = version.header_struct
        self.state = State.OPEN
        self._max_pages = max_pages
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._in_payload = 0  # bytes of page data still to come in the current message
        self._out_payload = 0  # bytes of page data we still owe after a header we sent
        # Requests we sent (client) or received (server) whose reply is still owed.
        self._unanswered: deque[GetRequest | OpenRequest | ParentRequest | CloseRequest] = deque()

    # -- properties an I/O layer uses to size its reads and writes

    @property
    def payload_remaining(self) -> int:
        """Bytes of page data still to arrive for the message being received."""
        return self._in_payload

    @property
    def payload_owed(self) -> int:
        """Bytes of page data we must still send after the last header we sent."""
        return self._out_payload

    @property
    def unanswered(self) -> int:
        """Requests awaiting a reply (sent by a client, received by a server)."""
        return len(self._unanswered)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf) - self._pos

    # -- receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; an empty ``data`` means the peer closed (EOF)."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        if not data:
            self._eof = True
            return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def payload_received_directly(self, nbytes: int) -> None:
        """Account for ``nbytes`` of page data the caller read into its own buffer.

        Only allowed while nothing is buffered and page data is expected.
        """
        if self.buffered or nbytes > self._in_payload or nbytes < 0:
            raise LocalProtocolError(
                f"cannot take {nbytes} payload bytes directly (expected {self._in_payload}, "
                f"{self.buffered} buffered)")
        self._in_payload -= nbytes

    def receive_payload_into(self, buffer: memoryview) -> int:
        """Move buffered page data of the message being received into ``buffer``.

        The bytes the next :class:`PageData` events would carry, as many as
        ``buffer`` holds, without building the events: for an I/O layer that
        keeps the payload in a buffer of its own. Returns how many were moved
        (0: none buffered, or no payload expected); raises RemoteProtocolError
        if the peer closed before sending them all.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        pos = self._pos
        count = min(len(self._buf) - pos, self._in_payload, len(buffer))
        if count <= 0:
            if self._in_payload and self._eof:
                self.state = State.ERROR
                raise _payload_missing(self._in_payload)
            return 0
        buffer[:count] = memoryview(self._buf)[pos:pos + count]
        self._pos = pos + count
        self._in_payload -= count
        return count

    def next_event(self) -> Event | _NeedData:
        """Return the next complete event, or :data:`NEED_DATA`."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        try:
            return self._next_event()
        except BaseException:
            self.state = State.ERROR
            raise

    def _next_event(self) -> Event | _NeedData:
        if self._in_payload:
            return self._take_payload()
        if self.state is State.CLOSED:
            return NEED_DATA
        if len(self._buf) == self._pos:  # nothing buffered
            if self._eof:
                self.state = State.CLOSED
                return ConnectionClosed(len(self._unanswered))
            return NEED_DATA
        if self.role is Role.SERVER:
            return self._next_request()
        return self._next_reply()

    def _has(self, size: int) -> bool:
        """Whether the next ``size`` bytes are buffered (raising on EOF mid-message)."""
        if len(self._buf) - self._pos < size:
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed in the middle of a message "
                    f"({self.buffered} of {size} bytes received)")
            return False
        return True

    def _take(self, size: int) -> bytes | None:
        """The next ``size`` buffered bytes, or None (raising on EOF mid-message)."""
        if not self._has(size):
            return None
        chunk = bytes(self._buf[self._pos:self._pos + size])
        self._pos += size
        return chunk

    def _take_payload(self) -> PageData | _NeedData:
        available = min(self.buffered, self._in_payload)
        if available == 0:
            if self._eof:
                raise _payload_missing(self._in_payload)
            return NEED_DATA
        data = bytes(self._buf[self._pos:self._pos + available])
        self._pos += available
        self._in_payload -= available
        return PageData(data, last=self._in_payload == 0)

    def _next_request(self) -> Event | _NeedData:
        if self.state is State.CLOSING:
            raise RemoteProtocolError("data received after CLOSE", field="cmd")
        raw = self._take(self.version.header_size)
        if raw is None:
            return NEED_DATA
        return self._decode_request(unpack_header(self.version, raw))

    def _decode_request(self, h: Header) -> Event:
        try:
            code = Cmd(h.code)
        except ValueError:
            raise RemoteProtocolError(f"unknown command {h.code:#x}", field="cmd") from None
        if code is Cmd.GET:
            _check_flags(h.flags, allowed=0, remote=True)
            _check_pages(h.nr_pages, h.vaddr, self._max_pages, remote=True)
            if not 0 < h.dst_id <= MAX_PID:
                raise RemoteProtocolError(f"GET for invalid pid {h.dst_id}", field="dst_id")
            get = GetRequest(h.dst_id, h.vaddr, h.nr_pages)
            self._await_reply(get, remote=True)
            return get
        if code in (Cmd.CLOSE, Cmd.FORCE_CLOSE):
            close = CloseRequest(force=code is Cmd.FORCE_CLOSE)
            self._await_reply(close, remote=True)
            self.state = State.CLOSING
            return close
        dst_type, id_ = _decode_target(h.dst_id)
        if code in (Cmd.OPEN, Cmd.OPEN2):
            opened = OpenRequest(dst_type, id_, wants_reply=code is Cmd.OPEN2)
            if opened.wants_reply:
                self._await_reply(opened, remote=True)
            return opened
        if code is Cmd.PARENT:
            parent = ParentRequest(dst_type, id_)
            self._await_reply(parent, remote=True)
            return parent
        if code is Cmd.ADD:
            _check_flags(h.flags, allowed=0, remote=True)
            flags = PE.PRESENT
        elif code is Cmd.HOLE:
            _check_flags(h.flags, allowed=0, remote=True)
            flags = PE.PARENT
        else:
            flags = _check_flags(h.flags, allowed=int(VALID_FLAGS), remote=True)
        bound = self._max_pages if flags & PE.PRESENT else None
        _check_pages(h.nr_pages, h.vaddr, bound, remote=True)
        if flags & PE.PRESENT:
            self._in_payload = h.nr_pages * PAGE_SIZE
        return AddPages(dst_type, id_, h.vaddr, h.nr_pages, flags)

    def _await_reply(self, request: GetRequest | OpenRequest | ParentRequest | CloseRequest,
                     *, remote: bool) -> None:
        if len(self._unanswered) >= self._max_in_flight:
            raise _error(remote, f"more than {self._max_in_flight} requests awaiting a reply "
                                 f"on one connection (max_in_flight)", "cmd")
        self._unanswered.append(request)

    def _next_reply(self) -> Event | _NeedData:
        if not self._unanswered:
            raise RemoteProtocolError("data received while no request is outstanding")
        request = self._unanswered[0]
        if isinstance(request, GetRequest):
            header = self._header_struct
            if not self._has(header.size):
                return NEED_DATA
            _, nr_pages, vaddr, dst_id = header.unpack_from(self._buf, self._pos)
            self._pos += header.size
            self._unanswered.popleft()
            error = get_reply_error(request.pid, request.vaddr, request.nr_pages, dst_id, vaddr,
                                    nr_pages)
            if error is not None:
                raise error
            self._in_payload = nr_pages * PAGE_SIZE
            return GetReply(dst_id, vaddr, nr_pages)
        if isinstance(request, OpenRequest):
            raw = self._take(1)
            if raw is None:
                return NEED_DATA
            self._unanswered.popleft()
            if raw[0] > 1:
                raise RemoteProtocolError(f"OPEN2 reply {raw[0]} is not 0 or 1",
                                          field="has_parent")
            return OpenReply(bool(raw[0]))
        raw = self._take(4)
        if raw is None:
            return NEED_DATA
        self._unanswered.popleft()
        (value,) = _INT32.unpack(raw)
        if isinstance(request, ParentRequest):
            return ParentReply(value != 0)
        return CloseReply(value)

    # -- sending

    def send(self, event: Event) -> bytes:
        """Return the bytes that carry ``event``; raise LocalProtocolError if not allowed."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        try:
            return self._send(event)
        except ProtocolError:
            self.state = State.ERROR
            raise

    def payload_sent_directly(self, nbytes: int) -> None:
        """Account for ``nbytes`` of page data the caller sent itself (e.g. by splice)."""
        if nbytes > self._out_payload or nbytes < 0:
            raise LocalProtocolError(f"{nbytes} payload bytes sent, {self._out_payload} owed")
        self._out_payload -= nbytes

    def _send(self, event: Event) -> bytes:
        if isinstance(event, PageData):
            self.payload_sent_directly(len(event.data))
            if event.last and self._out_payload:
                raise LocalProtocolError(f"last PageData leaves {self._out_payload} bytes owed")
            return event.data
        if self._out_payload:
            raise LocalProtocolError(
                f"{type(event).__name__} sent while {self._out_payload} bytes of page data "
                "are still owed")
        # A server still answers the requests that came before CLOSE.
        if self.state is not State.OPEN and not (
                self.role is Role.SERVER and self.state is State.CLOSING):
            raise LocalProtocolError(f"cannot send {type(event).__name__} in state {self.state}")
        wanted = _REQUESTS if self.role is Role.CLIENT else _REPLIES
        if not isinstance(event, wanted):
            raise LocalProtocolError(f"a {self.role.value} does not send {type(event).__name__}")
        if self.role is Role.CLIENT:
            return self._send_request(event)
        return self._send_reply(event)

    def _header(self, code: Cmd, flags: int, nr_pages: int, vaddr: int, dst_id: int) -> bytes:
        try:  # pack_header's layout, with the struct at hand: every GET comes here
            return self._header_struct.pack((flags << PS_CMD_BITS) | code, nr_pages, vaddr,
                                            dst_id)
        except struct.error as exc:
            raise LocalProtocolError(
                f"field out of range for {self.version.value}: {exc}") from None

    def _send_request(self, event: Event) -> bytes:
        if isinstance(event, GetRequest):
            check_get(event.pid, event.vaddr, event.nr_pages, self._max_pages)
            self._await_reply(event, remote=False)
            return self._header(Cmd.GET, 0, event.nr_pages, event.vaddr, event.pid)
        if isinstance(event, CloseRequest):
            self._await_reply(event, remote=False)
            self.state = State.CLOSING
            return self._header(Cmd.FORCE_CLOSE if event.force else Cmd.CLOSE, 0, 0, 0, 0)
        if isinstance(event, OpenRequest):
            if event.wants_reply:
                self._await_reply(event, remote=False)
            code = Cmd.OPEN2 if event.wants_reply else Cmd.OPEN
            return self._header(code, 0, 0, 0, encode_dst_id(event.dst_type, event.id))
        if isinstance(event, ParentRequest):
            self._await_reply(event, remote=False)
            return self._header(Cmd.PARENT, 0, 0, 0, encode_dst_id(event.dst_type, event.id))
        assert isinstance(event, AddPages)
        flags = _check_flags(int(event.flags), allowed=int(VALID_FLAGS), remote=False)
        bound = self._max_pages if flags & PE.PRESENT else None
        _check_pages(event.nr_pages, event.vaddr, bound, remote=False)
        data = self._header(Cmd.ADD_F, flags, event.nr_pages, event.vaddr,
                            encode_dst_id(event.dst_type, event.id))
        if flags & PE.PRESENT:
            self._out_payload = event.nr_pages * PAGE_SIZE
        return data

    def _send_reply(self, event: Event) -> bytes:
        if not self._unanswered:
            raise LocalProtocolError(f"{type(event).__name__} sent with no request to answer")
        request = self._unanswered[0]
        if isinstance(event, GetReply):
            if not isinstance(request, GetRequest):
                raise LocalProtocolError(f"GetReply does not answer {request}")
            if (event.pid, event.vaddr) != (request.pid, request.vaddr) or not (
                    0 < event.nr_pages <= request.nr_pages):
                raise LocalProtocolError(f"{event} does not answer {request}", field="nr_pages")
            self._unanswered.popleft()
            self._out_payload = event.nr_pages * PAGE_SIZE
            return self._header(Cmd.ADD_F, PE.PRESENT, event.nr_pages, event.vaddr, event.pid)
        expected = {OpenReply: OpenRequest, ParentReply: ParentRequest, CloseReply: CloseRequest}
        if not isinstance(request, expected[type(event)]):
            raise LocalProtocolError(f"{type(event).__name__} does not answer {request}")
        self._unanswered.popleft()
        if isinstance(event, OpenReply):
            return b"\x01" if event.has_parent else b"\x00"
        if isinstance(event, ParentReply):
            return _INT32.pack(1 if event.has_parent else 0)
        assert isinstance(event, CloseReply)
        return _INT32.pack(event.status)


def check_get(pid: int, vaddr: int, nr_pages: int, max_pages: int) -> None:
    """Raise LocalProtocolError unless a client may send a GET of ``nr_pages`` pages at
    ``vaddr`` of ``pid`` (``max_pages``: the connection's bound). The one check of a
    GET, whether the codec sends it or an I/O layer packs it itself with
    :attr:`~lazymig.proto.wire.WireVersion.header_struct` (``cmd`` = :data:`GET_CMD`)."""
    if 0 < nr_pages <= max_pages and not vaddr % PAGE_SIZE and \
            vaddr + nr_pages * PAGE_SIZE <= _ADDRESS_LIMIT and 0 < pid <= MAX_PID:
        return
    _check_pages(nr_pages, vaddr, max_pages, remote=False)
    raise LocalProtocolError(f"invalid pid {pid}", field="dst_id")


def get_reply_error(pid: int, vaddr: int, nr_pages: int, reply_pid: int, reply_vaddr: int,
                    reply_nr_pages: int) -> RemoteProtocolError | None:
    """What is wrong with a GET reply header (``reply_*``, its ``cmd`` ignored as CRIU
    does) for the request of ``nr_pages`` at ``vaddr`` of ``pid``, or None: it must
    echo both and carry 1 to ``nr_pages`` pages, whose bytes follow it."""
    if reply_pid != pid:
        return RemoteProtocolError(
            f"reply for pid {reply_pid} while pid {pid} was asked (out of order)",
            field="dst_id")
    if reply_vaddr != vaddr:
        return RemoteProtocolError(f"reply for {reply_vaddr:#x} while {vaddr:#x} was asked",
                                   field="vaddr")
    if not 0 < reply_nr_pages <= nr_pages:
        return RemoteProtocolError(
            f"reply carries {reply_nr_pages} pages for a request of {nr_pages}",
            field="nr_pages")
    return None


def _error(remote: bool, message: str, field: str) -> ProtocolError:
    return (RemoteProtocolError if remote else LocalProtocolError)(message, field=field)


def _payload_missing(count: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"connection closed with {count} bytes of page data missing",
                               field="nr_pages")


def _check_flags(flags: int, *, allowed: int, remote: bool) -> PE:
    if flags & ~allowed:
        raise _error(remote, f"invalid flags {flags:#x}", "flags")
    if flags & PE.PARENT and flags & PE.PRESENT:
        raise _error(remote, "PE_PARENT and PE_PRESENT together", "flags")
    return PE(flags)


def _check_pages(nr_pages: int, vaddr: int, bound: int | None, *, remote: bool) -> None:
    if nr_pages < 1:
        raise _error(remote, "nr_pages is 0", "nr_pages")
    if bound is not None and nr_pages > bound:
        raise _error(remote, f"nr_pages {nr_pages} is above the limit of {bound}", "nr_pages")
    if vaddr % PAGE_SIZE:
        raise _error(remote, f"vaddr {vaddr:#x} is not page-aligned", "vaddr")
    if vaddr + nr_pages * PAGE_SIZE > _ADDRESS_LIMIT:
        raise _error(remote, f"{nr_pages} pages at {vaddr:#x} overflow the address space",
                     "nr_pages")


def _decode_target(dst_id: int) -> tuple[DstType, int]:
    try:
        return decode_dst_id(dst_id)
    except ValueError as exc:
        raise RemoteProtocolError(str(exc), field="dst_id") from None
