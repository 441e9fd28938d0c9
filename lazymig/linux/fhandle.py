"""File handles: the path of an inode named by a handle, as an inotify watch names it.

fdinfo shows each inotify watch's inode as a file handle (name_to_handle_at(2))
of the filesystem on a device; ``open_by_handle_at(2)`` on a mount of that
filesystem opens the inode again (``O_PATH``), and its /proc fd link is its
path, as CRIU's irmap finds it.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path
from typing import Final

from lazymig.errors import LazyMigOSError
from lazymig.linux._libc import check, libc
from lazymig.linux.procfs import fd_path, mount_point, root_path

__all__ = ["handle_path", "kernel_dev"]

_FILE_HANDLE: Final = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


def kernel_dev(s_dev: int) -> tuple[int, int]:
    """(major, minor) of a device number in the kernel's own encoding (fdinfo's
    ``sdev``: major << 20 | minor)."""
    return s_dev >> 20, s_dev & 0xFFFFF


def handle_path(pid: int, s_dev: int, handle_type: int, handle: bytes) -> str | None:
    """The path (as this process sees it) of the inode that file handle ``handle``
    of type ``handle_type`` names on device ``s_dev`` (kernel encoding) in the
    mount namespace of ``pid``; None if no mount of it is there or the inode has
    no name any more (deleted)."""
    where = mount_point(pid, kernel_dev(s_dev))
    if where is None:
        return None
    # Not O_PATH: open_by_handle_at takes its mount from a fd it can read (fdget).
    mount_fd = os.open(root_path(pid, where), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buffer = ctypes.create_string_buffer(_FILE_HANDLE.pack(len(handle), handle_type) + handle)
        try:
            fd = check(libc.open_by_handle_at(mount_fd, buffer, os.O_PATH | os.O_CLOEXEC),
                       "open_by_handle_at", pid=pid)
        except LazyMigOSError as exc:
            if exc.errno == 116:  # ESTALE: the inode is gone
                return None
            raise
    finally:
        os.close(mount_fd)
    try:
        path = str(Path(fd_path(os.getpid(), fd)).readlink())
    finally:
        os.close(fd)
    return None if path.endswith(" (deleted)") else path
