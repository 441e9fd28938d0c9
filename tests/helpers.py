"""The helpers test modules share (fixtures live in conftest.py; CRIU's peer in
criu_peer.py). A test module imports from here, never from another test module."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import uvloop
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from lazydump import PipeServer, page_pattern

from lazymig._aio import wait_fd
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.linux.procfs import read_status
from lazymig.linux.vm import read_memory
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.constants import PAGE_SIZE as P
from lazymig.proto.images import (
    CoreEntry,
    CredsEntry,
    MmEntry,
    SaEntry,
    TaskCoreEntry,
    ThreadCoreEntry,
    ThreadInfoX86,
    UserX86FpregsEntry,
    UserX86RegsEntry,
    UserX86XsaveEntry,
    VmaEntry,
)
from lazymig.proto.uffd import Event, Ioctl
from lazymig.proto.wire import WireVersion
from lazymig.restore import Restorer, RestoreResult
from lazymig.testing import Pattern, assert_memory_equal
from lazymig.testing.workload import Check, OutputLines, Ready, Workload, expected_page, parse_check
from lazymig.uffd.daemon import DaemonReport, LazyPagesDaemon
from lazymig.uffd.source import PageSource
from lazymig.uffd.uffd import Uffd

__all__ = [
    "BASE",
    "CRIT",
    "DUMP",
    "LAYOUTS",
    "LAZY_CHILD",
    "MAP_PRIVATE_ANON",
    "PAGES",
    "PORT",
    "REGS",
    "SEED",
    "TIMEOUT",
    "UFFD_CHILD",
    "VMA_ANON_PRIVATE",
    "Child",
    "DumpCli",
    "MiniClient",
    "Output",
    "attach_and_read",
    "cli",
    "code_blocks",
    "crit_decode",
    "expected",
    "finish",
    "free_port",
    "kill",
    "layout",
    "mm_entry",
    "on_uvloop",
    "output_pipe",
    "parse",
    "pipe_layout",
    "plain",
    "proc_state",
    "process_state",
    "raw",
    "resolve_child_path",
    "restore_and_check",
    "restore_and_compare",
    "restore_with_output",
    "run_daemon",
    "runs_unchanged",
    "serve_all_lazy",
    "spawn",
    "status_line",
    "stop",
    "uffd_events",
    "until",
    "vma",
    "wait_ready",
    "x86_core"
]


def free_port() -> int:
    """A TCP port that nothing on 127.0.0.1 listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LISTENER = """
import os, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
os.write(1, b"listening\\n")
time.sleep(600)
"""


async def listening_process(port: int) -> asyncio.subprocess.Process:
    """A process that listens on 127.0.0.1:``port`` and never accepts: what a page-server
    client meets while ``lazymig dump`` writes its images (it listens from its start).
    Kill it, and the connections queued in its backlog are reset."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _LISTENER, str(port),
                                                stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"listening\n"
    return proc


def on_uvloop() -> bool:
    """Whether the running loop is uvloop's (the conftest runs async tests on both)."""
    return isinstance(asyncio.get_running_loop(), uvloop.Loop)


class Output:
    """A pipe for a restored process's stdout: ``fd`` to give it, ``lines`` to read."""

    def __init__(self) -> None:
        read_fd, self.fd = os.pipe()
        self.lines = OutputLines(read_fd)

    def handed_over(self) -> None:
        """The restored process has its copy: close ours (once: fd numbers are reused)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def stdio(self) -> tuple[int, int, int]:
        return (0, self.fd, 2)


@contextlib.contextmanager
def output_pipe() -> Iterator[Output]:
    output = Output()
    try:
        yield output
    finally:
        output.handed_over()
        output.lines.close()


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("t": stopped by a tracer); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def attach_and_read(socket_path: Path, pid: int, address: int, size: int) -> int:
    """In a fresh process: map ``size`` bytes at ``address``, attach them to the daemon
    under image pid ``pid``, read them all; their CRC-32."""
    child = (
        "import sys, zlib, ctypes, lazymig\n"
        "from lazymig.demo.region import map_region\n"
        f"map_region({address}, {size // 4096})\n"
        f"lazymig.attach(sys.argv[1], {pid}, [({address}, {size})])\n"
        f"print(zlib.crc32(ctypes.string_at({address}, {size})), flush=True)\n")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", child, str(socket_path)],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


LAZY_CHILD = Path(__file__).with_name("lazy_child.py")


BASE = 0x6F0000000000


PAGES = 256  # 1 MiB per process


def layout(count: int, pages: int = PAGES) -> dict[int, list[tuple[int, int]]]:
    """``count`` image pids, each with one lazy VMA at its own address."""
    return {1000 + i: [(BASE + i * 2**30, pages)] for i in range(count)}


async def stop(task: asyncio.Task[object]) -> None:
    """Cancel a background task (the page server) and wait until it is gone."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def spawn(socket_path: Path, pid: int, vaddr: int, nr_pages: int, scenario: str
                ) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(LAZY_CHILD), str(socket_path), str(pid), hex(vaddr), str(nr_pages),
        scenario, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)


async def finish(child: asyncio.subprocess.Process) -> tuple[int, str]:
    out, _ = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out.decode()


async def run_daemon(images_dir: Path, source: PageSource, expect_tasks: int = 1,
                     **options: object) -> tuple[LazyPagesDaemon, asyncio.Task[DaemonReport]]:
    daemon = LazyPagesDaemon.from_images(source, images_dir, expect_tasks=expect_tasks,
                                         socket_path=images_dir / "lazy.sock", **options)
    task = asyncio.create_task(daemon.run())
    await daemon.ready.wait()
    return daemon, task


def code_blocks(text: str, lang: str | None = None) -> list[str]:
    """Fenced blocks of a Markdown page (of one language, if given)."""
    return [body for info, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
            if lang is None or info == lang]


class DumpCli:
    """``lazymig dump`` in a subprocess, with --status-fd on a pipe of ours."""

    def __init__(self, pid: int, images: Path, *extra: str, uvloop: bool = True) -> None:
        self.status_r, status_w = os.pipe()
        argv = [sys.executable, "-m", "lazymig", "-v", "--uvloop" if uvloop else "--no-uvloop",
                "dump", "-t", str(pid), "-D", str(images), "--status-fd", str(status_w),
                *extra]
        self.proc = subprocess.Popen(argv, pass_fds=(status_w,), stderr=subprocess.PIPE,
                                     text=True)
        os.close(status_w)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the zero byte on the status fd (failing with the CLI's stderr if it exits)."""
        try:
            readable, _, _ = select.select([self.status_r], [], [], timeout)
            if not readable or os.read(self.status_r, 1) != b"\0":
                self.proc.kill()
                raise AssertionError(f"lazymig dump never got ready: {self.stderr()}")
        finally:
            os.close(self.status_r)

    def wait_filled(self, timeout: float = 10.0) -> None:
        """Until the CLI logs that the lazy pages are in its page pipes: until then
        the source, frozen, runs the dump's injected vmsplice calls now and then
        (see lazymig.dump.late_fill)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while "lazy pages put into the page pipes" not in self.proc.stderr.readline():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("lazymig dump never filled its page pipes")

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        """The rest of its log (what wait_filled read is gone); printed too, so that a
        failed test shows it (pytest shows a failed test's output)."""
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if err:
            print(f"lazymig dump (pid {self.proc.pid}) logged:\n{err}")
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.stderr()


def serve_all_lazy(reader: PipeServer, scan: MemoryScan, pid: int, *, seed: int,
                   region: tuple[int, int]) -> int:
    """Serve every lazy page (twice for the first chunk of each run); pattern pages
    must match the formula, others the frozen target's memory. Returns pages seen."""
    seen = 0
    for run in (r for r in scan.runs if r.lazy):
        vaddr, first = run.vaddr, True
        while vaddr < run.end:
            n, data = reader.serve(vaddr, (run.end - vaddr) // PAGE_SIZE)
            assert n >= 1
            if first:  # served again: the same bytes, the pipe was not consumed
                assert reader.serve(vaddr, n) == (n, data)
                first = False
            if region[0] <= vaddr < region[1]:
                assert data == b"".join(expected_page(vaddr + i * PAGE_SIZE, seed)
                                        for i in range(n))
            else:
                assert data == read_memory(pid, vaddr, n * PAGE_SIZE)
            vaddr += n * PAGE_SIZE
            seen += n
    return seen


def proc_state(pid: int) -> tuple[str, int]:
    """(State letter, TracerPid) of /proc/PID/status."""
    status = read_status(pid)
    return status["State"][0], int(status["TracerPid"])


def runs_unchanged(w: Workload, reference_sum: int) -> None:
    """The workload runs on, untraced, with the same memory."""
    w.drain()
    check = w.next_check()
    assert (check.sum, check.bad) == (reference_sum, 0)
    assert proc_state(w.pid)[1] == 0


SEED = 0x1234_5678_9ABC_DEF0


def pipe_layout(base: int) -> list[PageRun]:
    p = PAGE_SIZE
    return [PageRun(base, 20, True), PageRun(base + 20 * p, 3, False),
            PageRun(base + 23 * p, 30, True), PageRun(base + 60 * p, 4, False)]


MAP_PRIVATE_ANON = 0x22


VMA_ANON_PRIVATE = 0x201


def vma(start: int, end: int, **kw: int) -> VmaEntry:
    fields = {"pgoff": 0, "shmid": 0, "prot": 3, "flags": MAP_PRIVATE_ANON,
              "status": VMA_ANON_PRIVATE, "fd": -1} | kw
    return VmaEntry(start=start, end=end, **fields)


def mm_entry(vmas: list[VmaEntry]) -> MmEntry:
    return MmEntry(mm_start_code=0x400000, mm_end_code=0x401000, mm_start_data=0x600000,
                   mm_end_data=0x601000, mm_start_stack=0x7ffd0000, mm_start_brk=0x1000000,
                   mm_brk=0x1021000, mm_arg_start=0x7ffd1000, mm_arg_end=0x7ffd1010,
                   mm_env_start=0x7ffd1010, mm_env_end=0x7ffd1100, exe_file_id=7,
                   mm_saved_auxv=[33, 0x7fff0000, 0, 0], vmas=vmas)


REGS = ["r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si",
        "di", "orig_ax", "ip", "cs", "flags", "sp", "ss", "fs_base", "gs_base", "ds", "es", "fs",
        "gs"]


def x86_core(comm: str = "sleeper") -> CoreEntry:
    regs = UserX86RegsEntry()
    for i, name in enumerate(REGS, start=1):
        setattr(regs, name, i)
    regs.ip = 0x7F00_DEAD_BEEF
    fpregs = UserX86FpregsEntry(cwd=0x37F, swd=0, twd=0, fop=0, rip=0, rdp=0, mxcsr=0x1F80,
                                mxcsr_mask=0xFFFF, st_space=[0] * 32, xmm_space=[1] * 64,
                                xsave=UserX86XsaveEntry(xstate_bv=7, ymmh_space=[2] * 64))
    return CoreEntry(
        mtype=CoreEntry.X86_64,
        thread_info=ThreadInfoX86(clear_tid_addr=0x7F00_0000_1000, gpregs=regs, fpregs=fpregs),
        tc=TaskCoreEntry(task_state=1, exit_code=0, personality=0, flags=0x400000,
                         blk_sigset=0, comm=comm,
                         sigactions=[SaEntry(sigaction=0, flags=0, restorer=0, mask=0)] * 2),
        thread_core=ThreadCoreEntry(futex_rla=0, futex_rla_len=24, sched_nice=0,
                                    creds=CredsEntry(uid=0, gid=0, euid=0, egid=0, suid=0,
                                                     sgid=0, fsuid=0, fsgid=0, secbits=0,
                                                     cap_eff=[0xFFFFFFFF, 0x1FF])),
    )


CRIT = shutil.which("crit")


def crit_decode(path: Path, *, pretty: bool = False) -> dict[str, Any]:
    assert CRIT is not None
    cmd = [CRIT, "decode", "-i", str(path)] + (["--pretty"] if pretty else [])
    out = subprocess.run(cmd, check=True, capture_output=True, timeout=60).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def plain(msg: Message) -> dict[str, Any]:
    """The dict crit's non-pretty pb2dict makes of *msg*: ints, enum names, base64 bytes."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        def one(v: Any, field: FieldDescriptor = field) -> Any:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                return plain(v)
            if field.type == FieldDescriptor.TYPE_ENUM:
                assert field.enum_type is not None
                return field.enum_type.values_by_number[v].name
            if field.type == FieldDescriptor.TYPE_BYTES:
                return base64.encodebytes(v).decode()
            return v
        out[field.name] = [one(v) for v in value] if field.is_repeated else one(value)
    return out


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller's asyncio.timeout bounds the wait)."""
    for _ in itertools.count():
        if condition():
            return
        await asyncio.sleep(0.01)


PORT = 27  # CRIU's default: free in a fresh namespace


GET, ADD_F, CLOSE, PE_PRESENT = 7, 6, 0x1023, 4


LAYOUTS = {WireVersion.V1: struct.Struct("=IIQQ"), WireVersion.V2: struct.Struct("=I4xQQQ")}


PID, OTHER = 4242, 77


DUMP = {PID: [(0x7F0000000000, 8), (0x7F0000100000, 3)], OTHER: [(0x500000, 2)]}


class MiniClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 wire: WireVersion) -> None:
        self.reader, self.writer, self.layout = reader, writer, LAYOUTS[wire]

    @classmethod
    async def connect(cls, port: int, wire: WireVersion) -> MiniClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, wire)

    def send(self, cmd: int, nr_pages: int, vaddr: int, dst_id: int) -> None:
        self.writer.write(self.layout.pack(cmd, nr_pages, vaddr, dst_id))

    async def get(self, pid: int, vaddr: int, nr_pages: int) -> tuple[int, bytes]:
        self.send(GET, nr_pages, vaddr, pid)
        cmd, got, reply_vaddr, dst_id = self.layout.unpack(
            await self.reader.readexactly(self.layout.size))
        assert (cmd, reply_vaddr, dst_id) == ((PE_PRESENT << 16) | ADD_F, vaddr, pid)
        return got, await self.reader.readexactly(got * PAGE_SIZE)

    async def close(self) -> int:
        self.send(CLOSE, 0, 0, 0)
        (status,) = struct.unpack("=i", await self.reader.readexactly(4))
        self.writer.close()
        await self.writer.wait_closed()
        return int(status)

    async def closed_by_server(self) -> bool:
        return await self.reader.read(1) == b""


def expected(pid: int, vaddr: int, nr_pages: int) -> bytes:
    return b"".join(page_pattern(pid, vaddr + i * PAGE_SIZE) for i in range(nr_pages))


def raw(wire: WireVersion, cmd: int, nr_pages: int, vaddr: int, dst_id: int) -> bytes:
    return LAYOUTS[wire].pack(cmd, nr_pages, vaddr, dst_id)


async def restore_and_compare(images: Path, ready: Ready, before: Check,
                              daemon: subprocess.Popen[Any], dumper: subprocess.Popen[Any],
                              restored: asyncio.Event | None = None) -> None:
    """Restore lazily (the restorer API), check the restored process's CHECK lines, wait
    for the daemon and the dumper to finish, then compare the workload's region page by
    page: the daemon is gone, so a page that never arrived would read as zeros.
    ``restored`` is set once the restore is done (the process runs)."""
    restorer, result, lines = await restore_with_output(images, lazy_pages=True)
    if restored is not None:
        restored.set()
    try:
        check = await asyncio.to_thread(lines.next_check, 60.0)
        assert (check.sum, check.bad) == (before.sum, 0)
        assert await asyncio.to_thread(daemon.wait, 120) == 0  # every page is in
        assert await asyncio.to_thread(dumper.wait, 30) == 0  # and the source released
        # The daemon said so to the guardian, which let go of the uffd and left.
        assert restorer.guardian is not None
        assert await asyncio.to_thread(restorer.guardian.wait, 10) == 0
        await assert_memory_equal(result.pid, Pattern.of(ready))
        check = await asyncio.to_thread(lines.next_check, 30.0)
        assert (check.sum, check.bad) == (before.sum, 0)
    finally:
        restorer.kill()
        lines.close()


def status_line(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith(key + ":"))


def wait_ready(fd: int, proc: subprocess.Popen[str], what: str, timeout: float = 10.0) -> None:
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable or os.read(fd, 1) != b"\0":
            proc.kill()
            raise AssertionError(f"{what} never got ready: {proc.communicate()[1]}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def cli(*args: str, status: bool = True, uvloop: bool = True,
        stdout: int | None = None) -> Iterator[tuple[subprocess.Popen[str], int | None]]:
    """``lazymig ARGS`` in a subprocess; yields it and the read end of its --status-fd."""
    r = w = None
    extra: list[str] = []
    if status:
        r, w = os.pipe()
        extra = ["--status-fd", str(w)]
    argv = [sys.executable, "-m", "lazymig", "-v", "--uvloop" if uvloop else "--no-uvloop",
            *args, *extra]
    proc = subprocess.Popen(argv, pass_fds=(w,) if w is not None else (), text=True,
                            stderr=subprocess.PIPE, stdout=stdout)
    if w is not None:
        os.close(w)
    try:
        yield proc, r
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


async def restore_with_output(images: Path, *, lazy_pages: bool = False,
                              new_pids: bool = False
                              ) -> tuple[Restorer, RestoreResult, OutputLines]:
    """Restore with the restored process's stdout on a pipe read by ``OutputLines``; the
    caller kills the restorer and closes the lines."""
    read_fd, write_fd = os.pipe()
    restorer = Restorer(images, lazy_pages=lazy_pages, stdio=(0, write_fd, 2),
                        new_pids=new_pids)
    try:
        result = await restorer.run()
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return restorer, result, OutputLines(read_fd)


async def restore_and_check(images: Path, before: Check, loop: bool,
                            daemon: subprocess.Popen[Any], dumper: subprocess.Popen[Any], *,
                            wrapper: Sequence[str] = (), log_dir: Path | None = None,
                            check_pid: Callable[[int], None] | None = None) -> int:
    """``lazymig restore --lazy-pages -d`` (run under ``wrapper``, e.g. ``ip netns exec
    NS``), then the restored process's CHECK lines; returns its pid (killed again at
    the end). ``check_pid`` may inspect the restored process before it is checked."""
    read_fd, write_fd = os.pipe()
    argv = [*wrapper, sys.executable, "-m", "lazymig", "--uvloop" if loop else "--no-uvloop",
            "restore", "--lazy-pages", "-D", str(images), "-d", "--shell-job"]
    # Not stderr=PIPE: the restored process inherits the restorer's fds 0-2, so a
    # pipe would stay open as long as it runs.
    with ((log_dir or images) / "restore.log").open("w+") as log:
        try:
            restore = await asyncio.to_thread(subprocess.run, argv, stdout=write_fd,
                                              stderr=log, timeout=30)
        finally:
            os.close(write_fd)
        log.seek(0)
        errors = log.read()
    lines = OutputLines(read_fd)
    restored_pid = 0
    try:
        assert restore.returncode == 0, errors
        # The restorer prints the pid, but the restored process already runs and
        # shares its stdout: a CHECK line may come first.
        early: list[Check] = []
        while not restored_pid:
            line = await asyncio.to_thread(lines.next)
            if line.startswith("CHECK"):
                early.append(parse_check(line))
            elif line:  # the newline of a line split by a dump (see testing/pattern.py)
                restored_pid = int(line)
        assert all((c.sum, c.bad) == (before.sum, 0) for c in early), early
        if check_pid is not None:
            check_pid(restored_pid)
        for _ in range(3):
            check = await asyncio.to_thread(lines.next_check)
            assert (check.sum, check.bad) == (before.sum, 0)
        assert await asyncio.to_thread(daemon.wait, 20) == 0  # every page is in
        assert await asyncio.to_thread(dumper.wait, 10) == 0
        check = await asyncio.to_thread(lines.next_check)
        assert (check.sum, check.bad) == (before.sum, 0)
    finally:
        if restored_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restored_pid, signal.SIGKILL)
        lines.close()
    return restored_pid


def parse(line: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.split()[1:])


UFFD_CHILD = Path(__file__).with_name("uffd_child.py")


TIMEOUT = 15


def resolve_child_path(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Child:
    """A running tests/uffd_child.py and our end of its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket,
                 hello: dict[str, Any], uffd: Uffd) -> None:
        self.proc, self.sock, self.uffd = proc, sock, uffd
        self.addr: int = hello["addr"]
        self.npages: int = hello["npages"]
        self.pid: int = hello["pid"]
        self.ioctls = Ioctl(hello["ioctls"])

    @classmethod
    async def start(cls, npages: int, features: int) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, str(UFFD_CHILD), str(theirs.fileno()), str(npages), str(features)]
        proc = await asyncio.to_thread(subprocess.Popen, argv, pass_fds=[theirs.fileno()])
        theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(ours.fileno(), resolve_child_path, ready)
        try:
            await ready
        finally:
            loop.remove_reader(ours.fileno())
        msg, fds, _, _ = socket.recv_fds(ours, 4096, 1)
        assert msg, "the child died before sending its uffd"
        assert len(fds) == 1
        hello = json.loads(msg)
        return cls(proc, ours, hello, Uffd.from_fd(fds[0], pid=hello["pid"]))

    def page(self, i: int) -> int:
        return self.addr + i * P

    async def send(self, **cmd: Any) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, json.dumps(cmd).encode())

    async def recv(self) -> dict[str, Any]:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        assert data, "the child closed its socket"
        reply: dict[str, Any] = json.loads(data)
        assert "error" not in reply, reply["error"]
        return reply

    async def call(self, **cmd: Any) -> dict[str, Any]:
        await self.send(**cmd)
        return await self.recv()

    async def exit(self) -> None:
        await self.send(op="exit")
        assert await asyncio.to_thread(self.proc.wait, TIMEOUT) == 0

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, TIMEOUT)
        self.sock.close()


async def uffd_events(uffd: Uffd) -> list[Event]:
    """The next messages of non-blocking ``uffd``, at least one: read first, and wait
    for the fd to be readable only when nothing is queued (as the daemon's reader)."""
    while not (events := uffd.read_events()):
        await wait_fd(uffd.fd)
    return events


@contextlib.contextmanager
def started(argv: list[str], log: Path | None = None, *, stdin: int = subprocess.DEVNULL,
            stdout: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` in a session of its own, its output to ``log`` (or ``stdout``);
    killed and reaped on leaving."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else stdout
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
