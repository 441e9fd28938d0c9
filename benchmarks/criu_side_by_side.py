"""CRIU 4.1.1 and lazymig side by side: the same workloads through each set-up, in one run.

    sudo .venv/bin/python benchmarks/criu_side_by_side.py [--sizes 64,1024] [--repeat 3]
        [--setups ...] [--workloads idle,busy] [--out benchmarks/results/criu_side_by_side.txt]

About 3 minutes with the defaults (60 runs) on a 2-vCPU VM.

Set-ups (loopback; images on tmpfs; CRIU from the chroot of scripts/criu-peer.sh,
installed and mounted first if needed):

* ``CRIU``: ``criu dump --lazy-pages`` (page server on the frozen source) +
  ``criu lazy-pages`` + ``criu restore --lazy-pages``;
* ``lazymig daemon``: the same, with ``lazymig lazy-pages --page-server --wire v1``
  in place of ``criu lazy-pages``;
* ``lazymig daemon pre-started``: the same, the daemon started before the dump
  with ``--wait-for-page-server``, as an orchestrator may (the dump starts once
  the daemon logs that it waits for its page server): it connects once
  ``criu dump`` listens, so its start-up is off the downtime;
* ``lazymig page server``: an ordinary ``criu dump`` (every page on disk, source
  killed) + ``lazymig page-server --lazy-pages --wire v1`` + ``criu lazy-pages`` +
  ``criu restore --lazy-pages``;
* ``CRIU page server``: the same with CRIU's own ``criu page-server --lazy-pages``,
  the baseline of the row above (the same job: compare it with that row, not with
  ``CRIU``'s live lazy dump, whose downtime has no dump to disk in it).

Workloads (benchmarks/_sbs_workload.py): 64 MiB and 1 GiB of a known pattern,
``idle`` (asleep) or ``busy`` (checks its whole memory non-stop; the restored
copy is told to time its first full pass at once after ``criu restore``).

Columns:

* downtime: from starting the dump until ``criu restore -d`` returned (the
  restored copy runs), and its parts: the dump (until the page server listens;
  for an ordinary dump, until every page is on disk), starting the servers
  (the lazy-pages daemon; and lazymig's page server: until each said ready on
  ``--status-fd``), the restore;
* serving: ``lazymig lazy-pages`` says ready as soon as its socket listens and loads
  the rest afterwards (a peer that connects meanwhile waits in the backlog), so
  "start" is short and the restore may wait for the daemon's first replies (CRIU's
  restore faults on a couple of lazy pages); ``lazymig page-server`` says ready
  once it read the images (as CRIU's, whose start-up is all in "start"): this
  column is from exec until the lazymig command's loop serves (its "listening on"
  log line), the whole start-up;
* all in: from starting the restore until every lazy page is present in the
  restored process (watched from outside: its RssAnon, then its
  /proc/PID/pagemap over the lazy ranges, every millisecond);
* daemon exit: from starting the restore until the lazy-pages daemon exited
  (after its CLOSE exchange with the page server, where CRIU's corked sockets
  can wait 200 ms per end: pitfall 9 of the README of peers/criu);
* background: lazy bytes / (all in - restore time), i.e. from the moment the
  restore returned (it has just sent "restore finished", which starts the
  background fetch) until the last page was in;
* pass: busy, the restored copy's first full pass over its memory, started at
  once after the restore (faults and background fetch racing); idle, one pass
  once every page is in (the baseline: local memory);
* fault p50/p99: the round trip of a fault inside lazymig's daemon, from its
  summary line; CRIU does not report one;
* peak RSS: the maximum resident set size (VmHWM at exit) of the page server
  (``criu dump --lazy-pages`` or ``lazymig page-server``) and of the lazy-pages
  daemon, as GNU time (``/usr/bin/time -f %M``, run in the chroot for CRIU) reports
  it. (wait4's ru_maxrss of a child of this script is useless: exec keeps the
  high-water mark of the forked copy of this process.)

CRIU logs at -v2 (errors and warnings): at -v4 ``criu lazy-pages`` writes
three lines per fault. The machine's own limits are measured in the same run,
and so are the floors of a Python process (start-up time and peak RSS of
``python -c pass``, of importing asyncio, and of asyncio + uvloop + protobuf,
which a daemon reading CRIU's images on uvloop cannot do without). lazymig runs
from bytecode compiled first, as an installed package does (the environment may
say PYTHONDONTWRITEBYTECODE; this script lifts it for lazymig's tree).
Numbers are printed, never asserted; every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import _sbs_workload  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from criu_peer import (  # noqa: E402
    ROOT,
    ChrootDir,
    DaemonLogReport,
    Workload,
    chroot_argv,
    criu,
    criu_root_ready,
    kill_pid,
    lazymig_argv,
    log_errors,
    start_with_status_fd,
    stop,
)
from helpers import free_port  # noqa: E402

from lazymig.proto.constants import PAGE_SIZE  # noqa: E402
from lazymig.proto.images import ImagesDir  # noqa: E402

MIB = 1 << 20
PRESTARTED = "lazymig daemon pre-started"
ON_DISK = ("lazymig page server", "CRIU page server")
"""The set-ups that serve an ordinary dump on disk."""
SETUPS = ("CRIU", "lazymig daemon", PRESTARTED, *ON_DISK)
CRIU_VERBOSITY = 2
LOOP = "uvloop"


@dataclass
class Run:
    """One workload through one set-up."""

    setup: str
    mib: int
    busy: bool
    downtime: float = 0.0
    dump: float = 0.0
    servers_start: float = 0.0
    serving: float | None = None
    restore: float = 0.0
    all_in: float = 0.0
    daemon_exit: float = 0.0
    lazy_bytes: int = 0
    pass_s: float | None = None
    bad_pages: int | None = None
    fault_us: tuple[int, int] | None = None
    faults: int = 0
    server_rss_kib: int = 0
    daemon_rss_kib: int = 0
    error: str | None = None

    @property
    def background_gbps(self) -> float:
        return self.lazy_bytes / max(self.all_in - self.restore, 1e-9) / 1e9


@dataclass
class Procs:
    """Everything a run started, to be stopped whatever happens."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill each process and what it runs (GNU time does not pass signals on)."""
        for proc in reversed(self.started):
            if proc.returncode is None:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                with contextlib.suppress(OSError, ValueError):
                    for child in children.read_text().split():
                        kill_pid(int(child))
            stop(proc)


def timed(argv: list[str], rss_file: str) -> list[str]:
    """``argv`` under GNU time, which writes the peak RSS (KiB) to ``rss_file``."""
    return ["/usr/bin/time", "-f", "%M", "-o", rss_file, *argv]


def peak_rss_kib(rss_file: Path) -> int:
    """What :func:`timed` wrote (after a "Command exited with non-zero status" line)."""
    return int(rss_file.read_text().split()[-1])


_SERVING = re.compile(r"^(\S+ \S+) \S+ INFO: (?:lazy-pages daemon|page server) listening on",
                      re.MULTILINE)


def serving_after(log: Path, spawned: float) -> float:
    """Seconds from ``spawned`` (time.time()) until a lazymig command's log says its loop
    serves (the first "listening on" line; logging's asctime, to the millisecond)."""
    match = _SERVING.search(log.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"{log.name} has no 'listening on' line")
    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp() - spawned


def start_lazymig_daemon(d: ChrootDir, port: str, rss_file: Path, log: Path,
                         *options: str) -> subprocess.Popen[bytes]:
    """``lazymig lazy-pages`` for the dump in ``d`` (its page server at ``port``), under
    GNU time, its stderr into ``log``; returns once it said ready."""
    with log.open("wb") as err:
        return start_with_status_fd(
            timed(lazymig_argv("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                               port, "--wire", "v1", *options, "-D", str(d.host), loop=LOOP),
                  str(rss_file)),
            what="lazymig lazy-pages", stderr=err.fileno(), timeout=30)


def reap(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """Wait until ``proc`` exits (a pidfd, so that the moment is exact); its exit status."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"{what} still running after {timeout} s")
    finally:
        os.close(pidfd)
    return proc.wait()


class AllInWatcher:
    """Notes when every lazy page is present in the restored process.

    Every millisecond it reads RssAnon from /proc/PID/status (cheap); once that is
    within 1 MiB of the lazy bytes it reads /proc/PID/pagemap over the lazy ranges
    until every entry has its present bit.
    """

    def __init__(self, pid: int, ranges: list[tuple[int, int]], lazy_bytes: int) -> None:
        self.pid = pid
        self.ranges = ranges
        self.lazy_bytes = lazy_bytes
        self.done_at: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="all-in", daemon=True)
        self._thread.start()

    def _rss_anon(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _all_present(self, pagemap: int) -> bool:
        for vaddr, nr_pages in self.ranges:
            data = os.pread(pagemap, nr_pages * 8, vaddr // PAGE_SIZE * 8)
            # bit 63 of each little-endian u64: bit 7 of every 8th byte
            if data[7::8].translate(None, _PRESENT):
                return False
        return True

    def _run(self) -> None:
        try:
            pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
            try:
                while not self._stop.is_set():
                    if self._rss_anon() >= self.lazy_bytes - MIB and self._all_present(pagemap):
                        self.done_at = time.monotonic()
                        return
                    time.sleep(0.001)
            finally:
                os.close(pagemap)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        self._stop.set()
        if self.done_at is None:
            raise TimeoutError(f"the restored process lacks lazy pages after {timeout} s "
                               f"({self.error or 'still missing'})")
        return self.done_at


_PRESENT = bytes(range(0x80, 0x100))
"""Top bytes of pagemap entries with the present bit (deleted: what is left is missing)."""


@contextlib.contextmanager
def shm_dir(prefix: str) -> Iterator[ChrootDir]:
    """A fresh images dir on tmpfs that the chroot also sees (its /dev/shm is the host's)."""
    host = Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / "dev" / "shm"))
    try:
        yield ChrootDir(host)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.01)
    return value


def run_once(setup: str, binary: Path, mib: int, busy: bool) -> Run:
    run = Run(setup, mib, busy)
    procs = Procs()
    restored = 0
    with ChrootDir.temporary("sbs-work-") as work, shm_dir("sbs-images-") as d:
        workload = Workload(work, binary, mib=mib, args=["busy" if busy else "idle"])
        server_rss, daemon_rss = d.host / "page-server.rss", d.host / "lazy-pages.rss"
        logs: list[Path] = []
        try:
            workload.start(timeout=60)
            port = str(free_port())
            pid = str(workload.pid)
            daemon_log = d.host / "lazymig-lazy-pages.log"
            if setup == PRESTARTED:  # ready before the dump; connects once the dump listens
                logs.append(daemon_log)
                daemon = procs.add(start_lazymig_daemon(d, port, daemon_rss, daemon_log,
                                                        "--wait-for-page-server", "60"))
                wait_for(lambda: "waiting up to" in daemon_log.read_text(), 30,
                         "the pre-started daemon's wait for its page server")
            started = time.monotonic()
            if setup in ON_DISK:
                logs.append(d.host / "dump.log")
                criu(d, "dump", "-t", pid, "-D", d.inner, log="dump.log", timeout=120,
                     verbosity=CRIU_VERBOSITY)
                dumped = time.monotonic()
                if setup == "CRIU page server":
                    logs.append(d.host / "page-server.log")
                    server = procs.add(start_with_status_fd(
                        chroot_argv(*timed(["criu", "page-server", "--lazy-pages", "-D",
                                            d.inner, "--address", "127.0.0.1", "--port", port],
                                           d.inside(server_rss.name))),
                        what="criu page-server --lazy-pages", log="page-server.log",
                        verbosity=CRIU_VERBOSITY, timeout=30))
                else:
                    server_log = d.host / "lazymig-page-server.log"
                    logs.append(server_log)
                    lazymig_log, spawned = server_log, time.time()
                    with server_log.open("wb") as err:
                        server = procs.add(start_with_status_fd(
                            timed(lazymig_argv("page-server", "--lazy-pages", "-D", str(d.host),
                                               "--address", "127.0.0.1", "--port", port,
                                               "--wire", "v1", loop=LOOP), str(server_rss)),
                            what="lazymig page-server", stderr=err.fileno(), timeout=30))
            else:
                logs.append(d.host / "dump.log")
                server = procs.add(start_with_status_fd(
                    chroot_argv(*timed(["criu", "dump", "-t", pid, "--lazy-pages", "--address",
                                        "127.0.0.1", "--port", port, "-D", d.inner],
                                       d.inside(server_rss.name))),
                    what="criu dump --lazy-pages", log="dump.log", verbosity=CRIU_VERBOSITY,
                    timeout=120))
                dumped = time.monotonic()
            images = ImagesDir(d.host)
            ranges = [(r.vaddr, r.nr_pages) for e in images.pstree()
                      if images.has_memory(e.pid) for r in images.lazy_ranges(e.pid)]
            run.lazy_bytes = PAGE_SIZE * sum(n for _, n in ranges)
            if setup == "lazymig daemon":
                logs.append(daemon_log)
                lazymig_log, spawned = daemon_log, time.time()
                daemon = procs.add(start_lazymig_daemon(d, port, daemon_rss, daemon_log))
            elif setup != PRESTARTED:
                logs.append(d.host / "lazy-pages.log")
                daemon = procs.add(start_with_status_fd(
                    chroot_argv(*timed(["criu", "lazy-pages", "--page-server", "--address",
                                        "127.0.0.1", "--port", port, "-D", d.inner],
                                       d.inside(daemon_rss.name))),
                    what="criu lazy-pages", log="lazy-pages.log", verbosity=CRIU_VERBOSITY))
            logs.append(d.host / "restore.log")
            restore_started = time.monotonic()
            criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
                 "--pidfile", d.inside("restored.pid"), log="restore.log", timeout=120,
                 verbosity=CRIU_VERBOSITY)
            running = time.monotonic()
            restored = int((d.host / "restored.pid").read_text())
            watcher = AllInWatcher(restored, ranges, run.lazy_bytes)
            if busy:
                os.kill(restored, signal.SIGUSR1)
            run.downtime = running - started
            run.dump = dumped - started
            run.servers_start = restore_started - dumped
            run.restore = running - restore_started
            rc = reap(daemon, 120, "the lazy-pages daemon")
            run.daemon_exit = time.monotonic() - restore_started
            if rc:
                raise RuntimeError(f"the lazy-pages daemon exited {rc}")
            run.all_in = watcher.wait(10) - restore_started
            if rc := reap(server, 60, "the page server"):
                raise RuntimeError(f"the page server exited {rc}")
            run.server_rss_kib = peak_rss_kib(server_rss)
            run.daemon_rss_kib = peak_rss_kib(daemon_rss)
            if setup in ("lazymig daemon", "lazymig page server"):
                run.serving = serving_after(lazymig_log, spawned)
            if setup in ("lazymig daemon", PRESTARTED):
                report = DaemonLogReport.parse(daemon_log.read_text())
                if report.complete is not True:
                    raise RuntimeError("lazymig lazy-pages did not report complete")
                run.fault_us = (int(report.summary["fault_p50_us"]),
                                int(report.summary["fault_p99_us"]))
                run.faults = int(report.summary["faults"])
            if not busy:
                os.kill(restored, signal.SIGUSR1)
            passes = wait_for(lambda: _sbs_workload.passes(workload.log), 60, "pass line")
            run.pass_s, run.bad_pages = passes[0]
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            for log in logs:
                if log.exists():
                    tail = (log_errors(log) if log.suffix == ".log" and "lazymig" not in log.name
                            else log.read_text(errors="replace")[-1500:])
                    run.error += f"\n  --- {log.name}:\n  " + tail.replace("\n", "\n  ")
        finally:
            if restored:
                kill_pid(restored)
            procs.stop_all()
            workload.kill()
    return run


# -- output ----------------------------------------------------------------------------------


def fmt_s(values: list[float]) -> str:
    """min / median of several runs (one value: itself)."""
    if len(values) == 1:
        return f"{values[0]:.3f} s"
    return f"{min(values):.3f} / {statistics.median(values):.3f} s"


def fmt_size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def table(runs: list[Run]) -> list[str]:
    head = ["set-up", "workload", "downtime", "= dump + start + restore", "serving", "all in",
            "daemon exit", "background", "pass", "bad", "fault p50 / p99",
            "page server RSS", "daemon RSS"]
    rows = [head, ["---"] * len(head)]
    groups: dict[tuple[str, int, bool], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setup, run.mib, run.busy), []).append(run)
    for (setup, mib, busy), group in groups.items():
        good = [r for r in group if r.error is None]
        label = f"{fmt_size(mib)} {'busy' if busy else 'idle'}"
        if not good:
            rows.append([setup, label, "FAILED", *[""] * (len(head) - 3)])
            continue
        faults = [r.fault_us for r in good if r.fault_us is not None]
        rows.append([
            setup, label,
            fmt_s([r.downtime for r in good]),
            " + ".join(f"{statistics.median(values):.3f}" for values in (
                [r.dump for r in good], [r.servers_start for r in good],
                [r.restore for r in good])),
            fmt_s(serving) if (serving := [r.serving for r in good if r.serving is not None])
            else "n/a",
            fmt_s([r.all_in for r in good]),
            fmt_s([r.daemon_exit for r in good]),
            f"{statistics.median(r.background_gbps for r in good):.2f} GB/s",
            fmt_s([r.pass_s for r in good if r.pass_s is not None]),
            str(max(r.bad_pages or 0 for r in good)),
            (f"{statistics.median(f[0] for f in faults):.0f} / "
             f"{statistics.median(f[1] for f in faults):.0f} us "
             f"({statistics.median(r.faults for r in good):.0f} faults)") if faults else "n/a",
            f"{max(r.server_rss_kib for r in good) / 1024:.1f} MiB",
            f"{max(r.daemon_rss_kib for r in good) / 1024:.1f} MiB",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
            for row in rows]


FLOORS = {
    "python -c pass": "pass",
    "import asyncio": "import asyncio",
    "import asyncio, uvloop, protobuf": "import asyncio, uvloop, google.protobuf.descriptor_pool",
}
"""What any Python process, and one that reads CRIU's images on uvloop, costs here."""


def interpreter_floor(code: str, runs: int = 5) -> tuple[float, int]:
    """Median seconds from exec to exit of ``python -c CODE`` (this interpreter and
    environment, under GNU time as the commands are) and its median peak RSS in KiB."""
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        for _ in range(runs):
            began = time.monotonic()
            subprocess.run(timed([sys.executable, "-c", code], str(rss_file)), check=True)
            times.append(time.monotonic() - began)
            peaks.append(peak_rss_kib(rss_file))
    return statistics.median(times), int(statistics.median(peaks))


def floors() -> list[str]:
    lines = []
    for label, code in FLOORS.items():
        seconds, kib = interpreter_floor(code)
        lines.append(f"  {label:<36}   {seconds:.3f} s, {kib / 1024:.1f} MiB peak RSS")
    return lines


def use_bytecode() -> None:
    """Run lazymig as an installed package runs: from bytecode (compiled now, into the
    tree's __pycache__, which git ignores), whatever PYTHONDONTWRITEBYTECODE says."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "lazymig")],
                   check=True)


def limits() -> list[str]:
    return [
        f"  memcpy (4 MiB blocks)                  {machine.memcpy_gbps():.2f} GB/s",
        f"  bare UFFDIO_COPY                       {machine.uffd_copy_gbps():.2f} GB/s",
        f"  loopback TCP                           {machine.loopback_tcp_gbps():.2f} GB/s",
        f"  tee + read + send to a loopback socket {machine.pipe_to_socket_gbps():.2f} GB/s",
        f"  loopback 4 KiB request/reply (p50)     {machine.loopback_rtt_us():.1f} us",
    ]


class RunTimeout(BaseException):
    """The whole run took longer than --timeout (a BaseException: it ends the run,
    through every cleanup, instead of counting as one failed case)."""


def _on_alarm(signo: int, frame: FrameType | None) -> None:
    raise RunTimeout("the whole run took longer than --timeout")


LEGEND = """\
downtime: dump start until criu restore -d returned; its parts: the dump (until the page
  server listens; for an ordinary dump, until every page is on disk), starting the
  lazy-pages daemon (and lazymig's page server) until each said ready, the restore.
serving: exec of the lazymig command until its loop serves. lazymig lazy-pages says ready
  once its socket listens and loads the rest afterwards (peers wait in the backlog), so the
  restore may wait for the daemon (criu restore faults on a couple of lazy pages); lazymig
  page-server says ready once it read the images, as CRIU's page server does; compare the
  floors above (a bare interpreter, asyncio, asyncio + uvloop + protobuf). Pre-started:
  the daemon started before the dump (--wait-for-page-server), its start-up off the
  downtime. CRIU page server: the baseline of lazymig page server (the same dump on disk).
all in: restore start until every lazy page was present in the restored process (its
  pagemap, polled every ms). daemon exit: restore start until the lazy-pages daemon exited,
  after its CLOSE exchange (where CRIU's corked sockets can wait 200 ms per end).
background: lazy bytes / (all in - restore), from "restore finished" to the last page
  (busy: faults and background together).
pass: busy, the restored copy's first full pass over its memory, begun as soon as criu
  restore returned; idle, one pass once every page is in (local memory: the baseline).
  bad: pages of that pass that differ from the pattern.
fault p50 / p99: inside lazymig's daemon (its summary line; CRIU reports none).
RSS: peak resident set (GNU time %M) of the page server (criu dump --lazy-pages, criu
  page-server or lazymig page-server) and of the lazy-pages daemon (criu lazy-pages or
  lazymig lazy-pages).
CRIU logs at -v2; lazymig at -v (INFO) on uvloop, from bytecode. Images on tmpfs,
loopback TCP."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,1024", help="workload sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each case (the table shows min / median)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--workloads", default="idle,busy")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (CRIU, ptrace, userfaultfd, namespaces)")
    setups = [s.strip() for s in args.setups.split(",")]
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown set-up {unknown}")
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = [w.strip() == "busy" for w in args.workloads.split(",")]

    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.timeout)
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    began = time.monotonic()
    say(f"# CRIU 4.1.1 and lazymig side by side, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say()
    say(f"machine: {machine.describe()}")
    use_bytecode()
    say("limits, measured in this run:")
    for line in limits():
        say(line)
    say("floors of a Python process here (exec to exit, median of 5; GNU time's peak RSS):")
    for line in floors():
        say(line)
    runs: list[Run] = []
    aborted = None
    try:
        with criu_root_ready(), tempfile.TemporaryDirectory() as tmp:
            binary = _sbs_workload.build(Path(tmp) / "sbs_workload")
            for mib in sizes:
                for busy in kinds:
                    for _ in range(args.repeat):
                        for setup in setups:  # interleaved: drift hits every set-up alike
                            if mib >= 256:  # the source, the restored copy, pages on tmpfs
                                machine.warm_memory(3 * mib * MIB)
                            run = run_once(setup, binary, mib, busy)
                            runs.append(run)
                            status = "FAILED" if run.error else (
                                f"downtime {run.downtime:.3f} s, all in {run.all_in:.3f} s, "
                                f"pass {run.pass_s} s")
                            print(f"  {setup}, {fmt_size(mib)} {'busy' if busy else 'idle'}: "
                                  f"{status}", file=sys.stderr, flush=True)
    except RunTimeout as exc:
        aborted = str(exc)
    finally:
        signal.alarm(0)
    say()
    say(f"{len(runs)} runs ({args.repeat} per case"
        f"{', min / median' if args.repeat > 1 else ''}), "
        f"{time.monotonic() - began:.0f} s in all:")
    say()
    runs.sort(key=lambda r: (r.mib, r.busy, SETUPS.index(r.setup)))
    for line in table(runs):
        say(line)
    say()
    for line in LEGEND.splitlines():
        say(line)
    if aborted:
        say()
        say(f"ABORTED: {aborted}")
    failures = [r for r in runs if r.error]
    for run in failures:
        say()
        say(f"FAILED {run.setup}, {fmt_size(run.mib)} {'busy' if run.busy else 'idle'}: "
            f"{run.error}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")
    return 1 if failures or aborted else 0


if __name__ == "__main__":
    with report.recorded("criu_side_by_side"):
        status = main()
    sys.exit(status)
