"""Soak: 200 migrations in a row through one long-lived daemon and one page server.

Both run as the operator runs them (``lazymig page-server`` and ``lazymig
lazy-pages --keep-running``, each its own process), and are measured from
/proc: open fds, threads, resident memory. Children migrate the processes of a
200-process dump in turn, each with a handover of its own (a new userfaultfd),
faults, a background fill and every byte checked. After a warm-up the two
services must not grow: fds exactly, threads within the bound of asyncio's
executor, memory within a stated slack.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port, layout
from lazydump import write_lazy_dump
from reliability import Recorder

CHILD = Path(__file__).with_name("soak_child.py")
MIGRATIONS = 200
WARM_UP = 80  # with twice the children at once as later, to fill the buffer pools
ROUND = 40  # usage is sampled after each round
PAGES = 16  # 64 KiB per process
CHILDREN = 4  # at once, each migrating a batch in turn
BATCH = 10
EXECUTOR_MAX_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
RSS_SLACK_KIB = {"daemon": 5 << 10, "page server": 1 << 10}
"""RSS growth allowed after the warm-up. The daemon: one more buffer in the page
source's reply-buffer pool (up to 4 of 4 MiB are kept for reuse, source.py,
allocated when replies overlap, so one more may appear if replies overlap more
than during the warm-up) and 1 MiB for what it keeps per process handed over
(its report). The page server: 1 MiB for the allocator keeping freed memory."""


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines())
        return cls(len(list(Path(f"/proc/{pid}/fd").iterdir())), int(status["Threads"]),
                   int(status["VmRSS"].split()[0]))

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.rss_kib / 1024:.1f} MiB RSS"


def start(args: list[str]) -> subprocess.Popen[bytes]:
    """Run a lazymig subcommand and wait for its --status-fd byte."""
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "lazymig", *args, "--status-fd",
                             str(ready_w)], pass_fds=[ready_w])
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"\0", f"{args[0]} did not start"
    finally:
        os.close(ready_r)
    return proc



def settled(pid: int) -> Usage:
    """The usage once two samples 0.2 s apart agree (connections being torn down end)."""
    last = Usage.of(pid)
    for _ in range(50):
        time.sleep(0.2)
        now = Usage.of(pid)
        if (now.fds, now.threads) == (last.fds, last.threads):
            return now
        last = now
    return last


def migrate(socket_path: Path, jobs: list[tuple[int, int]], at_once: int = CHILDREN) -> None:
    """Run the jobs (image pid, address) in children, ``at_once`` at a time, BATCH each."""
    batches = [jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)]
    for first in range(0, len(batches), at_once):
        children = [subprocess.Popen(
            [sys.executable, str(CHILD), str(socket_path), str(PAGES),
             *(f"{pid}:{vaddr:#x}" for pid, vaddr in batch)], stdout=subprocess.PIPE)
            for batch in batches[first:first + at_once]]
        for child, batch in zip(children, batches[first:first + at_once], strict=True):
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0, out.decode()
            assert out.decode().count("migrated") == len(batch)


def test_200_migrations_through_one_daemon(tmp_path: Path, reliability: Recorder) -> None:
    dump = layout(MIGRATIONS, PAGES)
    write_lazy_dump(tmp_path, dump)
    jobs = [(pid, vaddr) for pid, [(vaddr, _)] in dump.items()]
    port = free_port()
    started = time.monotonic()
    server = start(["page-server", "--lazy-pages", "--address", "127.0.0.1", "--port",
                    str(port), "-D", str(tmp_path)])
    daemon = None
    try:
        daemon = start(["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                        str(port), "-D", str(tmp_path), "--keep-running"])
        services = {"daemon": daemon.pid, "page server": server.pid}
        socket_path = tmp_path / "lazy-pages.socket"
        migrate(socket_path, jobs[:WARM_UP], at_once=2 * CHILDREN)
        warm = {name: settled(pid) for name, pid in services.items()}
        trend = {name: [warm[name].rss_kib] for name in services}
        for first in range(WARM_UP, MIGRATIONS, ROUND):
            migrate(socket_path, jobs[first:first + ROUND])
            end = {name: settled(pid) for name, pid in services.items()}
            for name in services:
                trend[name].append(end[name].rss_kib)
        assert daemon.poll() is None and server.poll() is None  # both still serving
    finally:
        for proc in (daemon, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    elapsed = time.monotonic() - started
    for name in services:
        print(f"\n{name}: after {WARM_UP} migrations {warm[name]}; after {MIGRATIONS}: "
              f"{end[name]}; RSS every {ROUND} (KiB): {trend[name]}")
        assert end[name].fds == warm[name].fds, (name, warm[name], end[name])
        # asyncio's default executor starts its threads as concurrent calls first need them,
        # up to a bound: a pool still filling may add a few; a leak adds one per migration.
        assert end[name].threads - warm[name].threads <= EXECUTOR_MAX_WORKERS, \
            (name, warm[name], end[name])
        assert end[name].rss_kib - warm[name].rss_kib <= RSS_SLACK_KIB[name], \
            (name, warm[name], end[name])
    growth = "; ".join(
        f"{name} {warm[name]} after the warm-up, then {end[name].fds - warm[name].fds:+d} fds, "
        f"{end[name].threads - warm[name].threads:+d} threads, "
        f"{end[name].rss_kib - warm[name].rss_kib:+d} KiB RSS (every {ROUND}: "
        f"{', '.join(f'{kib - trend[name][0]:+d}' for kib in trend[name][1:])} KiB)"
        for name in services)
    reliability.record(
        "Soak", f"{MIGRATIONS} migrations in a row through one daemon and one page server",
        tried=f"{MIGRATIONS} handovers of {PAGES}-page processes (each a new userfaultfd, "
              f"faults, background fill, every byte checked) from attach() children, "
              f"{CHILDREN} at a time, in {elapsed:.0f} s; warm-up {WARM_UP}",
        held=f"{growth} (allowed: fds and threads 0, RSS {RSS_SLACK_KIB['daemon']} KiB "
             f"daemon / {RSS_SLACK_KIB['page server']} KiB page server)")
