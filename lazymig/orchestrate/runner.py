"""``lazymig.run``: run a coroutine on uvloop when it is installed, else on asyncio's loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Awaitable[T], *, use_uvloop: bool | None = None,
        debug: bool | None = None) -> T:
    """Run ``main`` (a coroutine, or a handle such as :func:`~lazymig.migrate`'s) to
    completion on a new event loop, like :func:`asyncio.run`.

    Args:
        use_uvloop: True requires uvloop, False uses asyncio's own loop, None
            (the default) uses uvloop if it is installed. lazymig works on both;
            uvloop roughly doubles the page-server and daemon round-trip rates.
        debug: the loop's debug mode.

    Example::

        result = lazymig.run(lazymig.migrate(pid))
    """
    async def await_main() -> T:
        return await main

    if use_uvloop is None:
        use_uvloop = importlib.util.find_spec("uvloop") is not None
    if use_uvloop:
        import uvloop  # noqa: PLC0415 (optional, and costly to import)

        return uvloop.run(await_main(), debug=debug)
    return asyncio.run(await_main(), debug=debug)
