"""Small helpers that many test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import socket

import uvloop

__all__ = ["free_port", "on_uvloop"]


def free_port() -> int:
    """A TCP port that nothing on 127.0.0.1 listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_uvloop() -> bool:
    """Whether the running loop is uvloop's (the conftest runs async tests on both)."""
    return isinstance(asyncio.get_running_loop(), uvloop.Loop)
