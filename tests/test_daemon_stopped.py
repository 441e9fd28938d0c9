"""``lazymig lazy-pages`` stopped (SIGTERM) or killed (SIGKILL) while a process waits for
pages that can no longer come: the process dies, it never reads a zero page.

The process (tests/lazy_child.py) attaches its region and hands its uffd over
without thread ids, as ``criu restore`` does, then reads one page every 5 ms and
checks each against the dump. The daemon runs as an operator runs it, in its own
process, fetching on faults only, patient with a lost page server. The page
server is killed, or the link to it cut for good (a FaultProxy that resets the
connection and refuses new ones); while the daemon tries again, it is stopped.
With SIGTERM it kills the process itself (it named it when the restore
finished); with SIGKILL its guardian does. tests/test_criu_holes.py does the
same under real ``criu restore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import finish, layout, on_uvloop, spawn, stop
from lazydump import write_lazy_dump
from reliability import Recorder

from lazymig._listen import SOCKET_NAME
from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.testing.proxy import FaultProxy

PATIENT = ("--reconnect-attempts", "1000", "--reconnect-timeout", "600")
"""The daemon keeps trying to reach the page server for as long as the test runs."""


def _ready(fd: int) -> None:
    try:
        readable, _, _ = select.select([fd], [], [], 20)
        assert readable and os.read(fd, 1) == b"\0", "lazymig lazy-pages never got ready"
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def daemon_process(images_dir: Path, port: int, *options: str
                         ) -> AsyncIterator[tuple[asyncio.subprocess.Process, Path]]:
    """``lazymig -v lazy-pages --page-server --no-background OPTIONS`` on this test's loop
    kind, its log in a file; yields it once it listens, and the log's path."""
    log = images_dir.parent / "lazy-pages.log"
    r, w = os.pipe()
    with log.open("wb") as err:
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lazymig", "-v", "--uvloop" if on_uvloop() else "--no-uvloop",
            "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
            "-D", str(images_dir), "--no-background", "--status-fd", str(w), *options,
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    os.close(w)
    try:
        await asyncio.to_thread(_ready, r)
        yield daemon, log
    finally:
        if daemon.returncode is None:
            daemon.kill()
        await daemon.wait()


async def logged(log: Path, text: str) -> None:
    """Wait until the daemon's log says ``text`` (within the test's timeout)."""
    for _ in range(3000):
        if text in await asyncio.to_thread(log.read_text):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the daemon never logged {text!r}")


@pytest.mark.asyncio
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("loss", ["server-killed", "link-cut"])
async def test_a_process_without_thread_ids_dies_with_the_daemon(
        tmp_path: Path, loss: str, how: signal.Signals, reliability: Recorder) -> None:
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    store = ImagesPageStore(write_lazy_dump(images_dir, layout(1)))
    (pid, [(vaddr, nr)]), = layout(1).items()
    async with asyncio.timeout(90), \
            PageServer(store, address="127.0.0.1", port=0) as server, \
            FaultProxy("127.0.0.1", server.port) as proxy:
        serving = asyncio.create_task(server.serve())
        try:
            port = server.port if loss == "server-killed" else proxy.port
            async with daemon_process(images_dir, port, *PATIENT) as (daemon, log):
                child = await spawn(images_dir / SOCKET_NAME, pid, vaddr, nr, "slow-anonymous")
                assert child.stdout is not None
                assert await child.stdout.readline() == b"attached\n"
                await child.stdout.readline()  # some pages have arrived
                await logged(log, f"pid {pid} is process {child.pid}")
                if loss == "server-killed":
                    await stop(serving)
                    server.close()
                else:
                    await proxy.refuse(True)
                    proxy.cut()
                await logged(log, "reconnecting")  # the process waits for its next page
                daemon.send_signal(how)
                code, out = await finish(child)
                status = await daemon.wait()
                if how == signal.SIGKILL:  # the guardian says so once it has killed
                    await logged(log, f"lazymig guardian: killed restored process {child.pid}")
        finally:
            await stop(serving)
    store.close()
    text = log.read_text()
    assert code == -signal.SIGKILL, f"{out}\n{text[-3000:]}"
    assert "MISMATCH" not in out  # it never read a zero page where data was due
    if how == signal.SIGTERM:
        assert status == 128 + signal.SIGTERM
        assert f"process {child.pid} (image pid {pid}) killed" in text, text[-3000:]
    else:
        assert status == -signal.SIGKILL
        assert f"lazymig guardian: killed restored process {child.pid}" in text, text[-3000:]
    reliability.record(
        "Faults injected", f"lazy-pages daemon {how.name} with a process held, {loss}",
        tried=("the page server killed" if loss == "server-killed" else
               "the link cut for good (FaultProxy)")
              + " under an attach() child without thread ids (as criu restore), then "
              f"`lazymig lazy-pages` got {how.name} while it tried to reconnect",
        held="the process was killed "
             + ("by the daemon before it exited" if how == signal.SIGTERM else
                "by the daemon's guardian, which held a duplicate of its uffd")
             + "; it never read a zero page")


@pytest.mark.asyncio
async def test_fetching_on_faults_only_a_source_lost_for_good_ends_the_daemon(
        tmp_path: Path) -> None:
    """With --no-background nothing is in flight while the process works on pages it
    has: the source's failure must still kill it and end the daemon (exit 1)."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    store = ImagesPageStore(write_lazy_dump(images_dir, layout(1)))
    (pid, [(vaddr, nr)]), = layout(1).items()
    async with asyncio.timeout(60), PageServer(store, address="127.0.0.1", port=0) as server:
        serving = asyncio.create_task(server.serve())
        try:
            async with daemon_process(images_dir, server.port,
                                      "--reconnect-attempts", "0") as (daemon, log):
                child = await spawn(images_dir / SOCKET_NAME, pid, vaddr, nr, "some-then-wait")
                assert child.stdout is not None
                assert await child.stdout.readline() == b"attached\n"
                assert await child.stdout.readline() == b"touched: 8/8 pages match\n"
                await stop(serving)
                server.close()
                status = await daemon.wait()
                code, out = await finish(child)
        finally:
            await stop(serving)
    store.close()
    assert status == 1, log.read_text()[-3000:]
    assert code == -signal.SIGKILL, out
    assert "MISMATCH" not in out
