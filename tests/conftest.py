"""Shared test set-up.

Every async test runs twice, under asyncio's own loop and under uvloop, and
fails if anything reached the loop's exception handler (an exception that a
task or callback could not deliver), as asyncpg's and uvloop's test bases do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

pytest_plugins = ["reliability"]  # the reliability record (docs/reliability.md)


def _strict_loop(factory: Callable[[], asyncio.AbstractEventLoop]) -> asyncio.AbstractEventLoop:
    loop = factory()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        loop.default_exception_handler(context)
        _UNHANDLED.append(context)

    loop.set_exception_handler(handler)
    return loop


_UNHANDLED: list[dict[str, Any]] = []


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {
        "asyncio": lambda: _strict_loop(asyncio.new_event_loop),
        "uvloop": lambda: _strict_loop(uvloop.new_event_loop),
    }


@pytest.fixture(autouse=True)
def _no_unhandled_loop_errors() -> Any:
    _UNHANDLED.clear()
    yield
    errors = list(_UNHANDLED)
    _UNHANDLED.clear()
    assert not errors, f"the event loop's exception handler was called: {errors}"


@pytest.fixture(scope="session")
def c_workload(lazymig_c_workload: Path) -> Path:
    """The C pattern workload, built once for the whole run (lazymig's own fixture)."""
    return lazymig_c_workload
