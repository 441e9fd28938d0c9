"""sock_diag(7) for unix sockets: a socket's type, state, peer and name by its inode.

The peer of an unnamed unix socket (a socketpair's end) is known only to the
kernel: CRIU asks NETLINK_SOCK_DIAG (``UNIX_DIAG_PEER``), and so does
:func:`unix_socket`. It answers for the sockets of the caller's network
namespace.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct
from collections.abc import Callable
from typing import Final

from lazymig.errors import LazyMigOSError
from lazymig.linux.vm import copy_fd

__all__ = ["UnixSocket", "describe_socket", "unix_socket"]

_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 1
_NLMSG_ERROR: Final = 2
_UDIAG_SHOW_NAME: Final = 0x01
_UDIAG_SHOW_PEER: Final = 0x04
_UNIX_DIAG_NAME: Final = 0
_UNIX_DIAG_PEER: Final = 2
_UNIX_DIAG_SHUTDOWN: Final = 6
_NLMSG: Final = struct.Struct("=IHHII")  # struct nlmsghdr
_REQ: Final = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_MSG: Final = struct.Struct("=BBBBIII")  # struct unix_diag_msg
_NLA: Final = struct.Struct("=HH")  # struct nlattr
_NO_COOKIE: Final = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True, slots=True)
class UnixSocket:
    """What sock_diag tells of one unix socket."""

    ino: int
    type: int
    """SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET."""
    state: int
    """The kernel's TCP_* state: 1 (ESTABLISHED) for a connected one, 10 (LISTEN)..."""
    peer: int
    """The peer's inode (0: none)."""
    name: bytes | None
    """The address it is bound to (None: unnamed)."""
    shutdown: int
    """``sk_shutdown``: 1 (RCV_SHUTDOWN) | 2 (SEND_SHUTDOWN)."""


def unix_socket(ino: int) -> UnixSocket | None:
    """The unix socket with inode ``ino`` in this network namespace, or None if there
    is none. Raises LazyMigOSError if sock_diag cannot be asked (a kernel
    without CONFIG_UNIX_DIAG)."""
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_NAME | _UDIAG_SHOW_PEER,
                    _NO_COOKIE, _NO_COOKIE)
    msg = _NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.sendto(msg, (0, 0))
            reply = nl.recv(65536)
    except OSError as exc:
        raise LazyMigOSError(exc.errno or 0, "asking sock_diag about a unix socket") from exc
    _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", reply, _NLMSG.size)[0]
        if err == errno.ENOENT:
            return None
        raise LazyMigOSError(err, f"sock_diag of unix socket {ino}")
    _family, sk_type, state, _pad, got, _c1, _c2 = _MSG.unpack_from(reply, _NLMSG.size)
    peer, name, shutdown = 0, None, 0
    at = _NLMSG.size + _MSG.size
    while at + _NLA.size <= len(reply):
        size, attr = _NLA.unpack_from(reply, at)
        if size < _NLA.size:
            break
        value = reply[at + _NLA.size:at + size]
        if attr == _UNIX_DIAG_PEER:
            peer = struct.unpack("=I", value)[0]
        elif attr == _UNIX_DIAG_NAME:
            name = value
        elif attr == _UNIX_DIAG_SHUTDOWN:
            shutdown = value[0]
        at += (size + 3) & ~3
    return UnixSocket(got, sk_type, state, peer, name, shutdown)


_FAMILIES: Final = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6", socket.AF_UNIX: "unix",
                    socket.AF_NETLINK: "netlink", socket.AF_PACKET: "packet"}
_KINDS: Final = {(socket.SOCK_STREAM, socket.IPPROTO_TCP): "TCP",
                 (socket.SOCK_DGRAM, socket.IPPROTO_UDP): "UDP",
                 socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram",
                 socket.SOCK_SEQPACKET: "seqpacket", socket.SOCK_RAW: "raw"}


def describe_socket(pid: int, fd: int) -> str:
    """What socket fd ``fd`` of ``pid`` is, for an error message: "a TCP socket
    listening on 127.0.0.1:8000", "a unix stream socket connected to
    /run/x.sock"... ("a socket" when it cannot be asked)."""
    try:
        sock = socket.socket(fileno=copy_fd(pid, fd))
    except OSError:
        return "a socket"
    with sock:
        family = _FAMILIES.get(sock.family, f"family {int(sock.family)}")
        kind = _KINDS.get((sock.type, sock.proto)) or _KINDS.get(sock.type, "")
        what = f"a {kind} socket" if family in ("IPv4", "IPv6") and kind in ("TCP", "UDP") \
            else f"a {family} {kind} socket".replace("  ", " ")
        local = _address(sock.getsockname)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return f"{what} listening on {local}"
        peer = _address(sock.getpeername)
        if peer:
            return f"{what} connected to {peer}" + (f" from {local}" if local else "")
        return f"{what} bound to {local}" if local else what


def _address(get: Callable[[], object]) -> str:
    """An address as people write it ("" for none): host:port, [v6]:port, a path."""
    try:
        addr = get()
    except OSError:
        return ""
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        if not port and host in ("0.0.0.0", "::"):
            return ""  # not bound
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(addr, bytes):
        return "@" + addr[1:].decode(errors="replace") if addr[:1] == b"\0" else \
            addr.decode(errors="replace")
    return str(addr) if addr else ""
