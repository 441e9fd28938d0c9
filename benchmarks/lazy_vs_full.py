"""Lazy and full migration side by side, with lazymig alone, in one run.

    sudo .venv/bin/python benchmarks/lazy_vs_full.py [--sizes 64,1024,4096] [--repeat 1]
        [--out benchmarks/results/lazy_vs_full.txt]

For each size a busy workload (benchmarks/_sbs_workload.py: it checks its whole
memory non-stop) is migrated over loopback, images on tmpfs, two ways:

* ``lazy``: ``lazymig dump --lazy-pages`` (page server on the frozen source),
  ``lazymig lazy-pages --page-server``, ``lazymig restore --lazy-pages -d``;
* ``full``: ``lazymig dump`` (``lazymig.dump.dump()``: every page into
  pages-1.img, source killed), ``lazymig restore -d``.

Each lazymig command runs in its own process (benchmarks/_lvf_worker.py) started
and imported *before* the clock runs: the command itself is
``lazymig.cli.main(argv)``, so the numbers are lazymig's, not the interpreter's
start-up (measured separately below, as one of the machine's limits).

Columns:

* downtime: from the moment the dump seized the source (its TracerPid, polled
  every 0.2 ms) until ``restore -d`` returned (the restored copy runs); its
  parts: the dump (until the page server listens, or every page is on disk),
  the daemon's start (lazy), the restore;
* total: from the dump's start until every lazymig process exited (lazy: the
  daemon after the last page, the dump after killing the source);
* pass: the restored busy copy's first full pass over its memory, begun the
  moment ``restore -d`` returned (SIGUSR1): faults and background fetch race it
  (lazy) or memory is local (full); bad = pages that differ from the pattern;
* RSS, CPU: peak resident set (VmHWM) and CPU time (user + system, median) of
  each lazymig process.

Numbers are printed, never asserted; every process started is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE.parent / "tests"))

import _sbs_workload  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from criu_side_by_side import wait_for  # noqa: E402
from helpers import free_port  # noqa: E402

MIB = 1 << 20


@dataclass
class Run:
    """One workload, one way."""

    mode: str
    mib: int
    downtime: float = 0.0
    dump: float = 0.0
    daemon_start: float = 0.0
    restore: float = 0.0
    total: float = 0.0
    pass_s: float | None = None
    bad: int | None = None
    usage: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Per lazymig process: peak RSS (KiB), CPU seconds."""
    error: str | None = None


class Worker:
    """A pre-started ``lazymig`` command (see _lvf_worker.py)."""

    def __init__(self, name: str, stdout: int | None = None, pass_fds: tuple[int, ...] = ()):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_lvf_worker.py")], stdin=subprocess.PIPE,
            stdout=stdout, stderr=subprocess.PIPE, pass_fds=pass_fds)
        assert self.proc.stderr is not None
        self._err = self.proc.stderr
        if self._line(60) != "ready":
            raise RuntimeError(f"the {name} worker did not start")

    def _line(self, timeout: float) -> str:
        """The next stderr line that is ours (log lines of lazymig pass by)."""
        deadline = time.monotonic() + timeout
        while True:
            if not select.select([self._err], [], [], max(deadline - time.monotonic(), 0))[0]:
                raise TimeoutError(f"{self.name}: nothing after {timeout} s")
            line = self._err.readline().decode()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.proc.wait()}")
            if line.startswith(("ready", "done ")):
                return line.strip()

    def go(self, argv: list[str]) -> float:
        assert self.proc.stdin is not None
        started = time.monotonic()
        self.proc.stdin.write(json.dumps(argv).encode() + b"\n")
        self.proc.stdin.flush()
        return started

    def done(self, timeout: float) -> tuple[float, tuple[int, float]]:
        """When the command returned (CLOCK_MONOTONIC); its peak RSS (KiB) and CPU (s)."""
        _, at, status, rss, cpu = self._line(timeout).split()
        if int(status):
            raise RuntimeError(f"{self.name} exited {status}")
        self.proc.wait(10)
        return float(at), (int(rss), float(cpu))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_status(fd: int, timeout: float, what: str) -> float:
    if not select.select([fd], [], [], timeout)[0] or os.read(fd, 1) != b"\0":
        raise TimeoutError(f"{what} not ready after {timeout} s")
    return time.monotonic()


class FreezeWatcher:
    """Notes when the source gets a tracer (the dump seized it: downtime starts),
    polling its TracerPid every 0.2 ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.frozen_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freeze-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._stop.is_set():
            with contextlib.suppress(OSError), open(path) as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        if line.split()[1] != "0":
                            self.frozen_at = time.monotonic()
                            return
                        break
            time.sleep(0.0002)

    def result(self) -> float:
        self._stop.set()
        self._thread.join()
        if self.frozen_at is None:
            raise RuntimeError("never saw the source traced")
        return self.frozen_at


@contextlib.contextmanager
def killing(procs: list[subprocess.Popen[bytes]], workers: list[Worker]) -> Iterator[None]:
    try:
        yield
    finally:
        for w in workers:
            w.kill()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def restored_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.strip().isdigit():
            return int(line)
    raise RuntimeError("restore -d printed no pid")


def run_once(mode: str, binary: Path, mib: int) -> Run:
    run = Run(mode, mib)
    lazy = mode == "lazy"
    procs: list[subprocess.Popen[bytes]] = []
    workers: list[Worker] = []
    restored = 0
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="lvf-") as tmp, \
            killing(procs, workers):
        images, log = Path(tmp) / "images", Path(tmp) / "workload.log"
        images.mkdir()
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        dump_r, dump_w = os.pipe()
        daemon_r, daemon_w = os.pipe()
        try:
            workload = subprocess.Popen([str(binary), str(mib), "busy"], stdout=out,
                                        stdin=subprocess.DEVNULL)
            procs.append(workload)
            dumper = Worker("dump", pass_fds=(dump_w,))
            daemon = Worker("lazy-pages", pass_fds=(daemon_w,)) if lazy else None
            restorer = Worker("restore", stdout=out)
            workers += [w for w in (dumper, daemon, restorer) if w is not None]
            wait_for(lambda: "tick" in log.read_text(), 120, "workload start")
            port = str(free_port())
            watcher = FreezeWatcher(workload.pid)
            if lazy:
                started = dumper.go(["dump", "-t", str(workload.pid), "-D", str(images),
                                     "--lazy-pages", "--address", "127.0.0.1", "--port", port,
                                     "--status-fd", str(dump_w)])
                dumped = wait_status(dump_r, 120, "lazymig dump --lazy-pages")
                assert daemon is not None
                daemon.go(["lazy-pages", "--page-server", "--address", "127.0.0.1",
                           "--port", port, "-D", str(images), "--status-fd", str(daemon_w)])
                daemon_up = wait_status(daemon_r, 60, "lazymig lazy-pages")
                restorer.go(["restore", "--lazy-pages", "-D", str(images), "-d"])
            else:
                started = dumper.go(["dump", "-t", str(workload.pid), "-D", str(images),
                                     "--status-fd", str(dump_w)])
                dumped = daemon_up = wait_status(dump_r, 300, "lazymig dump")
                restorer.go(["restore", "-D", str(images), "-d"])
            running, run.usage["restore"] = restorer.done(300)
            restored = restored_pid(log)
            os.kill(restored, signal.SIGUSR1)
            frozen = watcher.result()
            run.downtime, run.dump = running - frozen, dumped - frozen
            run.daemon_start, run.restore = daemon_up - dumped, running - daemon_up
            ends = []
            for name, w in (("dump", dumper), ("lazy-pages", daemon)):
                if w is not None:
                    end, run.usage[name] = w.done(600)
                    ends.append(end)
            run.total = max([*ends, running]) - started
            passes = wait_for(lambda: _sbs_workload.passes(log), 300, "pass line")
            run.pass_s, run.bad = passes[0]
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            if restored:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restored, signal.SIGKILL)
            for fd in (out, dump_r, dump_w, daemon_r, daemon_w):
                os.close(fd)
    return run


def python_startup_s() -> float:
    """Seconds for ``python -c 'import lazymig.cli, lazymig.restore'`` (what a CLI
    command pays before lazymig runs, left out of the numbers above)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import lazymig.cli, lazymig.restore, lazymig.dump"],
                   check=True)
    return time.monotonic() - started


def fmt_size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib >= 1024 else f"{mib} MiB"


def fmt_s(values: list[float]) -> str:
    """min / median over the repeats (one value alone as is)."""
    if len(values) == 1:
        return f"{values[0]:.3f} s"
    return f"{min(values):.3f} / {statistics.median(values):.3f} s"


def table(runs: list[Run]) -> list[str]:
    head = ["size", "mode", "downtime", "= dump + daemon + restore (medians)", "total",
            "pass (bad)", "dump: RSS, CPU", "lazy-pages: RSS, CPU", "restore: RSS, CPU"]
    rows = [head]
    cases = sorted({(r.mib, r.mode) for r in runs}, key=lambda c: (c[0], c[1] != "lazy"))
    for mib, mode in cases:
        case = [r for r in runs if (r.mib, r.mode) == (mib, mode)]
        good = [r for r in case if not r.error]
        failed = f" ({len(case) - len(good)} failed)" if len(good) < len(case) else ""
        if not good:
            rows.append([fmt_size(mib), mode, "FAILED", "", "", "", "", "", ""])
            continue
        rows.append([
            fmt_size(mib), mode + failed, fmt_s([r.downtime for r in good]),
            " + ".join(f"{statistics.median(v):.3f}" for v in (
                [r.dump for r in good], [r.daemon_start for r in good],
                [r.restore for r in good])),
            fmt_s([r.total for r in good]),
            f"{fmt_s([r.pass_s or 0.0 for r in good])} ({max(r.bad or 0 for r in good)})",
            *(f"{max(r.usage[k][0] for r in good) / 1024:.0f} MiB, "
              f"{statistics.median(r.usage[k][1] for r in good):.2f} s" if k in good[0].usage
              else "-" for k in ("dump", "lazy-pages", "restore")),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
            for row in rows]


def growth(runs: list[Run]) -> list[str]:
    """The issue's target, from the medians: lazy downtime of the largest size over
    that of the smallest (< 2), and of 1 GiB (< 0.2 s)."""
    lazy: dict[int, list[float]] = {}
    for run in runs:
        if run.mode == "lazy" and not run.error:
            lazy.setdefault(run.mib, []).append(run.downtime)
    if len(lazy) < 2:
        return []
    median = {mib: statistics.median(values) for mib, values in lazy.items()}
    small, large = min(median), max(median)
    lines = [
        f"lazy downtime {fmt_size(small)} -> {fmt_size(large)}: {median[small]:.3f} -> "
        f"{median[large]:.3f} s (medians), x{median[large] / median[small]:.2f} "
        "(target: less than x2)"]
    if 1024 in median:
        lines.append(f"lazy downtime 1 GiB: {median[1024]:.3f} s (target: under 0.2 s)")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,1024,4096", help="workload sizes in MiB")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each case (the table shows min / median)")
    parser.add_argument("--modes", default="lazy,full", help="lazy, full or both")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (ptrace, userfaultfd)")
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say(f"# lazymig: lazy vs full migration, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    say()
    say(f"machine: {machine.describe()}")
    say("limits, measured in this run:")
    say(f"  memcpy (4 MiB blocks)                  {machine.memcpy_gbps():.2f} GB/s")
    say(f"  bare UFFDIO_COPY                       {machine.uffd_copy_gbps():.2f} GB/s")
    say(f"  loopback TCP                           {machine.loopback_tcp_gbps():.2f} GB/s")
    say(f"  tee + read + send to a loopback socket {machine.pipe_to_socket_gbps():.2f} GB/s")
    say(f"  python start + lazymig imports         {python_startup_s():.3f} s (not counted)")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        binary = _sbs_workload.build(Path(tmp) / "sbs_workload")
        for mib in (int(s) for s in args.sizes.split(",")):
            for _ in range(args.repeat):
                for mode in args.modes.split(","):
                    machine.warm_memory(min(3 * mib * MIB, 12 << 30))
                    run = run_once(mode, binary, mib)
                    runs.append(run)
                    print(f"  {mode} {fmt_size(mib)}: {run.error or f'{run.downtime:.3f} s'}",
                          file=sys.stderr, flush=True)
    say()
    say(f"{len(runs)} runs ({args.repeat} per case"
        f"{', min / median' if args.repeat > 1 else ''}), loopback, images on tmpfs:")
    say()
    for line in table(runs):
        say(line)
    for run in runs:
        if run.error:
            say(f"FAILED {run.mode} {fmt_size(run.mib)}: {run.error}")
    say()
    for line in growth(runs):
        say(line)
    for line in __doc__.split("Columns:\n\n")[1].split("\n\nNumbers")[0].splitlines():
        say(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    shutil.which("gcc") or sys.exit("needs gcc for the workload")
    with report.recorded("lazy_vs_full"):
        status = main()
    sys.exit(status)
