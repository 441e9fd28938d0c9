"""CPython ``multiprocessing`` migrates with lazymig alone (issue 13): a Pool of
2 workers, a Queue, shared memory of three kinds and a pipe with bytes waiting
in it (tests/workloads/mp_pool.py).

Migrated lazily on loopback through ``lazymig.migrate`` and from one network
namespace to another through the three CLIs, with its ``shared_memory``
segment removed once dumped (as on a host that lacks it), and restored by
``Restorer`` from a plain dump once the source tree is gone, the tree then:

* goes on passing its own checks: every round's results come back through the
  queue, right (the digests of the shared anonymous region, the round number
  the parent wrote into the segment) and counted by the workers in a
  ``multiprocessing.Value`` under its lock (a deleted /dev/shm file and a
  POSIX semaphore, ``/dev/shm/sem.* (deleted)``);
* reads whole the 16 KiB a child wrote into a pipe that nobody had read at
  dump time;
* writes whole lines to its shared stdout (a file opened without O_APPEND):
  its processes share its offset again;
* holds the region as the source did, page by page, in every process that maps
  it; each semaphore is one object mapped at its address in every process, and
  the segment made again is the one they map;
* ``crit`` shows each open file description once in files.img, named by the
  fdinfo of every process that had it, and the pipe's bytes in pipes-data.img.

On one machine the frozen source holds the dumped pids during a lazy
migration, so the tree comes back under new ones; nothing here depends on
them (a Pool polls its workers by pid, gets ECHILD and takes them for alive, as
they are). Restored once the source is gone, the workers get their pids back.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import CRIT, crit_decode, on_uvloop
from workloads import WORKLOAD_DIR

import lazymig
from lazymig.dump import dump
from lazymig.linux.procfs import descendants
from lazymig.restore import Restorer
from lazymig.testing import HostPair, MemorySnapshot, assert_memory_equal
from lazymig.testing.plugin import StartCommand
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

LINE = re.compile(r"READY .*|W \d+|ROUND (\d+) ok=1 count=(\d+)|PIPE bytes=\d+ sha=[0-9a-f]+")
TASKS = 8  # per round (mp_pool.py)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def wait_for(path: Path, found: Callable[[list[str]], bool], what: str,
             timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while not found(now := lines(path)):
        assert time.monotonic() < deadline, f"no {what} in {path}: ...{now[-5:]}"
        time.sleep(0.05)
    return now


def last_round(out: list[str]) -> int:
    return max((int(m[1]) for line in out if (m := LINE.fullmatch(line)) and m[1]), default=0)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"{pids} still there"
        time.sleep(0.02)


def check_lines(out: list[str]) -> None:
    """Every line whole and right, counts adding up."""
    for line in out:
        m = LINE.fullmatch(line)
        assert m is not None, f"a bad or torn line: {line!r}"
        if m[1]:
            assert int(m[2]) == TASKS * int(m[1]), line


@contextlib.contextmanager
def mp_pool(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as o, open(err, "wb") as e:  # "wb": no O_APPEND
        proc = subprocess.Popen([sys.executable, str(WORKLOAD_DIR / "mp_pool.py")], stdout=o,
                                stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)
    ready: dict[str, str] = {}
    try:
        first = wait_for(out, lambda now: last_round(now) >= 3, "rounds")[0]
        ready = dict(f.split("=") for f in first.split()[1:])
        yield proc, ready, out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if ready:
            with contextlib.suppress(FileNotFoundError):
                Path(f"/dev/shm/{ready['shm']}").unlink()


def maps(pid: int) -> dict[int, str]:
    """{start: its maps line} of the shared mappings of ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if fields[1][3] == "s":
            out[int(fields[0].split("-")[0], 16)] = line
    return out


def object_at(pid: int, line: str) -> tuple[int, int]:
    st = Path(f"/proc/{pid}/map_files/{line.split(maxsplit=1)[0]}").stat()
    return st.st_dev, st.st_ino


def check_objects(root: int, holders: list[int], segment: Path) -> None:
    """The segment made again is what the root maps; each semaphore is one object,
    mapped at its address in every process that had it."""
    mine = maps(root)
    assert [object_at(root, line) for line in mine.values() if str(segment) in line] \
        == [(segment.stat().st_dev, segment.stat().st_ino)]
    sems = {a: line for a, line in mine.items() if "/dev/shm/sem." in line}
    assert len(sems) >= 3, mine  # the Value's lock, the Queue's two
    for pid in holders:  # (the pipe's writer was forked before the Pool's queues)
        theirs = maps(pid)
        common = [a for a in sems if a in theirs and "/dev/shm/sem." in theirs[a]]
        assert common, theirs
        for address in common:
            assert object_at(pid, theirs[address]) == object_at(root, sems[address])


def check_images(images: Path) -> None:
    """``crit`` shows one ``file_entry`` per open file description, the fdinfo of
    each process that had it naming its id, and the pipe's waiting bytes."""
    files = crit_decode(images / "files.img")["entries"]
    ids = [f["id"] for f in files]
    assert len(ids) == len(set(ids))
    holders: dict[int, int] = {}
    for fdinfo in sorted(images.glob("fdinfo-*.img")):
        for file_id in {e["id"] for e in crit_decode(fdinfo)["entries"]}:
            holders[file_id] = holders.get(file_id, 0) + 1
    pipes = {f["id"] for f in files if f["type"] == "PIPE"}
    assert pipes and all(file_id in ids for file_id in holders)
    assert any(holders.get(file_id, 0) >= 2 for file_id in pipes)  # one end, two processes
    data = crit_decode(images / "pipes-data.img")["entries"]
    assert any(e["bytes"] == 16 * 1024 for e in data), data


async def check_restored(root: int, ready: dict[str, str], out: Path, before: MemorySnapshot,
                         dumped: int) -> list[int]:
    """The restored tree of ``root`` works on and holds the region as it was
    (see the module docstring); returns the processes that map it."""
    restored = [root, *descendants(root)]
    assert len(restored) == 5  # the Pool's 2 workers, the pipe's writer, the tracker
    now = await asyncio.to_thread(wait_for, out, lambda n: last_round(n) >= dumped + 5,
                                  "rounds after the restore")
    check_lines(now)
    os.kill(root, signal.SIGUSR1)
    now = await asyncio.to_thread(
        wait_for, out, lambda n: any(line.startswith("PIPE") for line in n), "PIPE")
    assert f"PIPE bytes={16 * 1024} sha={ready['sha']}" in now
    check_lines(now)
    region = int(ready["region"], 16)
    holders = [pid for pid in restored if region in maps(pid)]
    assert root in holders and len(holders) == 4, holders  # not the exec'd tracker
    for pid in holders:
        await assert_memory_equal(pid, before)
    return holders


@pytest.mark.asyncio
async def test_a_multiprocessing_pool_migrates(tmp_path: Path) -> None:
    with mp_pool(tmp_path) as (proc, ready, out):
        region, size = int(ready["region"], 16), int(ready["size"])
        restored: list[int] = []
        process: lazymig.RestoredProcess | None = None
        try:
            # Written once before the Pool started: the region the workers only read.
            before = await asyncio.to_thread(MemorySnapshot.take, proc.pid, [(region, size)])
            images = tmp_path / "images"
            images.mkdir()
            segment = Path(f"/dev/shm/{ready['shm']}")

            async def as_to_another_host(dumped: Path) -> Path:
                # Where it goes there is no such segment: the restore makes it again.
                await asyncio.to_thread(segment.unlink)
                return dumped

            async with asyncio.timeout(90), lazymig.migrate(
                    proc.pid, images_dir=images, copy_images=as_to_another_host) as migration:
                dumped = last_round(lines(out))
                process, root = migration.process, migration.process.pid
                restored = [root, *descendants(root)]  # killed at the end, whatever happens
            holders = await check_restored(root, ready, out, before, dumped)
            await asyncio.to_thread(check_objects, root, holders, segment)
            if CRIT is not None:
                await asyncio.to_thread(check_images, images)
        finally:
            for pid in reversed(restored):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if process is not None:  # and its pid namespace: workers forked since go too
                await process.kill()


@pytest.mark.asyncio
async def test_a_multiprocessing_pool_restored_once_its_source_is_gone(tmp_path: Path) -> None:
    """A plain dump (the tree killed), restored once its pids are free: the
    workers come back under their own pids, those the Pool waits for."""
    with mp_pool(tmp_path) as (proc, ready, out):
        region, size = int(ready["region"], 16), int(ready["size"])
        restorer: Restorer | None = None
        restored: list[int] = []
        try:
            before = await asyncio.to_thread(MemorySnapshot.take, proc.pid, [(region, size)])
            old = await asyncio.to_thread(descendants, proc.pid)
            images = tmp_path / "images"
            images.mkdir()
            await dump(proc.pid, images)
            dumped = last_round(lines(out))
            await asyncio.to_thread(proc.wait, 10)
            await asyncio.to_thread(wait_gone, old)  # reaped by init once orphaned
            restorer = Restorer(images)
            root = (await asyncio.wait_for(restorer.run(), 60)).pid
            restored = [root, *descendants(root)]
            assert sorted(restored[1:]) == sorted(old)
            await check_restored(root, ready, out, before, dumped)
        finally:
            for pid in reversed(restored):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if restorer is not None:
                restorer.kill()


@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
@pytest.mark.asyncio
async def test_a_multiprocessing_pool_migrated_with_the_three_clis(
        lazymig_hosts: HostPair, lazymig_command: StartCommand, tmp_path: Path) -> None:
    """``lazymig dump -t``, ``lazymig lazy-pages`` and ``lazymig restore``, from one
    network namespace to another, the segment removed in between."""
    hosts, loop = lazymig_hosts, on_uvloop()
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    read_fd, write_fd = os.pipe()
    said = OutputLines(read_fd)
    restored: list[int] = []
    try:
        with mp_pool(tmp_path) as (proc, ready, out):
            region, size = int(ready["region"], 16), int(ready["size"])
            before = await asyncio.to_thread(MemorySnapshot.take, proc.pid, [(region, size)])
            dumper = await lazymig_command("dump", "-t", str(proc.pid), "--lazy-pages",
                                           "--address", hosts.source.address, "--port", "27",
                                           "-D", source_images, host=hosts.source, uvloop=loop)
            dumped = last_round(lines(out))
            await asyncio.to_thread(shutil.copytree, source_images, images)
            await asyncio.to_thread(Path(f"/dev/shm/{ready['shm']}").unlink)
            daemon = await lazymig_command(
                "lazy-pages", "--page-server", "--address", hosts.source.address, "--port", "27",
                "-D", images, host=hosts.destination, uvloop=loop)
            restore = await lazymig_command("restore", "--lazy-pages", "-D", images, "-d",
                                            host=hosts.destination, ready=False,
                                            stdout=write_fd, uvloop=loop)
            os.close(write_fd)
            write_fd = -1
            async with asyncio.timeout(60):
                assert await restore.wait() == 0, restore.log()
                root = int(await asyncio.to_thread(said.next, 10.0))
                restored = [root, *descendants(root)]
                assert await dumper.wait() == 0, dumper.log()  # every page served
                await daemon.wait()
            await check_restored(root, ready, out, before, dumped)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        for pid in reversed(restored):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        said.close()
