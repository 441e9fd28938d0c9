"""Pids as they were (lazymig issue 13 item 4; lazymig/restore/pids.py).

* bash running ``(while :; do echo d; sleep ..; done) & while :; do echo x;
  sleep ..; done``, its stdout a log file, migrated with ``lazymig.migrate`` on one
  machine: the frozen source holds the dumped pids, so the tree comes back in a
  pid namespace of its own (pid 1 its init) under them, and both loops go on
  writing (each bash waits for its foreground ``sleep`` by pid); a SIGKILL to
  the init ends the whole tree.
* tests/workloads/pids.py (a parent and its child, each with a second thread)
  migrated on one machine: ``getpid()`` and ``gettid()`` of both threads of
  both processes are the dumped ones, the parent kills its child by the pid
  ``fork()`` gave it and reaps it with ``waitpid(pid)``; when the root exits,
  the restorer reaps it (status 0) and the init ends by itself.
* the same with ``new_pids=True``: new pids, no namespace; the parent's
  remembered pid names no child of its.
* ``lazymig restore`` of a plain dump whose source is gone: the process gets
  its pid back here, no namespace; ``--new-pids`` gives it a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import cli, on_uvloop

import lazymig
from lazymig._aio import wait_fd
from lazymig.dump import dump
from lazymig.linux.procfs import children, ns_pids
from lazymig.linux.ptrace import process_alive
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace, clone3 set_tid and setns need root"),
]

PIDS = Path(__file__).parent / "workloads" / "pids.py"
BASH = "(while :; do echo d; sleep 0.05; done) & while :; do echo x; sleep 0.05; done"


def lines_after(log: Path, offset: int, want: int, timeout: float = 20.0) -> dict[str, int]:
    """How many ``x`` and ``d`` lines the log gets after ``offset``, once each has
    ``want`` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        with log.open("rb") as f:
            f.seek(offset)
            words = f.read().split()
        counts = {w: words.count(w.encode()) for w in ("x", "d")}
        if min(counts.values()) >= want or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def bash(log: Path) -> subprocess.Popen[bytes]:
    """bash running BASH, its stdout and stderr on ``log`` (appending: its two
    processes share that fd, each line lands at the end whichever writes it),
    its stdin /dev/null."""
    with log.open("ab") as out:
        return subprocess.Popen(["bash", "-c", BASH], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def sleeper() -> subprocess.Popen[bytes]:
    """A process that only sleeps, its fds 0-2 /dev/null."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


async def ended(pid: int) -> None:
    """Return once process ``pid`` (a child of ours, so not reused meanwhile) has exited."""
    pidfd = os.pidfd_open(pid)
    try:
        async with asyncio.timeout(20):
            await wait_fd(pidfd)
    finally:
        os.close(pidfd)


@pytest.mark.asyncio
async def test_bash_with_a_background_loop_goes_on_after_a_one_machine_migration(
        tmp_path: Path) -> None:
    log = tmp_path / "bash.log"
    init: int | None = None
    source = bash(log)
    try:
        assert min((await asyncio.to_thread(lines_after, log, 0, 3)).values()) >= 3
        async with asyncio.timeout(60), lazymig.migrate(source.pid) as migration:
            result = migration.process.result
            init = result.pid_namespace
            assert init is not None, "the source holds the pids: a namespace of its own"
            assert ns_pids(result.pid) == (result.pid, source.pid)
            assert ns_pids(init)[1:] == (1,)
        source.wait(timeout=10)  # killed once every page was served
        offset = log.stat().st_size
        counts = await asyncio.to_thread(lines_after, log, offset, 5)
        assert min(counts.values()) >= 5, counts  # both loops write on
        os.kill(init, signal.SIGKILL)  # the init's end is the namespace's
        assert await migration.process.wait() == -signal.SIGKILL
        await ended(init)
    finally:
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        if source.poll() is None:  # not migrated: its group is still its own
            os.killpg(source.pid, signal.SIGKILL)
        source.wait(timeout=10)


class PidsTree:
    """tests/workloads/pids.py, its stdin and stdout pipes of ours."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PIDS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.ids = parse(line)


def parse(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@contextlib.contextmanager
def pids_tree() -> Iterator[PidsTree]:
    tree = PidsTree()
    try:
        yield tree
    finally:
        if tree.proc.poll() is None:  # not migrated: its child's pid is still its child's
            os.kill(tree.ids["child"], signal.SIGKILL)
        tree.proc.kill()
        tree.proc.wait(timeout=10)


class Talk:
    """Pipes for the restored parent's stdin and stdout; ``stdio`` is its fds 0-2."""

    def __init__(self) -> None:
        self.in_r, self.cmd = os.pipe()
        out_r, self.out_w = os.pipe()
        self.lines = OutputLines(out_r)
        self.stdio = (self.in_r, self.out_w, 2)

    def handed_over(self) -> None:
        """The restored process has its ends: close ours."""
        for fd in (self.in_r, self.out_w):
            os.close(fd)
        self.in_r = self.out_w = -1

    def say(self, command: str) -> str:
        os.write(self.cmd, command.encode() + b"\n")
        return self.lines.next(10.0)

    def close(self) -> None:
        for fd in (self.in_r, self.out_w, self.cmd):
            if fd >= 0:
                os.close(fd)
        self.lines.close()


@contextlib.contextmanager
def talk() -> Iterator[Talk]:
    t = Talk()
    try:
        yield t
    finally:
        t.close()


@pytest.mark.asyncio
async def test_a_parent_waits_for_and_kills_its_child_by_pid_after_a_one_machine_migration(
        ) -> None:
    init: int | None = None
    with talk() as t, pids_tree() as source:
        try:
            async with asyncio.timeout(60), \
                    lazymig.migrate(source.proc.pid, stdio=t.stdio) as migration:
                t.handed_over()
                result = migration.process.result
                init = result.pid_namespace
                assert init is not None and result.image_pid == source.ids["parent"]
            # Inside its namespace every thread has its dumped id (gettid, getpid), and
            # the parent's remembered pid is its child's.
            after = parse(await asyncio.to_thread(t.say, "ids"))
            assert after == source.ids
            assert ns_pids(result.pid)[-1] == source.ids["parent"]
            child = children(result.pid)
            assert [ns_pids(c)[-1] for c in child] == [source.ids["child"]]
            killed = await asyncio.to_thread(t.say, "kill")
            assert killed == f"KILLED status={signal.SIGTERM}"  # by kill(pid), waitpid(pid)
            assert not process_alive(child[0])
            os.write(t.cmd, b"quit\n")
            # The root is the restorer's child: it reaps it; then the init ends by itself.
            assert await migration.process.wait() == 0
            await ended(init)
        finally:
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(init, signal.SIGKILL)


@pytest.mark.asyncio
async def test_new_pids_restores_the_tree_under_new_pids_without_a_namespace() -> None:
    with talk() as t, pids_tree() as source:
        async with asyncio.timeout(60), lazymig.migrate(
                source.proc.pid, stdio=t.stdio, new_pids=True) as migration:
            t.handed_over()
            result = migration.process.result
            assert result.pid_namespace is None
        try:
            (child,) = children(result.pid)
            assert len(ns_pids(result.pid)) == len(ns_pids(os.getpid()))
            after = parse(await asyncio.to_thread(t.say, "ids"))
            assert after["parent"] == result.pid != source.ids["parent"]
            assert after["child"] == child != source.ids["child"]
            assert after["remembered"] == source.ids["child"]  # names no child of it now
            assert after["ptid"] != source.ids["ptid"] and after["ctid"] != source.ids["ctid"]
            os.kill(child, signal.SIGKILL)
            os.write(t.cmd, b"quit\n")
            assert await migration.process.wait() == 0
        finally:
            await migration.process.kill()


@pytest.mark.asyncio
async def test_restore_gives_a_gone_sources_pid_back_and_new_pids_a_new_one(
        tmp_path: Path) -> None:
    source = sleeper()
    try:
        await dump(source.pid, tmp_path)
    finally:
        source.kill()
        source.wait(timeout=10)  # reaped: its pid is free here
    for flags, same in (([], True), (["--new-pids"], False)):
        read_fd, write_fd = os.pipe()
        with cli("restore", "-D", str(tmp_path), "-d", *flags, status=False,
                 uvloop=on_uvloop(), stdout=write_fd) as (proc, _):
            os.close(write_fd)
            lines = OutputLines(read_fd)
            try:
                pid = int(await asyncio.to_thread(lines.next, 20.0))
            finally:
                lines.close()
            assert await asyncio.to_thread(proc.wait, 20) == 0
        try:
            assert (pid == source.pid) == same
            assert len(ns_pids(pid)) == len(ns_pids(os.getpid()))  # no namespace either way
        finally:
            os.kill(pid, signal.SIGKILL)
