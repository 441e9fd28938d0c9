"""The lazymig pytest plugin: fixtures for testing code that drives lazymig.

Installed with lazymig (entry point ``pytest11``: ``lazymig``), so any test
suite in an environment with lazymig has these fixtures; it builds on
pytest-asyncio (mark async tests ``@pytest.mark.asyncio``). Everything a
fixture starts is stopped when the test ends, failed or not: workloads and
commands killed and reaped, namespaces deleted, proxies closed.

* ``lazymig_c_workload``: the C pattern workload, compiled once (skips the
  test, saying why, when no C compiler is installed).
* ``lazymig_workload``: starts pattern workloads, ``lazymig_workload("c",
  mib=8)`` or ``lazymig_workload("python")`` → :class:`~lazymig.testing.workload.Workload`.
* ``lazymig_hosts``: a :class:`~lazymig.testing.netns.HostPair`, once on
  loopback and once across two network namespaces (the test runs for each;
  ``@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)``
  picks one).
* ``lazymig_command``: starts ``lazymig`` commands on a host and waits until
  they are ready: ``await lazymig_command("page-server", ..., host=h)`` →
  :class:`~lazymig.testing.cli.LazymigCommand` (``.kill()`` kills it).
* ``lazymig_fault_proxy``: ``await lazymig_fault_proxy(address)`` → an entered
  :class:`~lazymig.testing.proxy.FaultProxy` in front of a page server (cut,
  cut mid-message, delay, refuse).

With :func:`~lazymig.testing.memory.assert_memory_equal` a test checks that
a migrated process's memory is the source's page by page::

    import lazymig, pytest
    from lazymig.testing import Pattern, assert_memory_equal

    @pytest.mark.asyncio
    async def test_my_orchestrator(lazymig_workload):
        workload = lazymig_workload("c", mib=8)
        result = await my_orchestrator.migrate(workload.pid)   # yours
        await assert_memory_equal(result.restored.pid, Pattern.of(workload.ready))

Faults for the code's failure handling: ``proxy.cut()`` or
``proxy.cut_after(nbytes)`` (the connection drops, mid-message),
``proxy.delay(seconds)`` (pages arrive late), ``command.kill()`` (a page
server or daemon dies), ``lazymig_hosts.set_link(up=False)`` (a dead link
between two namespaces: no reset reaches either end).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import pytest
import pytest_asyncio

from lazymig.errors import ConfigurationError
from lazymig.testing.cli import LazymigCommand
from lazymig.testing.fixture_types import StartCommand, StartProxy, StartWorkload
from lazymig.testing.netns import Host, HostPair, NamespaceError, two_namespaces
from lazymig.testing.proxy import FaultProxy
from lazymig.testing.workload import (
    CompilerMissingError,
    Workload,
    build_c_workload,
    python_workload_argv,
)

__all__ = [
    "StartCommand",
    "StartProxy",
    "StartWorkload",
    "lazymig_c_workload",
    "lazymig_command",
    "lazymig_fault_proxy",
    "lazymig_hosts",
    "lazymig_workload",
]


@pytest.hookimpl(trylast=True)  # after pytest-asyncio registered the option
def pytest_addoption(parser: pytest.Parser) -> None:
    """A project that leaves ``asyncio_default_fixture_loop_scope`` unset gets
    ``function`` (pytest-asyncio's announced default) instead of its deprecation
    warning; a value in the project's configuration still wins."""
    parser.addini("asyncio_default_fixture_loop_scope", type="string", default="function",
                  help="default scope of the asyncio event loop used to execute async "
                       "fixtures (lazymig's plugin: 'function' when unset)")


@pytest.fixture(scope="session")
def lazymig_c_workload() -> Path:
    """The C pattern workload's executable, built once (in the user's cache)."""
    try:
        return build_c_workload()
    except CompilerMissingError as exc:
        pytest.skip(f"the C workload cannot be built: {exc}")


@pytest.fixture
def lazymig_workload(request: pytest.FixtureRequest) -> Iterator[StartWorkload]:
    """Start pattern workloads; each is killed when the test ends.

    ``lazymig_workload(kind="c", *, mib=4, interval_ms=50, args=())``: ``kind``
    is ``"c"`` (pattern.c, compiled on first use) or ``"python"``; ``args``
    are more of the workload's options (``["--locked-kib", "64"]``). Returns
    the :class:`~lazymig.testing.workload.Workload`, READY already read.
    """
    with ExitStack() as stack:  # every workload stopped, even if one stop fails

        def start(kind: str = "c", *, mib: int = 4, interval_ms: int = 50,
                  args: Sequence[str] = ()) -> Workload:
            options = ["--mib", str(mib), "--interval-ms", str(interval_ms), *args]
            if kind == "c":
                argv = [str(request.getfixturevalue("lazymig_c_workload")), *options]
            elif kind == "python":
                argv = python_workload_argv(*options)
            else:
                raise ConfigurationError(f"workload kind must be 'c' or 'python', not {kind!r}")
            return stack.enter_context(Workload(argv))

        yield start


@pytest.fixture(params=["loopback", "netns"])
def lazymig_hosts(request: pytest.FixtureRequest) -> Iterator[HostPair]:
    """Source and destination hosts: loopback, then two network namespaces.

    The namespaces need root and iproute2; without them the netns case is
    skipped with the reason. They are deleted when the test ends.
    """
    if request.param == "loopback":
        yield HostPair.loopback()
        return
    with ExitStack() as stack:
        try:
            hosts = stack.enter_context(two_namespaces())
        except NamespaceError as exc:
            pytest.skip(f"cannot make two network namespaces: {exc}")
        yield hosts


@pytest.fixture
def lazymig_command(tmp_path: Path, lazymig_workload: StartWorkload) -> Iterator[StartCommand]:
    """Start ``lazymig`` commands and wait until they are ready; killed at the end.

    ``await lazymig_command(*args, host=None, ready=True, uvloop=True,
    stdout=None)`` returns the entered
    :class:`~lazymig.testing.cli.LazymigCommand`; its stderr is logged under
    the test's ``tmp_path``. (It depends on ``lazymig_workload`` so that its
    commands, a dumper tracing a workload among them, are killed before the
    workloads are: a traced process is reaped only once its tracer is gone.)
    """
    with ExitStack() as stack:
        count = 0

        async def start(*args: str | os.PathLike[str], host: Host | None = None,
                        ready: bool = True, uvloop: bool = True,
                        stdout: int | None = None) -> LazymigCommand:
            nonlocal count
            count += 1
            name = f"lazymig-{count}-{args[0] if args else 'none'}.log"
            command = LazymigCommand([str(a) for a in args], host=host,
                                     log_path=tmp_path / name, ready=ready, uvloop=uvloop,
                                     stdout=stdout)
            await command.__aenter__()
            stack.callback(command.close)
            return command

        yield start


@pytest_asyncio.fixture(loop_scope="function")
async def lazymig_fault_proxy() -> AsyncIterator[StartProxy]:
    """Put :class:`~lazymig.testing.proxy.FaultProxy` proxies in front of servers.

    ``proxy = await lazymig_fault_proxy(source.address)``: point the daemon
    at ``proxy.address`` instead, then ``proxy.cut()``, ``proxy.cut_after(n)``,
    ``proxy.delay(seconds)`` or ``await proxy.refuse()``. The proxies listen
    on 127.0.0.1 in this namespace and close when the test ends.
    """
    async with AsyncExitStack() as stack:

        async def start(upstream: tuple[str, int]) -> FaultProxy:
            host, port = upstream
            return await stack.enter_async_context(FaultProxy(host, port))

        yield start
