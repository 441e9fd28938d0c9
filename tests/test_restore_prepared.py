"""``lazymig restore --wait-for-images``: a restore started before the dump.

* The prepared destination as docs/operating.md runs it: ``lazymig lazy-pages
  --wait-for-page-server`` and ``lazymig restore --wait-for-images`` are
  started first and say ready (``--status-fd``) while the images directory is
  still empty; the restore then waits, and only once ``lazymig dump
  --lazy-pages`` has written the images does it restore. The restored process
  prints the source's checksum, its memory coming through the daemon.
* No dump comes: the restore gives up after SECONDS with an error that says
  what it waited for, and nothing is restored.
* :func:`~lazymig.restore.prepared.wait_for_images` returns once
  ``inventory.img`` appears (written by another thread meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, listening_process, on_uvloop, until

from lazymig.proto.images import ImagesDir, ImagesWait
from lazymig.restore.prepared import ImagesNotCompleteError, wait_for_images
from lazymig.testing.workload import OutputLines, Workload

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]


@contextlib.contextmanager
def command(*args: str, uvloop: bool, log: Path,
            stdout: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``lazymig -v ARGS --status-fd W``, its stderr into ``log``; yields it and the read
    end of its status pipe. Killed on the way out if it still runs."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "lazymig", "-v", "--uvloop" if uvloop else "--no-uvloop",
            *args, "--status-fd", str(w)]
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=err)
    os.close(w)
    try:
        yield proc, r
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def wait_ready(fd: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable or os.read(fd, 1) != b"\0":
        proc.kill()
        raise AssertionError(f"{log.name}: never got ready: {log.read_text()}")


@pytest.mark.asyncio
async def test_a_prepared_restore_waits_for_the_dump_then_restores_it(
        tmp_path: Path, c_workload: Path) -> None:
    port, loop = str(free_port()), on_uvloop()
    images = tmp_path / "images"
    images.mkdir()
    server = ["--address", "127.0.0.1", "--port", port]
    with Workload([str(c_workload), "--mib", "16", "--interval-ms", "20"]) as w:
        before = w.next_check()
        read_fd, write_fd = os.pipe()
        lines = OutputLines(read_fd)
        restored = 0
        try:
            with command("lazy-pages", "--page-server", *server, "-D", str(images),
                         "--wait-for-page-server", "60", uvloop=loop,
                         log=tmp_path / "daemon.log") as (daemon, daemon_ready), \
                    command("restore", "--lazy-pages", "-D", str(images), "-d", "--shell-job",
                            "--pidfile", str(tmp_path / "restored.pid"),
                            "--wait-for-images", "60", uvloop=loop, stdout=write_fd,
                            log=tmp_path / "restore.log") as (restore, restore_ready):
                os.close(write_fd)
                write_fd = -1
                await asyncio.to_thread(wait_ready, daemon_ready, daemon, tmp_path / "daemon.log")
                await asyncio.to_thread(wait_ready, restore_ready, restore,
                                        tmp_path / "restore.log")
                # Ready, and waiting: nothing to restore yet.
                await asyncio.sleep(0.2)
                assert restore.poll() is None, (tmp_path / "restore.log").read_text()
                assert not (images / "inventory.img").exists()
                assert "waiting up to 60 s for the images" in (tmp_path / "restore.log").read_text()
                with command("dump", "-t", str(w.pid), "--lazy-pages", *server, "-D",
                             str(images), uvloop=loop, log=tmp_path / "dump.log") as (dumper, dr):
                    await asyncio.to_thread(wait_ready, dr, dumper, tmp_path / "dump.log")
                    assert await asyncio.to_thread(restore.wait, 30) == 0, \
                        (tmp_path / "restore.log").read_text()
                    restored = int((tmp_path / "restored.pid").read_text())
                    assert "images complete after" in (tmp_path / "restore.log").read_text()
                    for _ in range(3):
                        check = await asyncio.to_thread(lines.next_check)
                        assert (check.sum, check.bad) == (before.sum, 0)
                    assert await asyncio.to_thread(daemon.wait, 30) == 0  # every page is in
                    assert await asyncio.to_thread(dumper.wait, 10) == 0
                    check = await asyncio.to_thread(lines.next_check)
                    assert (check.sum, check.bad) == (before.sum, 0)
                    assert check.n > before.n
            assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            if restored:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restored, signal.SIGKILL)
            lines.close()


@pytest.mark.asyncio
async def test_a_prepared_destination_whose_dump_dies_before_its_images_fails_at_once(
        tmp_path: Path) -> None:
    """The dump dies (kill -9) before it wrote its images, its socket listening since its
    start: the prepared daemon's connection, queued there, is reset, and the daemon fails
    and unlinks its socket; the prepared restore sees that and fails too. Both within
    seconds, not when their --wait-for-* SECONDS (600 here) are spent. The dump is
    played by a process that only listens, as `lazymig dump` does before its images."""
    port, loop = free_port(), on_uvloop()
    images = tmp_path / "images"
    images.mkdir()
    dump = await listening_process(port)
    try:
        with command("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                     str(port), "-D", str(images), "--wait-for-page-server", "600",
                     uvloop=loop, log=tmp_path / "daemon.log") as (daemon, daemon_ready), \
                command("restore", "--lazy-pages", "-D", str(images), "-d",
                        "--wait-for-images", "600", uvloop=loop,
                        log=tmp_path / "restore.log") as (restore, restore_ready):
            await asyncio.to_thread(wait_ready, daemon_ready, daemon, tmp_path / "daemon.log")
            await asyncio.to_thread(wait_ready, restore_ready, restore, tmp_path / "restore.log")
            async with asyncio.timeout(60):
                await until(lambda: "connected to page server" in
                            (tmp_path / "daemon.log").read_text())
                await until(lambda: "waiting up to 600 s" in (tmp_path / "restore.log").read_text())
            dump.kill()
            await dump.wait()
            assert await asyncio.to_thread(daemon.wait, 30) == 1, \
                (tmp_path / "daemon.log").read_text()
            assert await asyncio.to_thread(restore.wait, 30) == 1, \
                (tmp_path / "restore.log").read_text()
    finally:
        if dump.returncode is None:
            dump.kill()
            await dump.wait()
    assert "the page server went away" in (tmp_path / "daemon.log").read_text()
    log = (tmp_path / "restore.log").read_text()
    assert "lazy-pages.socket went away while the restore waited for the images" in log, log
    assert "Traceback" not in log


def test_no_dump_comes_and_the_prepared_restore_gives_up(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lazymig", "restore", "--lazy-pages", "-D",
                           str(tmp_path), "-d", "--wait-for-images", "0.3"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert time.monotonic() - started >= 0.3
    assert f"no complete dump in {tmp_path} after 0.3 s (inventory.img" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wait_for_images_returns_once_the_inventory_is_written(tmp_path: Path) -> None:
    images = ImagesDir(tmp_path)
    with pytest.raises(ImagesNotCompleteError, match="no complete dump"):
        wait_for_images(images, 0.05)
    writer = threading.Timer(0.1, images.write_inventory)
    writer.start()
    try:
        waited = wait_for_images(images, 10)
    finally:
        writer.join()
    assert waited > 0  # it waited (the timer started before its clock: no lower bound)
    assert (tmp_path / "inventory.img").exists()
    assert wait_for_images(images, 0) == 0.0  # there already: at once


@pytest.mark.asyncio
async def test_images_wait_awaited_on_the_loop(tmp_path: Path) -> None:
    """The daemon's way (``lazy-pages --wait-for-page-server``): the same wait, its
    pauses awaited, so that the loop runs meanwhile (here: the writer of the images)."""
    images = ImagesDir(tmp_path)
    timed_out = ImagesWait(images, 0.05)
    for pause in timed_out.pauses():
        await asyncio.sleep(pause)
    assert not timed_out.complete and timed_out.waited >= 0.05
    wait = ImagesWait(images, 10)
    asyncio.get_running_loop().call_later(0.1, images.write_inventory)
    pauses = 0
    for pause in wait.pauses():
        pauses += 1
        await asyncio.sleep(pause)
    assert wait.complete and wait.waited > 0 and pauses > 1
    assert list(ImagesWait(images, 0).pauses()) == []  # there already: no pause
