"""Test tools for code that drives lazymig: real processes, sockets and faults, no mocks.

* :mod:`~lazymig.testing.workload`: workloads whose memory is a known pattern
  (C, compiled on demand, or Python), and their output lines.
* :mod:`~lazymig.testing.memory`: assert that a migrated process's memory
  equals the source's, page by page.
* :mod:`~lazymig.testing.netns`: two test hosts on one machine (loopback, or
  two network namespaces joined by a veth pair).
* :mod:`~lazymig.testing.cli`: ``lazymig`` commands on a host, awaited until
  ready and killed on demand.
* :mod:`~lazymig.testing.proxy`: :class:`FaultProxy`, a TCP proxy that cuts,
  delays and refuses connections on demand.
* :mod:`~lazymig.testing.plugin`: the pytest plugin (loaded by pytest through
  its entry point) whose fixtures put these together; their types
  (:class:`StartWorkload`, :class:`StartCommand`, :data:`StartProxy`) are here,
  and docs/testing.md shows every fixture with its type and an example.

Example, a test of one's own migration code::

    from lazymig.testing import Pattern, assert_memory_equal

    @pytest.mark.asyncio
    async def test_migration_keeps_memory(lazymig_workload):
        workload = lazymig_workload("c", mib=8)
        result = await lazymig.migrate(workload.pid)
        try:
            await assert_memory_equal(result.restored.pid, Pattern.of(workload.ready))
        finally:
            os.kill(result.restored.pid, signal.SIGKILL)

This package imports no pytest: its tools work in any test runner.
"""

from __future__ import annotations

from lazymig.testing.cli import LazymigCommand
from lazymig.testing.fixture_types import StartCommand, StartProxy, StartWorkload
from lazymig.testing.memory import (
    MemoryDifference,
    MemorySnapshot,
    Pattern,
    assert_memory_equal,
    compare_memory,
)
from lazymig.testing.netns import Host, HostPair, two_namespaces
from lazymig.testing.proxy import Direction, FaultProxy
from lazymig.testing.workload import (
    Check,
    OutputLines,
    Ready,
    Workload,
    build_c_workload,
    python_workload_argv,
)

__all__ = [
    "Check",
    "Direction",
    "FaultProxy",
    "Host",
    "HostPair",
    "LazymigCommand",
    "MemoryDifference",
    "MemorySnapshot",
    "OutputLines",
    "Pattern",
    "Ready",
    "StartCommand",
    "StartProxy",
    "StartWorkload",
    "Workload",
    "assert_memory_equal",
    "build_c_workload",
    "compare_memory",
    "python_workload_argv",
    "two_namespaces",
]
