"""Programs nobody here wrote, migrated mid-run by lazymig alone, for the files they hold.

Each is migrated with ``lazymig.migrate(pid)`` on loopback while it is in the
middle of its work, and what it prints must be exactly what an unmigrated run
of the same program prints (a listing, an archive, a sorted file...):

* ``os.scandir`` paused half-way through a directory of ext4 (an htree: its
  offset is a hash of the next name) goes on with the next name;
* ``find`` over a tree, its output a pipe read slowly (it waits on a full pipe,
  directories open), prints the same listing; the pipe is given back as its
  stdout (``stdio=``), the bytes queued in it kept.

A program missing on this machine is skipped, saying which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lazymig

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

# Lists a directory one name a tick, through the one os.scandir iterator (a DIR*
# of glibc: getdents64 batches, the directory's offset between them).
SCANDIR = """
import os, sys, time
with os.scandir(sys.argv[1]) as it:
    for n, entry in enumerate(it):
        print(entry.name, flush=True)
        if n % 20 == 0:
            time.sleep(0.01)
print("done", flush=True)
"""


def make_tree(root: Path, dirs: int, files: int) -> None:
    """``dirs`` directories of ``files`` empty files each (over one block each: an
    ext4 htree directory)."""
    for d in range(dirs):
        sub = root / f"dir-{d:03d}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"file-with-a-longish-name-{i:05d}").touch()


def lines_of(log: Path) -> list[str]:
    return log.read_text().splitlines()


def wait_lines(log: Path, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(seen := lines_of(log)) < count:
        assert time.monotonic() < deadline, f"{count} lines not seen in {timeout} s: {seen}"
        time.sleep(0.02)
    return seen


def wait_done(log: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (seen := lines_of(log))[-1:] != ["done"]:
        assert time.monotonic() < deadline, f"not done in {timeout} s: {len(seen)} lines"
        time.sleep(0.05)
    return seen


@pytest.mark.asyncio
async def test_scandir_goes_on_with_the_next_name(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, 1, 3000)
    listing = tree / "dir-000"
    expected = [*(e.name for e in os.scandir(listing)), "done"]
    log = tmp_path / "out.log"
    with log.open("w") as out:
        source = subprocess.Popen([sys.executable, "-c", SCANDIR, str(listing)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  start_new_session=True)
    try:
        await asyncio.to_thread(wait_lines, log, 400, 60)
        fds = {str(p.readlink()) for p in Path(f"/proc/{source.pid}/fd").iterdir()}
        assert str(listing) in fds, "the directory is open, read part-way"
        async with asyncio.timeout(240), lazymig.migrate(source.pid) as migration:
            try:
                seen = await asyncio.to_thread(wait_done, log, 120)
            finally:
                await migration.process.kill()
        assert (await migration.done).transfer.ok
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(source.pid, signal.SIGKILL)
        source.wait(timeout=10)
    assert seen == expected, "a name was lost or repeated across the migration"


@pytest.mark.asyncio
async def test_find_piped_slowly_lists_the_same_tree(tmp_path: Path) -> None:
    if shutil.which("find") is None:
        pytest.skip("find is not installed on this machine")
    tree = tmp_path / "tree"
    make_tree(tree, 20, 400)
    expected = subprocess.run(["find", str(tree)], capture_output=True, check=True,
                              timeout=60).stdout
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        source = subprocess.Popen(["find", str(tree)], stdin=null, stdout=w, stderr=w,
                                  start_new_session=True)
        try:
            first = os.read(r, 4096)  # started; the pipe (64 KiB) fills up and it waits
            await asyncio.sleep(0.5)
            fds = [str(p.readlink()) for p in Path(f"/proc/{source.pid}/fd").iterdir()]
            assert any(f.startswith(str(tree)) for f in fds), f"no directory open: {fds}"
            async with asyncio.timeout(240), \
                    lazymig.migrate(source.pid, stdio=(null, w, w)) as migration:
                os.close(w)
                w = -1
                try:
                    rest = await asyncio.to_thread(read_to_end, r)
                    assert await migration.process.wait() == 0
                finally:
                    await migration.process.kill()
            assert (await migration.done).transfer.ok
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(source.pid, signal.SIGKILL)
            source.wait(timeout=10)
    finally:
        for fd in (r, w, null):
            if fd >= 0:
                os.close(fd)
    got = first + rest
    assert got.count(b"\n") == expected.count(b"\n") == 1 + 20 * 401
    assert got == expected, "find lost or repeated a name across the migration"


def read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
