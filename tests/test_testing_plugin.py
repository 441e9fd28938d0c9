"""lazymig.testing and its pytest plugin, used as a user's test suite would use them.

* The memory helpers on a live workload: equal memory passes, a page written
  behind the workload's back is named (page, offset, bytes, how many pages), a
  page that cannot be read is named; a snapshot of any process works the same.
* The C workload is built once into a cache, and without a compiler the error
  says what to install.
* Fault injection: the daemon killed mid-transfer takes the restored process
  with it and leaves the source frozen; the veth pair between two namespaces
  goes down (connections time out) and up.
* A small user test suite in a fresh directory (no conftest) runs in a
  subprocess pytest: the plugin comes from its entry point, and its fixtures
  migrate a workload (memory compared page by page), delay pages through a
  fault proxy and cut the connection mid-message (the daemon reconnects).
* A user test that fails midway leaves no process and no namespace behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from helpers import free_port, process_state

import lazymig
from lazymig.linux.vm import write_memory
from lazymig.testing import (
    HostPair,
    MemorySnapshot,
    Pattern,
    StartCommand,
    StartProxy,
    StartWorkload,
    assert_memory_equal,
    compare_memory,
    plugin,
)
from lazymig.testing.workload import (
    PAGE,
    CompilerMissingError,
    build_c_workload,
    expected_page,
)

pytest_plugins = ["pytester"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_a_changed_page_is_named(kind: str, lazymig_workload: StartWorkload) -> None:
    w = lazymig_workload(kind, mib=2, interval_ms=60000)
    expected = Pattern.of(w.ready)
    await assert_memory_equal(w.pid, expected)
    snapshot = await asyncio.to_thread(MemorySnapshot.take, w.pid, w.ready.regions)
    assert snapshot.content(w.ready.addr, w.ready.size) == expected.content(w.ready.addr,
                                                                             w.ready.size)
    page = w.ready.addr + 300 * PAGE
    write_memory(w.pid, page + 0x18, b"\xff\xfe")
    write_memory(w.pid, page + 7 * PAGE, b"\x01")
    for reference in (expected, snapshot):
        difference = compare_memory(w.pid, reference)
        assert difference is not None
        assert (difference.page, difference.offset, difference.pages, difference.compared) == \
            (page, 0x18, 2, w.ready.size // PAGE)
        assert difference.actual[:2] == b"\xff\xfe"
        assert difference.expected == expected.content(page + 0x18, 16)
        with pytest.raises(AssertionError, match=f"2 of 512 pages; first differing page "
                                                 f"{page:#x}, at offset 0x18"):
            await assert_memory_equal(w.pid, reference)
    # Each message says what the memory was compared with.
    assert "differs from the workload's pattern (seed" in str(compare_memory(w.pid, expected))
    assert f"differs from the snapshot of pid {w.pid} in" in str(compare_memory(w.pid,
                                                                               snapshot))


@pytest.mark.parametrize(("address", "pages"), [
    (0x7F0000000000, 1), (0x7F00000FF000, 2), (0x7F00000FE000, 260), (0x5555_5555_5000, 3)])
def test_the_pattern_is_the_workloads_across_blocks(address: int, pages: int) -> None:
    """Pattern builds whole aligned blocks at once: the same bytes as the formula, page
    by page, wherever a range starts and ends."""
    seed = 0x0123456789ABCDEF
    content = Pattern([(address, pages * PAGE)], seed).content(address, pages * PAGE)
    assert content == b"".join(expected_page(address + i * PAGE, seed) for i in range(pages))


def test_an_unreadable_page_is_named(lazymig_workload: StartWorkload) -> None:
    w = lazymig_workload("python", mib=1, interval_ms=60000)
    nowhere = 0x10000  # below mmap_min_addr: never mapped
    difference = compare_memory(w.pid, Pattern([(w.ready.addr, PAGE), (nowhere, 2 * PAGE)],
                                               w.ready.seed))
    assert difference is not None
    assert (difference.page, difference.pages, difference.compared) == (nowhere, 2, 3)
    assert f"page {nowhere:#x} could not be read" in str(difference)
    with pytest.raises(AssertionError, match=f"page {nowhere:#x} of pid {w.pid} cannot be read"):
        MemorySnapshot.take(w.pid, [(nowhere, PAGE)])


def test_the_c_workload_is_built_once(tmp_path: Path) -> None:
    first = build_c_workload(tmp_path)
    built = first.stat().st_mtime_ns
    assert build_c_workload(tmp_path) == first
    assert first.stat().st_mtime_ns == built
    assert first.name == "pattern" and os.access(first, os.X_OK)
    assert [p.name for p in first.parent.iterdir()] == ["pattern"]  # no partial file left


def test_no_compiler_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcc, no cc
    with pytest.raises(CompilerMissingError, match="install gcc"):
        build_c_workload(tmp_path)


@pytest.mark.asyncio
async def test_a_killed_daemon_takes_the_restored_process_with_it(
        lazymig_workload: StartWorkload, lazymig_command: StartCommand, tmp_path: Path) -> None:
    """Fault injection for failure handling: SIGKILL the daemon mid-transfer (faults only,
    an idle restored process whose memory is all still lazy): the restored process dies
    too (its guardian's doing: it must not run on zero pages), and the source, whose
    transfer never ended, stays frozen under its dumper for a retry."""
    w = lazymig_workload("c", mib=4, interval_ms=60000)
    port = str(free_port())
    dumper = await lazymig_command("dump", "-t", str(w.pid), "--lazy-pages", "--port", port,
                                   "-D", tmp_path)
    daemon = await lazymig_command("lazy-pages", "--page-server", "--port", port, "-D",
                                   tmp_path, "--no-background")
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        async with asyncio.timeout(60), \
                lazymig.restore_process(tmp_path, stdio=(devnull, devnull, devnull)) as process:
            daemon.kill()
            assert await daemon.wait() == -signal.SIGKILL
            assert await process.wait() == -signal.SIGKILL
    finally:
        os.close(devnull)
    assert dumper.process.poll() is None  # still serving: the source is not released
    assert process_state(w.pid) == "t"  # traced, memory intact


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError as exc:
    sys.exit(f"no connection: {exc}")
"""


@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
def test_the_link_between_two_namespaces_goes_down_and_up(lazymig_hosts: HostPair) -> None:
    """A listener on the source host, a client on the destination host: it connects
    while the veth pair is up, times out while it is down (no reset: a dead link)."""
    hosts = lazymig_hosts
    listener = subprocess.Popen(hosts.source.command(
        [sys.executable, "-c", "import socket, time; s = socket.create_server(('', 4000)); "
         "print(flush=True); time.sleep(60)"]), stdout=subprocess.PIPE)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == b"\n"

        def probe() -> subprocess.CompletedProcess[str]:
            return subprocess.run(hosts.destination.command(
                [sys.executable, "-c", PROBE, hosts.source.address, "4000"]),
                capture_output=True, text=True, timeout=30, check=False)

        assert probe().returncode == 0
        hosts.set_link(up=False)
        down = probe()
        assert down.returncode == 1 and "timed out" in down.stderr
        hosts.set_link(up=True)
        assert probe().returncode == 0
        assert hosts.bytes_sent() > 0
    finally:
        listener.kill()
        listener.wait()
    with pytest.raises(lazymig.ConfigurationError):
        HostPair.loopback().set_link(up=False)


USER_SUITE = '''
"""A user's own tests of their migration code, with only lazymig installed."""

import asyncio
import os
import signal

import pytest

import lazymig
from lazymig.testing import Pattern, assert_memory_equal


def test_the_plugin_came_from_its_entry_point(request):
    plugin = request.config.pluginmanager.get_plugin("lazymig")
    assert plugin is not None and plugin.__name__ == "lazymig.testing.plugin"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_my_migration_keeps_the_memory(kind, lazymig_workload):
    workload = lazymig_workload(kind, mib=4)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        result = await asyncio.wait_for(
            lazymig.migrate(workload.pid, stdio=(devnull, devnull, devnull)), 60)
    finally:
        os.close(devnull)
    try:
        await assert_memory_equal(result.restored.pid, Pattern.of(workload.ready))
    finally:
        os.kill(result.restored.pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_delayed_pages_all_arrive(lazymig_workload, lazymig_fault_proxy, tmp_path):
    workload = lazymig_workload("c", mib=4)
    async with asyncio.timeout(60), lazymig.serve(workload.pid, tmp_path) as source:
        proxy = await lazymig_fault_proxy(source.address)
        proxy.delay(0.02)
        async with lazymig.lazy_pages(tmp_path, page_server=proxy.address) as daemon, \\
                daemon.restore(stdio=(0, 2, 2)) as process:
            pass  # leaving the daemon's block waits for every page
        try:
            await assert_memory_equal(process.pid, Pattern.of(workload.ready))
        finally:
            await process.kill()
    assert proxy.stats.bytes_downstream >= 4 << 20


@pytest.mark.asyncio
async def test_a_cut_in_the_middle_of_a_transfer_is_survived(
        lazymig_workload, lazymig_fault_proxy, tmp_path):
    workload = lazymig_workload("c", mib=8)
    async with asyncio.timeout(60), lazymig.serve(workload.pid, tmp_path) as source:
        proxy = await lazymig_fault_proxy(source.address)
        proxy.cut_after(1_000_000)  # bytes towards the daemon: the cut lands mid-message
        async with lazymig.lazy_pages(tmp_path, page_server=proxy.address) as daemon, \\
                daemon.restore(stdio=(0, 2, 2)) as process:
            pass
        try:
            await assert_memory_equal(process.pid, Pattern.of(workload.ready))
        finally:
            await process.kill()
    assert proxy.stats.cuts == 1 and proxy.stats.connections >= 2  # it reconnected

'''


def run_user_suite(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    """``source`` as a test module in a fresh directory, run by pytest in a subprocess
    with no conftest and no ``-p``: whatever fixtures it gets come from entry points."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user_suite=textwrap.dedent(source))
    # A short base: the daemon's UNIX socket lives in tmp_path (108-byte path limit).
    with tempfile.TemporaryDirectory(prefix="lzm") as base:
        return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                             f"--basetemp={base}/t", timeout=300)


def test_a_user_suite_loads_the_plugin_from_its_entry_point(pytester: pytest.Pytester) -> None:
    run_user_suite(pytester, USER_SUITE).assert_outcomes(passed=5)


FAILING_SUITE = '''
import json

import pytest


@pytest.mark.asyncio
@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
async def test_that_fails_midway(lazymig_hosts, lazymig_workload, lazymig_command, tmp_path):
    workload = lazymig_workload("c", mib=1)
    (tmp_path / "dump").mkdir()
    dumper = await lazymig_command("dump", "-t", str(workload.pid), "--lazy-pages",
                                   "--address", lazymig_hosts.source.address, "--port", "27",
                                   "-D", tmp_path / "dump", host=lazymig_hosts.source)
    with open("started.json", "w") as f:
        json.dump({"pids": [workload.pid, dumper.pid],
                   "netns": [lazymig_hosts.source.netns, lazymig_hosts.destination.netns]}, f)
    raise RuntimeError("the user's code failed here")
'''


def test_fixtures_clean_up_after_a_failure(pytester: pytest.Pytester) -> None:
    """A test fails with a workload frozen by a dumper in a namespace: afterwards both
    processes are gone and both namespaces deleted."""
    result = run_user_suite(pytester, FAILING_SUITE)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: the user's code failed here*"])
    started = json.loads((pytester.path / "started.json").read_text())
    assert not [pid for pid in started["pids"] if Path(f"/proc/{pid}").exists()]
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    assert not [ns for ns in started["netns"] if ns in namespaces]


def test_the_fixture_types_come_from_lazymig_testing_without_pytest() -> None:
    assert (plugin.StartWorkload, plugin.StartCommand, plugin.StartProxy) == (
        StartWorkload, StartCommand, StartProxy)
    code = "import sys, lazymig.testing; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_a_fresh_project_gets_no_loop_scope_warning(pytester: pytest.Pytester) -> None:
    """No pytest configuration at all: the plugin sets pytest-asyncio's fixture loop
    scope (to "function"), so its deprecation warning does not appear."""
    pytester.makepyfile(test_fresh="""
        import pytest

        @pytest.mark.asyncio
        async def test_nothing():
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*asyncio_default_fixture_loop_scope=function*"])
    assert "PytestDeprecationWarning" not in result.stdout.str() + result.stderr.str()


def test_a_projects_own_loop_scope_wins(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = module\n")
    pytester.makepyfile(test_own="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*asyncio_default_fixture_loop_scope=module*"])


def test_the_testing_docs_examples_pass(pytester: pytest.Pytester) -> None:
    """Every python example of docs/testing.md, run as a user's test suite."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 5
    result = run_user_suite(pytester, "\n\n".join(blocks))
    result.assert_outcomes(passed=6, skipped=1)  # lazymig_hosts: the link, on loopback
