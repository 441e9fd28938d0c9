"""Shared test set-up.

Every async test runs twice, under asyncio's own loop and under uvloop, and
fails if anything reached the loop's exception handler (an exception that a
task or callback could not deliver), as asyncpg's and uvloop's test bases do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvloop
from criu_peer import ChrootDir, build_workload, criu_root_ready
from helpers import SEED, layout
from lazydump import write_lazy_dump
from tls_pki import Pki, make_pki

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.linux.vm import AnonMapping
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.workload import expected_page

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


@pytest.fixture(scope="module")
def criu_root() -> Iterator[None]:
    """The CRIU 4.1.1 chroot, installed and mounted (runs scripts/criu-peer.sh if needed)."""
    with criu_root_ready():
        yield


@pytest.fixture(scope="module")
def workload_binary(criu_root: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workload(tmp_path_factory.mktemp("criu-workload") / "criu_pattern")


@pytest.fixture
def chroot_dir(criu_root: None) -> Iterator[ChrootDir]:
    with ChrootDir.temporary("lazymig-criu-") as d:
        yield d


@pytest.fixture
def measure(record_property: Any) -> Iterator[dict[str, Any]]:
    """Numbers a test measured: recorded as properties and printed at the end."""
    numbers: dict[str, Any] = {}
    yield numbers
    for key, value in numbers.items():
        record_property(key, value)
    print("measured:", json.dumps(numbers))


@pytest_asyncio.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[tuple[Path, PageServer]]:
    """A dump on disk of 32 processes, served by lazymig's page server on loopback."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    store = ImagesPageStore(write_lazy_dump(images_dir, layout(32)))
    async with PageServer(store, address="127.0.0.1", port=0) as server:
        yield images_dir, server
    store.close()


@pytest.fixture
def memory() -> Iterator[AnonMapping]:
    """64 pages filled with the workload pattern."""
    with AnonMapping(64 * PAGE_SIZE) as m:
        with m.view() as v:
            for i in range(64):
                v[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = expected_page(m.address + i * PAGE_SIZE,
                                                                     SEED)
        yield m


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))
