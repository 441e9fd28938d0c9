"""asyncio I/O for the restore-to-daemon handover (codec in :mod:`lazymig.proto.handover`).

The socket is used raw, never through a buffered stream: the byte that carries
a uffd must be read with ``recvmsg`` and room for its SCM_RIGHTS, or the kernel
drops the fd. Reads and writes try the syscall first and only wait on the
loop's reader/writer callbacks when it would block (asyncio's own
``sock_recv_into`` pattern), so they work on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import array
import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from lazymig._aio import retry_until_ready
from lazymig.errors import BrokenResourceError, RemoteProtocolError
from lazymig.proto.handover import (
    FD_CARRIER,
    WORD_SIZE,
    RestoreFinished,
    TaskHandover,
    ZombieTask,
    decode_word,
    encode_restore_finished,
    encode_task,
    encode_zombie,
)

__all__ = ["ReceivedTask", "receive_record", "send_restore_finished", "send_task", "send_zombie"]

_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
_UFFD_LINK = "anon_inode:[userfaultfd]"
"""What /proc/self/fd/N reads for a userfaultfd."""


@dataclass(frozen=True, slots=True)
class ReceivedTask:
    """A live task handed over: its image pid and the uffd, now owned by the receiver."""

    pid: int
    fd: int


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes; b"" on EOF before the first byte."""
    data = b""
    while len(data) < size:
        want = size - len(data)
        chunk = await retry_until_ready(sock.fileno(), functools.partial(sock.recv, want))
        if not chunk:
            if data:
                raise RemoteProtocolError(
                    f"restorer closed the connection after {len(data)} of {size} bytes")
            return b""
        data += chunk
    return data


def _recv_fd(sock: socket.socket) -> int:
    data, ancdata, flags, _ = sock.recvmsg(1, _FD_SPACE)
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_CTRUNC or len(fds) != 1 or data != FD_CARRIER:
        for fd in fds:
            os.close(fd)
        if not data:
            raise RemoteProtocolError("restorer closed the connection before sending the uffd")
        raise RemoteProtocolError(
            f"expected one byte carrying one uffd, got {data!r} with {len(fds)} fds"
            + (" (truncated)" if flags & socket.MSG_CTRUNC else ""), field="uffd")
    fd = fds[0]
    link = str(Path(f"/proc/self/fd/{fd}").readlink())
    if link != _UFFD_LINK:  # a peer's pipe or file would be read as uffd events
        os.close(fd)
        raise RemoteProtocolError(f"the fd handed over is not a userfaultfd but {link}",
                                  field="uffd")
    return fd


async def receive_record(sock: socket.socket) -> ReceivedTask | ZombieTask | RestoreFinished | None:
    """Receive one handover record from a non-blocking UNIX stream socket.

    Returns a :class:`ReceivedTask` (whose fd the caller now owns), a
    :class:`~lazymig.proto.handover.ZombieTask`, the
    :class:`~lazymig.proto.handover.RestoreFinished` marker, or None at EOF on a
    record boundary. Raises :class:`~lazymig.errors.RemoteProtocolError` for
    anything else.
    """
    word = await _recv_exactly(sock, WORD_SIZE)
    if not word:
        return None
    record = decode_word(word)
    if isinstance(record, TaskHandover):
        fd = await retry_until_ready(sock.fileno(), functools.partial(_recv_fd, sock))
        return ReceivedTask(record.pid, fd)
    return record


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = await retry_until_ready(sock.fileno(), functools.partial(sock.send, view),
                                           writable=True)
        except OSError as exc:
            raise BrokenResourceError(f"lazy-pages daemon connection lost: {exc}") from exc
        view = view[sent:]


async def send_task(sock: socket.socket, pid: int, uffd: int) -> None:
    """Hand a live task's uffd to the daemon (the receiver gets its own copy of the fd)."""
    await _send_all(sock, encode_task(pid))
    try:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]).tobytes())]
        await retry_until_ready(sock.fileno(), functools.partial(
            sock.sendmsg, [FD_CARRIER], rights), writable=True)
    except OSError as exc:
        raise BrokenResourceError(f"lazy-pages daemon connection lost: {exc}") from exc


async def send_zombie(sock: socket.socket, pid: int) -> None:
    """Tell the daemon that task ``pid`` is a zombie (no memory to fill)."""
    await _send_all(sock, encode_zombie(pid))


async def send_restore_finished(sock: socket.socket) -> None:
    """Tell the daemon that every task has been handed over."""
    await _send_all(sock, encode_restore_finished())
