"""Waiting on raw fds from asyncio, the same way on asyncio's loop and on uvloop.

For fds that no Transport may own (SCM_RIGHTS sockets, uffds, splice paths):
try the syscall first and wait here only when it would block, as asyncio's
own ``sock_recv_into`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

__all__ = ["retry_until_ready", "wait_fd"]

_T = TypeVar("_T")


async def wait_fd(fd: int, *, writable: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable) according to the running loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            loop.remove_writer(fd)
    else:
        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


async def retry_until_ready(fd: int, attempt: Callable[[], _T], *, writable: bool = False) -> _T:
    """Call ``attempt`` until it stops raising BlockingIOError, waiting on ``fd`` between."""
    while True:
        try:
            return attempt()
        except (BlockingIOError, InterruptedError):
            await wait_fd(fd, writable=writable)
