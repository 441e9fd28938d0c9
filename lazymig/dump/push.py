"""Pre-dump pages pushed to a page server on the destination (``criu pre-dump
--page-server``), with the page-push messages of CRIU's protocol
(criu/page-xfer.c, the client of ``page_server_serve``).

One session per pre-dump: PS_IOV_OPEN2 of the process's pagemap (the server
answers one byte: whether it has a parent images dir holding that pagemap),
then one PS_IOV_ADD_F per pagemap entry in address order (PE_PRESENT with the
page bytes after it, PE_PARENT with none), then PS_IOV_CLOSE, answered with a
4-byte status. Either ``criu page-server -D DIR`` or ``lazymig page-server -D
DIR`` (:mod:`lazymig.dump.receiver`) takes it and writes ``pagemap-PID.img``
and a pages image into DIR.

Blocking socket I/O: call it from a worker thread (the rounds are written there).
"""

from __future__ import annotations

import dataclasses
import logging
import socket

from lazymig.errors import BrokenResourceError, ConfigurationError, RemoteProtocolError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.pageserver import (
    NEED_DATA,
    AddPages,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    OpenReply,
    OpenRequest,
    PageServerConnection,
    Role,
)
from lazymig.proto.wire import DstType, WireVersion

__all__ = ["PagePush", "PushTarget"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PushTarget:
    """A page server that takes pushed pages (``criu page-server -D DIR --port P``)."""

    address: str
    port: int
    wire: WireVersion = WireVersion.V2
    """The header layout: V1 for CRIU <= 4.1 (24 bytes), V2 for CRIU >= 4.2."""
    timeout: float = 60.0
    """Seconds to wait on the server (connect, a reply, a send) before giving up."""

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class PagePush:
    """One push session for the pagemap of process ``pid`` (see the module docstring).

    :meth:`open` connects and sends OPEN2; then :meth:`present` and :meth:`parent`
    in address order; :meth:`close` ends the session (CLOSE, status 0 expected);
    :meth:`abort` drops the connection (the server keeps no complete pagemap).

    Raises:
        BrokenResourceError: the server cannot be reached, or the connection broke.
        ConfigurationError: ``needs_parent`` and the server has no parent images.
        RemoteProtocolError: the server answered what the protocol does not allow.
    """

    def __init__(self, target: PushTarget, pid: int) -> None:
        self.target = target
        self.pid = pid
        self.pages_sent = 0
        self._conn = PageServerConnection(Role.CLIENT, target.wire)
        self._sock: socket.socket | None = None

    def open(self, *, needs_parent: bool) -> bool:
        """Connect and open the pagemap; returns whether the server has a parent
        for it."""
        try:
            self._sock = socket.create_connection((self.target.address, self.target.port),
                                                  timeout=self.target.timeout)
        except OSError as exc:
            raise BrokenResourceError(
                f"cannot reach the page server at {self.target} to push pages ({exc}): start "
                f"`lazymig page-server -D DIR --port {self.target.port}` (or `criu "
                "page-server`) on the destination first") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send(self._conn.send(OpenRequest(DstType.PID, self.pid)))
        reply = self._reply()
        assert isinstance(reply, OpenReply)
        if needs_parent and not reply.has_parent:
            raise ConfigurationError(
                f"the page server at {self.target} has no parent images of process {self.pid}, "
                "and this pre-dump only sends what changed since the last one: start it with "
                "--prev-images-dir pointing at the dir that received the previous pre-dump")
        return reply.has_parent

    def present(self, vaddr: int, data: memoryview) -> None:
        """Push the pages of ``data`` (whole pages) at ``vaddr`` (PE_PRESENT)."""
        nr_pages = len(data) // PAGE_SIZE
        self._send(self._conn.send(AddPages(DstType.PID, self.pid, vaddr, nr_pages,
                                            PE.PRESENT)))
        self._send(data)  # straight from the caller's buffer, not through an event
        self._conn.payload_sent_directly(len(data))
        self.pages_sent += nr_pages

    def parent(self, vaddr: int, nr_pages: int) -> None:
        """Say that ``nr_pages`` from ``vaddr`` are as in the parent (PE_PARENT)."""
        self._send(self._conn.send(AddPages(DstType.PID, self.pid, vaddr, nr_pages,
                                            PE.PARENT)))

    def close(self) -> None:
        """End the session: CLOSE, and the server's status (0: images written)."""
        self._send(self._conn.send(CloseRequest()))
        reply = self._reply()
        assert isinstance(reply, CloseReply)
        if reply.status != 0:
            raise RemoteProtocolError(f"the page server at {self.target} ended the push with "
                                      f"status {reply.status}: see its log", field="status")
        self._drop()

    def abort(self) -> None:
        """Drop the connection without CLOSE (idempotent)."""
        self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, data: bytes | memoryview) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise BrokenResourceError(f"pushing pages to {self.target}: {exc}") from exc

    def _reply(self) -> object:
        assert self._sock is not None
        while True:
            event = self._conn.next_event()
            if event is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    raise BrokenResourceError(f"the page server at {self.target} hung up "
                                              "before answering (see its log)")
                return event
            try:
                data = self._sock.recv(64)
            except OSError as exc:
                raise BrokenResourceError(f"waiting on the page server at {self.target}: "
                                          f"{exc}") from exc
            self._conn.receive_data(data)
