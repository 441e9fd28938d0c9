"""The types of the pytest plugin's fixtures, for annotating one's own tests.

Exported by :mod:`lazymig.testing` (without importing pytest)::

    from lazymig.testing import StartWorkload

    def test_it(lazymig_workload: StartWorkload) -> None:
        workload = lazymig_workload("c", mib=8)

The fixtures themselves are in :mod:`lazymig.testing.plugin`; docs/testing.md
lists every one with its type and an example.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from lazymig.testing.cli import LazymigCommand
from lazymig.testing.netns import Host
from lazymig.testing.proxy import FaultProxy
from lazymig.testing.workload import Workload

__all__ = ["StartCommand", "StartProxy", "StartWorkload"]


class StartWorkload(Protocol):
    """The ``lazymig_workload`` fixture's value: starts a pattern workload."""

    def __call__(self, kind: str = "c", *, mib: int = 4, interval_ms: int = 50,
                 args: Sequence[str] = ()) -> Workload: ...


class StartCommand(Protocol):
    """The ``lazymig_command`` fixture's value: starts a ``lazymig`` command."""

    def __call__(self, *args: str | os.PathLike[str], host: Host | None = None,
                 ready: bool = True, uvloop: bool = True,
                 stdout: int | None = None) -> Awaitable[LazymigCommand]: ...


StartProxy = Callable[[tuple[str, int]], Awaitable[FaultProxy]]
"""The ``lazymig_fault_proxy`` fixture's value: puts a proxy in front of a server."""
