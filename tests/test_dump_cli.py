"""``lazymig dump`` end to end: a real workload, the CLI in a subprocess (real ptrace),
and an independent page-server client over real TCP.

The client is test_page_server's ``MiniClient``, written from the protocol
description rather than with lazymig's codec. It fetches every lazy page the
pagemap lists (one GET per entry, following clamped replies) and compares each
with the pattern the workload wrote, or with the frozen source's own memory.
Each async test runs on both loops, and the CLI runs on the same kind of loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DumpCli, MiniClient, free_port, on_uvloop, proc_state

from lazymig.dump.images import read_lazymig_entry
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images import ImagesDir, PagemapEntry
from lazymig.proto.pageserver import DEFAULT_MAX_PAGES
from lazymig.proto.wire import WireVersion
from lazymig.testing.workload import Workload, expected_page, python_workload_argv

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root"),
]

CRIT = shutil.which("crit")
SA_RESTART = 0x10000000


@pytest.fixture
def workload(c_workload: Path) -> Iterator[Workload]:
    with Workload([str(c_workload), "--mib", "4", "--locked-kib", "64",
                   "--interval-ms", "50"]) as w:
        yield w


def frozen_by(pid: int, tracer_pid: int) -> bool:
    """``pid`` is in a ptrace-stop, traced by a thread of process ``tracer_pid``."""
    state, tracer = proc_state(pid)
    return state == "t" and Path(f"/proc/{tracer_pid}/task/{tracer}").exists()


def split_pagemap(images: ImagesDir, pid: int) -> tuple[list[PagemapEntry], list[PagemapEntry]]:
    """(PE_PRESENT entries, PE_LAZY entries); nothing else in a --lazy-pages dump."""
    pagemap = images.pagemap(pid)
    assert pagemap.pages_id == 1
    assert all(e.flags in (PE.PRESENT, PE.LAZY) for e in pagemap.entries)
    return ([e for e in pagemap.entries if e.flags == PE.PRESENT],
            [e for e in pagemap.entries if e.flags == PE.LAZY])


def expected_bytes(w: Workload, vaddr: int, nr_pages: int) -> bytes:
    """The pattern where the workload wrote one, else the frozen source's memory."""
    out = []
    for i in range(nr_pages):
        page = vaddr + i * PAGE_SIZE
        regions = [(w.ready.addr, w.ready.size), (w.ready.locked, w.ready.locked_size)]
        if any(start <= page < start + size for start, size in regions):
            out.append(expected_page(page, w.ready.seed))
        else:
            out.append(read_memory(w.pid, page, PAGE_SIZE))
    return b"".join(out)


def check_pages_image(images: ImagesDir, w: Workload, present: list[PagemapEntry]) -> None:
    """pages-1.img holds the PE_PRESENT pages, in pagemap order, as the source has them."""
    data = images.pages_path(1).read_bytes()
    offset = 0
    for e in present:
        size = e.nr_pages * PAGE_SIZE
        assert data[offset: offset + size] == expected_bytes(w, e.vaddr, e.nr_pages)
        offset += size
    assert offset == len(data)


async def fetch_lazy(client: MiniClient, w: Workload, lazy: list[PagemapEntry]) -> int:
    """One GET per lazy entry, then more from where a clamped reply stopped; returns GETs.

    A GET asks for at most the server's limit (DEFAULT_MAX_PAGES, 4 MiB), as a daemon
    does: an entry may be longer (the workload's region merged with a neighbouring
    mapping's pages, now and then), and a longer GET ends the connection."""
    gets = 0
    for e in lazy:
        vaddr = e.vaddr
        while vaddr < e.end:
            asked = min((e.end - vaddr) // PAGE_SIZE, DEFAULT_MAX_PAGES)
            got, data = await client.get(w.pid, vaddr, asked)
            gets += 1
            assert 1 <= got <= asked
            assert data == expected_bytes(w, vaddr, got)
            vaddr += got * PAGE_SIZE
    return gets


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_lazy_dump_serves_every_page_then_kills_the_source(
        kind: str, tmp_path: Path, c_workload: Path) -> None:
    # 6 MiB: a lazy entry longer than one GET may ask for, every time (not only when the
    # region happens to merge with a neighbour: a test's GET of 1,026 pages failed so).
    argv = ([str(c_workload), "--mib", "6", "--locked-kib", "64", "--interval-ms", "50"]
            if kind == "c" else python_workload_argv("--mib", "2", "--interval-ms", "50"))
    wire = WireVersion.V2 if kind == "c" else WireVersion.V1
    port = free_port()
    with Workload(argv) as w:
        w.next_check()
        cli = DumpCli(w.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                      "--port", str(port), "--wire", wire.value, uvloop=on_uvloop())
        try:
            await asyncio.to_thread(cli.wait_ready)
            await asyncio.to_thread(cli.wait_filled)
            assert frozen_by(w.pid, cli.proc.pid)
            images = ImagesDir(tmp_path)
            present, lazy = split_pagemap(images, w.pid)
            region = range(w.ready.addr, w.ready.addr + w.ready.size, PAGE_SIZE)
            assert all(any(e.vaddr <= a < e.end for e in lazy) for a in region)
            assert present  # at least the page holding the stack pointer
            check_pages_image(images, w, present)
            assert read_lazymig_entry(images, w.pid).lazy_pages
            if kind == "c":
                assert any(e.nr_pages > DEFAULT_MAX_PAGES for e in lazy)

            client = await MiniClient.connect(port, wire)
            gets = await fetch_lazy(client, w, lazy)
            assert gets >= len(lazy)
            assert await client.close() == 0
            assert await asyncio.to_thread(cli.wait) == 0
        finally:
            cli.kill()
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # CRIU's default end


async def connect_at_once(port: int) -> MiniClient:
    """Connect as soon as ``lazymig dump`` listens (its first act, before its imports)."""
    while True:
        try:
            return await MiniClient.connect(port, WireVersion.V2)
        except ConnectionRefusedError:
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_a_get_sent_before_the_dump_is_ready_is_answered_once_it_is(
        tmp_path: Path, workload: Workload) -> None:
    """The page server's socket listens from the command's start: a client that connects
    and sends a GET at the earliest moment waits in the backlog while the process is
    frozen and dumped, and is answered once the images are written, with the pages the
    late fill is still putting into the pipes (its GET hurries the one it needs)."""
    port = free_port()
    cli = DumpCli(workload.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                  "--port", str(port), uvloop=on_uvloop())
    try:
        client = await connect_at_once(port)
        last = workload.ready.addr + workload.ready.size - PAGE_SIZE
        early = asyncio.ensure_future(client.get(workload.pid, last, 1))  # sent at once
        await asyncio.sleep(0)
        assert cli.proc.poll() is None
        await asyncio.to_thread(cli.wait_ready)
        got, data = await asyncio.wait_for(early, 30)
        assert (got, data) == (1, expected_page(last, workload.ready.seed))
        await fetch_lazy(client, workload, split_pagemap(ImagesDir(tmp_path), workload.pid)[1])
        assert await client.close() == 0
        assert await asyncio.to_thread(cli.wait) == 0
    finally:
        cli.kill()
    assert workload.proc.wait(timeout=5) == -signal.SIGKILL


@pytest.mark.asyncio
async def test_leave_running_and_a_hostile_connection(tmp_path: Path,
                                                      workload: Workload) -> None:
    before = workload.next_check()
    port = free_port()
    cli = DumpCli(workload.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                  "--port", str(port), "--leave-running", uvloop=on_uvloop())
    try:
        await asyncio.to_thread(cli.wait_ready)
        # Garbage ends only its own connection.
        hostile = await MiniClient.connect(port, WireVersion.V2)
        hostile.writer.write(b"\xff" * 64)
        assert await hostile.closed_by_server()
        hostile.writer.close()

        client = await MiniClient.connect(port, WireVersion.V2)
        await fetch_lazy(client, workload, split_pagemap(ImagesDir(tmp_path), workload.pid)[1])
        assert await client.close() == 0
        assert await asyncio.to_thread(cli.wait) == 0
        err = cli.stderr()
    finally:
        cli.kill()
    assert "connection closed" in err and "migrated" in err
    workload.drain()
    after = workload.next_check()
    assert (after.sum, after.bad) == (before.sum, 0)
    assert proc_state(workload.pid)[1] == 0


@pytest.mark.asyncio
async def test_sigterm_after_a_disconnect_leaves_the_source_stopped(
        tmp_path: Path, workload: Workload) -> None:
    before = workload.next_check()
    port = free_port()
    cli = DumpCli(workload.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                  "--port", str(port), uvloop=on_uvloop())
    try:
        await asyncio.to_thread(cli.wait_ready)
        lazy = split_pagemap(ImagesDir(tmp_path), workload.pid)[1]
        client = await MiniClient.connect(port, WireVersion.V2)
        await client.get(workload.pid, lazy[0].vaddr, 1)
        client.writer.close()  # gone without CLOSE: the server keeps waiting
        await client.writer.wait_closed()
        await asyncio.sleep(0.1)
        assert cli.proc.poll() is None
        cli.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(cli.wait) == 128 + signal.SIGTERM
        err = cli.stderr()
    finally:
        cli.kill()
    assert f"pid {workload.pid} left stopped with its memory intact" in err
    assert f"kill -CONT {workload.pid}" in err
    assert proc_state(workload.pid) == ("T", 0)  # job-control stopped, nobody traces it
    workload.drain()  # lines printed before the freeze
    assert workload.quiet_for(0.2)
    region = read_memory(workload.pid, workload.ready.addr, 16 * PAGE_SIZE)
    assert region == expected_bytes(workload, workload.ready.addr, 16)
    os.kill(workload.pid, signal.SIGCONT)
    workload.drain()
    after = workload.next_check()
    assert (after.sum, after.bad) == (before.sum, 0)


def crit_decode(path: Path) -> dict[str, Any]:
    assert CRIT is not None
    out = subprocess.run([CRIT, "decode", "-i", str(path)], check=True, capture_output=True,
                         timeout=30).stdout
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.skipif(CRIT is None, reason="crit is not installed (Debian package criu)")
def test_plain_dump_decodes_with_crit(tmp_path: Path, workload: Workload,
                                      c_workload: Path) -> None:
    cli = DumpCli(workload.pid, tmp_path, uvloop=True)
    try:
        cli.wait_ready()
        assert cli.wait() == 0
    finally:
        cli.kill()
    assert workload.proc.wait(timeout=5) == -signal.SIGKILL
    pid = workload.pid
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["inventory.img", "pstree.img", f"core-{pid}.img", f"mm-{pid}.img",
                            f"pagemap-{pid}.img", "pages-1.img", f"lazymig-{pid}.img",
                            "fdinfo-1.img", "files.img", "pipes-data.img"])
    decoded = {name: crit_decode(tmp_path / name) for name in names
               if name not in ("pages-1.img", f"lazymig-{pid}.img")}
    assert {d["magic"] for d in decoded.values()} == {"INVENTORY", "PSTREE", "CORE", "MM",
                                                      "PAGEMAP", "FDINFO", "FILES", "PIPES_DATA"}
    assert CRIT is not None
    failed = subprocess.run([CRIT, "decode", "-i", str(tmp_path / f"lazymig-{pid}.img")],
                            check=False, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0 and "Unknown magic" in failed.stdout + failed.stderr

    (pstree,) = decoded["pstree.img"]["entries"]
    assert pstree["pid"] == pid and pstree["threads"] == [pid]
    (core,) = decoded[f"core-{pid}.img"]["entries"]
    assert core["mtype"] == "X86_64" and core["tc"]["comm"] == "pattern"
    assert core["tc"]["blk_sigset"] == core["thread_core"]["blk_sigset"] == 1 << 11  # SIGUSR2
    # CRIU's order: signals 1..64 without SIGKILL and SIGSTOP.
    signals = [s for s in range(1, 65) if s not in (signal.SIGKILL, signal.SIGSTOP)]
    usr1 = core["tc"]["sigactions"][signals.index(signal.SIGUSR1)]
    assert usr1["flags"] & SA_RESTART and usr1["mask"] == 1 << 11
    assert core["thread_info"]["gpregs"]["fs_base"] != "0x0"
    assert core["thread_info"]["fpregs"]["mxcsr"] & 0x1F80 == 0x1F80

    # Every page has its data in pages-1.img; the pattern region is the workload's.
    images = ImagesDir(tmp_path)
    pagemap = images.pagemap(pid)
    assert all(PE.PRESENT in e.flags for e in pagemap.entries)
    data = images.pages_path(1).read_bytes()
    assert len(data) == sum(e.nr_pages for e in pagemap.entries) * PAGE_SIZE
    _, index = images.page_index(pid)
    for addr in (workload.ready.addr, workload.ready.addr + workload.ready.size - PAGE_SIZE,
                 workload.ready.locked):
        offset = index.offset(addr)
        assert offset is not None
        assert data[offset: offset + PAGE_SIZE] == expected_page(addr, workload.ready.seed)
    region = next(e for e in pagemap.entries if e.vaddr <= workload.ready.addr < e.end)
    assert region.flags == PE.LAZY | PE.PRESENT  # lazy-capable, as CRIU marks it

    mm = images.mm(pid)
    files = {f.id: f for f in read_lazymig_entry(images, pid).files}
    assert files[mm.exe_file_id].path == str(c_workload)
    assert any(v.start <= workload.ready.addr < v.end and v.shmid == 0 for v in mm.vmas)
    assert any(files[v.shmid].path.endswith(".so.6") for v in mm.vmas if v.shmid)


def test_a_killed_dumper_does_not_take_the_source_with_it(tmp_path: Path,
                                                          workload: Workload) -> None:
    """SIGKILL cannot be caught: the kernel detaches the source, which must run on
    (not die of the SIGTRAP an injected syscall left it stopped on)."""
    before = workload.next_check()
    cli = DumpCli(workload.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                  "--port", str(free_port()))
    try:
        cli.wait_ready()
        cli.wait_filled()  # not while the source runs an injected call: see late_fill
        assert frozen_by(workload.pid, cli.proc.pid)
        cli.proc.kill()
        assert cli.wait() == -signal.SIGKILL
    finally:
        cli.kill()
    workload.drain()
    after = workload.next_check()
    assert (after.sum, after.bad) == (before.sum, 0)
    assert proc_state(workload.pid) in (("S", 0), ("R", 0))


def test_a_ctrl_c_that_reached_the_source_too_is_named(tmp_path: Path,
                                                        workload: Workload) -> None:
    """A terminal's Ctrl-C goes to its whole foreground process group: a frozen source
    that shares the dumper's gets it too, and dies of it as soon as it runs again. The
    hint (or, had it died already, the error) says so, and what to do; a source left
    stopped without that hint survives `kill -CONT`."""
    cli = DumpCli(workload.pid, tmp_path, "--lazy-pages", "--address", "127.0.0.1",
                  "--port", str(free_port()))
    try:
        cli.wait_ready()
        cli.wait_filled()  # the source no longer runs injected code: the signal waits
        os.kill(workload.pid, signal.SIGINT)  # as the group's signal reaches it
        cli.proc.send_signal(signal.SIGINT)
        assert cli.wait() == 128 + signal.SIGINT
        err = cli.stderr()
    finally:
        cli.kill()
    if f"pid {workload.pid} left stopped" not in err:
        assert "it died of the SIGINT it got while frozen" in err, err
        assert "a session of its own, `setsid`" in err
        return
    assert proc_state(workload.pid)[0] == "T"
    os.kill(workload.pid, signal.SIGCONT)
    if "But SIGINT is pending for it, and would kill it as soon as it runs" in err:
        assert "a session of its own, `setsid`" in err
        assert workload.proc.wait(timeout=10) == -signal.SIGINT  # as the hint warns
    else:
        workload.drain()
        workload.next_check()  # it runs on
