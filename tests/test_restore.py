"""``lazymig restore``: real processes dumped, then rebuilt in a new process.

* A plain ``dump()`` of pattern.c restored through the API: the new process
  (its pid back, source gone) keeps printing the source's checksum with bad=0, its
  VMAs sit at the dumped addresses, exe/comm/signal mask/handler are back.
* The seed workflow with the three CLIs, for pattern.c and for pattern.py
  (CPython: dynamic libraries, a read-only shared gconv cache mapping):
  ``lazymig dump --lazy-pages`` → ``lazymig lazy-pages --page-server`` →
  ``lazymig restore --lazy-pages -d``:
  the restored process prints the same checksums while its memory arrives
  through the daemon, the daemon and the dumper exit 0, the source is killed.
* Refusal: a dump whose mapped executable changed, or that CRIU wrote, is
  refused with a message naming the cause, before any process is created
  (threads: tests/test_threads.py).

The source's stdout is a pipe to the test, which stays behind: the restored
process gets a pipe of the test's in its place (the API's ``stdio``, the
CLI's ``--shell-job``), from which the tests read its CHECK lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    cli,
    free_port,
    on_uvloop,
    restore_and_check,
    restore_with_output,
    status_line,
    wait_ready,
)

from lazymig.dump import dump
from lazymig.errors import BrokenResourceError
from lazymig.linux.ptrace import process_alive
from lazymig.proto.constants import VmaStatus
from lazymig.proto.images import ImagesDir
from lazymig.restore import RestoreError, Restorer, UnsupportedDumpError
from lazymig.testing.workload import (
    OutputLines,
    Workload,
    python_workload_argv,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

SIGUSR1_BIT = 1 << (signal.SIGUSR1 - 1)
SIGUSR2_BIT = 1 << (signal.SIGUSR2 - 1)
NOBODY = 65534
MADV_DONTDUMP = 16


@pytest.mark.asyncio
async def test_plain_dump_restored_through_the_api(tmp_path: Path, c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "16", "--interval-ms", "50"]) as w:
        before = w.next_check()
        await dump(w.pid, tmp_path)
        w.proc.wait(timeout=5)  # killed (the dump's tracer may have reaped it: no status)
        assert not process_alive(w.pid)
        read_fd, write_fd = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        restorer = Restorer(tmp_path, stdio=(devnull, write_fd, write_fd))
        try:
            result = await restorer.run()
        finally:
            os.close(write_fd)
            os.close(devnull)
        lines = OutputLines(read_fd)
        try:
            assert result.pid == result.image_pid == w.pid  # the source's pid is free
            assert result.lazy_pages == 0 and result.nonlazy_pages >= 16 * 256
            for _ in range(3):
                check = await asyncio.to_thread(lines.next_check)
                assert (check.sum, check.bad) == (before.sum, 0)
                assert check.n > before.n

            pid = result.pid
            mm = ImagesDir(tmp_path).mm(w.pid)
            maps = await asyncio.to_thread(Path(f"/proc/{pid}/maps").read_text)
            starts = {int(line.split("-", 1)[0], 16) for line in maps.splitlines()}
            for v in mm.vmas:
                if not v.status & (VmaStatus.VVAR | VmaStatus.STACK):
                    assert v.start in starts, f"VMA {v.start:#x} not restored"
            exe = await asyncio.to_thread(Path(f"/proc/{pid}/exe").readlink)
            assert exe == await asyncio.to_thread(c_workload.resolve)
            assert status_line(pid, "Name") == "pattern"
            assert int(status_line(pid, "SigBlk"), 16) == SIGUSR2_BIT
            assert int(status_line(pid, "SigCgt"), 16) & SIGUSR1_BIT
            os.kill(pid, signal.SIGUSR1)  # the restored handler counts it
            for _ in range(20):
                check = await asyncio.to_thread(lines.next_check)
                if check.usr1:
                    break
            assert (check.usr1, check.bad, check.sum) == (1, 0, before.sum)
        finally:
            restorer.kill()
            lines.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_lazy_migration_with_the_three_clis(kind: str, tmp_path: Path,
                                                  c_workload: Path) -> None:
    port = str(free_port())
    loop = on_uvloop()
    argv = ([str(c_workload), "--mib", "32", "--interval-ms", "50"] if kind == "c"
            else python_workload_argv("--mib", "8", "--interval-ms", "50"))
    with Workload(argv) as w:
        before = w.next_check()
        with cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(tmp_path), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
            with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                     "-D", str(tmp_path), uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
                restored_pid = await restore_and_check(tmp_path, before, loop, daemon, dumper)
        assert restored_pid != w.pid
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.mark.asyncio
async def test_what_cannot_be_restored_is_refused_before_anything_runs(
        tmp_path: Path, c_workload: Path) -> None:
    exe = tmp_path / "pattern"
    await asyncio.to_thread(shutil.copy, c_workload, exe)
    images = tmp_path / "images"
    images.mkdir()
    with Workload([str(exe), "--mib", "1"]) as w:
        await dump(w.pid, images)
    await asyncio.to_thread(_append, exe, b"\0")  # the mapped executable changed since
    restorer = Restorer(images, shell_job=True)
    with pytest.raises(UnsupportedDumpError, match=r"pattern .*changed since the dump"):
        await restorer.run()
    assert restorer.process is None  # nothing was started
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "lazymig", "restore", "-D", str(images),
                         "--shell-job"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "changed since the dump" in proc.stderr

    (images / f"lazymig-{w.pid}.img").unlink()  # as if `criu dump` had written it
    with pytest.raises(UnsupportedDumpError, match=r"not written by `lazymig dump`"):
        await Restorer(images, shell_job=True).run()


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/*/stat: the per-thread
    ``children`` files miss a child while its forking thread exits)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def _tree_digest(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _start_restore(images: Path, stdout: int) -> subprocess.Popen[bytes]:
    with (images / "restore.log").open("w") as log:
        return subprocess.Popen([sys.executable, "-m", "lazymig", "restore", "-D", str(images),
                                 "--shell-job"], stdout=stdout, stderr=log)


@pytest.mark.asyncio
async def test_restore_without_d_waits_for_the_process(tmp_path: Path, c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50"]) as w:
        before = w.next_check()
        await dump(w.pid, tmp_path)
    read_fd, write_fd = os.pipe()
    proc = await asyncio.to_thread(_start_restore, tmp_path, write_fd)
    os.close(write_fd)
    lines = OutputLines(read_fd)
    try:
        check = await asyncio.to_thread(lines.next_check)
        assert (check.sum, check.bad) == (before.sum, 0)
        assert proc.poll() is None  # still waiting for its child, the restored process
        (restored,) = await asyncio.to_thread(_children, proc.pid)
        os.kill(restored, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines.close()


@pytest.mark.asyncio
async def test_a_restore_failing_half_way_kills_the_half_built_process(
        tmp_path: Path, c_workload: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Workload([str(c_workload), "--mib", "1"]) as w:
        await dump(w.pid, tmp_path)
    images_before = await asyncio.to_thread(_tree_digest, tmp_path)

    def broken(self: Restorer, *args: object) -> None:
        raise RuntimeError("injected failure after the address space was built")

    monkeypatch.setattr(Restorer, "_finish", broken)
    restorer = Restorer(tmp_path, stdio=(0, 2, 2))
    with pytest.raises(RestoreError, match="injected failure"):
        await restorer.run()
    assert restorer.process is not None
    assert restorer.process.returncode == -signal.SIGKILL  # killed and reaped
    assert not process_alive(restorer.process.pid)
    assert await asyncio.to_thread(_tree_digest, tmp_path) == images_before


@pytest.mark.asyncio
async def test_a_stopped_process_is_restored_stopped(tmp_path: Path, c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50"]) as w:
        w.next_check()
        os.kill(w.pid, signal.SIGSTOP)
        assert w.quiet_for(0.2)
        await dump(w.pid, tmp_path)
    restorer, result, lines = await restore_with_output(tmp_path)
    try:
        for _ in range(50):
            if status_line(result.pid, "State").startswith("T"):
                break
            await asyncio.sleep(0.02)
        assert status_line(result.pid, "State").startswith("T")
        os.kill(result.pid, signal.SIGCONT)
        check = await asyncio.to_thread(lines.next_check)
        assert check.bad == 0
    finally:
        restorer.kill()
        lines.close()


def _run_as_nobody_in_the_images(images: Path, pid: int) -> None:
    """Rewrite the dump's credentials to nobody's: this host cannot dump a process of
    another uid (prlimit needs CAP_SYS_RESOURCE, which the test runner lacks)."""
    dir_ = ImagesDir(images)
    core = dir_.core(pid)
    c = core.thread_core.creds
    c.uid = c.euid = c.suid = c.fsuid = c.gid = c.egid = c.sgid = c.fsgid = NOBODY
    del c.groups[:]
    c.cap_inh[:] = c.cap_prm[:] = c.cap_eff[:] = [0, 0]
    dir_.write_core(pid, core)


@pytest.mark.asyncio
async def test_the_restored_process_gets_the_dumped_credentials(
        tmp_path: Path, c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50"]) as w:
        before = w.next_check()
        await dump(w.pid, tmp_path)
    await asyncio.to_thread(_run_as_nobody_in_the_images, tmp_path, w.pid)
    restorer, result, lines = await restore_with_output(tmp_path)
    try:
        check = await asyncio.to_thread(lines.next_check)
        assert (check.sum, check.bad) == (before.sum, 0)
        assert status_line(result.pid, "Uid").split() == [str(NOBODY)] * 4
        assert status_line(result.pid, "Gid").split() == [str(NOBODY)] * 4
        assert status_line(result.pid, "Groups") == ""
        assert int(status_line(result.pid, "CapEff"), 16) == 0
    finally:
        restorer.kill()
        lines.close()


def _tweak_images(images: Path, pid: int, region: int) -> None:
    """Give the dump state pattern.c does not set itself: nice 5, THP disabled,
    MADV_DONTDUMP on the pattern region."""
    dir_ = ImagesDir(images)
    core = dir_.core(pid)
    core.thread_core.sched_nice = 5
    dir_.write_core(pid, core)
    mm = dir_.mm(pid)
    mm.thp_disabled = True
    (vma,) = [v for v in mm.vmas if v.start == region]
    vma.madv |= 1 << MADV_DONTDUMP
    dir_.write_mm(pid, mm)


@pytest.mark.asyncio
async def test_nice_thp_and_madvise_come_back(tmp_path: Path, c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "1", "--interval-ms", "50"]) as w:
        await dump(w.pid, tmp_path)
    await asyncio.to_thread(_tweak_images, tmp_path, w.pid, w.ready.addr)
    restorer = Restorer(tmp_path, stdio=(0, 2, 2))
    result = await restorer.run()
    try:
        stat = await asyncio.to_thread(Path(f"/proc/{result.pid}/stat").read_text)
        assert int(stat.rsplit(")", 1)[1].split()[16]) == 5  # field 19: nice
        assert status_line(result.pid, "THP_enabled") == "0"
        smaps = await asyncio.to_thread(Path(f"/proc/{result.pid}/smaps").read_text)
        block = smaps[smaps.index(f"{w.ready.addr:x}-"):]
        flags = next(line for line in block.splitlines() if line.startswith("VmFlags:"))
        assert " dd" in flags
    finally:
        restorer.kill()


@pytest.mark.asyncio
async def test_a_page_server_lost_mid_transfer_kills_the_restored_process(
        tmp_path: Path, c_workload: Path) -> None:
    """The daemon fetches on faults only; the page server dies before the restored
    process's first check touches its region: it must die, never print bad > 0."""
    port = str(free_port())
    loop = on_uvloop()
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "2000"]) as w, \
            cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                "--port", port, "-D", str(tmp_path), uvloop=loop) as (dumper, dr):
        assert dr is not None
        await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
        with cli("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                 "--no-background", "-D", str(tmp_path), uvloop=loop) as (daemon, lr):
            assert lr is not None
            await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
            restorer, result, lines = await restore_with_output(tmp_path, lazy_pages=True)
            dumper.kill()  # the source host is lost, the restored process still sleeps
            try:
                printed = []
                with contextlib.suppress(EOFError):
                    while True:
                        printed.append(await asyncio.to_thread(lines.next_check, 10.0))
                assert all(c.bad == 0 and c.sum for c in printed), printed
                assert await asyncio.to_thread(restorer.wait) == -signal.SIGKILL
                assert await asyncio.to_thread(daemon.wait, 10) != 0
            finally:
                restorer.kill()
                lines.close()
        assert not process_alive(result.pid)


@pytest.mark.asyncio
async def test_a_plain_dump_restored_lazily_from_a_local_daemon(tmp_path: Path,
                                                                c_workload: Path) -> None:
    """criu's local lazy mode: the daemon serves the PE_LAZY|PE_PRESENT pages of a
    plain dump from pages-1.img. Without a daemon the restore fails before it starts."""
    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "50"]) as w:
        before = w.next_check()
        await dump(w.pid, tmp_path)
    orphan = Restorer(tmp_path, lazy_pages=True, shell_job=True)
    with pytest.raises(BrokenResourceError, match="lazy-pages daemon"):
        await orphan.run()
    assert orphan.process is None
    with cli("lazy-pages", "-D", str(tmp_path), uvloop=on_uvloop()) as (daemon, lr):
        assert lr is not None
        await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
        restorer, result, lines = await restore_with_output(tmp_path, lazy_pages=True)
        try:
            assert result.lazy_pages >= 4 * 256
            check = await asyncio.to_thread(lines.next_check)
            assert (check.sum, check.bad) == (before.sum, 0)
            assert await asyncio.to_thread(daemon.wait, 10) == 0
            check = await asyncio.to_thread(lines.next_check)
            assert (check.sum, check.bad) == (before.sum, 0)
        finally:
            restorer.kill()
            lines.close()
