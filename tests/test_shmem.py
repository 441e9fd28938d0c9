"""Shared memory migrates (lazymig issue 13 item 3): tests/workloads/shmem.py.

One process (no threads, no children) holds shared anonymous memory
(``mmap(-1, n)``, three VMAs of one object, with holes), a
``multiprocessing.shared_memory`` segment (a /dev/shm file mapped shared), a
memfd mapped twice and open on a fd, a sealed memfd only on a fd, and a
regular file mapped shared. It is migrated lazily
on loopback through ``lazymig.migrate`` and through the three CLIs. Then:

* the restored process checks itself (CHECK ok=1, its counter going on from
  the source's, and what it writes through one memfd view it reads through
  the other and through its fd: one object again; the sealed memfd's data,
  offset and seals);
* its memory equals the source's page by page (all but the counter pages);
* its maps show the same objects: the two anonymous VMAs one
  ``/dev/zero (deleted)`` object at offsets 0, 1 and 2 MiB, both memfd views one
  ``/memfd:lazymig-shmem (deleted)``, the /dev/shm file and the file at their
  paths; what it writes into the shared file mapping reaches the file;
* ``crit`` decodes the shmem pagemap image, ``memfd-inode.img`` and the
  MEMFD entries of ``files.img`` (CRIU's formats), and the mm image's VMAs
  carry the object's shmid.
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
from helpers import cli, crit_decode, free_port, on_uvloop, wait_ready
from workloads import WORKLOAD_DIR
from workloads import shmem as shmem_workload

import lazymig
from lazymig.dump.shmem import shmem_pagemap_path
from lazymig.proto.constants import VmaStatus
from lazymig.proto.images import ImagesDir
from lazymig.testing import MemorySnapshot, assert_memory_equal
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

PAGE = 4096
MIB = 1 << 20


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class ShmemProcess:
    """tests/workloads/shmem.py, its READY fields, and its CHECK lines."""

    def __init__(self, file: Path) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, str(WORKLOAD_DIR / "shmem.py"), str(file)],
                                     stdin=subprocess.DEVNULL, stdout=w, start_new_session=True)
        os.close(w)
        self.lines = OutputLines(r)
        ready = self.lines.next(10.0).split()
        assert ready[0] == "READY", ready
        fields = dict(tok.split("=", 1) for tok in ready[1:])
        self.shm_name = fields.pop("shm_name")
        self.memfd_fd, self.sealed_fd = int(fields.pop("memfd_fd")), int(fields.pop("sealed_fd"))
        self.regions = {k: tuple(int(x, 16) for x in v.split(":")) for k, v in fields.items()}
        self.pid = self.proc.pid

    def check(self) -> dict[str, int]:
        line = self.lines.next(10.0)
        assert line.startswith("CHECK"), line
        return {k: int(v) for k, v in (tok.split("=") for tok in line.split()[1:])}

    def snapshot(self) -> MemorySnapshot:
        """All but the counter pages (page 0 of each), the holes and the file."""
        return MemorySnapshot.take(self.pid, [
            (a + off, length) for k, (a, n) in self.regions.items() if k != "file"
            for off, length in shmem_workload.data_runs(n, k == "anon")])

    def close(self) -> None:
        kill(self.pid)
        self.proc.wait(timeout=10)
        self.lines.close()
        Path(f"/dev/shm/{self.shm_name}").unlink(missing_ok=True)


@contextlib.contextmanager
def shmem_process(file: Path) -> Iterator[ShmemProcess]:
    p = ShmemProcess(file)
    try:
        yield p
    finally:
        p.close()


def maps_of(pid: int) -> dict[int, tuple[int, int, str]]:
    """{start: (offset, inode, path)} of /proc/PID/maps."""
    out = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        out[int(fields[0].split("-")[0], 16)] = (int(fields[2], 16), int(fields[4]),
                                                 fields[5] if len(fields) > 5 else "")
    return out


def holes_of(pid: int, start: int, length: int) -> list[tuple[int, int]]:
    """The holes of the shared object mapped at ``start`` (SEEK_HOLE/SEEK_DATA)."""
    fd = os.open(f"/proc/{pid}/map_files/{start:x}-{start + MIB:x}", os.O_RDONLY)
    try:
        holes, at = [], 0
        while at < length:
            hole = os.lseek(fd, at, os.SEEK_HOLE)
            if hole >= length:
                break
            try:
                at = min(os.lseek(fd, hole, os.SEEK_DATA), length)
            except OSError:
                at = length
            holes.append((hole, at))
        return holes
    finally:
        os.close(fd)


def check_restored(p: ShmemProcess, pid: int, last: int, file: Path) -> None:
    """The restored process checks itself, under its dumped pid (the source held it: in
    a pid namespace of its own, ``pid`` its pid here); its objects are as they were."""
    for _ in range(3):
        check = p.check()
        assert check["pid"] == p.pid and check["ok"] == 1 and check["n"] > last, check
    maps = maps_of(pid)
    anon, _ = p.regions["anon"]
    assert maps[anon][0] == 0 and maps[anon + MIB][0] == MIB
    assert maps[anon + 2 * MIB][0] == 2 * MIB
    assert maps[anon][1] == maps[anon + MIB][1] == maps[anon + 2 * MIB][1]  # one object
    assert maps[anon][2] == maps[anon + MIB][2] == "/dev/zero (deleted)"
    one, two = maps[p.regions["memfd"][0]], maps[p.regions["memfd2"][0]]
    assert one == two and one[2] == "/memfd:lazymig-shmem (deleted)"
    assert maps[p.regions["shm"][0]][2] == f"/dev/shm/{p.shm_name}"
    assert maps[p.regions["file"][0]][2] == str(file)
    fd_path = Path(f"/proc/{pid}/fd")
    assert str((fd_path / str(p.memfd_fd)).readlink()) == "/memfd:lazymig-shmem (deleted)"
    assert (fd_path / str(p.memfd_fd)).stat().st_ino == one[1]  # the mapped object
    assert str((fd_path / str(p.sealed_fd)).readlink()) == "/memfd:lazymig-sealed (deleted)"
    assert (fd_path / str(p.sealed_fd)).stat().st_size == 2 * PAGE + 4
    holes = holes_of(pid, anon, 4 * MIB)
    assert holes[:2] == [(2 * PAGE, 3 * PAGE), (5 * PAGE, 6 * PAGE)] and len(holes) == 341
    deadline = time.monotonic() + 10
    while f"pid={p.pid}\n".encode() not in file.read_bytes()[:64]:  # written through the map
        assert time.monotonic() < deadline, file.read_bytes()[:64]
        time.sleep(0.02)


def check_images(images: Path, pid: int) -> None:
    mm = ImagesDir(images).mm(pid)
    shared = [v for v in mm.vmas if v.status & VmaStatus.ANON_SHARED]
    assert [v.pgoff for v in shared] == [0, MIB, 2 * MIB]  # split by the mprotect
    assert len({v.shmid for v in shared}) == 1 and shared[0].shmid != 0
    memfds = [v for v in mm.vmas if v.status & VmaStatus.MEMFD]
    assert len(memfds) == 2 and memfds[0].shmid == memfds[1].shmid
    inodes = crit_decode(images / "memfd-inode.img")["entries"]
    assert sorted((e["name"], e["size"], e["seals"]) for e in inodes) == [
        ("lazymig-sealed", 2 * PAGE + 4, 6), ("lazymig-shmem", 2 * MIB, 1)]
    files = crit_decode(images / "files.img")["entries"]
    opened = [f["memfd"] for f in files if f["type"] == "MEMFD"]
    assert sorted(f["pos"] for f in opened) == [0, 5000]
    assert {f["inode_id"] for f in opened} == {e["inode_id"] for e in inodes}
    decoded = crit_decode(shmem_pagemap_path(ImagesDir(images), shared[0].shmid))
    head, *entries = decoded["entries"]
    assert head["pages_id"] > 1
    # Every third page is a hole and page 0 has the counter: pages 0, 1, 3, 4, 6...
    assert entries[0]["vaddr"] == 0 and sum(e["nr_pages"] for e in entries) == 683


@pytest.mark.asyncio
async def test_shared_memory_migrates_through_lazymig_migrate(tmp_path: Path) -> None:
    file = tmp_path / "mapped"
    with shmem_process(file) as p:
        p.check()
        before = await asyncio.to_thread(p.snapshot)
        r, w = os.pipe()
        out = OutputLines(r)
        try:
            result = await asyncio.wait_for(
                lazymig.migrate(p.pid, stdio=(0, w, 2), images_dir=tmp_path), 60)
            os.close(w)
            w = -1
            p.lines, out = out, p.lines  # the restored process's lines
            pid = result.restored.pid
            try:
                last = 0  # (the source's lines in the old pipe may lag; n goes on anyway)
                await asyncio.to_thread(check_restored, p, pid, last, file)
                await assert_memory_equal(pid, before)
                await asyncio.to_thread(check_images, tmp_path, p.pid)
            finally:
                kill(pid)
        finally:
            if w >= 0:
                os.close(w)
            out.close()


@pytest.mark.asyncio
async def test_shared_memory_migrates_through_the_clis(tmp_path: Path) -> None:
    file, images = tmp_path / "mapped", tmp_path / "images"
    images.mkdir()
    port, loop = str(free_port()), on_uvloop()
    with shmem_process(file) as p:
        p.check()
        before = await asyncio.to_thread(p.snapshot)
        with cli("dump", "-t", str(p.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(images), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
            await asyncio.to_thread(check_images, images, p.pid)
            with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                     "-D", str(images), uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
                r, w = os.pipe()
                # --shell-job: its stdout (a pipe to us) becomes the restorer's, w; and
                # its stderr the restorer's (not a pipe: it would never see EOF).
                with (tmp_path / "restore.log").open("w+") as log:
                    try:
                        restore = await asyncio.to_thread(
                            subprocess.run, [sys.executable, "-m", "lazymig", "restore",
                                             "--lazy-pages", "-D", str(images), "-d",
                                             "--shell-job"], stdout=w, stderr=log, timeout=60)
                    finally:
                        os.close(w)
                    log.seek(0)
                    assert restore.returncode == 0, log.read()
                p.lines.close()
                p.lines = OutputLines(r)
                pid = 0
                while not pid:  # the pid, maybe after the restored process's first lines
                    line = await asyncio.to_thread(p.lines.next, 10.0)
                    pid = 0 if line.startswith("CHECK") else int(line)
                try:
                    assert await asyncio.to_thread(daemon.wait, 20) == 0
                    assert await asyncio.to_thread(dumper.wait, 10) == 0
                    await asyncio.to_thread(check_restored, p, pid, 0, file)
                    await assert_memory_equal(pid, before)
                finally:
                    kill(pid)
