"""Downtime as a user of the CLI meets it: lazymig, CRIU 4.1.1 and their mixes, one run.

    sudo .venv/bin/python benchmarks/downtime.py [--quick] [--sizes 64,1024,4096]
        [--repeat 3] [--setups ...] [--workloads idle,busy] [--out FILE]

It takes /tmp/lazymig-criu.lock itself for the migrations (do not wrap it in
``flock``). ``--quick``: 64 MiB, one run each, not published.

Each migration is the seed's workflow on loopback, images on tmpfs: the dump
starts on the source; once it says ready (``--status-fd``) the lazy-pages
daemon starts, a fresh process; once that says ready, the restore starts, a
fresh process. Nothing is imported or started ahead, except in the rows marked
"prepared": there the destination's daemon is started with the dump, as
``lazymig lazy-pages --wait-for-page-server`` is documented to be run
(docs/operating.md: before the dump; the restore starts once the dump is
ready), so its start-up is counted once, beside the dump's rather than after
it; the column "prepared" shows it (spawned until it logged that it waits for
its page server or, when that was ready first, that it connected). On this
one machine both start-ups share its 2 vCPUs, where two hosts would not.

Set-ups (which mixes exist: docs/criu-interop.md; ``criu restore`` cannot
restore lazymig's images nor ``lazymig restore`` CRIU's, so every mix has CRIU's
dump and restore around a lazymig daemon or page server):

* ``lazymig``: ``lazymig dump --lazy-pages`` + ``lazymig lazy-pages
  --page-server`` + ``lazymig restore --lazy-pages -d``;
* ``lazymig prepared``: the same, the daemon started with the dump;
* ``lazymig restore prepared``: the whole destination prepared, as
  docs/operating.md runs it: the daemon and ``lazymig restore --lazy-pages -d
  --wait-for-images`` both started with the dump, the restore restoring as soon
  as the dump's images are complete (its start-up in the column "prepared:
  restore start-up": spawned until it logged that it waits for the images);
* ``lazymig destination ready first``: the same, in docs/operating.md's order:
  both destination commands started and loaded (the restore's ``--status-fd``
  byte, the daemon's "waiting up to" line) before the dump starts, as on two
  hosts, where the destination's start-ups would not take the source's CPUs:
  here they would (2 vCPUs), so the row above pays them beside the dump;
* ``CRIU``: ``criu dump --lazy-pages`` + ``criu lazy-pages`` + ``criu restore
  --lazy-pages -d``;
* ``CRIU + lazymig daemon``: ``lazymig lazy-pages --wire v1`` in place of
  ``criu lazy-pages``; ``... prepared``: started with the dump;
* ``CRIU on disk + lazymig page server``: an ordinary ``criu dump`` (every page
  on disk, source killed) + ``lazymig page-server --lazy-pages --wire v1`` +
  ``criu lazy-pages`` + ``criu restore --lazy-pages``; its baseline ``CRIU on
  disk + CRIU page server`` has ``criu page-server --lazy-pages`` instead.

The workload (benchmarks/_dt_workload.py) writes a line every millisecond;
the restored process "runs" when its first line after the restore started
comes (seen by polling the file every 0.5 ms: CRIU's restored process reads a
clock that goes on from the dump, so its own timestamps cannot say). CRIU
needs its workloads inside its chroot, as the init of a pid namespace and a
session leader (tests/criu_peer.py); the ``lazymig`` rows run the same binary
on the host, in a session of its own (lazymig needs no chroot, and restores
no pid namespace).

Columns: downtime, from spawning the dump until that first tick, and its parts:
the dump (until ready: its page server listens; for an ordinary dump, until it
exited), the start-ups of the destination's servers (spawned until ready), the
restore (spawned until the first tick); "frozen": the process's own gap, from
its last tick before the freeze to its first one after; "all in": the restore's
start until the lazy-pages daemon exited (every page in). Medians, and min.

Besides the CLI rows, ``lazymig demo`` (``--demo-size`` MiB, its own Python
workload, lazymig's API in one process) is run as a new user runs it, and its
own downtime line is shown: the same measure, see lazymig/demo/__init__.py.

Numbers are printed, never asserted; every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import _dt_workload  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from criu_peer import (  # noqa: E402
    ChrootDir,
    Workload,
    chroot_argv,
    criu,
    criu_root_ready,
    kill_pid,
    lazymig_argv,
    log_errors,
    start_with_status_fd,
    stop,
    wait_ready,
)
from criu_side_by_side import (  # noqa: E402
    FLOORS,
    interpreter_floor,
    limits,
    shm_dir,
    use_bytecode,
    wait_for,
)
from helpers import free_port  # noqa: E402

MIB = 1 << 20
LOCK = Path("/tmp/lazymig-criu.lock")
LAZYMIG, LAZYMIG_PREPARED = "lazymig", "lazymig prepared"
LAZYMIG_RESTORE_PREPARED = "lazymig restore prepared"
LAZYMIG_READY_FIRST = "lazymig destination ready first"
CRIU, MIXED, MIXED_PREPARED = "CRIU", "CRIU + lazymig daemon", "CRIU + lazymig daemon prepared"
ON_DISK_LAZYMIG = "CRIU on disk + lazymig page server"
ON_DISK_CRIU = "CRIU on disk + CRIU page server"
SETUPS = (LAZYMIG, LAZYMIG_PREPARED, LAZYMIG_RESTORE_PREPARED, LAZYMIG_READY_FIRST, CRIU, MIXED,
          MIXED_PREPARED, ON_DISK_LAZYMIG, ON_DISK_CRIU)
PREPARED = (LAZYMIG_PREPARED, LAZYMIG_RESTORE_PREPARED, LAZYMIG_READY_FIRST, MIXED_PREPARED)
"""The set-ups whose daemon is started before the dump is ready."""
RESTORE_PREPARED = (LAZYMIG_RESTORE_PREPARED, LAZYMIG_READY_FIRST)
"""The set-ups whose restore is (lazymig restore --wait-for-images)."""
LOOP = "uvloop"
CRIU_VERBOSITY = 2
FLOORS_HERE = {**FLOORS, "import lazymig.cli, lazymig.restore":
               "import lazymig.cli, lazymig.restore"}


@dataclass(frozen=True)
class Case:
    """One workload: a size, idle or busy, and what else it holds."""

    mib: int
    busy: bool
    threads: int = 1
    maps: int = 0
    kind: str = ""
    """What the workload does, when it is not benchmarks/_dt_workload.py's idle or busy."""

    @property
    def label(self) -> str:
        size = f"{self.mib // 1024} GiB" if self.mib % 1024 == 0 else f"{self.mib} MiB"
        if self.kind:
            return f"{size} {self.kind}"
        extra = (f", {self.threads} threads" if self.threads > 1 else "") + \
            (f", {self.maps} file maps" if self.maps else "")
        return f"{size} {'busy' if self.busy else 'idle'}{extra}"

    def args(self, maps_path: str) -> list[str]:
        """The workload's arguments after MIB."""
        args = ["busy" if self.busy else "idle"]
        if self.threads > 1:
            args += ["threads", str(self.threads)]
        if self.maps:
            args += _dt_workload.maps_argv(self.maps, maps_path)
        return args


@dataclass
class Run:
    """One migration of one case through one set-up (seconds)."""

    setup: str
    case: Case
    downtime: float = 0.0
    dump: float = 0.0
    startups: float = 0.0
    restore: float = 0.0
    frozen: float = 0.0
    all_in: float = 0.0
    prepared: float | None = None
    restore_prepared: float | None = None
    """A prepared restore's start-up (spawned until it waits for the images)."""
    error: str | None = None


class HostWorkload:
    """The workload on the host, in a session of its own, its output in ``dir/out.log``
    (what lazymig migrates; CRIU's runs in the chroot: criu_peer.Workload)."""

    def __init__(self, d: ChrootDir, binary: Path, args: list[str]) -> None:
        self.log = d.host / "out.log"
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._proc = subprocess.Popen([str(binary), *args], cwd=d.host, stdout=fd,
                                          stderr=fd, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        finally:
            os.close(fd)
        self.pid = self._proc.pid

    def start(self, timeout: float) -> None:
        wait_for(lambda: self._proc.poll() is not None or b"tick 0" in self.log.read_bytes(),
                 timeout, "workload start")
        if self._proc.poll() is not None:
            raise RuntimeError(f"the workload exited {self._proc.returncode}")

    def kill(self) -> None:
        stop(self._proc)


@contextlib.contextmanager
def criu_lock() -> Iterator[None]:
    """The lock every user of the shared CRIU chroot takes on this machine (a convention
    of its users, not of CRIU: two runs at once would collide in it)."""
    with LOCK.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def lazymig(*args: str) -> list[str]:
    return lazymig_argv(*args, loop=LOOP)


def spawn_ready(argv: list[str], what: str, log: Path | None = None,
                criu_log: str | None = None, timeout: float = 120) -> subprocess.Popen[bytes]:
    """Start a command with ``--status-fd`` and return once it wrote its ready byte."""
    if log is None:
        return start_with_status_fd(argv, what=what, log=criu_log, verbosity=CRIU_VERBOSITY,
                                    timeout=timeout)
    with log.open("wb") as err:
        return start_with_status_fd(argv, what=what, stderr=err.fileno(), timeout=timeout)


def spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start a command with ``--status-fd``, its stderr into ``log``; the process and
    the read end of its status pipe (for criu_peer.wait_ready)."""
    r, w = os.pipe()
    try:
        with log.open("wb") as err:
            proc = subprocess.Popen([*argv, "--status-fd", str(w)], pass_fds=(w,),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return proc, r


def logged_at(log: Path, *words: str) -> float:
    """When (time.time()) a lazymig command first logged one of ``words`` (logging's
    asctime, to the millisecond)."""
    for line in log.read_text(errors="replace").splitlines():
        if any(w in line for w in words):
            stamp = " ".join(line.split()[:2])
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise RuntimeError(f"{log.name} logged none of {words}")


def run_once(setup: str, case: Case, binary: Path) -> Run:
    run = Run(setup, case)
    procs: list[subprocess.Popen[bytes]] = []
    restored = 0
    ticks = None
    daemon_ready = -1  # the prepared daemon's status pipe, until read
    restore_ready = -1  # the prepared restore's
    criu_side = setup not in (LAZYMIG, LAZYMIG_PREPARED, *RESTORE_PREPARED)
    wire = ["--wire", "v1"] if criu_side else []
    with ChrootDir.temporary("dt-work-") as work, shm_dir("dt-images-") as d:
        logs: list[Path] = []
        maps = work.inside("maps.dat") if criu_side else str(work.host / "maps.dat")
        workload: Workload | HostWorkload = (
            Workload(work, binary, mib=case.mib, args=case.args(maps)) if criu_side
            else HostWorkload(work, binary, [str(case.mib), *case.args(maps)]))
        try:
            workload.start(timeout=120)
            ticks = _dt_workload.TickWatcher(workload.log)
            port, pid = str(free_port()), str(workload.pid)
            daemon_log = d.host / "lazymig-lazy-pages.log"
            daemon_argv = lazymig("lazy-pages", "--page-server", "--address", "127.0.0.1",
                                  "--port", port, *wire, "-D", str(d.host))
            restore_log = d.host / "lazymig-restore.log"
            restore_argv = lazymig("restore", "--lazy-pages", "-D", str(d.host), "-d",
                                   "--pidfile", str(d.host / "restored.pid"))
            if setup == LAZYMIG_READY_FIRST:  # both loaded before the clock starts
                logs += [daemon_log, restore_log]
                spawned = time.time()
                daemon, daemon_ready = spawn([*daemon_argv, "--wait-for-page-server", "120"],
                                             daemon_log)
                procs.append(daemon)
                restore_spawned = time.time()
                prepared_restore, restore_ready = spawn(
                    [*restore_argv, "--wait-for-images", "120"], restore_log)
                procs.append(prepared_restore)
                ready, restore_ready = restore_ready, -1
                wait_ready(ready, 60, "lazymig restore (prepared)", prepared_restore)
                wait_for(lambda: "waiting up to" in daemon_log.read_text(errors="replace"),
                         60, "the prepared daemon's load")
            started = time.monotonic()
            if setup in PREPARED and setup != LAZYMIG_READY_FIRST:  # beside the dump
                logs.append(daemon_log)
                spawned = time.time()
                daemon, daemon_ready = spawn([*daemon_argv, "--wait-for-page-server", "120"],
                                             daemon_log)
                procs.append(daemon)
            if setup == LAZYMIG_RESTORE_PREPARED:  # it restores once the images are complete
                logs.append(restore_log)
                restore_spawned = time.time()
                prepared_restore, restore_ready = spawn(
                    [*restore_argv, "--wait-for-images", "120"], restore_log)
                procs.append(prepared_restore)
            if setup in (ON_DISK_LAZYMIG, ON_DISK_CRIU):
                logs.append(d.host / "dump.log")
                criu(d, "dump", "-t", pid, "-D", d.inner, log="dump.log", timeout=300,
                     verbosity=CRIU_VERBOSITY)
            elif criu_side:
                logs.append(d.host / "dump.log")
                procs.append(spawn_ready(
                    chroot_argv("criu", "dump", "-t", pid, "--lazy-pages", "--address",
                                "127.0.0.1", "--port", port, "-D", d.inner),
                    "criu dump --lazy-pages", criu_log="dump.log"))
            else:
                logs.append(d.host / "lazymig-dump.log")
                procs.append(spawn_ready(
                    lazymig("dump", "-t", pid, "-D", str(d.host), "--lazy-pages", "--address",
                            "127.0.0.1", "--port", port),
                    "lazymig dump --lazy-pages", d.host / "lazymig-dump.log"))
            dumped = time.monotonic()
            if setup in PREPARED:
                ready, daemon_ready = daemon_ready, -1
                wait_ready(ready, 60, "lazymig lazy-pages (prepared)", daemon)
            if setup == ON_DISK_LAZYMIG:
                logs.append(d.host / "lazymig-page-server.log")
                procs.append(spawn_ready(
                    lazymig("page-server", "--lazy-pages", "-D", str(d.host), "--address",
                            "127.0.0.1", "--port", port, *wire),
                    "lazymig page-server", d.host / "lazymig-page-server.log"))
            elif setup == ON_DISK_CRIU:
                logs.append(d.host / "page-server.log")
                procs.append(spawn_ready(
                    chroot_argv("criu", "page-server", "--lazy-pages", "-D", d.inner,
                                "--address", "127.0.0.1", "--port", port),
                    "criu page-server --lazy-pages", criu_log="page-server.log"))
            if setup in (CRIU, ON_DISK_LAZYMIG, ON_DISK_CRIU):
                logs.append(d.host / "lazy-pages.log")
                daemon = spawn_ready(
                    chroot_argv("criu", "lazy-pages", "--page-server", "--address",
                                "127.0.0.1", "--port", port, "-D", d.inner),
                    "criu lazy-pages", criu_log="lazy-pages.log")
                procs.append(daemon)
            elif setup not in PREPARED:
                logs.append(daemon_log)
                daemon = spawn_ready(daemon_argv, "lazymig lazy-pages", daemon_log)
                procs.append(daemon)
            restore_started = time.monotonic()
            if criu_side:
                logs.append(d.host / "restore.log")
                criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
                     "--pidfile", d.inside("restored.pid"), log="restore.log", timeout=300,
                     verbosity=CRIU_VERBOSITY)
            elif setup in RESTORE_PREPARED:
                if restore_ready >= 0:
                    ready, restore_ready = restore_ready, -1
                    wait_ready(ready, 60, "lazymig restore (prepared)", prepared_restore)
                if rc := prepared_restore.wait(300):
                    raise RuntimeError(f"the prepared lazymig restore exited {rc}")
            else:
                logs.append(restore_log)
                with restore_log.open("wb") as err:
                    subprocess.run(restore_argv, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err, check=True,
                                   timeout=300)
            restored = int((d.host / "restored.pid").read_text())
            first = wait_for(lambda: ticks.first_after(restore_started), 60,
                             "tick of the restored process")
            last = ticks.last_before(dumped)
            if last is None:
                raise RuntimeError("no tick of the source before the dump")
            run.downtime = first - started
            run.dump, run.startups = dumped - started, restore_started - dumped
            run.restore, run.frozen = first - restore_started, first - last
            if rc := daemon.wait(600):
                raise RuntimeError(f"the lazy-pages daemon exited {rc}")
            run.all_in = time.monotonic() - restore_started
            if setup in PREPARED:
                # Loaded: it waits for its page server, or (a dump ready first) is connected.
                run.prepared = logged_at(daemon_log, "waiting up to",
                                         "connected to page server") - spawned
            if setup in RESTORE_PREPARED:
                # Loaded: it waits for the images, or (a dump complete first) restores.
                run.restore_prepared = logged_at(restore_log, "for the images in",
                                                 "is there already") - restore_spawned
            for proc in procs:
                if rc := proc.wait(120):
                    raise RuntimeError(f"{proc.args!r} exited {rc}")
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            for log in logs:
                if log.exists():
                    tail = (log_errors(log) if "lazymig" not in log.name
                            else log.read_text(errors="replace")[-1500:])
                    run.error += f"\n  --- {log.name}:\n  " + tail.replace("\n", "\n  ")
        finally:
            for fd in (daemon_ready, restore_ready):
                if fd >= 0:
                    os.close(fd)
            if ticks is not None:
                ticks.stop()
            if restored:
                kill_pid(restored)
            for proc in reversed(procs):
                stop(proc)
            workload.kill()
    return run


_DEMO_DOWNTIME = re.compile(r"downtime ([\d.]+) s")


def run_demo(mib: int, *options: str) -> Run:
    """``lazymig demo --size MIB`` as a user runs it: its own downtime line."""
    run = Run(" ".join(["lazymig demo (API)", *options]),
              Case(mib, busy=False, kind="demo workload (Python)"))
    proc = subprocess.run(lazymig("demo", "--size", str(mib), *options), capture_output=True,
                          text=True, timeout=300, check=False)
    found = _DEMO_DOWNTIME.search(proc.stdout)
    if proc.returncode or found is None:
        run.error = f"lazymig demo exited {proc.returncode}:\n{proc.stdout}{proc.stderr[-1500:]}"
    else:
        run.downtime = float(found[1])
    return run


# -- output ----------------------------------------------------------------------------------


def fmt_s(values: list[float]) -> str:
    """median (min) of several runs."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f})"


def table(runs: list[Run]) -> list[str]:
    head = ["set-up", "workload", "downtime, median (min)", "= dump + start-ups + restore",
            "vs CRIU", "frozen", "all in", "prepared: daemon start-up",
            "prepared: restore start-up"]
    rows = [head, ["---"] * len(head)]
    groups: dict[tuple[str, Case], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setup, run.case), []).append(run)
    criu_median = {case: statistics.median(r.downtime for r in group if not r.error)
                   for (setup, case), group in groups.items()
                   if setup == CRIU and any(not r.error for r in group)}
    for (setup, case), group in groups.items():
        good = [r for r in group if r.error is None]
        failed = f" ({len(group) - len(good)} failed)" if len(good) < len(group) else ""
        if not good:
            rows.append([setup, case.label, "FAILED", *[""] * (len(head) - 3)])
            continue
        median = statistics.median(r.downtime for r in good)
        parts = [r for r in good if r.restore]
        rows.append([
            setup + failed, case.label, fmt_s([r.downtime for r in good]) + " s",
            " + ".join(f"{statistics.median(v):.3f}" for v in (
                [r.dump for r in parts], [r.startups for r in parts],
                [r.restore for r in parts])) if parts else "n/a",
            f"x{median / criu_median[case]:.2f}" if case in criu_median else "n/a",
            fmt_s([r.frozen for r in parts]) + " s" if parts else "n/a",
            fmt_s([r.all_in for r in parts]) + " s" if parts else "n/a",
            fmt_s([r.prepared for r in good if r.prepared is not None]) + " s"
            if good[0].prepared is not None else "",
            fmt_s([r.restore_prepared for r in good if r.restore_prepared is not None]) + " s"
            if good[0].restore_prepared is not None else "",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            for row in rows]


LEGEND = """\
downtime: from spawning the dump until the restored process's first tick (it writes a
  line every ms; a thread notes when each comes, polling every 0.5 ms: then it runs).
  Its parts: the dump (spawned until ready: its page server listens; an ordinary criu
  dump: until it exited), the start-ups (the destination's daemon and, on disk, page
  server, spawned until ready; prepared: the wait for it after the dump), the restore
  (spawned until the first
  tick). Every command is a fresh process.
vs CRIU: this row's median downtime over CRIU's, same workload, same run.
frozen: the process's own gap, its last tick before the freeze to its first after.
all in: from the restore's start until the lazy-pages daemon exited (every page in).
prepared: the daemon started with the dump (lazy-pages --wait-for-page-server), its
  start-up beside the dump's (both on these 2 vCPUs): spawned until it logged that it
  waits for its page server or, ready first, that it connected.
prepared restore: `lazymig restore --wait-for-images` started with the dump too (after
  the daemon); its start-up: spawned until it logged that it waits for the images. Its
  restore starts as soon as the dump's images are complete, so the "restore" part
  (from the moment the dump and the prepared daemon were ready) is what is left of it.
destination ready first: both prepared commands loaded before the dump starts (the
  order docs/operating.md gives); their start-ups are in the prepared columns only.
lazymig rows run the workload on the host; CRIU and mixed rows inside the CRIU chroot
  (its own pid namespace and session, as CRIU needs). lazymig runs from bytecode on
  uvloop, logging at -v; CRIU logs at -v2. Images on tmpfs, loopback TCP.
lazymig demo: `lazymig demo` run as a command, its own "downtime" line (the same measure,
  lazymig's API in one process that imported lazymig before the clock); it touches guest
  memory first as this benchmark does, --cold not (after 10 s idle: this VM's balloon
  reports free pages back to the host, so they are cold again, as on a fresh VM)."""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cases(args: argparse.Namespace) -> list[Case]:
    kinds = [w.strip() == "busy" for w in args.workloads.split(",")]
    out = [Case(int(s), busy) for s in args.sizes.split(",") for busy in kinds]
    if args.threads:
        out.append(Case(64, busy=False, threads=args.threads))
    if args.maps:
        out.append(Case(64, busy=False, maps=args.maps))
    return out


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="64 MiB only, one run each, no 4 GiB; for development "
                             "(not published)")
    parser.add_argument("--sizes", default="64,1024,4096", help="workload sizes in MiB")
    parser.add_argument("--workloads", default="idle,busy")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--threads", type=int, default=8,
                        help="a 64 MiB idle case with this many threads (0: none)")
    parser.add_argument("--maps", type=int, default=5000,
                        help="a 64 MiB idle case with this many file mappings (0: none)")
    parser.add_argument("--demo-size", type=int, default=256,
                        help="run `lazymig demo --size N` (0: not)")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    parser.add_argument("--no-publish", action="store_true",
                        help="leave docs/benchmarks.md alone (publish a saved --out with "
                             "benchmarks/report.py)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.sizes, args.repeat = "64", 1
    setups = [s.strip() for s in args.setups.split(",")]
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    began = time.monotonic()
    say(f"# Downtime as the CLI meets it, lazymig and CRIU 4.1.1, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say()
    say(f"uptime at the start: {uptime()}")
    say(f"machine: {machine.describe()}")
    use_bytecode()
    say("limits, measured in this run:")
    for line in limits():
        say(line)
    say("floors of a Python process here (exec to exit, median of 5):")
    for label, code in FLOORS_HERE.items():
        say(f"  {label:<36}   {interpreter_floor(code)[0]:.3f} s")
    runs: list[Run] = []
    with criu_lock(), criu_root_ready(), tempfile.TemporaryDirectory() as tmp:
        binary = _dt_workload.build(Path(tmp) / "dt_workload")
        for case in cases(args):
            for _ in range(args.repeat):
                for setup in setups:  # interleaved: drift hits every set-up alike
                    machine.warm_memory(min(3 * case.mib, 8192) * MIB)
                    run = run_once(setup, case, binary)
                    runs.append(run)
                    print(f"  {setup}, {case.label}: "
                          f"{'FAILED' if run.error else f'downtime {run.downtime:.3f} s'}",
                          file=sys.stderr, flush=True)
        for _ in range(args.repeat if args.demo_size else 0):
            runs.append(run_demo(args.demo_size))  # it touches memory first itself
            time.sleep(10)  # what it freed is reported back to the host meanwhile
            runs.append(run_demo(args.demo_size, "--cold"))
    say()
    say(f"{len(runs)} runs ({args.repeat} per case), {time.monotonic() - began:.0f} s in all:")
    say()
    for line in table(runs):
        say(line)
    say()
    for line in LEGEND.splitlines():
        say(line)
    say()
    say(f"uptime at the end: {uptime()}")
    failures = [r for r in runs if r.error]
    for run in failures:
        say()
        say(f"FAILED {run.setup}, {run.case.label}: {run.error}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = arguments()
    arguments_given = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (CRIU, ptrace, userfaultfd, namespaces)")
    if unknown := {s.strip() for s in arguments_given.setups.split(",")} - set(SETUPS):
        parser.error(f"unknown set-up {unknown}")
    if arguments_given.quick or arguments_given.no_publish:
        sys.exit(main(arguments_given))
    with report.recorded("downtime"):
        status = main(arguments_given)
    sys.exit(status)
