"""A workload that the migrating process itself started and waits for is refused at
once, saying why and how to start it instead: its waiter (asyncio's child watcher,
uvloop, a thread in Popen.wait) would take the ptrace stops the freeze needs, which
hung the freeze until it timed out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvloop

import lazymig
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.linux.procfs import read_syscall
from lazymig.linux.ptrace import process_alive

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace needs root"),
]



def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.asyncio
async def test_a_child_started_by_the_event_loop_is_refused_saying_how_to_start_it(
        c_workload: Path, tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(str(c_workload), "--mib", "1",
                                                 stdout=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(30):
            with pytest.raises(UnsupportedTargetError) as caught:
                async with lazymig.serve(child.pid, tmp_path):
                    pytest.fail("served a process its own loop waits for")
        message = str(caught.value)
        assert f"cannot migrate process {child.pid}: it is a child of this process" in message
        if isinstance(asyncio.get_running_loop(), uvloop.Loop):
            assert "uvloop, which started it" in message
        else:
            assert "asyncio's child watcher" in message
        assert "subprocess.Popen(argv, start_new_session=True, close_fds=True)" in message
        assert state(child.pid) in "RS"  # untouched, running on
    finally:
        child.kill()
        await child.wait()


def start_in_its_own_session(argv: list[str]) -> subprocess.Popen[bytes]:
    """As docs/operating.md says to start a workload to migrate."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


@pytest.mark.asyncio
async def test_a_child_a_thread_waits_for_is_refused(c_workload: Path, tmp_path: Path) -> None:
    child = start_in_its_own_session([str(c_workload), "--mib", "1"])
    waiter = threading.Thread(target=child.wait, name="waiter")
    waiter.start()
    try:
        assert waiter.native_id is not None
        deadline = time.monotonic() + 10
        while (read_syscall(os.getpid(), waiter.native_id) or (0,))[0] != 61:  # wait4
            assert time.monotonic() < deadline, "the thread never blocked in wait4"
            await asyncio.sleep(0.01)
        with pytest.raises(UnsupportedTargetError,
                           match=f"thread {waiter.native_id} of this process, blocked in wait4"):
            async with asyncio.timeout(30), lazymig.serve(child.pid, tmp_path):
                pytest.fail("served a process a thread here waits for")
        assert process_alive(child.pid) and state(child.pid) in "RS"
    finally:
        child.kill()
        waiter.join(10)
