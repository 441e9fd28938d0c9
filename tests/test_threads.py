"""Multi-threaded processes, dumped and restored by lazymig alone.

* threads.c (tests/workloads/threads.c says what it holds: per-thread TLS
  values, blocked signals and alternate signal stacks, workers rewriting
  their own memory without end, and checking all of it themselves), with a
  signal queued for each worker and one for the process:
  - a plain ``dump()`` restored through the API: the restored process has as
    many threads, under their dumped tids (the source is gone), each with its
    own mask, sigaltstack and queued signal, and,
    frozen again, each the state its core image holds (TLS, rseq, robust
    list, clear-tid, name...); its
    memory equals the pattern page by page; its self-checks stay clean and
    its workers go on; released, each worker takes its own signal (in
    itself, by its TLS) and one of them the process's;
  - ``lazymig.migrate`` (lazy: the workers fault on their memory while the
    others run), then the same checks;
  - the CLI workflow (``lazymig dump --lazy-pages``, ``lazy-pages
    --no-background``, ``restore --lazy-pages -d``), on loopback and across two
    network namespaces: every page comes through a fault, from whichever thread
    touches it while the others run;
  - ``crit`` decodes the thread images: the pstree entry lists the threads,
    one core image each with its mask, sigaltstack, queued signals and TLS.
* threads.c with a thread creating short-lived threads: each freeze holds
  them all; restored, it goes on creating and joining them.
* stopped (SIGSTOP) and as another user: every thread comes back stopped,
  with that user's credentials.
* CPython with a ``concurrent.futures.ThreadPoolExecutor`` hashing during the
  dump: after ``lazymig.migrate`` its workers go on computing correct chains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port, on_uvloop

import lazymig
from lazymig.dump import dump
from lazymig.dump.freeze import FrozenProcess
from lazymig.linux.ptrace import process_alive
from lazymig.proto.images import ImagesDir
from lazymig.restore import Restorer
from lazymig.testing import HostPair, Pattern, assert_memory_equal
from lazymig.testing.plugin import StartCommand
from lazymig.testing.workload import OutputLines, Workload

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

WORKLOADS = Path(__file__).parent / "workloads"
THREADS = 4
SIGRTMIN = signal.SIGRTMIN
SYS_TGKILL = 234
NOBODY = 65534
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def threads_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc is not None, "no C compiler on PATH"
    out = tmp_path_factory.mktemp("threads") / "threads"
    subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(out),
                    str(WORKLOADS / "threads.c")], check=True, capture_output=True)
    return out


def fields(line: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in (tok.split("=", 1) for tok in line.split()[1:])}


def next_check(lines: OutputLines) -> dict[str, int]:
    while not (line := lines.next(10.0)).startswith("CHECK"):
        pass
    return fields(line)


def status(pid: int, tid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def tids(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())


def worker_index(pid: int, tid: int) -> int:
    """The index i of the worker that blocks SIGRTMIN+i (0: the leader, which blocks
    them all)."""
    if tid == pid:
        return 0
    blocked = int(status(pid, tid)["SigBlk"], 16)
    return next((i for i in range(1, THREADS) if blocked >> (SIGRTMIN + i - 1) & 1), 0)


def queue_signals(pid: int) -> None:
    """SIGRTMIN+i for each worker i (it blocks it: pending in that thread), SIGUSR2
    for the process (every thread blocks it: pending in the process)."""
    for tid in tids(pid):
        if i := worker_index(pid, tid):
            assert _libc.syscall(SYS_TGKILL, pid, tid, SIGRTMIN + i) == 0
    os.kill(pid, signal.SIGUSR2)


def check_threads_of(pid: int) -> None:
    """Every thread is back, each with its own blocked and queued signals."""
    threads = tids(pid)
    assert len(threads) == THREADS and pid in threads
    assert sorted(worker_index(pid, t) for t in threads) == list(range(THREADS))
    for t in threads:
        st, i = status(pid, t), worker_index(pid, t)
        assert int(st["ShdPnd"], 16) == 1 << (signal.SIGUSR2 - 1)
        assert int(st["SigPnd"], 16) == (1 << (SIGRTMIN + i - 1) if i else 0)


async def check_restored(pid: int, lines: OutputLines, before: dict[str, int]) -> None:
    """The restored threads.c: same memory, clean self-checks, workers running; once
    released, each worker takes the signal queued for it and one thread the process's."""
    first = await asyncio.to_thread(next_check, lines)
    check = first
    while check["gens"] <= first["gens"]:  # every worker runs on
        check = await asyncio.to_thread(next_check, lines)
    for c in (first, check):
        assert (c["sum"], c["bad"], c["tbad"]) == (before["sum"], 0, 0), c
        assert (c["rt"], c["usr2"]) == (0, 0)
    os.kill(pid, signal.SIGUSR1)
    while not check["released"] or check["rt"] < THREADS - 1 or not check["usr2"]:
        check = await asyncio.to_thread(next_check, lines)
    check = await asyncio.to_thread(next_check, lines)
    assert (check["rt"], check["rtbad"], check["usr2"]) == (THREADS - 1, 0, 1), check
    assert (check["bad"], check["tbad"]) == (0, 0), check


async def same_thread_state(pid: int, images: ImagesDir) -> None:
    """Each thread of the restored process (frozen again to read it) has the state
    of the dumped thread whose TLS it has: what lazymig's freeze reads of it is
    what the thread's core image holds."""
    (tree,) = images.pstree()
    cores = {c.thread_info.gpregs.fs_base: c for c in map(images.core, tree.threads)}
    async with await FrozenProcess.freeze(pid) as fp:
        threads = fp.state.threads
    assert len(threads) == len(cores) == THREADS
    assert sorted(c.thread_core.sched_nice for c in cores.values()) == list(range(THREADS))
    for t in threads:
        core = cores.pop(t.regs.fs_base)  # its TLS: one dumped thread's
        tc = core.thread_core
        assert t.sigmask == tc.blk_sigset
        assert t.sigaltstack == (tc.sas.ss_sp, tc.sas.ss_size, tc.sas.ss_flags)
        assert t.robust_list == (tc.futex_rla, tc.futex_rla_len)
        assert t.clear_tid_addr == core.thread_info.clear_tid_addr
        assert t.comm == tc.comm
        assert t.sched[0] == tc.sched_nice
        assert t.regs.gs_base == core.thread_info.gpregs.gs_base
        if tc.HasField("rseq_entry"):
            assert t.rseq is not None
            assert (t.rseq.rseq_abi_pointer, t.rseq.rseq_abi_size, t.rseq.signature) == (
                tc.rseq_entry.rseq_abi_pointer, tc.rseq_entry.rseq_abi_size,
                tc.rseq_entry.signature)
        assert [raw[:4] for raw in t.pending_signals] == [
            s.siginfo[:4] for s in tc.signals_p.signals]


@contextlib.contextmanager
def threads_workload(threads_c: Path, mib: int) -> Iterator[tuple[Workload, dict[str, int]]]:
    with Workload([str(threads_c), "--threads", str(THREADS), "--mib", str(mib),
                   "--interval-ms", "50"]) as w:
        before = next_check(w.lines)
        queue_signals(w.pid)
        yield w, before


@pytest.mark.asyncio
async def test_threads_dumped_and_restored(tmp_path: Path, threads_c: Path) -> None:
    with threads_workload(threads_c, 4) as (w, before):
        await dump(w.pid, tmp_path)
        w.proc.wait(timeout=5)
        assert not process_alive(w.pid)
    read_fd, write_fd = os.pipe()
    restorer = Restorer(tmp_path, stdio=(0, write_fd, 2))
    try:
        result = await restorer.run()
    finally:
        os.close(write_fd)
    lines = OutputLines(read_fd)
    try:
        await asyncio.to_thread(check_threads_of, result.pid)
        # The source is gone: its threads' tids are free, and the threads have them back.
        (tree,) = ImagesDir(tmp_path).pstree()
        assert await asyncio.to_thread(tids, result.pid) == sorted(
            [result.pid, *tree.threads[1:]])
        await assert_memory_equal(result.pid, Pattern.of(w.ready))
        await same_thread_state(result.pid, ImagesDir(tmp_path))
        await check_restored(result.pid, lines, before)
    finally:
        restorer.kill()
        lines.close()


@pytest.mark.asyncio
async def test_threads_migrated_lazily(threads_c: Path) -> None:
    read_fd, write_fd = os.pipe()
    lines = OutputLines(read_fd)
    pid = 0
    try:
        with threads_workload(threads_c, 8) as (w, before):
            async with asyncio.timeout(60), \
                    lazymig.migrate(w.pid, stdio=(0, write_fd, 2)) as migration:
                os.close(write_fd)
                write_fd = -1
                pid = migration.process.pid
                await asyncio.to_thread(check_threads_of, pid)
                await check_restored(pid, lines, before)  # faulting while the others run
            result = await migration.done
        assert result.dump.lazy_pages > 0
        await assert_memory_equal(pid, Pattern.of(w.ready))
        check = await asyncio.to_thread(next_check, lines)
        assert (check["bad"], check["tbad"], check["rtbad"]) == (0, 0, 0)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lines.close()


@pytest.mark.asyncio
async def test_threads_migrated_with_the_three_clis_on_demand_only(
        lazymig_hosts: HostPair, lazymig_command: StartCommand, threads_c: Path,
        tmp_path: Path) -> None:
    """``lazy-pages --no-background``: every page the restored process gets, it gets
    through a fault, taken by whichever of its threads touches it while the others
    run (the leader reads its region, the workers rewrite theirs)."""
    hosts = lazymig_hosts
    loop = on_uvloop()
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    port = "27" if hosts.kind == "netns" else str(free_port())
    read_fd, write_fd = os.pipe()
    lines = OutputLines(read_fd)
    pid = 0
    try:
        with threads_workload(threads_c, 8) as (w, before), contextlib.ExitStack() as stack:
            dumper = await lazymig_command("dump", "-t", str(w.pid), "--lazy-pages", "--address",
                                           hosts.source.address, "--port", port, "-D",
                                           source_images, host=hosts.source, uvloop=loop)
            # Not every page is ever touched: the dumper never sees the transfer
            # complete, and its traced source is reaped only once it is gone.
            stack.callback(dumper.close)
            await asyncio.to_thread(shutil.copytree, source_images, images)
            daemon = await lazymig_command(
                "lazy-pages", "--page-server", "--no-background", "--address",
                hosts.source.address, "--port", port, "-D", images, host=hosts.destination,
                uvloop=loop)
            # --shell-job: its stdout (a pipe to the test) stays behind; write_fd instead
            restore = await lazymig_command("restore", "--lazy-pages", "-D", images, "-d",
                                            "--shell-job", host=hosts.destination, ready=False,
                                            stdout=write_fd, uvloop=loop)
            os.close(write_fd)
            write_fd = -1
            async with asyncio.timeout(30):
                assert await restore.wait() == 0, restore.log()
            while not (line := await asyncio.to_thread(lines.next, 10.0)).isdigit():
                pass  # a CHECK line may come before the pid the restorer prints
            pid = int(line)
            assert hosts.destination.owns(pid)
            await asyncio.to_thread(check_threads_of, pid)
            await check_restored(pid, lines, before)
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(30):
                await daemon.wait()
            faults = re.search(r"copied, .*?, (\d+) faults", daemon.log())
            assert faults is not None and int(faults[1]) > 0, daemon.log()
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lines.close()


def thread_states(pid: int) -> dict[int, str]:
    out = {}
    for tid in tids(pid):
        with contextlib.suppress(FileNotFoundError):
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
            out[tid] = raw[raw.rfind(b")") + 2:][:1].decode()
    return out


@pytest.mark.asyncio
async def test_threads_created_while_freezing_are_caught(tmp_path: Path,
                                                        threads_c: Path) -> None:
    """A thread that creates and joins 1 ms threads without end: each freeze holds
    every thread there is (seized until no new one appears), and the process, frozen
    with some short-lived thread half-way, is restored and goes on creating and
    joining them (pthread_join waits on the clear-tid word the kernel clears)."""
    with Workload([str(threads_c), "--threads", "2", "--churn", "--mib", "1",
                   "--interval-ms", "50"]) as w:
        before = next_check(w.lines)
        caught = 0
        for _ in range(5):
            async with await FrozenProcess.freeze(w.pid) as fp:
                states = await asyncio.to_thread(thread_states, w.pid)
                assert sorted(t.tid for t in fp.state.threads) == sorted(states)
                assert set(states.values()) == {"t"}, states  # all in a ptrace-stop
                caught += len(states) == 4  # a short-lived one among them
        assert caught  # (it lives 1 ms of each ~1.1)
        after = next_check(w.lines)
        assert after["churn"] > before["churn"] and after["tbad"] == 0
        await dump(w.pid, tmp_path)
        w.proc.wait(timeout=5)
    read_fd, write_fd = os.pipe()
    restorer = Restorer(tmp_path, stdio=(0, write_fd, 2))
    try:
        result = await restorer.run()
    finally:
        os.close(write_fd)
    lines = OutputLines(read_fd)
    try:
        first = await asyncio.to_thread(next_check, lines)
        check = first
        while check["churn"] < first["churn"] + 20:
            check = await asyncio.to_thread(next_check, lines)
        assert (check["bad"], check["tbad"], check["sum"]) == (0, 0, before["sum"])
        assert len(await asyncio.to_thread(tids, result.pid)) >= 3  # leader, worker, churner
    finally:
        restorer.kill()
        lines.close()


@pytest.mark.asyncio
async def test_stopped_threads_are_restored_stopped_as_nobody(tmp_path: Path,
                                                              threads_c: Path) -> None:
    """A job-control stopped process comes back stopped, every thread of it, and
    runs on with SIGCONT; the threads have the credentials the dump gives the
    process (cloned after they were set: a raw setresuid sets only its caller's)."""
    with threads_workload(threads_c, 1) as (w, before):
        os.kill(w.pid, signal.SIGSTOP)
        assert w.quiet_for(0.2)
        await dump(w.pid, tmp_path)
    images = ImagesDir(tmp_path)
    for tid in images.pstree()[0].threads:  # as if dumped from nobody's process
        core = images.core(tid)
        c = core.thread_core.creds
        c.uid = c.euid = c.suid = c.fsuid = c.gid = c.egid = c.sgid = c.fsgid = NOBODY
        del c.groups[:]
        c.cap_inh[:] = c.cap_prm[:] = c.cap_eff[:] = [0, 0]
        images.write_core(tid, core)
    read_fd, write_fd = os.pipe()
    restorer = Restorer(tmp_path, stdio=(0, write_fd, 2))
    try:
        result = await restorer.run()
    finally:
        os.close(write_fd)
    lines = OutputLines(read_fd)
    try:
        for _ in range(100):
            states = await asyncio.to_thread(thread_states, result.pid)
            if set(states.values()) == {"T"}:
                break
            await asyncio.sleep(0.02)
        assert len(states) == THREADS and set(states.values()) == {"T"}, states
        assert await asyncio.to_thread(lines.quiet_for, 0.2)
        for tid in states:
            st = await asyncio.to_thread(status, result.pid, tid)
            assert st["Uid"].split() == st["Gid"].split() == [str(NOBODY)] * 4
        os.kill(result.pid, signal.SIGCONT)
        first = await asyncio.to_thread(next_check, lines)
        check = first
        while check["gens"] <= first["gens"]:
            check = await asyncio.to_thread(next_check, lines)
        assert (check["sum"], check["bad"], check["tbad"]) == (before["sum"], 0, 0)
    finally:
        restorer.kill()
        lines.close()


@pytest.mark.crit
@pytest.mark.skipif(shutil.which("crit") is None, reason="crit is not installed")
@pytest.mark.asyncio
async def test_crit_decodes_the_thread_images(tmp_path: Path, threads_c: Path) -> None:
    with threads_workload(threads_c, 1) as (w, _):
        leader_mask = int(status(w.pid, w.pid)["SigBlk"], 16)
        await dump(w.pid, tmp_path, leave_running=True)
    pid = w.pid

    def decode(name: str) -> list[dict[str, object]]:
        out = subprocess.run(["crit", "decode", "-i", str(tmp_path / name)], check=True,
                             capture_output=True, timeout=60).stdout
        entries: list[dict[str, object]] = json.loads(out)["entries"]
        return entries

    (tree,) = await asyncio.to_thread(decode, "pstree.img")
    threads = tree["threads"]
    assert isinstance(threads, list) and len(threads) == THREADS and threads[0] == pid
    fs_bases = set()
    for tid in threads:
        (core,) = await asyncio.to_thread(decode, f"core-{tid}.img")
        tcore, info = core["thread_core"], core["thread_info"]
        assert isinstance(tcore, dict) and isinstance(info, dict)
        fs_bases.add(info["gpregs"]["fs_base"])
        assert info["clear_tid_addr"] and tcore["futex_rla"]
        pending = [base64.b64decode(s["siginfo"]) for s in
                   tcore.get("signals_p", {}).get("signals", [])]
        signos = [int.from_bytes(raw[:4], "little") for raw in pending]
        if tid == pid:
            assert tcore["blk_sigset"] == leader_mask and signos == []
            shared = core["tc"]["signals_s"]["signals"]  # type: ignore[index]
            assert [int.from_bytes(base64.b64decode(s["siginfo"])[:4], "little")
                    for s in shared] == [signal.SIGUSR2]
        else:
            (signo,) = signos
            i = signo - SIGRTMIN
            assert 1 <= i < THREADS
            assert tcore["blk_sigset"] == (1 << (signal.SIGUSR1 - 1) | 1 << (
                signal.SIGUSR2 - 1) | 1 << (signo - 1))
            assert tcore["sas"]["ss_size"] == 64 * 1024 and tcore["sas"]["ss_sp"]
            assert "tc" not in core  # the process's part is in the leader's core only
    assert len(fs_bases) == THREADS  # a TLS block each


@pytest.mark.asyncio
async def test_a_python_thread_pool_goes_on_hashing(tmp_path: Path) -> None:
    argv = [sys.executable, str(WORKLOADS / "pool.py"), "--workers", "3",
            "--interval-ms", "50"]
    read_fd, write_fd = os.pipe()
    lines = OutputLines(read_fd)
    pid = 0
    try:
        with Workload(argv) as w:
            before = next_check(w.lines)
            while before["workers"] < 3:  # every pool thread exists and has hashed
                before = next_check(w.lines)
            assert len(tids(w.pid)) >= 4
            async with asyncio.timeout(60), \
                    lazymig.migrate(w.pid, stdio=(0, write_fd, 2)) as migration:
                os.close(write_fd)
                write_fd = -1
                pid = migration.process.pid
            await migration.done
        assert len(tids(pid)) == len({t for t in tids(pid)}) >= 4
        first = await asyncio.to_thread(next_check, lines)
        check = first
        while check["done"] < first["done"] + 10:
            check = await asyncio.to_thread(next_check, lines)
        assert (check["sum"], check["bad"]) == (before["sum"], 0)
        assert check["done"] > before["done"]
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        lines.close()
