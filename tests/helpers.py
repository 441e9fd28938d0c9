"""Small helpers that many test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator

import uvloop

from lazymig.testing.workload import OutputLines

__all__ = ["Output", "free_port", "on_uvloop", "output_pipe"]


def free_port() -> int:
    """A TCP port that nothing on 127.0.0.1 listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_uvloop() -> bool:
    """Whether the running loop is uvloop's (the conftest runs async tests on both)."""
    return isinstance(asyncio.get_running_loop(), uvloop.Loop)


class Output:
    """A pipe for a restored process's stdout: ``fd`` to give it, ``lines`` to read."""

    def __init__(self) -> None:
        read_fd, self.fd = os.pipe()
        self.lines = OutputLines(read_fd)

    def handed_over(self) -> None:
        """The restored process has its copy: close ours (once: fd numbers are reused)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def stdio(self) -> tuple[int, int, int]:
        return (0, self.fd, 2)


@contextlib.contextmanager
def output_pipe() -> Iterator[Output]:
    output = Output()
    try:
        yield output
    finally:
        output.handed_over()
        output.lines.close()
