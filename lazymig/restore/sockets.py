"""Sockets taken over from the source, on the source's own host.

A socket other than a socketpair the process holds both ends of (those are
rebuilt: :mod:`lazymig.restore.anon_files`) stays on the source host: a TCP
server's listening socket, a connection, a unix socket to a daemon. The dump
records it as external (``socket:[INO]``, as CRIU names it), and the restore
puts a socket of the caller's in its place (``--inherit-fd fd[N]:socket:[INO]``,
the API's ``inherit_fds``): on another host, the caller makes it (binds the
port again, say).

On the source's own host the frozen source still holds it, and the restorer
takes that very socket (``pidfd_getfd`` from the dumped pid, checked by inode):
the same listening socket with the connections waiting in its backlog, the
same connection with its data in flight. The source holds it too until it is
killed once every page was served; should the migration fail, the source
resumes with it as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from typing import Final

from lazymig.dump.files import read_files
from lazymig.dump.images import read_lazymig_entry
from lazymig.linux.vm import copy_fd
from lazymig.proto.images import ImageKind, ImagesDir
from lazymig.restore.task import FdInheritance, InheritFd

__all__ = ["take_over_sockets"]

log = logging.getLogger(__name__)

_SOCKET_NAME: Final = re.compile(r"socket:\[(\d+)\]")


def take_over_sockets(images: ImagesDir, fds: FdInheritance
                      ) -> tuple[FdInheritance, list[int]]:
    """``fds`` with a copy of each external socket of the dump that a dumped process
    of this host still holds (and the caller does not give), and those copies
    (close them once the restored process has its own)."""
    given = {i.name for i in fds.inherit}
    taken: list[InheritFd] = []
    try:
        entries = images.pstree()
    except FileNotFoundError:
        return fds, []  # not a dump: load_task says so
    for entry in entries:
        if not images.image_path(ImageKind.LAZYMIG, entry.pid).exists():
            continue  # not lazymig's dump: load_task refuses it, saying so
        extra = read_lazymig_entry(images, entry.pid)
        sockets = {e.file_id: (e.name, int(m[1])) for e in extra.external_files
                   if (m := _SOCKET_NAME.fullmatch(e.name)) and e.name not in given}
        if not sockets:
            continue
        core = images.core(entry.pid)
        files = read_files(images, core.ids.files_id if core.HasField("ids") else 1)
        for file_id, (name, ino) in sorted(sockets.items()):
            if name in given:  # another process of the tree holds it too
                continue
            for fd, _ in files.fds_of(file_id):
                copy = _copy_if_same(entry.pid, fd, ino)
                if copy is not None:
                    taken.append(InheritFd(copy, name, optional=True))
                    given.add(name)
                    log.info("fd %d of process %d (%s) is taken over from the source on this "
                             "host", fd, entry.pid, name)
                    break
    return dataclasses.replace(fds, inherit=(*fds.inherit, *taken)), [i.fd for i in taken]


def _copy_if_same(pid: int, fd: int, ino: int) -> int | None:
    """A copy of fd ``fd`` of process ``pid`` here if it is socket ``ino``, else None
    (another host, the source gone, the fd reused)."""
    try:
        copy = copy_fd(pid, fd)
    except OSError:
        return None
    if os.fstat(copy).st_ino == ino:
        return copy
    with contextlib.suppress(OSError):
        os.close(copy)
    return None
