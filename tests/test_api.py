"""The orchestrator API (lazymig.orchestrate, exported by ``lazymig``) end to end.

Real workloads (lazymig/testing/pattern.c) are migrated over loopback through
the handles; their CHECK lines (checksum, and words that differ from the
pattern) must be the source's after the migration.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import LAYOUTS, attach_and_read, kill, output_pipe, process_state

import lazymig
from lazymig.linux.ptrace import process_alive
from lazymig.proto.wire import WireVersion
from lazymig.testing import Pattern, assert_memory_equal
from lazymig.testing.plugin import StartWorkload
from lazymig.testing.workload import Check, Workload


def same_memory(check: Check, before: Check) -> bool:
    return (check.sum, check.bad) == (before.sum, 0)


def test_import_lazymig_loads_no_machinery() -> None:
    code = ("import sys, lazymig; print(sorted(m for m in sys.modules if m.startswith("
            "('lazymig.', 'uvloop', 'ptrace', 'construct', 'google'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['lazymig._lazy', 'lazymig._version']"


def test_every_exported_name_resolves() -> None:
    for name in lazymig.__all__:
        assert getattr(lazymig, name) is not None, name
    assert lazymig.migrate is lazymig.orchestrate.migrate
    assert set(lazymig.orchestrate.__all__) <= set(lazymig.__all__)
    assert set(dir(lazymig)) >= set(lazymig.__all__)
    with pytest.raises(AttributeError):
        lazymig.no_such_name  # noqa: B018


def test_dir_lists_the_api_not_the_packages_own_imports() -> None:
    names = dir(lazymig)
    assert not {"TYPE_CHECKING", "annotations", "lazy_exports"} & set(names)
    assert "Outcome" in names and lazymig.Outcome is lazymig.orchestrate.Outcome


def test_the_types_a_user_meets_are_public() -> None:
    """``done``'s type comes from lazymig itself, and a migration's downtime, known
    once the block is entered, is typed as a float there."""
    migration = lazymig.migrate(os.getpid())
    assert isinstance(migration.done, lazymig.Outcome)
    downtime = vars(lazymig.Migration)["downtime"]
    assert inspect.get_annotations(downtime.fget, eval_str=True)["return"] is float
    with pytest.raises(lazymig.ClosedResourceError):
        migration.downtime  # noqa: B018


@pytest.mark.asyncio
async def test_migrate_in_one_call(lazymig_workload: StartWorkload) -> None:
    w = lazymig_workload("c", mib=8)
    with output_pipe() as out:
        before = w.next_check()
        result = await asyncio.wait_for(lazymig.migrate(w.pid, stdio=out.stdio), 60)
        out.handed_over()
        try:
            assert result.restored.pid != w.pid
            assert same_memory(await asyncio.to_thread(out.lines.next_check), before)
            await assert_memory_equal(result.restored.pid, Pattern.of(w.ready))
            assert result.dump.source is lazymig.SourceFate.KILLED
            assert not process_alive(w.pid) or process_state(w.pid) == "Z"
            final = result.progress
            assert final.pages_total == result.dump.lazy_pages > 0
            assert final.pages_on_demand + final.pages_background == final.pages_total
            assert final.fraction == 1.0
            assert 0 < result.dump.frozen_seconds < result.downtime
        finally:
            kill(result.restored.pid)


@pytest.mark.asyncio
async def test_migrate_with_a_copy_step(c_workload: Path, tmp_path: Path) -> None:
    """``copy_images`` runs once the images are written; the destination reads the copy."""
    copied: list[Path] = []
    (tmp_path / "src").mkdir()

    async def copy(images: Path) -> Path:
        target = tmp_path / "copy"
        await asyncio.to_thread(shutil.copytree, images, target)
        copied.append(images)
        return target

    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "50"]) as w, \
            output_pipe() as out:
        before = w.next_check()
        async with asyncio.timeout(60):
            result = await lazymig.migrate(w.pid, images_dir=tmp_path / "src",
                                           copy_images=copy, stdio=out.stdio)
        out.handed_over()
        try:
            assert same_memory(await asyncio.to_thread(out.lines.next_check), before)
        finally:
            kill(result.restored.pid)
    assert copied == [tmp_path / "src"]
    assert (tmp_path / "copy" / "pstree.img").exists()
    assert result.dump.images_dir == tmp_path / "src"


async def _migrate_watching(workload: Workload) -> tuple[list[lazymig.TransferProgress],
                                                          lazymig.MigrationResult, bool]:
    """Migrate with a progress feed; returns the snapshots, the result and whether the
    restored process printed the source's checksum."""
    before = workload.next_check()
    with output_pipe() as out:
        async with lazymig.migrate(workload.pid, stdio=out.stdio) as migration:
            out.handed_over()
            try:
                snapshots = [p async for p in migration.progress(interval=0.01)]
                check = await asyncio.to_thread(out.lines.next_check)
            finally:
                pid = migration.process.pid
        result = await migration.done
        kill(pid)
    assert result.restored.pid == pid
    return snapshots, result, same_memory(check, before)


@pytest.mark.asyncio
async def test_several_migrations_in_one_loop_with_progress(c_workload: Path) -> None:
    workloads = [Workload([str(c_workload), "--mib", str(4 * (i + 1)), "--interval-ms", "50"])
                 for i in range(3)]
    try:
        async with asyncio.timeout(90):
            outcomes = await asyncio.gather(*(_migrate_watching(w) for w in workloads))
    finally:
        for w in workloads:
            w.stop()
    for snapshots, result, memory_intact in outcomes:
        assert memory_intact
        done = [p.pages_done for p in snapshots]
        assert done == sorted(done)  # progress never goes back
        assert snapshots[-1] == result.progress  # the last one is the final state
        assert snapshots[-1].fraction == 1.0
        assert snapshots[-1].pages_total == result.dump.lazy_pages
    assert len({result.restored.pid for _, result, _ in outcomes}) == 3


@pytest.mark.asyncio
async def test_the_two_halves_with_a_copy_of_the_images(c_workload: Path,
                                                        tmp_path: Path) -> None:
    """The source half and the destination half in two tasks, each given only what
    crosses hosts: a copy of the images dir and the page server's address (which the
    destination awaits through ``ready`` before the source is even entered)."""
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "50"]) as w, \
            output_pipe() as out:
        before = w.next_check()
        source = lazymig.serve(w.pid, src_dir, port=0)

        async def destination_half() -> tuple[int, Check, lazymig.DaemonReport]:
            address = await source.ready
            assert address == source.address and address.port > 0
            await asyncio.to_thread(shutil.copytree, src_dir, dst_dir)
            async with lazymig.receive(dst_dir, page_server=address,
                                       stdio=out.stdio) as destination:
                out.handed_over()
                check = await asyncio.to_thread(out.lines.next_check)
            return destination.process.pid, check, await destination.done

        async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
            receiving = tg.create_task(destination_half())
            async with source:
                pass  # leaving waits until every lazy page was served
        dumped = await source.done
        restored, check, report = receiving.result()
        kill(restored)
    assert same_memory(check, before)
    assert report.ok and report.processes[0].pages_copied == dumped.lazy_pages
    assert dumped.source is lazymig.SourceFate.KILLED
    final = [p async for p in source.progress()]  # after the end: one last snapshot
    assert len(final) == 1 and final[0].pages_served == final[0].pages_total


@pytest.mark.asyncio
async def test_a_failure_raises_a_lazymig_error_and_keeps_the_source(
        c_workload: Path, tmp_path: Path) -> None:
    """The destination cannot reach the page server: BrokenResourceError (the OSError
    chained), and the source, whose transfer never happened, is kept stopped."""
    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "50"]) as w:
        w.next_check()
        async with asyncio.timeout(60):
            with pytest.raises(lazymig.BrokenResourceError) as caught:
                async with lazymig.serve(w.pid, tmp_path) as source:
                    unreachable = (source.address.host, source.address.port + 1)
                    async with lazymig.receive(tmp_path, page_server=unreachable):
                        pytest.fail("restored without a page server")
            assert isinstance(caught.value.__cause__, OSError)
            with pytest.raises(lazymig.BrokenResourceError):
                await source.done
        assert process_state(w.pid) == "T"  # stopped, memory intact
        w.drain()  # lines printed before the freeze
        assert w.quiet_for(0.3)
        os.kill(w.pid, signal.SIGCONT)  # and it can go on where it was
        assert same_memory(w.next_check(), w.next_check())


@pytest.mark.asyncio
async def test_cancellation_kills_the_restored_process_and_keeps_the_source(
        c_workload: Path, tmp_path: Path) -> None:
    """Cancelled mid-transfer (faults only, and the restored process sleeps between
    checks): the restored process is killed, the daemon gone, the source stopped."""
    restored: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def migrate_slowly(pid: int) -> None:
        async with lazymig.serve(pid, tmp_path) as source, \
                lazymig.lazy_pages(tmp_path, page_server=source.address,
                                   background=False) as daemon, \
                daemon.restore(stdio=(0, devnull, 2)) as process:
            restored.set_result(process.pid)
            await asyncio.Event().wait()

    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "60000"]) as w:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            async with asyncio.timeout(60):
                task = asyncio.create_task(migrate_slowly(w.pid))
                pid = await restored
                assert process_alive(pid)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            os.close(devnull)
        assert not process_alive(pid)  # killed and reaped
        assert not (tmp_path / "lazy-pages.socket").exists()
        assert process_state(w.pid) == "T"


@pytest.mark.asyncio
async def test_a_source_lost_mid_transfer_raises_transfer_error(
        c_workload: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The page server goes away before the restored process touches its memory (faults
    only): the daemon kills it, and TransferError says so with the page source's error
    as its cause."""
    listening: asyncio.Future[lazymig.Address] = asyncio.get_running_loop().create_future()

    async def serve_until_cancelled(pid: int) -> None:
        async with lazymig.serve(pid, tmp_path) as source:
            listening.set_result(source.address)
            await asyncio.Event().wait()

    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "1000"]) as w:
        w.next_check()
        async with asyncio.timeout(60):
            serving = asyncio.create_task(serve_until_cancelled(w.pid))
            address = await listening
            with pytest.raises(lazymig.TransferError) as caught:
                async with lazymig.lazy_pages(tmp_path, page_server=address,
                                              background=False) as daemon, \
                        daemon.restore(stdio=(0, 2, 2)) as process:
                    serving.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await serving
                    assert await process.wait() == -signal.SIGKILL
        assert isinstance(caught.value.__cause__, lazymig.BrokenResourceError)
        assert [p.state for p in caught.value.report.processes] == ["killed"]
        assert process_state(w.pid) == "T"
    # The log names the restored copy by its pid on this host, not only the source's.
    assert f"process {process.pid} (image pid {w.pid}) killed" in caplog.text


def test_run_uses_uvloop_when_installed_unless_told_not_to() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert lazymig.run(loop_module()).startswith("uvloop")
    assert lazymig.run(loop_module(), use_uvloop=False).startswith("asyncio")


def test_run_runs_a_handle_to_its_end(c_workload: Path) -> None:
    with Workload([str(c_workload), "--mib", "4", "--interval-ms", "50"]) as w:
        result = lazymig.run(lazymig.migrate(w.pid, stdio=(0, 2, 2)))  # as the docs show
        kill(result.restored.pid)
    assert result.transfer.ok and result.dump.source is lazymig.SourceFate.KILLED


@pytest.mark.asyncio
async def test_a_handle_says_when_it_is_not_entered(tmp_path: Path) -> None:
    server = lazymig.serve(os.getpid(), tmp_path)
    with pytest.raises(lazymig.ClosedResourceError):
        server.address  # noqa: B018
    daemon = lazymig.lazy_pages(tmp_path)
    with pytest.raises(lazymig.ClosedResourceError):
        daemon.report  # noqa: B018
    with pytest.raises(lazymig.ConfigurationError):
        lazymig.lazy_pages(tmp_path, channels=3)
    with pytest.raises(lazymig.ConfigurationError):
        daemon.progress(interval=0)


@pytest.mark.asyncio
async def test_a_snapshot_served_from_disk_fills_an_attached_region(tmp_path: Path) -> None:
    """write_snapshot + serve_images + lazy_pages + attach in a fresh process."""
    address, pages = 0x6D0000000000, 64
    memory = b"".join(bytes([i]) * 4096 for i in range(pages))
    await lazymig.write_snapshot(tmp_path, [(address, memory)], pid=7)
    async with asyncio.timeout(60), lazymig.serve_images(tmp_path) as server, \
            lazymig.lazy_pages(tmp_path, page_server=server.address) as daemon:
        crc = await attach_and_read(daemon.socket_path, 7, address, len(memory))
    assert crc == zlib.crc32(memory)
    report = await daemon.done
    served = await server.done
    assert report.ok and report.processes[0].pages_copied == pages
    assert served.pages_served == served.pages_total == pages
    with pytest.raises(lazymig.BusyResourceError):
        async with server:
            pass


@pytest.mark.asyncio
async def test_a_daemon_in_local_mode_fills_from_the_images(tmp_path: Path) -> None:
    """No page server: lazy_pages(page_server=None) reads the lazy pages from the images."""
    address, size = 0x6D0000000000, 1 << 20
    memory = os.urandom(size)
    await lazymig.write_snapshot(tmp_path, [(address, memory)])
    async with asyncio.timeout(60), lazymig.lazy_pages(tmp_path) as daemon:
        crc = await attach_and_read(daemon.socket_path, 1, address, size)
    assert crc == zlib.crc32(memory)
    assert (await daemon.done).ok


def remove_the_executable(exe: Path, images: Path) -> None:
    """The destination lacks a mapped file: refused before any process is made."""
    exe.unlink()  # the running source keeps its inode


def cut_the_pages_image(exe: Path, images: Path) -> None:
    """pages-1.img loses its end: found while the half-built process fills its memory."""
    pages = images / "pages-1.img"
    os.truncate(pages, pages.stat().st_size - 4096)


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", [remove_the_executable, cut_the_pages_image])
@pytest.mark.parametrize("keep_stopped", [False, True])
async def test_a_restore_that_fails_before_the_copy_ran_resumes_the_source(
        c_workload: Path, tmp_path: Path, keep_stopped: bool,
        damage: Callable[[Path, Path], None]) -> None:
    """The copy step damages what the destination gets: the restore fails before the
    restored process runs, so nothing can have diverged and the source is resumed,
    the error says so; keep_stopped=True leaves it stopped."""
    exe = tmp_path / "pattern"
    shutil.copy(c_workload, exe)
    (tmp_path / "images").mkdir()

    async def damaging_copy(images: Path) -> Path:
        damage(exe, images)
        return images

    with Workload([str(exe), "--mib", "4", "--interval-ms", "50"]) as w:
        before = w.next_check()
        async with asyncio.timeout(60):
            with pytest.raises(lazymig.LazyMigError) as caught:
                await lazymig.migrate(w.pid, images_dir=tmp_path / "images",
                                      copy_images=damaging_copy, keep_stopped=keep_stopped,
                                      stdio=(0, 2, 2))
        notes = "\n".join(getattr(caught.value, "__notes__", []))
        if keep_stopped:
            assert f"the source, pid {w.pid}, is left stopped (keep_stopped)" in notes
            assert process_state(w.pid) == "T"
            os.kill(w.pid, signal.SIGCONT)
        else:
            assert f"the source, pid {w.pid}, was resumed: the restored copy never ran" in notes
        w.drain()
        assert same_memory(w.next_check(), before)  # it runs on, memory intact


class _StopServing(Exception):
    pass


@pytest.mark.asyncio
@pytest.mark.parametrize("keep_serving", [False, True])
async def test_serve_images_ends_with_its_clients_session(tmp_path: Path,
                                                          keep_serving: bool) -> None:
    """A dump on disk has no source to keep: as CRIU's ``page-server --lazy-pages``, the
    server ends when a client that took some pages closes its session (its restored
    process exited), unless it was asked to keep serving one restore after another."""
    address, pages = 0x6D0000000000, 8
    await lazymig.write_snapshot(tmp_path, [(address, bytes(pages * 4096))], pid=7)
    layout = LAYOUTS[WireVersion.V2]  # cmd, nr_pages, vaddr, dst_id

    async def one_page_then_close(server: lazymig.ImagesServer) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(layout.pack(7, 1, address, 7))  # PS_IOV_GET of one page
        await reader.readexactly(layout.size + 4096)
        writer.write(layout.pack(0x1023, 0, 0, 0))  # PS_IOV_CLOSE
        assert struct.unpack("=i", await reader.readexactly(4)) == (0,)
        writer.close()
        await writer.wait_closed()

    async with asyncio.timeout(30):
        if not keep_serving:
            async with lazymig.serve_images(tmp_path) as server:
                await one_page_then_close(server)
                served = await server.done
            assert (served.pages_served, served.pages_total) == (1, pages)
            return
        with pytest.raises(_StopServing):
            async with lazymig.serve_images(tmp_path, keep_serving=True) as server:
                for _ in range(2):
                    await one_page_then_close(server)
                await asyncio.sleep(0.2)
                assert not server.done.done()
                raise _StopServing
