"""Programs nobody here wrote, migrated mid-run by lazymig alone, for the files they hold.

Each is migrated with ``lazymig.migrate(pid)`` on loopback while it is in the
middle of its work, and what it prints must be exactly what an unmigrated run
of the same program prints (a listing, an archive, a sorted file...):

* ``os.scandir`` paused half-way through a directory of ext4 (an htree: its
  offset is a hash of the next name) goes on with the next name;
* ``find`` over a tree, its output a pipe read slowly (it waits on a full pipe,
  directories open), prints the same listing; the pipe is given back as its
  stdout (``stdio=``), the bytes queued in it kept;
* a process talking to itself through a named FIFO (both ends open, bytes
  queued in it) keeps both ends and the bytes, once (on one host the source,
  stopped, still holds the same pipe);

A program missing on this machine is skipped, saying which.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CRIT, crit_decode, started

import lazymig
from lazymig.dump import dump
from lazymig.proto.images import ImageKind, ImagesDir

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

# Both ends of a named FIFO, always one 8-byte record queued in it: each tick
# writes record N and reads back the one before ("q" first): a record lost or
# doubled by the migration shows.
FIFO = """
import os, sys, time
path = sys.argv[1]
os.mkfifo(path)
r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(path, os.O_WRONLY)
os.write(w, b"q".ljust(8))
n = 0
while True:
    n += 1
    time.sleep(0.05)
    os.write(w, str(n).encode().ljust(8))
    print("tick", n, os.read(r, 8).decode().strip(), flush=True)
"""


def make_tree(root: Path, dirs: int, files: int) -> None:
    """``dirs`` directories of ``files`` empty files each (over one block each: an
    ext4 htree directory)."""
    for d in range(dirs):
        sub = root / f"dir-{d:03d}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"file-with-a-longish-name-{i:05d}").touch()


def open_files(pid: int) -> list[str]:
    return [str(p.readlink()) for p in Path(f"/proc/{pid}/fd").iterdir()]


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
    with started([sys.executable, "-c", SCANDIR, str(listing)], log) as source:
        await asyncio.to_thread(wait_lines, log, 400, 60)
        fds = await asyncio.to_thread(open_files, source.pid)
        assert str(listing) in fds, "the directory is open, read part-way"
        async with asyncio.timeout(240), lazymig.migrate(source.pid) as migration:
            try:
                seen = await asyncio.to_thread(wait_done, log, 120)
            finally:
                await migration.process.kill()
        assert (await migration.done).transfer.ok
    assert seen == expected, "a name was lost or repeated across the migration"


@pytest.mark.asyncio
async def test_find_piped_slowly_lists_the_same_tree(tmp_path: Path) -> None:
    if shutil.which("find") is None:
        pytest.skip("find is not installed on this machine")
    tree = tmp_path / "tree"
    make_tree(tree, 20, 400)
    expected = (await asyncio.to_thread(subprocess.run, ["find", str(tree)],
                                        capture_output=True, check=True, timeout=60)).stdout
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with started(["find", str(tree)], stdin=null, stdout=w) as source:
            # Started; the pipe (64 KiB) fills up and it waits.
            first = await asyncio.to_thread(os.read, r, 4096)
            await asyncio.sleep(0.5)
            fds = await asyncio.to_thread(open_files, source.pid)
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


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["migrate", "dump-restore"])
async def test_a_named_fifo_keeps_both_ends_and_its_bytes(how: str, tmp_path: Path) -> None:
    """``migrate``: on one host the source, stopped, holds the same pipe still (its
    bytes stay in it); ``dump-restore``: the source is gone with the pipe, the
    bytes come back from fifo-data.img (which crit decodes)."""
    log, images = tmp_path / "out.log", tmp_path / "images"
    with started([sys.executable, "-c", FIFO, str(tmp_path / "fifo")], log) as source:
        await asyncio.to_thread(wait_lines, log, 3, 60)
        if how == "migrate":
            async with asyncio.timeout(240), lazymig.migrate(source.pid) as migration:
                try:
                    seen = await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 5, 60)
                finally:
                    await migration.process.kill()
            assert (await migration.done).transfer.ok
        else:
            images.mkdir()
            await dump(source.pid, images)
            source.wait(timeout=10)  # killed by the dump
            if CRIT is not None:
                d = ImagesDir(images)
                files = crit_decode(d.image_path(ImageKind.FILES))["entries"]
                fifo = next(f for f in files if f["type"] == "FIFO")["fifo"]
                path = next(f for f in files if f["id"] == fifo["regf_id"])["reg"]["name"]
                assert path == str(tmp_path / "fifo")
                queued = crit_decode(d.image_path(ImageKind.FIFO_DATA))["entries"]
                assert [e["pipe_id"] for e in queued] == [fifo["pipe_id"]]
            async with asyncio.timeout(240), \
                    lazymig.restore_process(images, lazy_pages=False) as restored:
                try:
                    seen = await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 5, 60)
                finally:
                    await restored.kill()
    assert seen == [f"tick {n} {n - 1 or 'q'}" for n in range(1, len(seen) + 1)], \
        "a record in the FIFO was lost or doubled across the migration"


# A file mapped private then deleted (as ld.so maps a library replaced on disk
# since): each tick checks the file's bytes through the mapping, page 0 (written
# by the process: its own copy) holds the tick count.
DELETED_PRIVATE = """
import mmap, os, sys, time
path = sys.argv[1]
data = bytes(8) + (bytes(range(256)) * 256)[8:]  # 64 KiB
with open(path, "wb") as f:
    f.write(data)
fd = os.open(path, os.O_RDONLY)
m = mmap.mmap(fd, 65536, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
os.unlink(path)
n = 0
while True:
    n += 1
    ok = m[8:] == data[8:]
    ok = ok and int.from_bytes(m[:8], "little") == n - 1
    m[:8] = n.to_bytes(8, "little")
    print("tick", n, "ok" if ok else "BAD", flush=True)
    time.sleep(0.05)
"""


def ticks_ok(lines: list[str]) -> bool:
    return lines == [f"tick {n} ok" for n in range(1, len(lines) + 1)]


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["migrate", "dump-restore"])
async def test_a_deleted_file_mapped_private_comes_back(how: str, tmp_path: Path) -> None:
    """The file is carried as a memfd (a CRIU ghost file's contents) and mapped
    private from it again; the page the process wrote is its own again."""
    log, images = tmp_path / "out.log", tmp_path / "images"
    argv = [sys.executable, "-c", DELETED_PRIVATE, str(tmp_path / "lib.so")]
    with started(argv, log) as source:
        await asyncio.to_thread(wait_lines, log, 3, 60)
        maps = await asyncio.to_thread(Path(f"/proc/{source.pid}/maps").read_text)
        assert f"{tmp_path}/lib.so (deleted)" in maps
        if how == "migrate":
            async with asyncio.timeout(240), lazymig.migrate(source.pid) as migration:
                try:
                    seen = await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 5, 60)
                finally:
                    await migration.process.kill()
            assert (await migration.done).transfer.ok
        else:
            images.mkdir()
            await dump(source.pid, images)
            source.wait(timeout=10)  # killed by the dump
            async with asyncio.timeout(240), \
                    lazymig.restore_process(images, lazy_pages=False) as restored:
                try:
                    seen = await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 5, 60)
                finally:
                    await restored.kill()
    assert ticks_ok(seen), seen


@pytest.mark.asyncio
async def test_a_program_deleted_while_it_runs_goes_on(tmp_path: Path) -> None:
    """``perl`` run from a copy that is then deleted (a package upgrade replaces
    the binary under a running program): its executable's mappings are private
    mappings of a deleted file, carried; its ticks go on with its memory intact."""
    perl = shutil.which("perl")
    if perl is None:
        pytest.skip("perl is not installed on this machine")
    copy = tmp_path / "perl"
    shutil.copy2(perl, copy)
    script = (r'$|=1; my @a=(0..199999); for (my $n=1;;$n++) { my $s=0; $s+=$_ for @a; '
              r'print "tick $n $s\n"; select(undef,undef,undef,0.05); }')
    log = tmp_path / "out.log"
    with started([str(copy), "-e", script], log) as source:
        await asyncio.to_thread(wait_lines, log, 3, 60)
        copy.unlink()
        maps = await asyncio.to_thread(Path(f"/proc/{source.pid}/maps").read_text)
        assert f"{copy} (deleted)" in maps
        async with asyncio.timeout(240), lazymig.migrate(source.pid) as migration:
            try:
                seen = await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 5, 60)
            finally:
                await migration.process.kill()
        assert (await migration.done).transfer.ok
    total = sum(range(200_000))
    assert seen == [f"tick {n} {total}" for n in range(1, len(seen) + 1)]


# POSIX locks (two ranges, read and write), an OFD lock and a flock: what sqlite,
# dpkg, git and most daemons' pid files hold.
LOCKS = """
import fcntl, os, struct, sys, time
d = sys.argv[1]
a = open(os.path.join(d, "a"), "w+"); a.write("x" * 100); a.flush()
fcntl.lockf(a, fcntl.LOCK_EX, 10, 5)
fcntl.lockf(a, fcntl.LOCK_SH, 0, 50)
b = open(os.path.join(d, "b"), "w")
fcntl.flock(b, fcntl.LOCK_EX)
c = open(os.path.join(d, "c"), "w+")
fcntl.fcntl(c, 37, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))  # F_OFD_SETLK
n = 0
while True:
    n += 1
    print("tick", n, flush=True)
    time.sleep(0.05)
"""


def locks_of(pid: int) -> list[tuple[int, str]]:
    """(fd, lock line without its number and pid) of every lock fdinfo shows."""
    out = []
    for fd in sorted(int(p.name) for p in Path(f"/proc/{pid}/fdinfo").iterdir()):
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("lock:"):
                fields = line.split()
                out.append((fd, " ".join(fields[2:5] + fields[7:])))
    return out


def flock_refused(path: Path) -> bool:
    with path.open("w") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@pytest.mark.asyncio
async def test_file_locks_are_taken_again(tmp_path: Path) -> None:
    """Dumped into filelocks.img (crit decodes it) and taken again through the same
    fds once the source is gone: the same locks, and they still keep others out."""
    log, images = tmp_path / "out.log", tmp_path / "images"
    with started([sys.executable, "-c", LOCKS, str(tmp_path)], log) as source:
        assert (await asyncio.to_thread(wait_lines, log, 2, 60))[:2] == ["tick 1", "tick 2"]
        before = await asyncio.to_thread(locks_of, source.pid)
        assert [kind for _, kind in before] == [
            "POSIX ADVISORY WRITE 5 14", "POSIX ADVISORY READ 50 EOF",
            "FLOCK ADVISORY WRITE 0 EOF", "OFDLCK ADVISORY READ 0 EOF"]
        images.mkdir()
        await dump(source.pid, images)
        source.wait(timeout=10)  # killed by the dump
    if CRIT is not None:
        entries = crit_decode(ImagesDir(images).image_path(ImageKind.FILE_LOCKS))["entries"]
        assert [(e["type"], e["flag"], e["start"], e["len"]) for e in entries] == [
            (1, 1, 5, 10), (1, 0, 50, 0), (2, 1, 0, 0), (4, 0, 0, 0)]
    async with asyncio.timeout(240), \
            lazymig.restore_process(images, lazy_pages=False) as restored:
        try:
            await asyncio.to_thread(wait_lines, log, len(lines_of(log)) + 2, 60)
            after = await asyncio.to_thread(locks_of, restored.pid)
            assert await asyncio.to_thread(flock_refused, tmp_path / "b")
        finally:
            await restored.kill()
    assert after == before


SQL_BEFORE = [b"PRAGMA journal_mode=WAL;", b"CREATE TABLE t(i INTEGER, s TEXT);",
              *(b"INSERT INTO t VALUES(%d, 'row %d');" % (i, i) for i in range(500)),
              b"SELECT count(*), sum(i) FROM t;"]
SQL_AFTER = [*(b"INSERT INTO t VALUES(%d, 'row %d');" % (i, i) for i in range(500, 800)),
             b"DELETE FROM t WHERE i % 7 = 0;", b"SELECT count(*), sum(i) FROM t;",
             b"PRAGMA integrity_check;"]


@pytest.mark.asyncio
async def test_sqlite_in_wal_mode_goes_on_with_its_database(tmp_path: Path) -> None:
    """``sqlite3`` on a WAL database, fed SQL through a pipe, migrated while it waits
    for more: its read locks on the database and on the -shm file (mapped shared)
    are taken again, and what it prints is what an unmigrated session prints."""
    if shutil.which("sqlite3") is None:
        pytest.skip("sqlite3 is not installed on this machine (Debian package sqlite3)")
    script = b"\n".join(SQL_BEFORE + SQL_AFTER) + b"\n"
    expected = (await asyncio.to_thread(subprocess.run, ["sqlite3", str(tmp_path / "ref.db")],
                                        input=script, capture_output=True, check=True,
                                        timeout=60)).stdout
    log = tmp_path / "out.log"
    r, w = os.pipe()
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with started(["sqlite3", str(tmp_path / "test.db")], stdin=r, stdout=out) as source:
            await asyncio.to_thread(os.write, w, b"\n".join(SQL_BEFORE) + b"\n")
            await asyncio.to_thread(wait_lines, log, 2, 60)  # "wal", then the count
            await asyncio.sleep(0.2)
            locks = await asyncio.to_thread(locks_of, source.pid)
            assert [kind.split()[:3] for _, kind in locks] == [["POSIX", "ADVISORY", "READ"]] * 2
            async with asyncio.timeout(240), \
                    lazymig.migrate(source.pid, stdio=(r, out, out)) as migration:
                try:
                    await asyncio.to_thread(os.write, w, b"\n".join(SQL_AFTER) + b"\n")
                    os.close(w)
                    w = -1
                    assert await migration.process.wait() == 0
                finally:
                    await migration.process.kill()
            assert (await migration.done).transfer.ok
    finally:
        for fd in (r, w, out):
            if fd >= 0:
                os.close(fd)
    assert log.read_bytes() == expected
