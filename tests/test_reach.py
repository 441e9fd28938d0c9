"""What lazymig migrates beyond its own workloads, and what it refuses clearly.

* ``sleep 300`` itself: the restore starts from a ``sleep`` helper, so the
  executable to switch to is the helper's own (it was refused with EBUSY).
* Refusals before the target is touched, each cause named with what to do
  (``criu restore`` with lazymig's daemon), the source running on unchanged:
  a fanotify instance, of the process or of one of its children (sockets
  migrate: tests/test_sockets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lazymig
from lazymig.dump import dump
from lazymig.dump.dumper import REFUSAL_HINT
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.restore import Restorer

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def started(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        kill(proc.pid)
        proc.wait(timeout=10)


def exe(pid: int) -> Path:
    return Path(f"/proc/{pid}/exe").readlink()


def wait_sleeping(pid: int) -> None:
    for _ in range(500):
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[0] in ("35", "230"):
                return
        subprocess.run(["sleep", "0.01"], check=True)
    raise AssertionError(f"{pid} never slept")


@pytest.mark.asyncio
async def test_sleep_is_restored_from_the_sleep_helper(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    with started([sleep, "300"]) as proc:
        await asyncio.to_thread(wait_sleeping, proc.pid)
        await dump(proc.pid, tmp_path)
        devnull = os.open(os.devnull, os.O_RDWR)
        restorer = Restorer(tmp_path, stdio=(devnull, devnull, devnull))
        try:
            result = await restorer.run()
        finally:
            os.close(devnull)
        try:
            pid = result.pid
            assert await asyncio.to_thread(exe, pid) == await asyncio.to_thread(
                Path(sleep).resolve)
            with open(f"/proc/{pid}/cmdline", "rb") as f:  # noqa: ASYNC230 - procfs
                assert f.read().split(b"\0")[1] == b"300"
            await asyncio.to_thread(wait_sleeping, pid)
            assert state(pid) == "S"
            os.kill(pid, signal.SIGTERM)
            assert await asyncio.to_thread(restorer.wait) == -signal.SIGTERM
        finally:
            restorer.kill()


@pytest.mark.asyncio
async def test_sleep_migrates_through_the_api() -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    with started([sleep, "300"]) as proc:
        await asyncio.to_thread(wait_sleeping, proc.pid)
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            result = await asyncio.wait_for(
                lazymig.migrate(proc.pid, stdio=(devnull, devnull, devnull)), 60)
        finally:
            os.close(devnull)
        try:
            assert result.restored.pid != proc.pid
            await asyncio.to_thread(wait_sleeping, result.restored.pid)
            assert await asyncio.to_thread(exe, result.restored.pid) == \
                await asyncio.to_thread(Path(sleep).resolve)
        finally:
            kill(result.restored.pid)


TICKER = """
import ctypes, os, subprocess, sys, time
FANOTIFY = "import ctypes; fd = ctypes.CDLL(None).fanotify_init(1, 0)"  # FAN_CLOEXEC
kind = sys.argv[1]
if kind == "fanotify":
    exec(FANOTIFY)
else:  # a child holding one
    held = subprocess.Popen([sys.executable, "-c", FANOTIFY + "; print(flush=True); "
                             "import time; time.sleep(300)"], stdout=subprocess.PIPE)
    held.stdout.readline()
print("READY", held.pid if kind == "child" else fd, flush=True)
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.02)
"""


def ticks(proc: subprocess.Popen[str], count: int) -> list[int]:
    assert proc.stdout is not None
    return [int(proc.stdout.readline()) for _ in range(count)]


def assert_runs_on(proc: subprocess.Popen[str]) -> None:
    """Not traced, not stopped, and still counting one by one."""
    with open(f"/proc/{proc.pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert status["TracerPid"].strip() == "0"
    assert state(proc.pid) in ("S", "R")
    seen = ticks(proc, 3)
    assert seen == list(range(seen[0], seen[0] + 3))


@contextlib.contextmanager
def ticker(kind: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", TICKER, kind, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "READY", ready
        yield proc, int(ready[1])
    finally:
        kill(proc.pid)
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.asyncio
async def test_a_fanotify_fd_is_refused_and_the_source_runs_on(tmp_path: Path) -> None:
    with ticker("fanotify") as (proc, fd):
        with pytest.raises(UnsupportedTargetError) as info:
            await lazymig.migrate(proc.pid)
        message = str(info.value)
        assert f"fd {fd} is a fanotify instance (anon_inode:[fanotify])" in message
        assert "criu dump --lazy-pages" in message and "lazymig lazy-pages" in message
        assert info.value.hint.startswith(REFUSAL_HINT)
        assert "fd 1 is pipe:[" in message and "Pass stdio=" in message  # its stdout too
        assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []
        await asyncio.to_thread(assert_runs_on, proc)


def test_a_fanotify_fd_is_refused_by_the_cli(tmp_path: Path) -> None:
    with ticker("fanotify") as (proc, fd):
        out = subprocess.run([sys.executable, "-m", "lazymig", "dump", "-t", str(proc.pid),
                              "-D", str(tmp_path)], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode != 0
        assert f"fd {fd} is a fanotify instance" in out.stderr
        assert "criu restore" in out.stderr
        assert list(tmp_path.iterdir()) == []
        assert_runs_on(proc)


@pytest.mark.asyncio
async def test_a_child_holding_a_fanotify_fd_is_refused(tmp_path: Path) -> None:
    """A process with children is migrated with its tree (tests/test_trees.py): what
    a child holds is checked as the process's own, and the refusal names the child."""
    with ticker("child") as (proc, child):
        try:
            with pytest.raises(UnsupportedTargetError) as info:
                await lazymig.migrate(proc.pid)
            assert f"its child process {child}: fd " in str(info.value)
            assert "is a fanotify instance" in str(info.value)
            assert "criu dump --lazy-pages" in str(info.value)
            await asyncio.to_thread(assert_runs_on, proc)
            assert state(child) == "S"
        finally:
            kill(child)
