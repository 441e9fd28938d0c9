"""fds 0, 1 and 2 migrate like every other fd (lazymig issue 13 item 5).

* A process whose stdin is /dev/null and whose stdout and stderr are a log
  file (not O_APPEND: the offset matters) is migrated lazily, through the
  CLIs and through ``lazymig.migrate`` on loopback: its numbered lines go on
  in the file at the right offset (no gap, no line written twice, no line
  overwritten), its fd 0 is /dev/null again, and the restorer's own stdio
  is not involved (``lazymig restore -d`` prints only the pid).
* fds 0-2 that stayed on the source host (here a pipe read by the test) are
  refused at restore, before any process exists, the fd and what to pass
  named; ``--inherit-fd fd[N]:pipe:[INO]`` hands the restored process a fd
  of the caller's in their place, ``--shell-job`` the restorer's own;
  ``lazymig.migrate`` without ``stdio=`` refuses such a process before the
  freeze, and it runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli, free_port, on_uvloop, wait_ready

import lazymig
from lazymig.dump import dump
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.restore import InheritFd, Restorer, UnsupportedDumpError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

# Each line: its number, the writer's pid as this host numbers it (/proc/self: a
# restored writer has its dumped pid, in a pid namespace of its own on one machine).
WRITER = """
import os, sys, time
n = 0
while True:
    n += 1
    os.write(1, b"%d %s\\n" % (n, os.readlink("/proc/self").encode()))
    time.sleep(0.01)
"""


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def writer(log: Path, *, stdout: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The WRITER with stdin /dev/null and stdout + stderr on ``log`` (or ``stdout``)."""
    with log.open("wb") as f:
        out = f.fileno() if stdout is None else stdout
        proc = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=f, start_new_session=True)
    try:
        yield proc
    finally:
        kill(proc.pid)
        proc.wait(timeout=10)


def newest_count(fd: int, pending: bytearray) -> int:
    """The counter of the newest whole line the WRITER has sent down pipe ``fd``, read
    at least once more; ``pending`` keeps a line half read for the next call (a read
    may end anywhere in a line)."""
    while True:
        pending += os.read(fd, 65536)
        *whole, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        if whole:
            return int(whole[-1].split()[0])


def lines_of(log: Path) -> list[tuple[int, int]]:
    data = log.read_bytes()
    assert b"\0" not in data, "a hole: the restored process wrote at a later offset"
    return [(int(a), int(b)) for a, b in (line.split() for line in data.splitlines())]


def wait_lines(log: Path, pid: int, count: int) -> list[tuple[int, int]]:
    """The log once ``count`` lines of ``pid`` are in it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError):  # a line half written
            lines = lines_of(log)
            if sum(1 for _, p in lines if p == pid) >= count:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"{pid} did not write {count} lines to {log}: {log.read_bytes()!r}")


def assert_continues(lines: list[tuple[int, int]], source: int, restored: int) -> None:
    """Numbered 1, 2, 3... with no gap or repeat, the source's then the restored one's."""
    assert [n for n, _ in lines] == list(range(1, len(lines) + 1))
    pids = [p for _, p in lines]
    first = pids.index(restored)
    assert set(pids[:first]) == {source} and set(pids[first:]) == {restored}


def fds_of(pid: int) -> set[int]:
    return {int(p.name) for p in Path(f"/proc/{pid}/fd").iterdir()}


def fd_link(pid: int, fd: int) -> str:
    return str(Path(f"/proc/{pid}/fd/{fd}").readlink())


@pytest.mark.asyncio
async def test_a_log_on_stdout_continues_through_lazymig_migrate(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    with writer(log) as proc:
        await asyncio.to_thread(wait_lines, log, proc.pid, 5)
        result = await asyncio.wait_for(lazymig.migrate(proc.pid), 60)
        pid = result.restored.pid
        try:
            lines = await asyncio.to_thread(wait_lines, log, pid, 10)
            assert_continues(lines, proc.pid, pid)
            assert fd_link(pid, 0) == os.devnull
            assert fd_link(pid, 1) == fd_link(pid, 2) == str(log)
        finally:
            kill(pid)


@pytest.mark.asyncio
async def test_a_log_on_stdout_continues_through_the_clis(tmp_path: Path) -> None:
    log, images = tmp_path / "out.log", tmp_path / "images"
    images.mkdir()
    port, loop = str(free_port()), on_uvloop()
    with writer(log) as proc:
        await asyncio.to_thread(wait_lines, log, proc.pid, 5)
        with cli("dump", "-t", str(proc.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(images), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
            with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                     "-D", str(images), uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
                restore = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "lazymig", "restore", "--lazy-pages",
                                     "-D", str(images), "-d"],
                    capture_output=True, text=True, timeout=60)
                assert restore.returncode == 0, restore.stderr
                pid = int(restore.stdout)  # the pid alone: the process writes to its log
                try:
                    assert await asyncio.to_thread(daemon.wait, 20) == 0
                    assert await asyncio.to_thread(dumper.wait, 10) == 0
                    lines = await asyncio.to_thread(wait_lines, log, pid, 10)
                    assert_continues(lines, proc.pid, pid)
                    assert fd_link(pid, 0) == os.devnull
                finally:
                    kill(pid)


@pytest.mark.asyncio
async def test_stdio_that_stayed_behind_needs_the_caller_to_say(tmp_path: Path) -> None:
    log, images = tmp_path / "err.log", tmp_path / "images"
    images.mkdir()
    read_fd, write_fd = os.pipe()
    try:
        with writer(log, stdout=write_fd) as proc:
            ino = os.fstat(write_fd).st_ino
            os.read(read_fd, 1)  # it runs
            await dump(proc.pid, images)
        os.close(write_fd)
        write_fd = -1
        name = f"pipe:[{ino}]"
        refused = Restorer(images)
        with pytest.raises(UnsupportedDumpError,
                           match=rf"fd 1 of process {proc.pid} was pipe:\[{ino}\], which stayed "
                                 r"on the source host: .*--inherit-fd fd\[N\]:pipe:\[\d+\].*"
                                 r"--shell-job"):
            await refused.run()
        assert refused.process is None  # nothing was started

        # --inherit-fd: a new pipe of ours takes the dumped pipe's place on fd 1
        new_r, new_w = os.pipe()
        try:
            restorer = Restorer(images, inherit_fds=[InheritFd.parse(f"fd[{new_w}]:{name}")])
            result = await restorer.run()
            given = new_w
            os.close(new_w)
            new_w = -1
            try:
                line = await asyncio.to_thread(os.read, new_r, 100)
                assert line.split()[1] == str(result.pid).encode()
                assert fd_link(result.pid, 2) == str(log)  # the others are the dumped ones
                assert fd_link(result.pid, 0) == os.devnull
                open_fds = await asyncio.to_thread(fds_of, result.pid)
                assert given not in open_fds and {0, 1, 2} <= open_fds  # given is fd 1 now
            finally:
                restorer.kill()
        finally:
            os.close(new_r)
            if new_w >= 0:
                os.close(new_w)
        await asyncio.to_thread(restore_with_cli_inherit_fd, images, name)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def restore_with_cli_inherit_fd(images: Path, name: str) -> None:
    """``lazymig restore`` refuses without an option, and with ``--inherit-fd``
    the restored process writes into the fd given."""
    refused = subprocess.run([sys.executable, "-m", "lazymig", "restore", "-D", str(images),
                              "-d"], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and f"--inherit-fd fd[N]:{name}" in refused.stderr
    r, w = os.pipe()
    try:
        restore = subprocess.run(
            [sys.executable, "-m", "lazymig", "restore", "-D", str(images), "-d",
             "--inherit-fd", f"fd[{w}]:{name}"], pass_fds=(w,), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, timeout=60, check=True)
        os.close(w)
        w = -1
        pid = int(restore.stdout)
        try:
            assert os.read(r, 100).split()[1] == str(pid).encode()
        finally:
            kill(pid)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_inherit_fd_names_what_it_takes() -> None:
    assert InheritFd.parse("fd[7]:pipe:[123]") == InheritFd(7, "pipe:[123]")
    assert InheritFd.parse("fd[1]:/var/log/app.log") == InheritFd(1, "/var/log/app.log")
    with pytest.raises(lazymig.ConfigurationError, match=r"expected fd\[N\]:NAME"):
        InheritFd.parse("7:pipe:[123]")


@pytest.mark.asyncio
async def test_migrate_refuses_stdio_that_would_stay_behind_before_the_freeze(
        tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        with writer(tmp_path / "err.log", stdout=write_fd) as proc:
            ino = os.fstat(write_fd).st_ino
            pending = bytearray()
            newest_count(read_fd, pending)  # it runs
            with pytest.raises(UnsupportedTargetError,
                               match=rf"fd 1 is pipe:\[{ino}\], which would stay on this host"
                                     r".*not touched. Pass stdio="):
                await lazymig.migrate(proc.pid)
            with open(f"/proc/{proc.pid}/status") as f:  # noqa: ASYNC230 - procfs
                assert "TracerPid:\t0\n" in f.read()
            before = newest_count(read_fd, pending)  # it writes on
            await asyncio.sleep(0.1)
            assert newest_count(read_fd, pending) > before
    finally:
        os.close(read_fd)
        os.close(write_fd)
