"""Pre-copy (issue 17): rounds copied while a real process writes its memory
non-stop (tests/workloads/precopy_writer.c), then the freeze, then a restore
whose every page the process itself checks (a stale, lost or zero page
disagrees with its version table); pre-dump dirs that crit reads as a chain;
and an abort during the rounds that leaves the source as it was."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import criu_peer
import helpers
import pytest

import lazymig
from lazymig.dump.dumper import dump
from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.dump.keeper import KeeperRecord
from lazymig.dump.precopy import PreCopy, PreCopyOptions, RoundReport
from lazymig.dump.receiver import receive_session
from lazymig.errors import RemoteProtocolError
from lazymig.linux.procfs import children
from lazymig.linux.ptrace import process_alive
from lazymig.proto.constants import PAGE_SIZE, PARENT_LINK, PE
from lazymig.proto.images import ImagesDir
from lazymig.proto.pageserver import (
    AddPages,
    CloseRequest,
    OpenRequest,
    PageServerConnection,
    Role,
)
from lazymig.proto.wire import DstType, WireVersion
from lazymig.restore.restorer import Restorer
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root"),
]

WRITER_C = Path(__file__).resolve().parent / "workloads" / "precopy_writer.c"
PAGES = 4096
HOT = 512
CRIT = shutil.which("crit")


@pytest.fixture(scope="module")
def writer_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) for tests/workloads/precopy_writer.c")
    out = tmp_path_factory.mktemp("writer") / "precopy_writer"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(out), str(WRITER_C)], check=True,
                   capture_output=True, timeout=120)
    return out


class Writer:
    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen([str(exe), "--pages", str(PAGES), "--hot", str(HOT)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True)
        assert self.proc.stdout is not None
        self.lines = OutputLines(self.proc.stdout)
        ready = self.lines.next()
        assert ready.startswith("READY"), ready
        self.addr = int(re.search(r"addr=(0x[0-9a-f]+)", ready)[1], 16)  # type: ignore[index]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.lines.close()


@pytest.fixture
def writer(writer_exe: Path) -> Iterator[Writer]:
    w = Writer(writer_exe)
    try:
        yield w
    finally:
        w.close()


class Output(helpers.Output):
    """A pipe for the restored process's stdout, and its CHECK answers."""

    async def check(self, pid: int) -> tuple[int, int]:
        """Ask the process to check every page; (pages that disagree, writes so far)."""
        os.kill(pid, signal.SIGUSR1)
        line = await asyncio.to_thread(self.lines.next, 30.0)
        m = re.fullmatch(r"CHECK bad=(\d+) writes=(\d+)", line)
        assert m, line
        return int(m[1]), int(m[2])


@pytest.fixture
def output() -> Iterator[Output]:
    out = Output()
    try:
        yield out
    finally:
        out.handed_over()
        out.lines.close()


def sleep_children() -> list[int]:
    """This process's children that run ``sleep`` (a restorer's helper)."""
    found = []
    for kid in children(os.getpid()):
        with contextlib.suppress(FileNotFoundError):
            argv0 = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")[0]
            if Path(os.fsdecode(argv0)).name == "sleep":
                found.append(kid)
    return found


def fd_names(pid: int) -> list[str]:
    return sorted(p.name for p in Path(f"/proc/{pid}/fd").iterdir())


def run_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def crit_decode(path: Path) -> list[dict[str, int]]:
    assert CRIT is not None
    out = subprocess.run([CRIT, "decode", "-i", str(path)], check=True, capture_output=True,
                         timeout=60).stdout
    entries: list[dict[str, int]] = json.loads(out)["entries"]
    return entries


def uffd_state(pid: int) -> tuple[list[str], list[str]]:
    """(the fds that are userfaultfds, the smaps VmFlags lines with a uffd mode)."""
    fds = Path(f"/proc/{pid}/fd")
    uffds = [str(fd.readlink()) for fd in fds.iterdir() if "userfaultfd" in str(fd.readlink())]
    with open(f"/proc/{pid}/smaps") as f:
        flagged = [line for line in f if line.startswith("VmFlags:")
                   and {"um", "uw", "ui"} & set(line.split())]
    return uffds, flagged


async def test_rounds_then_a_plain_dump_restore_every_page(
        writer: Writer, output: Output, tmp_path: Path) -> None:
    options = PreCopyOptions(max_rounds=4, min_dirty_pages=0, min_shrink=1.0)
    precopy = await PreCopy.start(writer.pid, tmp_path / "pre", options=options)
    try:
        rounds = await precopy.run()
        assert 2 <= len(rounds) <= 4  # fewer when a round found more written than the last
        assert rounds[0].pages_sent >= PAGES + PAGES * 8 // PAGE_SIZE
        # After the first, a round copies what was written since: at most the hot
        # pages, the table and whatever the C runtime touched; not the cold pages.
        assert all(r.pages_sent < HOT + 64 for r in rounds[1:])
        images = tmp_path / "dump"
        images.mkdir()
        result = await dump(writer.pid, images, precopy=precopy)
    finally:
        await precopy.aclose()
    writer.proc.wait(timeout=10)
    # The dump holds only what was written since the last round; the rest is in the chain.
    entries = ImagesDir(images).pagemap(writer.pid).entries
    in_parent = sum(e.nr_pages for e in entries if PE.PARENT in e.flags)
    assert in_parent >= PAGES - HOT
    assert result.nonlazy_pages < HOT + 64
    assert (images / PARENT_LINK).resolve() == rounds[-1].images_dir.resolve()

    restorer = Restorer(images, stdio=output.stdio)
    try:
        restored = await restorer.run()
        output.handed_over()
        assert restored.nonlazy_pages >= in_parent
        bad, writes = await output.check(restored.pid)
        assert bad == 0
        bad, after = await output.check(restored.pid)
        assert bad == 0 and after > writes  # it writes on, on its restored memory
    finally:
        restorer.kill()


@pytest.mark.skipif(CRIT is None, reason="crit is not installed (Debian package criu)")
async def test_crit_reads_the_pre_dump_chain(writer: Writer, tmp_path: Path) -> None:
    async with await PreCopy.start(writer.pid, tmp_path,
                                   options=PreCopyOptions(max_rounds=2)) as precopy:
        await precopy.round()
        await precopy.round()
    second = tmp_path / "2"
    assert str(await asyncio.to_thread((second / PARENT_LINK).readlink)) == "../1"
    head, *entries = await asyncio.to_thread(crit_decode, second / f"pagemap-{writer.pid}.img")
    assert head["pages_id"] == 1
    data = [e for e in entries if e.get("flags") == PE.PRESENT]
    parent = [e for e in entries if e.get("flags") == PE.PARENT]
    assert data and parent  # what was written again, and what the first round holds
    size = (await asyncio.to_thread((second / "pages-1.img").stat)).st_size
    assert size == PAGE_SIZE * sum(e["nr_pages"] for e in data)


async def test_an_abort_during_the_rounds_leaves_the_source_as_it_was(
        writer: Writer, output: Output) -> None:
    fds_before = fd_names(writer.pid)

    def fail(report: RoundReport) -> None:
        if report.number == 2:
            raise RuntimeError("abort in round 2")

    with pytest.raises(RuntimeError, match="abort in round 2"):
        await lazymig.migrate(writer.pid, precopy=True, on_round=fail, stdio=output.stdio)
    # The destination prepared meanwhile is gone too (the restorer's `sleep` helper).
    for _ in range(100):  # killed and reaped by the migration's end; a look to be sure
        if not await asyncio.to_thread(sleep_children):
            break
        await asyncio.sleep(0.05)
    left = await asyncio.to_thread(sleep_children)
    assert left == [], await asyncio.to_thread(
        lambda: [Path(f"/proc/{k}/status").read_text() for k in left])
    assert writer.proc.poll() is None
    assert uffd_state(writer.pid) == ([], [])
    assert fd_names(writer.pid) == fds_before
    assert run_state(writer.pid) in "RS"  # running, not stopped


def mappings(pid: int) -> list[str]:
    """``start-end perms`` of each line of /proc/PID/maps but the stack's (it grows as
    the process runs on)."""
    with open(f"/proc/{pid}/maps") as f:
        return [" ".join(line.split()[:2]) for line in f if not line.endswith("[stack]\n")]


async def test_migrate_with_pre_copy_then_lazy(writer: Writer, output: Output) -> None:
    """The destination is prepared while the rounds run: the pre-copied pages are in
    the process-to-be before the freeze and moved into place after it; the restored
    process has the source's mappings exactly (no window of the preparation left)."""
    rounds: list[RoundReport] = []

    def on_round(report: RoundReport) -> None:
        rounds.append(report)
        layout.append(mappings(writer.pid))

    layout: list[list[str]] = []
    result = await asyncio.wait_for(lazymig.migrate(
        writer.pid, precopy=PreCopyOptions(max_rounds=3, lazy=True), on_round=on_round,
        stdio=output.stdio), 120)
    output.handed_over()
    try:
        assert rounds and tuple(rounds) == result.precopy
        assert rounds[0].pages_dirtied >= PAGES
        # Only what was written after the last round stays lazy.
        assert result.dump.lazy_pages < HOT + 64
        # The pages copied before and not written since were moved, not written.
        assert result.restored.prepared_pages >= PAGES - HOT
        bad, _ = await output.check(result.restored.pid)
        assert bad == 0
        assert mappings(result.restored.pid) == layout[-1]
    finally:
        os.kill(result.restored.pid, signal.SIGKILL)


async def test_a_prepared_restore_moves_the_pre_copied_pages_into_place(
        writer: Writer, output: Output, tmp_path: Path) -> None:
    """Restorer.prepare() before the rounds, add_round() after each, then a plain dump
    (the last dirty set on disk) and run(): every page checked by the process."""
    images = tmp_path / "dump"
    images.mkdir()
    restorer = Restorer(images, stdio=output.stdio)
    await restorer.prepare()
    try:
        precopy = await PreCopy.start(
            writer.pid, tmp_path / "pre",
            options=PreCopyOptions(max_rounds=4, min_dirty_pages=0, min_shrink=1.0),
            on_round=lambda r: restorer.add_round(r.images_dir))
        try:
            await precopy.run()
            layout = mappings(writer.pid)
            await dump(writer.pid, images, precopy=precopy)
        finally:
            await precopy.aclose()
        writer.proc.wait(timeout=10)
        restored = await restorer.run()
        output.handed_over()
        assert restored.prepared_pages >= PAGES - HOT
        assert mappings(restored.pid) == layout
        bad, writes = await output.check(restored.pid)
        assert bad == 0
        bad, after = await output.check(restored.pid)
        assert bad == 0 and after > writes
    finally:
        restorer.kill()


async def test_pages_prepared_from_an_older_round_are_written_instead(
        writer: Writer, output: Output, tmp_path: Path) -> None:
    """The last round never reached the prepared restore: what it holds is not the
    newest copy of every page, so nothing prepared is used, and the restore writes
    the pages from the chain as without preparation."""
    images = tmp_path / "dump"
    images.mkdir()
    restorer = Restorer(images, stdio=output.stdio)
    await restorer.prepare()
    try:
        async with await PreCopy.start(writer.pid, tmp_path / "pre") as precopy:
            await restorer.add_round((await precopy.round()).images_dir)
            await precopy.round()
            await dump(writer.pid, images, precopy=precopy)
        writer.proc.wait(timeout=10)
        restored = await restorer.run()
        output.handed_over()
        assert restored.prepared_pages == 0
        assert restored.nonlazy_pages >= PAGES
        bad, _ = await output.check(restored.pid)
        assert bad == 0
    finally:
        restorer.kill()


def lazymig_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lazymig", *args], check=True, timeout=120,
                   stdin=subprocess.DEVNULL)


async def test_the_cli_chain_pre_dump_pre_dump_dump(
        writer: Writer, output: Output, tmp_path: Path) -> None:
    pid = str(writer.pid)
    for name in ("1", "2", "3"):
        (tmp_path / name).mkdir()
    await asyncio.to_thread(lazymig_cli, "pre-dump", "-t", pid, "-D", str(tmp_path / "1"),
                            "--track-mem")
    record = KeeperRecord.read(tmp_path / "1")
    assert uffd_state(writer.pid)[1]  # still tracked, by the keeper, between commands
    await asyncio.to_thread(lazymig_cli, "pre-dump", "-t", pid, "-D", str(tmp_path / "2"),
                            "--track-mem", "--prev-images-dir", "../1")
    assert KeeperRecord.read(tmp_path / "2") == record
    await asyncio.to_thread(lazymig_cli, "dump", "-t", pid, "-D", str(tmp_path / "3"),
                            "--track-mem", "--prev-images-dir", "../2")
    writer.proc.wait(timeout=10)
    assert not process_alive(record.keeper)
    entries = ImagesDir(tmp_path / "3").pagemap(writer.pid).entries
    assert sum(e.nr_pages for e in entries if PE.PARENT in e.flags) >= PAGES - HOT

    restorer = Restorer(tmp_path / "3", stdio=output.stdio)
    try:
        restored = await restorer.run()
        output.handed_over()
        bad, _ = await output.check(restored.pid)
        assert bad == 0
    finally:
        restorer.kill()


async def test_killing_the_keeper_ends_an_abandoned_chain(writer: Writer,
                                                          tmp_path: Path) -> None:
    fds_before = fd_names(writer.pid)
    await asyncio.to_thread(lazymig_cli, "pre-dump", "-t", str(writer.pid), "-D",
                            str(tmp_path), "--track-mem")
    record = KeeperRecord.read(tmp_path)
    os.kill(record.keeper, signal.SIGTERM)
    for _ in range(500):
        if uffd_state(writer.pid) == ([], []):
            break
        await asyncio.sleep(0.01)
    assert uffd_state(writer.pid) == ([], [])
    assert fd_names(writer.pid) == fds_before and run_state(writer.pid) in "RS"


# -- pages pushed to a receiving page server (lazymig's and CRIU's) ------------------------


class Receiver:
    """A receiving page server for one pre-dump: ``lazymig page-server -D DIR`` or real
    ``criu page-server -D DIR`` (in its chroot, ``--wire v1``: CRIU 4.1.1's header)."""

    def __init__(self, kind: str, images: Path, prev: str | None) -> None:
        self.kind, self.images = kind, images
        self.port = helpers.free_port()
        self.log = images.parent / f"{images.name}-{kind}-page-server.log"
        images.mkdir()
        extra = ["--prev-images-dir", prev] if prev else []
        if kind == "lazymig":
            with self.log.open("wb") as err:
                self.proc = criu_peer.start_with_status_fd(
                    criu_peer.lazymig_argv("page-server", "-D", str(images), "--address",
                                           "127.0.0.1", "--port", str(self.port), *extra,
                                           loop="uvloop"),
                    what="lazymig page-server", stderr=err.fileno())
        else:
            inner = "/" + str(images.relative_to(criu_peer.ROOT))
            self.proc = criu_peer.start_with_status_fd(
                criu_peer.chroot_argv("criu", "page-server", "-D", inner, "--address",
                                      "127.0.0.1", "--port", str(self.port), *extra),
                what="criu page-server", log=f"../{self.log.name}")

    @property
    def wire(self) -> str:
        return "v2" if self.kind == "lazymig" else "v1"

    def wait(self) -> None:
        rc = self.proc.wait(timeout=60)
        assert rc == 0, self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(params=["lazymig", "criu"])
def receiver_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "criu":
        if not criu_peer.CRIU.exists():
            pytest.skip(f"no CRIU at {criu_peer.CRIU} (scripts/criu-peer.sh makes it)")
        with criu_peer.criu_root_ready():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def dest_root(receiver_kind: str, tmp_path: Path) -> Iterator[Path]:
    """Where the receiver writes: in CRIU's chroot for CRIU's."""
    if receiver_kind == "lazymig":
        yield tmp_path / "dest"
        return
    with criu_peer.ChrootDir.temporary("lazymig-push-") as d:
        yield d.host


def push_two_pre_dumps(pid: str, src: Path, dest_root: Path, kind: str) -> None:
    """``pre-dump --page-server`` into src/1 and src/2, their pages into a receiver
    of ``kind`` each, dest_root/1 and dest_root/2 (``--prev-images-dir ../1``)."""
    dest_root.mkdir(exist_ok=True)
    for n in ("1", "2", "3"):
        (src / n).mkdir(parents=True)
    for n, prev in (("1", None), ("2", "../1")):
        rx = Receiver(kind, dest_root / n, prev)
        try:
            lazymig_cli("pre-dump", "-t", pid, "-D", str(src / n), "--track-mem",
                        *(["--prev-images-dir", prev] if prev else []), "--page-server",
                        "--address", "127.0.0.1", "--port", str(rx.port), "--wire", rx.wire)
            rx.wait()
        finally:
            criu_peer.stop(rx.proc)
        assert not list((src / n).glob("pages-*.img"))  # the pages went to the server


def check_received_chain(second: Path, pid: str) -> None:
    """What the receiver of the second pre-dump wrote, as crit reads it."""
    assert str((second / PARENT_LINK).readlink()) == "../1"
    if CRIT is None:
        return
    head, *entries = crit_decode(second / f"pagemap-{pid}.img")
    data = [e for e in entries if e.get("flags") == PE.PRESENT]
    parent = [e for e in entries if e.get("flags") == PE.PARENT]
    assert data and parent
    assert sum(e["nr_pages"] for e in parent) >= PAGES - HOT
    size = (second / f"pages-{head['pages_id']}.img").stat().st_size
    assert size == PAGE_SIZE * sum(e["nr_pages"] for e in data)


def start_lazy_dump(pid: str, images: Path, prev: str, port: int) -> subprocess.Popen[bytes]:
    """``lazymig dump --track-mem --prev-images-dir PREV --lazy-pages``, once it serves."""
    r, w = os.pipe()
    try:
        dumper = subprocess.Popen(
            [sys.executable, "-m", "lazymig", "dump", "-t", pid, "-D", str(images),
             "--track-mem", "--prev-images-dir", prev, "--lazy-pages", "--address",
             "127.0.0.1", "--port", str(port), "--status-fd", str(w)], pass_fds=(w,),
            stdin=subprocess.DEVNULL)
    finally:
        os.close(w)
    try:
        criu_peer.wait_ready(r, 60, "lazymig dump", dumper)
    except BaseException:
        dumper.kill()
        dumper.wait()
        raise
    return dumper


async def test_pre_dumps_pushed_to_a_page_server_then_a_lazy_dump_restores(
        writer: Writer, output: Output, tmp_path: Path, receiver_kind: str,
        dest_root: Path) -> None:
    """Two ``pre-dump --page-server`` into a receiver each (the second with
    --prev-images-dir), crit reads what it wrote as a chain, then ``dump
    --prev-images-dir --track-mem --lazy-pages`` on the source, its images copied
    beside the received ones, and a lazy restore there: every page checked."""
    pid = str(writer.pid)
    src = tmp_path / "src"
    await asyncio.to_thread(push_two_pre_dumps, pid, src, dest_root, receiver_kind)
    await asyncio.to_thread(check_received_chain, dest_root / "2", pid)

    port = helpers.free_port()
    dumper = await asyncio.to_thread(start_lazy_dump, pid, src / "3", "../2", port)
    try:
        entries = ImagesDir(src / "3").pagemap(writer.pid).entries
        assert sum(e.nr_pages for e in entries if PE.PARENT in e.flags) >= PAGES - HOT
        # The destination: the final dump's images beside the received pre-dumps.
        await asyncio.to_thread(shutil.copytree, src / "3", dest_root / "3", symlinks=True)
        async with lazymig.receive(dest_root / "3", page_server=("127.0.0.1", port),
                                   stdio=output.stdio) as dst:
            output.handed_over()
            restored = dst.process.pid
            bad, _ = await output.check(restored)
            assert bad == 0
        os.kill(restored, signal.SIGKILL)
        assert await asyncio.to_thread(dumper.wait, 30) == 0
    finally:
        if dumper.poll() is None:
            dumper.kill()
        await asyncio.to_thread(dumper.wait)


def copy_dump(src: Path, dst: Path) -> None:
    """Copy a dump's images as a user must: inventory.img last (it marks the dump
    complete for a prepared destination); symlinks (``parent``) as symlinks."""
    dst.mkdir(exist_ok=True)
    for path in sorted(src.iterdir(), key=lambda p: p.name == "inventory.img"):
        if path.is_symlink():
            (dst / path.name).symlink_to(path.readlink())
        elif path.is_file():
            shutil.copy2(path, dst / path.name)


async def test_a_prepared_cli_destination_builds_the_memory_from_pushed_pre_dumps(
        writer: Writer, output: Output, tmp_path: Path) -> None:
    """The documented workflow with a prepared destination: ``lazymig lazy-pages
    --wait-for-page-server`` and ``lazymig restore --wait-for-images --pre-dumps DEST``
    started first; two ``pre-dump --page-server`` into receivers under DEST, whose
    pages the waiting restore puts in place as each arrives; then ``dump --lazy-pages``
    on the source, its images copied to DEST/3 (inventory.img last): the restore only
    moves the pages, and the process checks every page."""
    pid = str(writer.pid)
    src, dest = tmp_path / "src", tmp_path / "dest"
    dest.mkdir()
    (dest / "3").mkdir()
    sock = str(tmp_path / "lazy-pages.socket")
    port = helpers.free_port()
    log = tmp_path / "restore.log"
    pidfile = tmp_path / "restored.pid"
    with log.open("wb") as err:
        restore = subprocess.Popen(  # noqa: ASYNC220 (it only starts: nothing waits here)
            criu_peer.lazymig_argv("restore", "--lazy-pages", "-D", str(dest / "3"), "--socket",
                                   sock, "-d", "--shell-job", "--pidfile", str(pidfile),
                                   "--wait-for-images", "120", "--pre-dumps", str(dest),
                                   loop="uvloop" if helpers.on_uvloop() else "no-uvloop"),
            stdin=subprocess.DEVNULL, stdout=output.stdio[1], stderr=err)
    daemon = criu_peer.start_with_status_fd(
        criu_peer.lazymig_argv("lazy-pages", "--page-server", "--address", "127.0.0.1",
                               "--port", str(port), "-D", str(dest / "3"), "--socket", sock,
                               "--wait-for-page-server", "120", loop="uvloop"),
        what="lazymig lazy-pages")
    dumper = None
    restored = -1
    try:
        await asyncio.to_thread(push_two_pre_dumps, pid, src, dest, "lazymig")
        dumper = await asyncio.to_thread(start_lazy_dump, pid, src / "3", "../2", port)
        await asyncio.to_thread(copy_dump, src / "3", dest / "3")
        assert await asyncio.to_thread(restore.wait, 120) == 0, log.read_text()[-3000:]
        output.handed_over()
        text = log.read_text()
        assert "pre-dump" in text and "put in place" in text, text[-3000:]
        moved = re.search(r"(\d+) pre-copied pages moved into place", text)
        assert moved and int(moved[1]) >= PAGES - HOT, text[-3000:]
        restored = int(pidfile.read_text())
        # -d prints the pid on its stdout, the pipe the restored process writes to too.
        assert await asyncio.to_thread(output.lines.next, 30) == str(restored)
        bad, _ = await output.check(restored)
        assert bad == 0
        os.kill(restored, signal.SIGKILL)
        assert await asyncio.to_thread(dumper.wait, 30) == 0
    finally:
        if restored > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restored, signal.SIGKILL)
        for proc in (restore, daemon, *([dumper] if dumper else [])):
            criu_peer.stop(proc)


def pre_dump_fails(*args: str) -> str:
    """Run ``lazymig pre-dump ARGS``, which must fail; its stderr."""
    res = subprocess.run([sys.executable, "-m", "lazymig", "pre-dump", *args], check=False,
                         timeout=120, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert res.returncode != 0, res.stderr
    return res.stderr


def hang_up_mid_push(listener: socket.socket) -> None:
    """A page server that answers OPEN2, takes a little of the pages, and hangs up."""
    conn, _ = listener.accept()
    with conn:
        conn.recv(32)  # the OPEN2 header (either layout)
        conn.sendall(b"\0")  # no parent
        got = 0
        while got < (256 << 10):
            data = conn.recv(65536)
            if not data:
                break
            got += len(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_a_push_that_fails_leaves_the_source_as_it_was(
        writer: Writer, tmp_path: Path) -> None:
    """The page server hangs up in the middle of the first pre-dump; a second pre-dump
    pushes to a server with no parent for it: each pre-dump fails naming the cause,
    and the source runs on untracked, as before the chain."""
    fds_before = fd_names(writer.pid)
    pid = str(writer.pid)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = asyncio.create_task(asyncio.to_thread(hang_up_mid_push, listener))
        (tmp_path / "1").mkdir()
        err = await asyncio.to_thread(
            pre_dump_fails, "-t", pid, "-D", str(tmp_path / "1"), "--track-mem",
            "--page-server", "--address", "127.0.0.1", "--port", str(port))
        await server
    assert "127.0.0.1" in err and "push" in err, err
    assert uffd_state(writer.pid) == ([], [])
    assert fd_names(writer.pid) == fds_before and run_state(writer.pid) in "RS"

    # A good first pre-dump, then a second one to a receiver without --prev-images-dir.
    dest = tmp_path / "dest"
    dest.mkdir()
    for n, prev in (("2", None), ("3", "../2")):
        rx = Receiver("lazymig", dest / n, None)
        (tmp_path / n).mkdir()
        try:
            argv = ["-t", pid, "-D", str(tmp_path / n), "--track-mem", "--page-server",
                    "--address", "127.0.0.1", "--port", str(rx.port),
                    *(["--prev-images-dir", prev] if prev else [])]
            if prev is None:
                await asyncio.to_thread(lazymig_cli, "pre-dump", *argv)
                await asyncio.to_thread(rx.wait)
            else:
                err = await asyncio.to_thread(pre_dump_fails, *argv)
                assert "--prev-images-dir" in err, err
        finally:
            criu_peer.stop(rx.proc)
    assert not list((dest / "3").glob("*.img"))  # the receiver kept nothing of it
    assert uffd_state(writer.pid) == ([], [])  # the chain ended, its keeper with it
    assert fd_names(writer.pid) == fds_before and run_state(writer.pid) in "RS"


async def test_a_receiver_keeps_nothing_of_a_session_without_close(tmp_path: Path) -> None:
    await asyncio.to_thread(receiver_sessions, tmp_path)


def receiver_sessions(tmp_path: Path) -> None:
    """A client that hangs up before CLOSE, one that sends pages out of address order,
    and one that says PE_PARENT with no parent: an error naming it, and no image."""
    pid, vaddr = 4242, 0x7F0000000000

    def session(*requests: AddPages, close: bool = False) -> None:
        client = PageServerConnection(Role.CLIENT, WireVersion.V2)
        a, b = socket.socketpair()
        with a, b:
            a.sendall(client.send(OpenRequest(DstType.PID, pid)))
            for add in requests:
                a.sendall(client.send(add))
                if PE.PRESENT in add.flags:
                    a.sendall(bytes(add.nr_pages * PAGE_SIZE))
                    client.payload_sent_directly(add.nr_pages * PAGE_SIZE)
            if close:
                a.sendall(client.send(CloseRequest()))
            a.shutdown(socket.SHUT_WR)
            receive_session(b, tmp_path)

    with pytest.raises(RemoteProtocolError, match="without CLOSE"):
        session(AddPages(DstType.PID, pid, vaddr, 2, PE.PRESENT))
    with pytest.raises(RemoteProtocolError, match="out of order"):
        session(AddPages(DstType.PID, pid, vaddr, 2, PE.PRESENT),
                AddPages(DstType.PID, pid, vaddr, 1, PE.PRESENT), close=True)
    with pytest.raises(RemoteProtocolError, match="no parent"):
        session(AddPages(DstType.PID, pid, vaddr, 2, PE.PARENT), close=True)
    assert list(tmp_path.iterdir()) == []
    session(AddPages(DstType.PID, pid, vaddr, 2, PE.PRESENT), close=True)
    assert [e.nr_pages for e in ImagesDir(tmp_path).pagemap(pid).entries] == [2]


async def test_pre_copy_of_a_process_with_children_is_refused_before_any_round(
        tmp_path: Path) -> None:
    # Not asyncio's subprocess: uvloop's leaves a pipe of its own open in the child.
    parent = await asyncio.to_thread(
        subprocess.Popen, ["sh", "-c", "sleep 60 & wait"], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if await asyncio.to_thread(children, parent.pid):
                break
            await asyncio.sleep(0.01)
        with pytest.raises(UnsupportedTargetError, match=r"child process.*tree is not"):
            await PreCopy.start(parent.pid, tmp_path)
        with pytest.raises(UnsupportedTargetError, match=r"child process.*tree is not"):
            await lazymig.migrate(parent.pid, precopy=True)
        assert uffd_state(parent.pid) == ([], []) and run_state(parent.pid) in "RS"
    finally:
        for kid in children(parent.pid):
            os.kill(kid, signal.SIGKILL)
        parent.kill()
        await asyncio.to_thread(parent.wait)
