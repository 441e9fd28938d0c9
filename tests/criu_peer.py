"""Real CRIU 4.1.1 as a test peer: the chroot it lives in, workloads, and criu runs.

Debian 12's own criu cannot run on recent kernels, so ``scripts/criu-peer.sh``
(a copy of the shared peers/criu/setup.sh) debootstraps a Debian 13 root at
``$CRIU_ROOT`` (default /opt/criu-root) with criu 4.1.1 in it. What CRIU needs
from the processes it dumps and restores (see that script's README):

* they run inside the chroot, as the init of their own pid namespace
  (``unshare --pid --fork``, no ``--mount-proc``: a mount namespace whose root
  is not the task's root cannot be dumped, "The root task has another root
  than mntns"), and lead their own session ("A session leader of X is outside
  of its pid namespace");
* they hold no fd opened outside the chroot ("Can't lookup mount=... for fd"):
  every fd of the workload is opened by a shell inside the chroot;
* they sleep to absolute deadlines (a dump interrupts sleeps).

Directories live below ``$CRIU_ROOT/tmp`` so that the same files are reachable
from the host (lazymig runs there) and from inside the chroot (criu).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import free_port, process_state

from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.images import ImagesDir

ROOT = Path(os.environ.get("CRIU_ROOT", "/opt/criu-root"))
CRIU = ROOT / "usr/sbin/criu"
REPO = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO / "scripts" / "criu-peer.sh"
WORKLOAD_SOURCE = Path(__file__).resolve().parent / "workloads" / "criu_pattern.c"
PIPE_MAX_WANTED = 4 * 1024 * 1024
"""CRIU's lazy page server (in ``criu lazy-pages``, too) needs pipes of ~3.2 MiB."""

PATTERN_MAGIC = 0x6C617A796D696700
"""As in criu_pattern.c: page i of the process with tag t holds (MAGIC | t, i) repeated."""


def page_pattern(tag: int, index: int) -> bytes:
    """The 4 KiB that page ``index`` of criu_pattern's area holds in the process tagged ``tag``."""
    return struct.pack("<QQ", PATTERN_MAGIC | tag, index) * (PAGE_SIZE // 16)


def page_digest(data: bytes | bytearray | memoryview) -> str:
    """A short digest of a page's bytes (what the checks compare, rather than 4 KiB)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# -- the chroot --------------------------------------------------------------------------


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def _mount_points() -> set[str]:
    """Mount points of this mount namespace (os.path.ismount misses a bind of a dir on itself)."""
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
        points.add(line.split()[4].encode().decode("unicode_escape"))
    return points


_PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


def pipe_max_size() -> int:
    return int(_PIPE_MAX_SIZE.read_text())


@contextlib.contextmanager
def criu_root_ready() -> Iterator[None]:
    """The chroot ready for CRIU while the block runs.

    The script raises the global fs.pipe-max-size (CRIU's lazy page server needs
    it; lazymig must not). If it was low before, it is put back afterwards, so
    that tests running later see the machine's default.
    """
    before = pipe_max_size()
    ensure_criu_root()
    try:
        yield
    finally:
        if before < PIPE_MAX_WANTED and pipe_max_size() != before:
            _PIPE_MAX_SIZE.write_text(f"{before}\n")


def criu_root_problem() -> str | None:
    """Why the chroot cannot run CRIU as is (None when it can)."""
    if not CRIU.exists():
        return f"{CRIU} is missing"
    mounted = _mount_points()
    for mnt in (ROOT, ROOT / "proc", ROOT / "dev", ROOT / "run"):
        if str(mnt) not in mounted:
            return f"{mnt} is not mounted"
    pipe_max = pipe_max_size()
    if pipe_max < PIPE_MAX_WANTED and not _has_cap_sys_resource():
        return f"fs.pipe-max-size is {pipe_max}"
    return None


def ensure_criu_root(timeout: float = 900) -> None:
    """Run ``scripts/criu-peer.sh`` (idempotent) unless the chroot is ready already.

    Raises:
        RuntimeError: the script failed; its output is in the message.
    """
    if criu_root_problem() is None:
        return
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], env={**os.environ, "CRIU_ROOT": str(ROOT)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    problem = criu_root_problem()
    if proc.returncode or problem:
        raise RuntimeError(f"{SETUP_SCRIPT} failed (rc {proc.returncode}, {problem}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def build_static(source: Path | str, dest: Path, *flags: str) -> Path:
    """Compile C ``source`` (a path, or the program's text, written to ``dest``.c) with
    the host's gcc into ``dest``, statically: so that it runs inside the CRIU chroot
    too. The one compile of every C workload of the CRIU tests and benchmarks."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler on the host (gcc)")
    if isinstance(source, str):
        path = dest.with_suffix(".c")
        path.write_text(source)
        source = path
    subprocess.run([gcc, "-static", *flags, "-O2", "-Wall", "-I", str(WORKLOAD_SOURCE.parent),
                    "-o", str(dest), str(source)], check=True, capture_output=True, timeout=120)
    return dest


def build_workload(dest: Path) -> Path:
    """Compile criu_pattern.c statically with the host's gcc into ``dest``."""
    return build_static(WORKLOAD_SOURCE, dest)


FORKER_SOURCE = r"""
/*
 * criu_forker MIB: criu_pattern with one process (tag 0) that forks checking
 * children once it got SIGUSR1: at once, from the signal handler (so that the
 * fork comes within moments of the signal, scanning or asleep), and then at
 * the start of every tick. A child checks the whole area, prints
 *     child tick K pid P sum 0xS bad B
 * (same hash and pattern as criu_pattern) and exits; SIGCHLD is ignored, so
 * children are reaped by the kernel. Send SIGUSR1 to the restored copy only:
 * it then forks while its pages are still lazy (UFFD_EVENT_FORK).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "say.h"

#define PAGE 4096UL
#define PATTERN_MAGIC 0x6c617a796d696700ULL
#define INTERVAL_NS 100000000L

static uint64_t *mem;
static size_t pages;
static volatile sig_atomic_t forking;
static volatile unsigned long tick;

static uint64_t scan(size_t *bad)
{
    uint64_t sum = 0xcbf29ce484222325ULL;
    *bad = 0;
    for (size_t i = 0; i < pages; i++) {
        const uint64_t *p = mem + i * (PAGE / 8);
        int ok = 1;
        for (size_t w = 0; w < PAGE / 8; w++) {
            sum = (sum ^ p[w]) * 0x100000001b3ULL;
            if (p[w] != ((w & 1) ? i : PATTERN_MAGIC))
                ok = 0;
        }
        *bad += !ok;
    }
    return sum;
}

static void spawn(void)
{
    char line[160];
    size_t bad;

    if (fork() != 0)
        return;
    uint64_t sum = scan(&bad);
    snprintf(line, sizeof(line), "child tick %lu pid %d sum %#018llx bad %zu\n",
             (unsigned long)tick, (int)getpid(), (unsigned long long)sum, bad);
    say(line);
    _exit(0);
}

static void on_usr1(int sig)
{
    (void)sig;
    int saved = errno;
    if (!forking) {
        forking = 1;
        spawn();
    }
    errno = saved;
}

int main(int argc, char **argv)
{
    char line[160];
    struct timespec next;
    size_t bad;

    if (argc != 2)
        return 2;
    pages = strtoul(argv[1], NULL, 10) * (1024 * 1024 / PAGE);
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == 0 || mem == MAP_FAILED)
        return 1;
    for (size_t i = 0; i < pages; i++)
        for (size_t w = 0; w < PAGE / 8; w += 2) {
            mem[i * (PAGE / 8) + w] = PATTERN_MAGIC;
            mem[i * (PAGE / 8) + w + 1] = i;
        }
    signal(SIGCHLD, SIG_IGN);
    signal(SIGUSR1, on_usr1);
    snprintf(line, sizeof(line), "start tag 0 pid %d addr %#lx pages %zu\n",
             (int)getpid(), (unsigned long)mem, pages);
    say(line);
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;; tick++) {
        if (forking)
            spawn();
        uint64_t sum = scan(&bad);
        snprintf(line, sizeof(line), "tick %lu tag 0 sum %#018llx bad %zu\n",
                 (unsigned long)tick, (unsigned long long)sum, bad);
        say(line);
        next.tv_nsec += INTERVAL_NS;
        if (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
            ;
    }
}
"""


_CHILD_TICK = re.compile(r"child tick (\d+) pid (\d+) sum (0x[0-9a-f]+) bad (\d+)$")


@dataclass(frozen=True)
class ChildTick:
    """A ``child tick`` line of criu_forker: what a child forked at that tick saw."""

    tick: int
    pid: int
    checksum: int
    bad_pages: int


def child_ticks(log: Path) -> list[ChildTick]:
    """The ``child tick`` lines criu_forker wrote to ``log`` so far."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [ChildTick(int(m[1]), int(m[2]), int(m[3], 16), int(m[4]))
            for line in text.splitlines() if (m := _CHILD_TICK.match(line))]


def build_forker(dest: Path) -> Path:
    """Compile :data:`FORKER_SOURCE` statically into ``dest``."""
    return build_static(FORKER_SOURCE, dest)


@dataclass
class ChrootDir:
    """A directory below ``$CRIU_ROOT/tmp``, seen from the host and from inside the chroot."""

    host: Path

    @property
    def inner(self) -> str:
        return "/" + str(self.host.relative_to(ROOT))

    def inside(self, name: str) -> str:
        return f"{self.inner}/{name}"

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, prefix: str) -> Iterator[ChrootDir]:
        """A fresh directory, removed afterwards unless $LAZYMIG_KEEP_CRIU_DIRS is set."""
        host = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / "tmp"))
        try:
            yield cls(host)
        finally:
            for pid in _users_of(host):
                # A tree a failed test left (criu restore --restore-detached): it would pin
                # the chroot's mounts, and scripts/criu-peer.sh refuses to run then.
                warnings.warn(f"killing pid {pid}, left running in {host}", stacklevel=1)
                kill_pid(pid)
            if not os.environ.get("LAZYMIG_KEEP_CRIU_DIRS"):
                shutil.rmtree(host, ignore_errors=True)


def _users_of(directory: Path) -> list[int]:
    """Processes inside the chroot whose cwd or an open file is in ``directory``
    (a workload's output log is its stdout)."""
    users = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "root").readlink() != ROOT:
                continue
            links = [(proc / "cwd").readlink()]
            links += [fd.readlink() for fd in (proc / "fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        if any(link.is_relative_to(directory) for link in links):
            users.append(int(proc.name))
    return users



# -- criu ----------------------------------------------------------------------------------


class CriuError(RuntimeError):
    """A criu command failed; the message ends with the errors of its log."""


def log_errors(log: Path, limit: int = 30) -> str:
    """The Error/Warn lines of a criu log (what to show when a step fails)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no {log.name})"
    bad = [ln for ln in lines if "Error" in ln or "Warn" in ln] or lines[-limit:]
    return "\n".join(bad[-limit:])


def chroot_argv(*argv: str) -> list[str]:
    return ["chroot", str(ROOT), *argv]


def criu(d: ChrootDir, *args: str, log: str, timeout: float = 60, verbosity: int = 4) -> float:
    """Run ``criu ARGS -o LOG -vN`` in the chroot with the images dir ``d``; return its time.

    criu's stdout/stderr go to the log (criu writes there with -o). ``verbosity``
    is criu's -vN (4: debug, every fault and copy; 2: errors and warnings).

    Raises:
        CriuError: non-zero exit, with the errors of the log.
    """
    started = time.monotonic()
    proc = subprocess.run(chroot_argv("criu", *args, "-o", log, f"-v{verbosity}"), cwd="/",
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode:
        raise CriuError(f"criu {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
                        f"\n{log_errors(d.host / log)}")
    return time.monotonic() - started


def wait_ready(fd: int, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait for the one zero byte a --status-fd writes (then close ``fd``)."""
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{what} not ready after {timeout} s")
        if os.read(fd, 1) != b"\0":
            raise RuntimeError(f"{what} closed its status fd without being ready "
                               f"(exit status {proc.poll()})")
    finally:
        os.close(fd)


def start_with_status_fd(argv: Sequence[str], *, what: str, timeout: float = 20,
                         stderr: int | None = None, log: str | None = None,
                         verbosity: int = 4) -> subprocess.Popen[bytes]:
    """Start ``argv + ['--status-fd', N]`` and wait until it writes its ready byte.

    ``log`` names an extra ``-o LOG -vN`` to append (for criu; N = ``verbosity``).
    """
    r, w = os.pipe()
    extra = ["--status-fd", str(w)] + (["-o", log, f"-v{verbosity}"] if log else [])
    try:
        proc = subprocess.Popen([*argv, *extra], pass_fds=(w,), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr if stderr is not None else subprocess.DEVNULL)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        wait_ready(r, timeout, what, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 5) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def kill_pid(pid: int, timeout: float = 5) -> None:
    """SIGKILL a process that is not our child (a restored tree) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = process_state(pid)
        if not state:
            return
        if state == "Z" and _parent(pid) != os.getpid():
            return  # its new parent (init or a subreaper) reaps it
        time.sleep(0.02)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


# -- the workload -----------------------------------------------------------------------------

_START = re.compile(r"start tag (\d+) pid (\d+) addr (0x[0-9a-f]+) pages (\d+)$")
_TICK = re.compile(r"tick (\d+) tag (\d+) sum (0x[0-9a-f]+) bad (\d+)$")


@dataclass(frozen=True)
class Tick:
    tick: int
    tag: int
    checksum: int
    bad_pages: int


@dataclass(frozen=True)
class Started:
    tag: int
    pid: int
    """The pid inside the workload's pid namespace (the pid in the images)."""
    addr: int
    pages: int


@dataclass
class Output:
    """What criu_pattern wrote so far."""

    started: dict[int, Started] = field(default_factory=dict)
    ticks: list[Tick] = field(default_factory=list)

    def last(self, tag: int) -> Tick | None:
        return next((t for t in reversed(self.ticks) if t.tag == tag), None)

    def after(self, tag: int, tick: int) -> list[Tick]:
        return [t for t in self.ticks if t.tag == tag and t.tick > tick]


class Workload:
    """criu_pattern running inside the chroot as the init of its own pid namespace.

    Args:
        d: the directory (it gets the binary and ``out.log``).
        binary: the static criu_pattern (or criu_forker) on the host.
        mib: size of the pattern area of each process.
        children: processes forked from the first (tags 1..children).
        args: the program's arguments after MIB, instead of ``children``.
    """

    def __init__(self, d: ChrootDir, binary: Path, *, mib: int, children: int = 0,
                 args: Sequence[str] | None = None) -> None:
        self.dir = d
        self.processes = 1 + children
        self.log = d.host / "out.log"
        shutil.copy2(binary, d.host / binary.name)
        rest = [str(children)] if args is None else list(args)
        argv = " ".join([d.inside(binary.name), str(mib), *rest])
        script = f"exec {argv} >>{d.inside('out.log')} 2>&1 </dev/null"
        # unshare --fork makes the pid-1 child; setsid makes it lead its own session (it is
        # not a group leader, so setsid does not fork); sh opens every fd inside the chroot.
        self._unshare = subprocess.Popen(
            chroot_argv("unshare", "--pid", "--fork", "setsid", "/bin/sh", "-c", script),
            cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = 0
        """Host pid of the workload's first process (pid 1 in its namespace)."""

    def output(self) -> Output:
        out = Output()
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            if m := _START.match(line):
                s = Started(int(m[1]), int(m[2]), int(m[3], 16), int(m[4]))
                out.started[s.tag] = s
            elif m := _TICK.match(line):
                out.ticks.append(Tick(int(m[1]), int(m[2]), int(m[3], 16), int(m[4])))
        return out

    def wait_ticks(self, after: dict[int, int], count: int, timeout: float) -> Output:
        """Wait until every process printed ``count`` ticks numbered above ``after[tag]``."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if all(len(out.after(tag, after.get(tag, -1))) >= count
                   for tag in range(self.processes)):
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"workload printed {len(out.ticks)} ticks in all "
                                   f"(wanted {count} per process after {after}):\n"
                                   f"{self.log.read_text()[-2000:] if self.log.exists() else ''}")
            time.sleep(0.05)

    def start(self, timeout: float = 10) -> Output:
        """Wait until every process ran a first tick; find the host pid of the first one."""
        out = self.wait_ticks({}, 1, timeout)
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        self.pid = int(children.read_text().split()[0])
        return out

    def alive(self) -> bool:
        """The source still exists (``unshare`` has not seen its init end)."""
        return self._unshare.poll() is None

    def wait_gone(self, timeout: float = 10) -> int:
        """Wait until the dumped source is gone (``unshare`` reports its init's end)."""
        return self._unshare.wait(timeout)

    def kill(self) -> None:
        """Kill whatever is left of the source (its session) and reap ``unshare``."""
        if self._unshare.poll() is None:
            pid = self.pid
            if not pid:
                with contextlib.suppress(FileNotFoundError, IndexError, ValueError):
                    children = f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children"
                    pid = int(Path(children).read_text().split()[0])
            if pid:
                kill_pid(pid)  # the namespace's init: the kernel kills the rest of it
        stop(self._unshare)


# -- a wire tap between criu lazy-pages and a page server ------------------------------------

_V1 = struct.Struct("=IIQQ")
"""CRIU <= 4.1.1's page_server_iov: cmd u32, nr_pages u32, vaddr u64, dst_id u64."""
PS_IOV_GET, PS_IOV_CLOSE = 7, 0x1023


@dataclass
class WireLog:
    """What went over one page-server session (v1 headers), as the tap parsed it."""

    requests: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(cmd, nr_pages, vaddr, dst_id) of each client request, in order."""
    replies: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(cmd, nr_pages, vaddr, dst_id) of each GET reply header."""
    close_status: bytes | None = None
    """The 4 bytes the server answered CLOSE with."""
    bytes_to_client: int = 0
    trailing_client_bytes: int = 0
    """Bytes the client sent after CLOSE (CRIU expects none: EOF)."""
    pages: list[tuple[int, int, str]] = field(default_factory=list)
    """(dst_id, vaddr, :func:`page_digest`) of every page the replies carried, in order
    (only with ``WireTap(capture_pages=True)``)."""
    error: str | None = None


class WireTap:
    """A one-connection TCP proxy on 127.0.0.1 that parses the v1 page-server stream.

    Client to server: a stream of 24-byte headers (GET, CLOSE). Server to client,
    in request order: per GET a header then nr_pages x 4096 bytes; per CLOSE a
    4-byte int32 status. Bytes are forwarded unchanged. With ``capture_pages`` the
    tap also digests every page of the replies (:attr:`WireLog.pages`). ``rate`` (bytes/s)
    throttles the replies, to keep pages lazy long enough for what a test does meanwhile.
    """

    def __init__(self, upstream_port: int, *, capture_pages: bool = False,
                 rate: float | None = None) -> None:
        self.upstream_port = upstream_port
        self._rate = rate
        self.log = WireLog()
        self._capture = capture_pages
        self._page = bytearray()  # the part of the page being received
        self._reply: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._reply_pages = 0  # pages of self._reply received whole
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._pending: queue.Queue[tuple[int, int, int, int]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="wire-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._listener.settimeout(60)
            client, _ = self._listener.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
            with client, server:
                up = threading.Thread(target=self._client_to_server, args=(client, server),
                                      daemon=True)
                up.start()
                self._server_to_client(server, client)
                up.join(60)
        except Exception as exc:
            self.log.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._listener.close()

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        buf = b""
        closed = False
        while data := _recv_or_reset(client):
            if closed:
                self.log.trailing_client_bytes += len(data)
            else:
                buf += data
                while len(buf) >= _V1.size and not closed:
                    header = _V1.unpack_from(buf)
                    buf = buf[_V1.size:]
                    self.log.requests.append(header)
                    self._pending.put(header)
                    closed = header[0] & 0xFFFF == PS_IOV_CLOSE
                self.log.trailing_client_bytes += len(buf) if closed else 0
            server.sendall(data)
        server.shutdown(socket.SHUT_WR)

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        buf = b""
        need = 0  # payload bytes of the last reply still to skip
        request: tuple[int, int, int, int] | None = None  # the one being answered
        while data := server.recv(1 << 20):
            if self._rate:
                time.sleep(len(data) / self._rate)
            client.sendall(data)
            self.log.bytes_to_client += len(data)
            buf += data
            while True:
                skip = min(need, len(buf))
                if self._capture and skip:
                    self._take_payload(buf[:skip])
                buf, need = buf[skip:], need - skip
                if need or not buf:
                    break
                if request is None:  # replies come in request order
                    request = self._pending.get(timeout=10)
                if request[0] & 0xFFFF == PS_IOV_CLOSE:
                    if len(buf) < 4:
                        break
                    self.log.close_status, buf = buf[:4], buf[4:]
                elif len(buf) < _V1.size:
                    break
                else:
                    reply = _V1.unpack_from(buf)
                    buf = buf[_V1.size:]
                    self.log.replies.append(reply)
                    need = reply[1] * PAGE_SIZE
                    self._reply, self._reply_pages = reply, 0
                request = None
        client.shutdown(socket.SHUT_WR)

    def _take_payload(self, data: bytes) -> None:
        """Page data of the current reply: digest each page once it is whole."""
        while data:
            take = PAGE_SIZE - len(self._page)
            self._page += data[:take]
            data = data[take:]
            if len(self._page) == PAGE_SIZE:
                _, _, vaddr, dst_id = self._reply
                self.log.pages.append((dst_id, vaddr + self._reply_pages * PAGE_SIZE,
                                       page_digest(self._page)))
                self._reply_pages += 1
                self._page.clear()

    def join(self, timeout: float = 10) -> WireLog:
        self._thread.join(timeout)
        return self.log


def _recv_or_reset(sock: socket.socket) -> bytes:
    """Up to 64 KiB from ``sock``; a reset ends the stream as EOF does (criu lazy-pages
    may close with a reply left unread: the server must still see its end)."""
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


# -- lazymig lazy-pages in place of criu lazy-pages --------------------------------------------

_PROCESS_DONE = re.compile(r"pid (\d+): (\w+), UFFD transferred pages: \((\d+)/(\d+)\)")
_SUMMARY = re.compile(r"lazy pages (complete|FAILED): (\d+) processes, ([\d.]+) MiB copied, "
                      r"([\d.]+) MB/s, (\d+) faults \(p50 (\d+) us, p99 (\d+) us\)")


@dataclass(frozen=True)
class ProcessDone:
    """One ``pid N: STATE, UFFD transferred pages: (copied/total)`` line of the daemon."""

    pid: int
    state: str
    copied: int
    total: int


@dataclass
class DaemonLogReport:
    """What ``lazymig -v lazy-pages`` logged about its run (INFO level)."""

    processes: list[ProcessDone] = field(default_factory=list)
    complete: bool | None = None
    """The final summary: complete (True), FAILED (False), or not written (None)."""
    summary: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DaemonLogReport:
        report = cls()
        for line in text.splitlines():
            if m := _PROCESS_DONE.search(line):
                report.processes.append(ProcessDone(int(m[1]), m[2], int(m[3]), int(m[4])))
            elif m := _SUMMARY.search(line):
                report.complete = m[1] == "complete"
                report.summary = {"processes": int(m[2]), "mib_copied": float(m[3]),
                                  "mb_per_s": float(m[4]), "faults": int(m[5]),
                                  "fault_p50_us": int(m[6]), "fault_p99_us": int(m[7])}
        return report


def lazymig_argv(*args: str, loop: str, verbose: bool = True) -> list[str]:
    """``python -m lazymig [-v] --uvloop|--no-uvloop ARGS`` with this interpreter (the venv's)."""
    return [sys.executable, "-m", "lazymig", *(["-v"] if verbose else []), f"--{loop}", *args]


# -- a stand-in for criu restore in front of criu lazy-pages -------------------------------------

_LAZY_PAGES_RESTORE_FINISHED = 0x52535446
"""criu/uffd.c: the u32 criu restore sends after the last task ("ReSTore Finished")."""
_MAP_FIXED_NOREPLACE = 0x100000
_EEXIST_EXIT = 17
"""The stand-in's exit status when one of its regions is taken in its own address space."""


def source_pages(pid: int, regions: Sequence[tuple[int, int]]) -> dict[int, str]:
    """:func:`page_digest` of every page of ``regions`` (address, length) of live process
    ``pid``, read from its /proc/PID/mem (root; the process may be ptrace-stopped)."""
    digests: dict[int, str] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for address, length in regions:
            mem.seek(address)
            data = mem.read(length)
            if len(data) != length:
                raise RuntimeError(f"short read of {address:#x}+{length:#x} of pid {pid}")
            for offset in range(0, length, PAGE_SIZE):
                digests[address + offset] = page_digest(data[offset:offset + PAGE_SIZE])
    return digests


def merge_regions(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(vaddr, nr_pages) page runs, sorted, as (address, length) with adjacent runs merged."""
    merged: list[tuple[int, int]] = []
    for vaddr, nr_pages in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] == vaddr:
            merged[-1] = (merged[-1][0], merged[-1][1] + nr_pages * PAGE_SIZE)
        else:
            merged.append((vaddr, nr_pages * PAGE_SIZE))
    return merged


@dataclass(frozen=True)
class Touched:
    """Pages the stand-in touched before "restore finished": the faults criu lazy-pages served."""

    digests: dict[int, str]
    """Page address -> :func:`page_digest` of what the fault brought in."""
    latencies_us: list[float]
    """Each touch, from the faulting side (the fault's whole round trip)."""


class StandInRestorer:
    """A process that does for ``criu lazy-pages`` what ``criu restore --lazy-pages`` does.

    criu lazy-pages waits on lazy-pages.socket until a restorer hands it, for each
    task of pstree.img, the image pid (int32) and the task's userfaultfd (one byte
    carrying SCM_RIGHTS); only then does it connect to its page server, and it
    starts the background fetch once the restorer sends "restore finished"
    (criu/uffd.c: send_uffd, lazy_pages_finish_restore). criu restore cannot
    restore a lazymig dump (lazymig writes its own task image, unknown to CRIU),
    so this process stands in for the one restored task: it maps private
    anonymous memory at the dump-time addresses of the task's lazy pages, registers
    it on a uffd with the restorer's features, and speaks that handover itself
    (not through lazymig's). Before "restore finished" it touches the ``touch``
    pages one by one: each is a fault criu lazy-pages must serve with a one-page
    request. :meth:`pages` reads every page afterwards.

    Another process, so that a taken address is a fresh try (its layout is
    random): one of the dump's regions may collide with its own mappings.
    """

    def __init__(self, socket_path: Path, pid: int, regions: Sequence[tuple[int, int]],
                 touch: Sequence[int], *, tries: int = 3, timeout: float = 30) -> None:
        self.timeout = timeout
        request = json.dumps({"socket": str(socket_path), "pid": pid,
                              "regions": [list(r) for r in regions], "touch": list(touch)})
        for attempt in range(tries):
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "stand-in-restorer"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self._proc.stdin is not None
            self._proc.stdin.write(request + "\n")
            self._proc.stdin.flush()
            try:
                self.touched = self._touched(self._read())
                return
            except _RegionTaken:
                stop(self._proc)
                if attempt == tries - 1:
                    raise

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            if self._proc.wait(5) == _EEXIST_EXIT:
                raise _RegionTaken
            raise RuntimeError(f"the stand-in restorer said nothing in {self.timeout} s "
                               f"(exit status {self._proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"stand-in restorer: {answer['error']}")
        return answer

    @staticmethod
    def _touched(answer: dict[str, Any]) -> Touched:
        return Touched({int(k): v for k, v in answer["touched"].items()},
                       [float(x) for x in answer["latencies_us"]])

    def pages(self) -> dict[int, str]:
        """Read every page of the regions (call it once criu lazy-pages is gone: a
        page it never filled then reads as zeros instead of faulting forever)."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("read\n")
        self._proc.stdin.flush()
        return {int(k): v for k, v in self._read()["pages"].items()}

    def close(self) -> None:
        stop(self._proc)


class _RegionTaken(Exception):
    pass


def _stand_in_restorer() -> int:
    """The stand-in's process (``python criu_peer.py stand-in-restorer``): one JSON
    request on stdin, JSON answers on stdout (see :class:`StandInRestorer`)."""
    import array  # noqa: PLC0415 (only this process needs these)
    import ctypes  # noqa: PLC0415
    import mmap  # noqa: PLC0415

    from lazymig.uffd.uffd import DEFAULT_FEATURES, Uffd  # noqa: PLC0415

    def say(answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    request = json.loads(sys.stdin.readline())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    regions = [(int(a), int(n)) for a, n in request["regions"]]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE
    for address, length in regions:
        got = libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if got != address:
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return _EEXIST_EXIT
            say({"error": f"mmap {address:#x}+{length:#x}: {os.strerror(err)}"})
            return 1
    # criu restore's uffd: the non-cooperative features CRIU asks for (setup_uffd)
    uffd = Uffd.open(DEFAULT_FEATURES, non_blocking=True)
    for address, length in regions:
        uffd.register(address, length)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(request["socket"])
    sock.sendall(struct.pack("=i", request["pid"]))
    sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                            array.array("i", [uffd.fd]).tobytes())])
    uffd.close()  # criu lazy-pages holds the only reference now
    digests: dict[int, str] = {}
    latencies: list[float] = []
    for address in request["touch"]:
        started = time.perf_counter()
        data = ctypes.string_at(address, PAGE_SIZE)  # faults until criu lazy-pages copies
        latencies.append((time.perf_counter() - started) * 1e6)
        digests[address] = page_digest(data)
    sock.sendall(struct.pack("=I", _LAZY_PAGES_RESTORE_FINISHED))
    sock.close()
    say({"touched": digests, "latencies_us": latencies})
    if sys.stdin.readline().strip() != "read":
        return 0
    say({"pages": {address + offset: page_digest(ctypes.string_at(address + offset, PAGE_SIZE))
                   for address, length in regions for offset in range(0, length, PAGE_SIZE)}})
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["stand-in-restorer"]:
        sys.exit(f"usage: {sys.argv[0]} stand-in-restorer")
    sys.exit(_stand_in_restorer())


LOOPS = ["uvloop", "no-uvloop"]
"""lazymig's --uvloop / --no-uvloop: every test that runs lazymig runs on both loops."""


def start_lazy_dump(d: ChrootDir, workload: Workload, *extra: str,
                    what: str = "criu dump --lazy-pages") -> tuple[subprocess.Popen[bytes], int]:
    """Start ``criu dump --lazy-pages`` of the running ``workload`` into ``d``, its page
    server on a free port of 127.0.0.1 (``extra``: more criu options); return the dump
    once it listens, and the port."""
    port = free_port()
    dump = start_with_status_fd(
        chroot_argv("criu", "dump", "-t", str(workload.pid), "--lazy-pages",
                    "--address", "127.0.0.1", "--port", str(port), "-D", d.inner, *extra),
        what=what, log="dump.log", timeout=30)
    return dump, port


def dump_workload(d: ChrootDir, binary: Path, *, mib: int, children: int,
                  measure: dict[str, Any]) -> tuple[Workload, Output]:
    """Run criu_pattern, let it tick, ``criu dump`` it (which kills it); return its output."""
    workload = Workload(d, binary, mib=mib, children=children)
    try:
        workload.start()
        before = workload.wait_ticks({}, 2, timeout=10)
        measure["dump_s"] = round(criu(d, "dump", "-t", str(workload.pid), "-D", d.inner,
                                       log="dump.log"), 3)
        measure["source_exit"] = workload.wait_gone()  # criu dump kills it: it must be gone
    finally:
        workload.kill()
    out = workload.output()
    # It may tick again before the dump freezes it (a busy machine), never after.
    assert out.ticks[:len(before.ticks)] == before.ticks
    return workload, out


def check_restored_ticks(workload: Workload, dumped: Output) -> None:
    """The restored processes go on ticking (numbers continue after the dump) with the
    checksums they had before and no page that differs from the pattern."""
    last = {tag: tick.tick for tag in range(workload.processes)
            if (tick := dumped.last(tag)) is not None}
    after = workload.wait_ticks(last, 3, timeout=20)
    for tag in range(workload.processes):
        before = dumped.last(tag)
        assert before is not None
        new = after.after(tag, before.tick)
        assert new[0].tick == before.tick + 1, "the restored process restarted its count"
        assert {(t.checksum, t.bad_pages) for t in new} == {(before.checksum, 0)}, new


@contextlib.contextmanager
def restored_from_lazymig_page_server(
        d: ChrootDir, loop: str, measure: dict[str, Any], *, server_args: Sequence[str] = (),
        criu_args: Sequence[str] = (), tap: bool = True) -> Iterator[tuple[str, WireLog | None]]:
    """Serve the criu dump in ``d`` with ``lazymig page-server --wire v1 SERVER_ARGS``; run
    ``criu lazy-pages --page-server CRIU_ARGS`` (through a :class:`WireTap` unless ``tap``
    is False) and ``criu restore --lazy-pages -d``; wait until the server reports a complete
    transfer and both exit 0. Yields the server's log and the tap's; the restored tree is
    killed on leaving, and a failure inside the block comes with the logs."""
    port = free_port()
    server_log = d.host / "lazymig-page-server.log"
    restored_pid = 0
    with server_log.open("wb") as server_err:
        server = start_with_status_fd(
            [sys.executable, "-m", "lazymig", "-v", f"--{loop}", "page-server", "--lazy-pages",
             "-D", str(d.host), "--address", "127.0.0.1", "--port", str(port), "--wire", "v1",
             *server_args],
            what="lazymig page-server", stderr=server_err.fileno())
    daemon: subprocess.Popen[bytes] | None = None
    wire_tap = WireTap(port) if tap else None  # criu lazy-pages -> tap -> lazymig (v1)
    try:
        # criu lazy-pages must listen on lazy-pages.socket in the work dir (= -D) before
        # restore connects to it.
        daemon = start_with_status_fd(
            chroot_argv("criu", "lazy-pages", "--page-server", "--address", "127.0.0.1",
                        "--port", str(wire_tap.port if wire_tap else port), "-D", d.inner,
                        *criu_args),
            what="criu lazy-pages", log="lazy-pages.log")
        started = time.monotonic()
        measure["restore_s"] = round(criu(
            d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
            "--pidfile", d.inside("restored.pid"), log="restore.log"), 3)
        restored_pid = int((d.host / "restored.pid").read_text())

        rc = server.wait(60)
        measure["all_pages_in_s"] = round(time.monotonic() - started, 3)
        assert rc == 0, f"lazymig page-server exited {rc}:\n{server_log.read_text()[-3000:]}"
        assert daemon.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
        server_text = server_log.read_text()
        assert "transfer complete" in server_text, server_text[-3000:]
        yield server_text, wire_tap.join() if wire_tap else None
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n--- lazy-pages.log:\n{log_errors(d.host / 'lazy-pages.log')}"
                             f"\n--- lazymig page-server:\n{server_log.read_text()[-3000:]}"
                             ) from exc
    finally:
        if restored_pid:
            kill_pid(restored_pid)
        if daemon is not None:
            stop(daemon)
        stop(server)


def restore_with_lazymig_daemon(d: ChrootDir, images: ImagesDir, daemon_args: list[str], *,
                                loop: str, measure: dict[str, Any],
                                procs: list[subprocess.Popen[bytes]], forks: bool = False,
                                after_restore: Callable[[int], None] | None = None) -> None:
    """Start ``lazymig lazy-pages DAEMON_ARGS -D <host path>`` on the host, run ``criu restore
    --lazy-pages -d`` in the chroot against it and wait until the daemon exits 0, having
    reported every process of pstree.img complete. The restored tree's host pid is in
    ``restored.pid`` (see :func:`kill_restored`).

    ``after_restore`` runs with the restored tree's host pid as soon as criu restore
    returns. ``forks``: the restored processes fork while pages are lazy; the daemon must
    also have followed at least one child (UFFD_EVENT_FORK), which asks under its
    parent's image pid and ends complete or exited.

    The images dir is below the chroot: lazymig listens on its host path
    (.../criu-root/tmp/X/lazy-pages.socket), the same file that criu restore, whose work
    dir is -D, reaches as /tmp/X/lazy-pages.socket. Started processes go to ``procs``.
    """
    daemon_log = d.host / "lazymig-lazy-pages.log"
    with daemon_log.open("wb") as err:
        daemon = start_with_status_fd(
            lazymig_argv("lazy-pages", *daemon_args, "-D", str(d.host), loop=loop),
            what="lazymig lazy-pages", stderr=err.fileno())
    procs.append(daemon)
    assert (d.host / "lazy-pages.socket").is_socket()
    started = time.monotonic()
    measure["restore_s"] = round(criu(
        d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
        "--pidfile", d.inside("restored.pid"), log="restore.log"), 3)
    if after_restore is not None:
        after_restore(int((d.host / "restored.pid").read_text()))
    rc = daemon.wait(60)
    measure["all_pages_in_s"] = round(time.monotonic() - started, 3)
    text = daemon_log.read_text()
    assert rc == 0, f"lazymig lazy-pages exited {rc}:\n{text[-3000:]}"

    # Its report: every process of pstree.img (one uffd each) got all its lazy pages.
    report = DaemonLogReport.parse(text)
    assert report.complete is True, text[-3000:]
    lazy = {e.pid: sum(r.nr_pages for r in images.lazy_ranges(e.pid)) for e in images.pstree()}
    done = sorted((p.pid, p.state, p.copied, p.total) for p in report.processes)
    restored = sorted((pid, "complete", n, n) for pid, n in lazy.items())
    children = list(done)
    for entry in restored:
        assert entry in children, f"{entry} not in {done}:\n{text[-3000:]}"
        children.remove(entry)
    if forks:
        assert children, f"no forked child was followed:\n{text[-3000:]}"
        assert all(pid in lazy and state in ("complete", "exited") and copied <= total
                   for pid, state, copied, total in children), children
        measure["forked_children"] = {state: sum(1 for c in children if c[1] == state)
                                      for state in ("complete", "exited")}
    else:
        assert not children, f"unexpected processes {children}"
    assert report.summary["processes"] == len(done)
    measure["lazymig"] = report.summary
    assert not (d.host / "lazy-pages.socket").exists(), "the daemon left its socket behind"


def kill_restored(d: ChrootDir) -> None:
    """Kill the tree criu restore wrote to ``restored.pid`` (its root is the init of its
    pid namespace: the kernel kills the rest), whatever check failed after the restore."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        kill_pid(int((d.host / "restored.pid").read_text()))


def lazy_pages_in(images: ImagesDir) -> int:
    return sum(r.nr_pages for e in images.pstree() for r in images.lazy_ranges(e.pid))


def failure_context(d: ChrootDir) -> str:
    daemon_log = d.host / "lazymig-lazy-pages.log"
    return (f"--- restore.log:\n{log_errors(d.host / 'restore.log')}\n"
            f"--- dump.log:\n{log_errors(d.host / 'dump.log')}\n--- lazymig lazy-pages:\n"
            f"{daemon_log.read_text()[-3000:] if daemon_log.exists() else '(none)'}")
