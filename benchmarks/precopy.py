"""Pre-copy against pure lazy and pure full migration (issue 17), lazymig alone.

    sudo .venv/bin/python benchmarks/precopy.py [--mib 1024] [--out benchmarks/results/precopy.txt]
        [--workloads idle,read-mostly,write-heavy] [--modes lazy,full,pre+eager,pre+lazy]

Three workloads (benchmarks/_precopy_workload.c), each --mib of private memory:
idle; read-mostly (reads everything over and over, writes 5% of its pages per
second); write-heavy (writes 30% per second). Each is migrated over loopback,
images on /dev/shm, four ways:

* ``lazy``: ``lazymig.migrate(pid)``;
* ``full``: ``lazymig.dump.dump(pid)`` (every page on disk), then a restore;
* ``pre+eager``: pre-copy rounds while it runs, each applied to a prepared restore
  (``Restorer.prepare``, ``add_round``) meanwhile, then the dump (the last dirty
  set on disk), then that restore;
* ``pre+lazy``: ``lazymig.migrate(pid, precopy=...)``: the last dirty set stays
  lazy, the destination prepared during the rounds;
* ``pre+lazy-unprepared``: the same without the preparation (``copy_images`` given,
  as an identity, turns it off): the restore writes every pre-copied page into the
  new process after the freeze, as before the prepared restore.

Columns: downtime (from the freeze until the restored copy runs); of which the
restore (a prepared one moves the pre-copied pages into place; an unprepared
one writes them, allocating the new process's memory then); pages moved into
place (prepared); faults after
the restore (lazy pages a fault asked for); bytes sent (pre-copy rounds, pages on
disk after the freeze, lazy pages served); to all pages (from the freeze until
every page is in the restored process); its first full pass over its memory
(asked the moment it runs; bad = pages that disagree with its version table);
the rounds. And CRIU's own pre-dump on this kernel, as a row with its error.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lazymig
from lazymig.dump.dumper import dump
from lazymig.dump.precopy import PreCopy, PreCopyOptions
from lazymig.proto.constants import PAGE_SIZE
from lazymig.restore.restorer import Restorer
from lazymig.testing.workload import OutputLines

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import helpers  # noqa: E402

WORKLOADS = {"idle": ("idle", 0.0), "read-mostly": ("read", 5.0), "write-heavy": ("write", 30.0)}
MODES = ("lazy", "full", "pre+eager", "pre+lazy", "pre+lazy-unprepared")
CRIU_ROOT = Path(os.environ.get("CRIU_ROOT", "/opt/criu-root"))


@dataclass
class Row:
    workload: str
    mode: str
    downtime: float
    faults: int
    bytes_sent: int
    to_all: float
    first_pass: float
    bad: int
    rounds: str
    restore: float
    """Of the downtime, the restore."""
    moved: int = 0
    """Pre-copied pages a prepared restore moved into place."""


def build(out: Path) -> Path:
    exe = out / "_precopy_workload"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "_precopy_workload.c")],
                   check=True)
    return exe


class Restored(helpers.Output):
    """A pipe for the restored copy's stdout, and its PASS line."""

    async def first_pass(self, pid: int) -> tuple[float, int]:
        os.kill(pid, signal.SIGUSR1)
        line = await asyncio.to_thread(self.lines.next, 120.0)
        m = re.fullmatch(r"PASS seconds=([\d.]+) bad=(\d+)", line)
        assert m, line
        return float(m[1]), int(m[2])


def spawn(exe: Path, workload: str, mib: int) -> subprocess.Popen[str]:
    kind, pct = WORKLOADS[workload]
    return subprocess.Popen([str(exe), "--mib", str(mib), "--mode", kind, "--pct", str(pct)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


async def migrate_one(exe: Path, workload: str, mode: str, mib: int, shm: Path) -> Row:
    proc = spawn(exe, workload, mib)
    assert proc.stdout is not None
    lines = OutputLines(proc.stdout)
    out = Restored()
    images = Path(tempfile.mkdtemp(prefix="precopy-", dir=shm))
    restored_pid = -1
    try:
        await asyncio.to_thread(lines.next, 60.0)  # READY, memory filled
        await asyncio.sleep(1.0)  # it runs its pattern for a while
        rounds = ""
        pages_sent = 0
        faults = 0
        moved = 0
        if mode in ("lazy", "pre+lazy", "pre+lazy-unprepared"):
            reports: list[lazymig.RoundReport] = []
            began = time.monotonic()

            async def in_place(path: Path) -> Path:
                return path

            result = await lazymig.migrate(
                proc.pid, images_dir=images, stdio=out.stdio, on_round=reports.append,
                precopy=PreCopyOptions(lazy=True) if mode != "lazy" else False,
                copy_images=in_place if mode == "pre+lazy-unprepared" else None)
            out.handed_over()
            restored_pid = result.restored.pid
            downtime = result.downtime
            to_all = time.monotonic() - began - sum(r.seconds for r in reports)
            faults = result.progress.faults
            restore = result.restored.seconds
            moved = result.restored.prepared_pages
            pages_sent = sum(r.pages_sent for r in reports) + result.dump.nonlazy_pages \
                + result.dump.pages_sent
            rounds = " ".join(f"{r.pages_sent}" for r in reports)
        else:
            precopy = None
            final = images / "dump"
            final.mkdir()
            restorer = Restorer(final, stdio=out.stdio)
            if mode == "pre+eager":
                await restorer.prepare()
                precopy = await PreCopy.start(proc.pid, images / "precopy",
                                              on_round=lambda r: restorer.add_round(r.images_dir))
                await precopy.run()
                rounds = " ".join(f"{r.pages_sent}" for r in precopy.rounds)
                pages_sent = precopy.pages_sent
            began = time.monotonic()
            try:
                dumped = await dump(proc.pid, final, precopy=precopy)
            finally:
                if precopy is not None:
                    await precopy.aclose()
            restored = await restorer.run()
            out.handed_over()
            restored_pid = restored.pid
            restore = restored.seconds
            moved = restored.prepared_pages
            downtime = to_all = time.monotonic() - began
            pages_sent += dumped.nonlazy_pages
        first_pass, bad = await out.first_pass(restored_pid)
        return Row(workload, mode, downtime, faults, pages_sent * PAGE_SIZE, to_all,
                   first_pass, bad, rounds, restore, moved)
    finally:
        for pid in (restored_pid, proc.pid):
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
        out.handed_over()
        out.lines.close()
        lines.close()
        shutil.rmtree(images, ignore_errors=True)


def criu_pre_dump_error() -> str:
    """What CRIU 4.1.1's ``pre-dump --track-mem`` says on this kernel (its chroot,
    shared: taken under /tmp/lazymig-criu.lock)."""
    criu = CRIU_ROOT / "usr/sbin/criu"
    if not criu.exists():
        return f"(no CRIU at {CRIU_ROOT})"
    with open("/tmp/lazymig-criu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _criu_pre_dump()


def _criu_pre_dump() -> str:
    sleeper = subprocess.Popen(["chroot", str(CRIU_ROOT), "setsid", "sleep", "60"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        with tempfile.TemporaryDirectory(dir=CRIU_ROOT / "tmp") as d:
            inside = "/" + str(Path(d).relative_to(CRIU_ROOT))
            res = subprocess.run(["chroot", str(CRIU_ROOT), "criu", "pre-dump", "-t",
                                  str(sleeper.pid), "-D", inside, "--track-mem"],
                                 check=False, capture_output=True, text=True, timeout=60)
        return f"exit {res.returncode}: " + " ".join(res.stderr.strip().splitlines()[-1:])
    finally:
        sleeper.kill()
        sleeper.wait()


def table(rows: list[Row]) -> list[str]:
    out = ["| workload | mode | downtime | of which restore | pages moved | faults after restore "
           "| bytes sent | to all pages | first pass (bad) | rounds (pages copied) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r.workload} | {r.mode} | {r.downtime:.3f} s | {r.restore:.3f} s | "
                   f"{r.moved} | {r.faults} | "
                   f"{r.bytes_sent / (1 << 20):.0f} MiB | {r.to_all:.3f} s | "
                   f"{r.first_pass:.3f} s ({r.bad}) | {r.rounds or '-'} |")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per case, the modes alternating within each repeat (a "
                             "loaded machine: the median downtime's run is shown)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shm = Path("/dev/shm")
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        rows = []
        for workload in args.workloads.split(","):
            runs: dict[str, list[Row]] = {m: [] for m in args.modes.split(",")}
            for _ in range(args.repeat):
                for mode, done in runs.items():
                    done.append(asyncio.run(migrate_one(exe, workload, mode, args.mib, shm)))
                    print(table(done[-1:])[-1], flush=True)
                    loads.append(os.getloadavg()[0])
            for done in runs.values():
                median = sorted(done, key=lambda r: r.downtime)[len(done) // 2]
                if len(done) > 1:
                    median.rounds = (median.rounds or "-") + " (downtimes " + " ".join(
                        f"{r.downtime:.3f}" for r in done) + ")"
                rows.append(median)
    load = os.getloadavg()
    text = [f"# lazymig: pre-copy vs lazy vs full, "
            f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}", "",
            f"machine: Linux {os.uname().release}, {os.cpu_count()} CPUs, Python "
            f"{sys.version.split()[0]}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            f" (a shared machine: noisy; 1-minute load {min(loads):.1f} to {max(loads):.1f} "
            "during the runs)",
            f"{args.mib} MiB per workload, {args.repeat} run(s) per case, the modes alternating "
            "(the run of median downtime shown), loopback, images on /dev/shm:", "",
            *table(rows), ""]
    if args.out:  # before CRIU's row, which waits for the shared chroot
        args.out.write_text("\n".join(text))
    text.append(f"CRIU 4.1.1 `pre-dump --track-mem` here: {criu_pre_dump_error()}\n")
    print("\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
