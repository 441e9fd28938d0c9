"""Open files, process group and session across ``lazymig dump`` and ``lazymig restore``.

* fds.c and fds.py (tests/workloads/fds.py says what they hold: a log open
  for append, a read-only file mid-way dup'd to fd 42, /dev/null, a 1 MiB
  pipe to itself with data in it, the read end of a pipe whose writer is
  closed, an O_PATH dirfd) are dumped, plainly and lazily (page server +
  daemon), and restored; the restored process reports, by its own output, the
  same offsets, flags and pipe capacity, data read where the source left off,
  a shared offset on the dup'd fd, the pipe's queued data and a working pipe,
  EOF on the orphan read end, a working dirfd; the log holds what both wrote.
* A session leader leads a new session; a group leader a new group.
* A parent-death signal is recorded in the core image, not restored (logged).
* fanotify, an epoll watching a closed fd, a deleted file over
  64 MiB, a pipe open in another process too, or a
  terminal is refused before the target is touched, the fd named (API and
  CLI); a file that changed (but a write-only append log) or is gone since the
  dump is refused at restore, before any process exists.
* crit decodes fdinfo-1.img, files.img and pipes-data.img.
"""

from __future__ import annotations

import asyncio
import base64
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    cli,
    crit_decode,
    on_uvloop,
    parse,
    plain,
    restore_with_output,
    status_line,
    wait_ready,
)
from workloads import WORKLOAD_DIR

from lazymig.dump import LazyDump, dump
from lazymig.dump.files import FILES_ID, read_files
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.linux.ptrace import process_alive
from lazymig.proto.images import ImageKind, ImagesDir
from lazymig.restore import Restorer, RestoreResult, UnsupportedDumpError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

DATA = bytes((i * 7 + i // 256) % 256 for i in range(4096))
O_ACCMODE_BITS = os.O_ACCMODE


@pytest.fixture(scope="module")
def fds_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc is not None, "no C compiler on PATH"
    out = tmp_path_factory.mktemp("fds") / "fds"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(WORKLOAD_DIR / "fds.c")],
                   check=True, capture_output=True)
    return out


class FdsProcess:
    """fds.c or fds.py running with ``DIR`` prepared; ``ready`` is its READY line."""

    def __init__(self, argv: Sequence[str], *, pass_fds: Sequence[int] = ()) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                                     pass_fds=pass_fds)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self._lines.get(timeout=10)
        if not line.startswith("READY"):
            self.stop()
            raise AssertionError(f"fds workload said {line!r}")
        self.ready = parse(line)
        self.pid = self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("EOF")

    def stop(self) -> None:
        if process_alive(self.proc.pid):
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FdsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prepare(tmp_path: Path) -> tuple[Path, Path]:
    files = tmp_path / "files"
    files.mkdir()
    (files / "log").write_bytes(b"before\n")
    (files / "data").write_bytes(DATA)
    images = tmp_path / "images"
    images.mkdir()
    return files, images


def argv_for(kind: str, fds_c: Path, files: Path, *opts: str) -> list[str]:
    if kind == "c":
        return [str(fds_c), str(files), *opts]
    return [sys.executable, str(WORKLOAD_DIR / "fds.py"), str(files), *opts]


async def restore_and_report(images: Path, *, lazy_pages: bool = False,
                             daemon: subprocess.Popen[str] | None = None
                             ) -> tuple[RestoreResult, dict[str, str]]:
    """Restore; the restored process's RESTORED line, once it exited 0 (told to
    with SIGUSR1 once ``daemon``, if any, has sent every page and exited 0). Under
    a new pid: the workload tells it was restored by its pid changing."""
    restorer, result, lines = await restore_with_output(images, lazy_pages=lazy_pages,
                                                        new_pids=True)
    try:
        line = await asyncio.to_thread(lines.next, 10.0)
        assert line.startswith("RESTORED"), line
        if daemon is not None:
            assert await asyncio.to_thread(daemon.wait, 20) == 0
        os.kill(result.pid, signal.SIGUSR1)
        assert await asyncio.to_thread(restorer.wait) == 0
    finally:
        restorer.kill()
        lines.close()
    assert int(parse(line)["pid"]) == result.pid
    return result, parse(line)


def check_report(before: dict[str, str], after: dict[str, str], files: Path) -> None:
    """What the restored process said about its fds matches what they were."""
    same = ["log_pos", "log_flags", "log_cloexec", "ro_pos", "ro_flags", "ro_cloexec",
            "dup_cloexec", "null_flags", "r_flags", "w_flags", "r_cloexec", "tail_flags",
            "dir_flags", "pipe_size"]
    assert {k: after[k] for k in same} == {k: before[k] for k in same}
    log_flags, null_flags = int(after["log_flags"]), int(after["null_flags"])
    assert log_flags & O_ACCMODE_BITS == os.O_WRONLY and log_flags & os.O_APPEND
    assert int(after["log_pos"]) == len(b"before\nopened\n")
    assert int(after["ro_flags"]) & O_ACCMODE_BITS == os.O_RDONLY
    assert (after["ro_pos"], after["ro_cloexec"], after["dup_cloexec"]) == ("100", "1", "0")
    assert bytes.fromhex(after["ro_read"]) == DATA[100:110]
    assert after["dup_pos"] == "110"  # fd 42 shares the description (and offset) of ro
    assert null_flags & O_ACCMODE_BITS == os.O_WRONLY and null_flags & os.O_NONBLOCK
    assert after["null_write"] == "3"
    assert int(after["r_flags"]) & os.O_NONBLOCK and not int(after["w_flags"]) & os.O_NONBLOCK
    assert int(after["w_flags"]) & O_ACCMODE_BITS == os.O_WRONLY
    assert int(after["pipe_size"]) == 1 << 20
    assert bytes.fromhex(after["pipe_data"]) == b"in-flight"
    assert bytes.fromhex(after["pipe_echo"]) == b"echo"
    assert bytes.fromhex(after["tail_data"]) == b"tail"
    assert after["tail_eof"] == "1"
    assert int(after["dir_flags"]) & os.O_PATH
    assert bytes.fromhex(after["dir_read"]) == DATA[:4]  # openat(dirfd, "data")
    assert (files / "log").read_bytes() == b"before\nopened\nafter\n"


async def migrate_lazily(pid: int, images: Path) -> tuple[RestoreResult, dict[str, str]]:
    """``LazyDump`` (page server), ``lazymig lazy-pages --page-server``, a lazy restore."""
    async with LazyDump(pid, images, address="127.0.0.1", port=0,
                        progress_interval=None) as lazy:
        serving = asyncio.create_task(lazy.serve())
        with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                 str(lazy.port), "-D", str(images), uvloop=on_uvloop()) as (daemon, lr):
            assert lr is not None
            await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
            result, after = await restore_and_report(images, lazy_pages=True, daemon=daemon)
            assert result.lazy_pages > 0
        async with asyncio.timeout(20):
            await serving
    return result, after


@pytest.mark.asyncio
@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_open_files_come_back(kind: str, lazy: bool, tmp_path: Path,
                                    fds_c: Path) -> None:
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for(kind, fds_c, files)) as w:
        if lazy:
            result, after = await migrate_lazily(w.pid, images)
        else:
            await dump(w.pid, images)
    if not lazy:
        result, after = await restore_and_report(images)
    assert result.pid != w.pid
    # Neither group nor session leader: it joins the restorer's (this process's).
    assert (int(after["pgid"]), int(after["sid"])) == (os.getpgid(0), os.getsid(0))
    await asyncio.to_thread(check_report, w.ready, after, files)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["--setsid", "--setpgid"])
async def test_a_leader_leads_a_new_session_or_group(mode: str, tmp_path: Path,
                                                     fds_c: Path) -> None:
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for("c", fds_c, files, mode)) as w:
        await dump(w.pid, images)
    (tree,) = ImagesDir(images).pstree()
    assert (tree.pgid, tree.sid) == (int(w.ready["pgid"]), int(w.ready["sid"]))
    assert tree.pgid == w.pid and (tree.sid == w.pid) == (mode == "--setsid")
    result, after = await restore_and_report(images)
    assert int(after["pgid"]) == result.pid
    assert int(after["sid"]) == (result.pid if mode == "--setsid" else os.getsid(0))


@pytest.mark.asyncio
async def test_a_parent_death_signal_is_recorded_not_restored(
        tmp_path: Path, fds_c: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Restored, it would fire once the restorer's tracer thread (the helper's
    parent) ends, and the process would die of SIGTERM instead of exiting 0."""
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for("python", fds_c, files, "--pdeathsig")) as w:
        await dump(w.pid, images)
    assert ImagesDir(images).core(w.pid).thread_core.pdeath_sig == signal.SIGTERM
    await restore_and_report(images)  # it exited 0: no SIGTERM
    assert f"parent-death signal {int(signal.SIGTERM)} not restored" in caplog.text


def untouched(pid: int) -> bool:
    """The process runs as before: alive, untraced, not stopped."""
    return (process_alive(pid) and status_line(pid, "TracerPid") == "0"
            and not status_line(pid, "State").startswith(("T", "t")))


@pytest.mark.asyncio
@pytest.mark.parametrize(("extra", "what"), [
    ("fanotify", r"is a fanotify instance \(anon_inode:\[fanotify\]\)"),
    ("stale-epoll", r"is an epoll instance watching a file registered as fd \d+, which is "
                    r"(closed|now another file) \(the file stays registered while a dup of it "
                    r"is open\)"),
    ("deleted", r"is a deleted file of 67112960 bytes \(.*/doomed\): lazymig carries deleted "
                r"files of up to 64 MiB"),
])
async def test_unsupported_fds_are_refused_before_the_target_is_touched(
        extra: str, what: str, tmp_path: Path, fds_c: Path) -> None:
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for("python", fds_c, files, "--extra", extra)) as w:
        fd = w.ready["extra"]
        with pytest.raises(UnsupportedTargetError, match=rf"fd {fd} {what}"):
            await dump(w.pid, images)
        assert untouched(w.pid)
        assert list(images.iterdir()) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["pipe", "fifo", "terminal", "eventfd"])
async def test_an_fd_tied_to_this_host_is_refused(kind: str, tmp_path: Path,
                                                   fds_c: Path) -> None:
    """A pipe whose other end this process holds; a named FIFO this process holds
    open too; a pty slave (this process holds
    the master); an eventfd this process holds too: the workload inherits the fd.
    (A socket to another process stays behind, taken over on this host:
    tests/test_sockets.py.)"""
    files, images = prepare(tmp_path)
    if kind == "pipe":
        mine, theirs = os.pipe()
        ino = os.fstat(mine).st_ino
        what = (f"fd {theirs} is a pipe (pipe:[{ino}]) also open in process {os.getpid()}: "
                "the other end would stay behind")
    elif kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        mine = os.open(tmp_path / "fifo", os.O_RDWR)
        theirs = os.open(tmp_path / "fifo", os.O_WRONLY)
        what = (f"fd {theirs} is a named FIFO ({tmp_path}/fifo) also open in process "
                f"{os.getpid()}: the other end would stay behind")
    elif kind == "eventfd":
        mine = os.eventfd(0, os.EFD_CLOEXEC)
        theirs = os.dup(mine)
        what = (f"fd {theirs} (anon_inode:[eventfd]) is also open in process {os.getpid()}: "
                "that process would keep it on the source host")
    else:
        mine, theirs = os.openpty()
        what = (f"fd {theirs} is a terminal ({os.ttyname(theirs)}): a terminal does not move "
                "to another host")
    try:
        with FdsProcess(argv_for("c", fds_c, files), pass_fds=(theirs,)) as w:
            with pytest.raises(UnsupportedTargetError) as refused:
                await dump(w.pid, images)
            assert what in str(refused.value)
            assert untouched(w.pid)
            proc = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "lazymig", "dump", "-t", str(w.pid),
                                 "-D", str(images)], capture_output=True, text=True, timeout=30)
            assert proc.returncode != 0 and what in proc.stderr
            assert untouched(w.pid)
            assert list(images.iterdir()) == []
    finally:
        os.close(mine)
        os.close(theirs)


@pytest.mark.asyncio
async def test_a_file_changed_or_gone_since_the_dump_is_refused_at_restore(tmp_path: Path,
                                                                   fds_c: Path) -> None:
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for("c", fds_c, files)) as w:
        await dump(w.pid, images)
    with (files / "data").open("ab") as f:
        f.write(b"more")
    with (files / "log").open("ab") as f:  # another writer: write-only append fds don't care
        f.write(b"other\n")
    restorer = Restorer(images, shell_job=True)
    with pytest.raises(UnsupportedDumpError,
                       match=rf"{files}/data \(open on fd 4, 42 of process {w.pid}\) changed "
                             r"since the dump: 4100 bytes, 4096 then"):
        await restorer.run()
    assert restorer.process is None
    (files / "data").write_bytes(DATA)
    (files / "log").unlink()
    restorer = Restorer(images, shell_job=True)
    with pytest.raises(UnsupportedDumpError,
                       match=rf"fd 3 of process {w.pid} had {files}/log open, which cannot be "
                             r"opened here: No such file or directory"):
        await restorer.run()
    assert restorer.process is None


def crit_view(images: Path) -> dict[str, Any]:
    d = ImagesDir(images)
    return {name: crit_decode(d.image_path(kind, ident))
            for name, kind, ident in [("fdinfo", ImageKind.FDINFO, FILES_ID),
                                      ("files", ImageKind.FILES, None),
                                      ("pipes", ImageKind.PIPES_DATA, None)]}


@pytest.mark.crit
@pytest.mark.skipif(shutil.which("crit") is None, reason="crit is not installed (package criu)")
@pytest.mark.asyncio
async def test_crit_decodes_the_file_images(tmp_path: Path, fds_c: Path) -> None:
    files, images = prepare(tmp_path)
    with FdsProcess(argv_for("c", fds_c, files)) as w:
        await dump(w.pid, images)
    ours = await asyncio.to_thread(read_files, ImagesDir(images))
    decoded = await asyncio.to_thread(crit_view, images)
    assert decoded["fdinfo"] == {"magic": "FDINFO", "entries": [plain(e) for e in ours.fds]}
    assert decoded["files"] == {"magic": "FILES", "entries": [plain(f) for f in ours.files]}
    assert decoded["pipes"]["magic"] == "PIPES_DATA"
    assert [(e["pipe_id"], e["bytes"], e["extra"]) for e in decoded["pipes"]["entries"]] == [
        (entry.pipe_id, len(data), plain_bytes(data)) for entry, data in ours.pipe_data]
    by_fd = {e["fd"]: e for e in decoded["fdinfo"]["entries"]}
    names = {f["id"]: f.get("reg", {}).get("name") for f in decoded["files"]["entries"]}
    assert names[by_fd[42]["id"]] == names[by_fd[int(w.ready["ro"])]["id"]] == \
        f"{files}/data"
    assert names[by_fd[int(w.ready["null"])]["id"]] == "/dev/null"
    assert by_fd[int(w.ready["r"])]["type"] == "PIPE"
    assert sorted(d for _, d in ours.pipe_data) == [b"in-flight", b"tail"]


def plain_bytes(data: bytes) -> str:
    """Bytes as crit shows an image's extra payload."""
    return base64.encodebytes(data).decode()
