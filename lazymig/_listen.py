"""The listening sockets of the daemon and the page server, bound before anything heavy.

A listening socket is the readiness of both servers: once it listens, the
kernel completes connections and queues them (and whatever the peer sends,
SCM_RIGHTS fds included) until the event loop accepts them. So the command
line binds first, reports ready (``--status-fd``), and only then imports the
machinery and reads the images, as socket activation does; a restorer that
connects meanwhile waits in the backlog, and its faults wait until the daemon
reads them. This module imports nothing but ``socket``, ``os`` and ``stat``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from lazymig.errors import ConfigurationError, LazyMigError

__all__ = ["BACKLOG", "SOCKET_NAME", "listen_tcp", "listen_unix"]

SOCKET_NAME = "lazy-pages.socket"
"""CRIU's name for the lazy-pages daemon's socket, in the work dir."""

BACKLOG = 16
"""Connections the kernel queues before the loop accepts them (CRIU: 10 and 1)."""


def listen_unix(path: str | os.PathLike[str]) -> socket.socket:
    """The daemon's UNIX socket at ``path``, mode 0600, listening and non-blocking.

    A stale socket of an earlier daemon is removed first; any other file there
    is an error (LazyMigError), as is a path that cannot be bound.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # only the owner may hand us processes
    try:
        sock.bind(os.fspath(path))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise LazyMigError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    return sock


def listen_tcp(address: str, port: int) -> socket.socket:
    """A page server's TCP socket (CRIU's setup_tcp_server: SO_REUSEADDR, the given
    address; port 0 picks a free one), listening and non-blocking."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
    return sock
