"""``lazymig.run``: run a coroutine on uvloop when it is installed, else on asyncio's loop."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool | None = None,
        debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new event loop, like :func:`asyncio.run`.

    Args:
        use_uvloop: True requires uvloop, False uses asyncio's own loop, None
            (the default) uses uvloop if it is installed. lazymig works on both;
            uvloop roughly doubles the page-server and daemon round-trip rates.
        debug: the loop's debug mode.

    Example::

        result = lazymig.run(lazymig.migrate(pid))
    """
    if use_uvloop is None:
        use_uvloop = importlib.util.find_spec("uvloop") is not None
    if use_uvloop:
        import uvloop  # noqa: PLC0415 (optional, and costly to import)

        return uvloop.run(main, debug=debug)
    return asyncio.run(main, debug=debug)
