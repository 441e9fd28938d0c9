"""Benchmark of the lazy-pages daemon on loopback, beside the machine's own limits.

    .venv/bin/python benchmarks/daemon.py [--sizes 256,1024] [--touches 2000] [--no-limits]
    sudo .venv/bin/python benchmarks/daemon.py --criu [--size 256] [--touches 2000]
        [--repeat 3]

With --criu: CRIU's ``criu lazy-pages`` and lazymig's daemon in one run, each
fed by the same page server (``criu dump --lazy-pages`` of a C workload in the
CRIU chroot, benchmarks/_sbs_workload.py ``random``), restored by ``criu
restore --lazy-pages``; the restored copy times its own reads of random pages
that are not present yet (the fault round trip a program sees). Printed: p50 /
p99 per daemon with the background on and (lazymig only: CRIU's cannot turn it
off) off, lazymig's daemon fed by its own page server, each daemon's peak RSS
and CPU, the ratio to CRIU's p50, the machine's limits and its load.

For each region size it writes a lazy dump, serves it with lazymig's page
server (its own process) and runs the daemon (its own process, so its peak RSS
is its own). A child process attaches the region and:

* touches random pages with the background fetch off, then on, timing every
  touch from the faulting side (the fault round trip a program sees);
* waits while the background fetch pulls everything (throughput, with the CPU
  seconds the daemon and the page server spent meanwhile and how busy the
  vCPUs were: the background is bound by CPU time on this 2-vCPU VM).

Printed beside, measured in the same run: bare UFFDIO_COPY from memory, a bare
uffd fault round trip (handler copying from memory, blocked in read() on the
uffd, and again blocked in epoll_wait as an event loop is), loopback TCP throughput
and a loopback request/reply round trip. Then the floors that explain what is
left: the request/reply with both processes pinned to one vCPU and to two (an
idle vCPU of this VM halts, and waking it costs several round trips), the same
between two uvloop processes, and a fault served by a GET in minimal Python
(benchmarks/_fault_floor.py: three processes, no bookkeeping), all on one vCPU
and placed freely by the scheduler, as the daemon's processes are. Last, the
floor of the background transfer: the same four copies of every byte (file
read, send, receive, UFFDIO_COPY) in two bare processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import mmap
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _sbs_workload
import criu_side_by_side as sbs
import machine
import report
from _fault_floor import fault_floor_us
from criu_peer import (
    ChrootDir,
    Workload,
    chroot_argv,
    criu,
    criu_root_ready,
    kill_pid,
    lazymig_argv,
    start_with_status_fd,
)
from helpers import free_port
from lazydump import write_lazy_dump

from lazymig.linux.procfs import read_stat
from lazymig.proto.constants import PAGE_SIZE
from lazymig.uffd.uffd import Uffd

BASE = 0x6F0000000000
PID = 4000

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


_JSON_LINE_LIMIT = 64 << 20
"""The toucher and the daemon runner report in one JSON line, with a latency per
touch: asyncio's default 64 KiB readline limit broke runs above ~3000 touches."""


async def run_case(images: Path, nr_pages: int, *, background: bool, touches: int,
                   channels: int, wait: bool) -> dict[str, object]:
    py = sys.executable
    server = await asyncio.create_subprocess_exec(
        py, "-m", "lazymig", "page-server", "--lazy-pages", "-D", str(images),
        "--address", "127.0.0.1", "--port", "0", "--status-fd", "1",
        stdout=asyncio.subprocess.PIPE)
    # The port is chosen by the kernel: read it from /proc of the server.
    assert server.stdout is not None
    await server.stdout.readexactly(1)
    port = _listening_port(server.pid)
    daemon = await asyncio.create_subprocess_exec(
        py, str(HERE / "_daemon_runner.py"), str(images), str(port),
        "1" if background else "0", str(channels), stdout=asyncio.subprocess.PIPE,
        limit=_JSON_LINE_LIMIT)
    sock = images / "lazy-pages.socket"
    async with asyncio.timeout(30):
        while not sock.exists():  # noqa: ASYNC110 (another process creates it)
            await asyncio.sleep(0.01)
    toucher = await asyncio.create_subprocess_exec(
        py, str(HERE / "_toucher.py"), str(sock), str(PID), hex(BASE), str(nr_pages),
        str(touches), "wait" if wait else "touch", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, limit=_JSON_LINE_LIMIT)
    assert daemon.stdout is not None and toucher.stdout is not None and toucher.stdin
    busy_before = machine_busy()
    server_cpu = [cpu_seconds(server.pid)]
    watch = asyncio.create_task(_follow_cpu(server.pid, server_cpu))
    if wait:  # the daemon finishes while the toucher still waits, then it touches
        daemon_out = json.loads(await daemon.stdout.readline())
        toucher.stdin.write(b"\n")
        await toucher.stdin.drain()
        touch_out = json.loads(await toucher.stdout.readline())
    else:
        touch_out = json.loads(await toucher.stdout.readline())
        daemon_out = json.loads(await daemon.stdout.readline())
    busy = [after - before for after, before in zip(machine_busy(), busy_before, strict=True)]
    watch.cancel()
    await toucher.wait()
    await daemon.wait()
    try:  # complete only if every page was served (the toucher may have exited first)
        await asyncio.wait_for(server.wait(), 1.0)
    except TimeoutError:
        server.terminate()
        await server.wait()
    if not daemon_out["ok"]:
        raise SystemExit("the daemon did not complete")
    busy_vcpus = busy[0] / max(sum(busy), 1e-9) * (os.cpu_count() or 1)
    return {**daemon_out, **touch_out, "busy_vcpus": busy_vcpus,
            "server_cpu_s": server_cpu[-1] - server_cpu[0]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = read_stat(pid)[1]
    return (fields[14] + fields[15]) / TICK


async def _follow_cpu(pid: int, samples: list[float], period: float = 0.02) -> None:
    """Keep the CPU seconds of ``pid`` in ``samples[-1]`` until it exits (its last
    ``period`` is lost: it may be reaped before the case ends)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        while True:
            await asyncio.sleep(period)
            samples.append(cpu_seconds(pid))


def machine_busy() -> tuple[float, float]:
    """Busy and idle seconds, summed over every vCPU, since boot (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / TICK, idle / TICK


def _listening_port(pid: int) -> int:
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (its status fd)
            links.append(str(fd.readlink()))
    inodes = {link[8:-1] for link in links if link.startswith("socket:")}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and fields[3] == "0A":
            return int(fields[1].split(":")[1], 16)
    raise RuntimeError("page server port not found")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def bare_fault_rtt_us(touches: int = 2000, *, epoll: bool = False) -> float:
    """Median fault round trip with a minimal handler copying from memory, blocked in
    read() on the uffd or, with ``epoll``, in epoll_wait as an event loop waits."""
    nr = 4096
    a, b = socket.socketpair()
    child = os.fork()
    if child == 0:
        try:
            region = mmap.mmap(-1, nr * PAGE_SIZE)
            base = ctypes.addressof(ctypes.c_char.from_buffer(region))
            uffd = Uffd.open()
            uffd.register(base, nr * PAGE_SIZE)
            socket.send_fds(a, [base.to_bytes(8, "little")], [uffd.fd])
            lat = []
            for p in random.Random(1).sample(range(nr), touches):
                t = time.perf_counter()
                region[p * PAGE_SIZE]
                lat.append(time.perf_counter() - t)
            a.sendall(json.dumps(sorted(lat)[len(lat) // 2]).encode())
        finally:
            os._exit(0)
    _, fds, _, _ = socket.recv_fds(b, 8, 1)
    uffd = Uffd.from_fd(fds[0], non_blocking=epoll)
    poller = select.epoll()
    poller.register(uffd.fd, select.EPOLLIN)
    page = bytes(PAGE_SIZE)
    served = 0
    while served < touches:  # one fault at a time: the child touches pages in turn
        if epoll:
            poller.poll()
        for event in uffd.read_events():
            uffd.copy(event.address & ~(PAGE_SIZE - 1), page)  # type: ignore[union-attr]
            served += 1
    median = json.loads(b.recv(100))
    os.waitpid(child, 0)
    poller.close()
    uffd.close()
    return float(median) * 1e6


def machine_limits() -> dict[str, str]:
    """The machine's limits and floors, measured now (outside any event loop)."""
    limits = {
        "bare UFFDIO_COPY": f"{machine.uffd_copy_gbps():.2f} GB/s",
        "bare uffd fault round trip (p50)": f"{bare_fault_rtt_us():.1f} us",
        "bare uffd fault round trip, epoll handler (p50)":
            f"{bare_fault_rtt_us(epoll=True):.1f} us",
        "loopback TCP": f"{machine.loopback_tcp_gbps():.2f} GB/s",
        "loopback 4 KiB request/reply (p50)": f"{machine.loopback_rtt_us():.1f} us",
    }
    # Floors: where the wake-ups land, and what Python itself costs (see the docs).
    one, across = machine.loopback_rtt_us(cpus=(0, 0)), machine.loopback_rtt_us(cpus=(0, 1))
    limits["loopback 4 KiB request/reply, 1 / 2 vCPUs"] = f"{one:.1f} / {across:.1f} us"
    limits["uvloop 4 KiB request/reply (p50)"] = f"{machine.uvloop_rtt_us():.1f} us"
    for block in (PAGE_SIZE, 16 * PAGE_SIZE):
        pinned = fault_floor_us(block, one_cpu=True)
        free = fault_floor_us(block)
        limits[f"minimal uvloop fault + {block >> 10} KiB GET, 1 vCPU / free"] = \
            f"{pinned:.1f} / {free:.1f} us"
    machine.warm_memory(2 << 30)
    limits["bare transfer: file read+send -> recv+UFFDIO_COPY"] = \
        f"{machine.transfer_floor_gbps():.2f} GB/s"
    return limits


async def main(args: argparse.Namespace) -> None:
    for size in (int(s) for s in args.sizes.split(",")):
        nr = size * 2**20 // PAGE_SIZE
        machine.warm_memory(3 * size * 2**20)  # the dump in tmpfs, the region, slack
        with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:  # page cache, not disk
            images = Path(tmp)
            write_lazy_dump(images, {PID: [(BASE, nr)]})
            print(f"\n{size} MiB region ({nr} pages), {args.channels} channel(s):")
            for background in (False, True) if args.touches else ():
                r = await run_case(images, nr, background=background, touches=args.touches,
                                   channels=args.channels, wait=False)
                lat = r["latencies"]
                assert isinstance(lat, list)
                inside = r["daemon_p50"]
                assert isinstance(inside, float)
                print(f"  fault round trip, background {'on ' if background else 'off'}: "
                      f"p50 {pct(lat, 0.5):7.1f} us  p99 {pct(lat, 0.99):8.1f} us  "
                      f"(mean {statistics.mean(lat) * 1e6:.1f} us, {len(lat)} touches; "
                      f"inside the daemon p50 {inside * 1e6:.1f} us)")
            r = await run_case(images, nr, background=True, touches=0, channels=args.channels,
                               wait=True)
            elapsed = float(r["finished"]) - float(r["first_handover"])  # type: ignore[arg-type]
            print(f"  background: {size} MiB in {elapsed:.3f} s = "
                  f"{r['bytes'] / elapsed / 1e9:.2f} GB/s; daemon CPU "  # type: ignore[operator]
                  f"{r['cpu_s']:.2f} s, page server CPU {r['server_cpu_s']:.2f} s, vCPUs busy "
                  f"meanwhile {r['busy_vcpus']:.1f} of {os.cpu_count()} (all processes)")
            print(f"  daemon peak RSS: {int(r['rss_kib']) / 1024:.1f} MiB")  # type: ignore[call-overload]


# -- the fault round trip beside CRIU's daemon (--criu) ---------------------------------------

FAULT_SETUPS = ("CRIU", "lazymig", "lazymig, background off",
                "lazymig, background off, lazymig page server", "lazymig, no spin",
                "lazymig, background off, no spin")
"""Daemons measured by --criu: CRIU's ``criu lazy-pages`` and lazymig's, both fed by
``criu dump --lazy-pages``, but "lazymig page server" is fed by ``lazymig page-server`` over
an ordinary dump. CRIU's daemon has no switch for its background fetch (it starts once the
restore finished): its faults race it, as lazymig's do in "lazymig". "no spin": lazymig's
daemon with ``--fault-poll 0``, sleeping in epoll_wait while a fault's reply comes (what the
spinning buys)."""


@dataclasses.dataclass
class FaultRun:
    """One restore whose restored copy timed its faults on random pages."""

    setup: str
    latencies: list[float] = dataclasses.field(default_factory=list)
    skipped: int = 0
    behind: int | None = None  # lazymig: faults sent behind background requests
    daemon_rss_kib: int = 0
    daemon_cpu_s: float = 0.0
    error: str | None = None


_BEHIND = re.compile(r"(\d+) sent behind background requests")
"""In lazymig's summary line (logged with -v, as lazymig_argv runs it): its faults whose
request went out with background requests in flight."""


def _gnu_time(argv: list[str], out: str) -> list[str]:
    """``argv`` under GNU time: user and system CPU seconds and peak RSS (KiB) to ``out``."""
    return ["/usr/bin/time", "-f", "%U %S %M", "-o", out, *argv]


def _read_gnu_time(path: Path) -> tuple[float, int]:
    user, system, peak = path.read_text().split()[-3:]  # after "Command exited with ..."
    return float(user) + float(system), int(peak)


def fault_run(setup: str, binary: Path, mib: int, touches: int) -> FaultRun:
    """Dump a ``random`` workload lazily, restore it through ``setup``, signal the
    restored copy to time ``touches`` random reads, then end it and its daemon."""
    run = FaultRun(setup)
    procs = sbs.Procs()
    restored = 0
    with ChrootDir.temporary("flt-work-") as work, sbs.shm_dir("flt-images-") as d:
        workload = Workload(work, binary, mib=mib, args=["random", str(touches)])
        rss = d.host / "daemon.time"
        try:
            workload.start(timeout=60)
            port, pid = str(free_port()), str(workload.pid)
            if setup.endswith("lazymig page server"):
                criu(d, "dump", "-t", pid, "-D", d.inner, log="dump.log", timeout=120,
                     verbosity=sbs.CRIU_VERBOSITY)
                with (d.host / "page-server.log").open("wb") as err:
                    procs.add(start_with_status_fd(
                        lazymig_argv("page-server", "--lazy-pages", "-D", str(d.host),
                                     "--address", "127.0.0.1", "--port", port, "--wire", "v1",
                                     loop=sbs.LOOP),
                        what="lazymig page-server", stderr=err.fileno(), timeout=30))
            else:
                procs.add(start_with_status_fd(
                    chroot_argv("criu", "dump", "-t", pid, "--lazy-pages", "--address",
                                "127.0.0.1", "--port", port, "-D", d.inner),
                    what="criu dump --lazy-pages", log="dump.log",
                    verbosity=sbs.CRIU_VERBOSITY, timeout=120))
            if setup == "CRIU":
                daemon = procs.add(start_with_status_fd(
                    chroot_argv(*_gnu_time(["criu", "lazy-pages", "--page-server", "--address",
                                            "127.0.0.1", "--port", port, "-D", d.inner],
                                           d.inside(rss.name))),
                    what="criu lazy-pages", log="lazy-pages.log",
                    verbosity=sbs.CRIU_VERBOSITY))
            else:
                options = ["--no-background"] if "background off" in setup else []
                if setup.endswith("no spin"):
                    options += ["--fault-poll", "0"]
                with (d.host / "lazymig-lazy-pages.log").open("wb") as err:
                    daemon = procs.add(start_with_status_fd(
                        _gnu_time(lazymig_argv("lazy-pages", "--page-server", "--address",
                                               "127.0.0.1", "--port", port, "--wire", "v1",
                                               *options, "-D", str(d.host), loop=sbs.LOOP),
                                  str(rss)),
                        what="lazymig lazy-pages", stderr=err.fileno(), timeout=30))
            criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
                 "--pidfile", d.inside("restored.pid"), log="restore.log", timeout=120,
                 verbosity=sbs.CRIU_VERBOSITY)
            restored = int((d.host / "restored.pid").read_text())
            os.kill(restored, signal.SIGUSR1)  # at once: the background has just begun
            run.latencies, run.skipped = sbs.wait_for(
                lambda: _sbs_workload.faults(workload.log), 120, "faults line")
            kill_pid(restored)  # the daemon ends with its last process
            restored = 0
            sbs.reap(daemon, 60, "the lazy-pages daemon")
            run.daemon_cpu_s, run.daemon_rss_kib = _read_gnu_time(rss)
            summary = d.host / "lazymig-lazy-pages.log"
            if summary.exists() and (m := _BEHIND.search(summary.read_text(errors="replace"))):
                run.behind = int(m[1])
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
            for log in sorted(d.host.glob("*.log")):
                run.error += f"\n  --- {log.name}:\n  " + \
                    log.read_text(errors="replace")[-1200:].replace("\n", "\n  ")
        finally:
            if restored:
                kill_pid(restored)
            procs.stop_all()
            workload.kill()
    return run


def criu_faults(args: argparse.Namespace) -> None:
    """CRIU's daemon and lazymig's in one run, set-ups interleaved (A/B/C/D, repeated)."""
    if os.geteuid() != 0:
        raise SystemExit("--criu needs root (CRIU, ptrace, userfaultfd, namespaces)")
    print(f"machine: {machine.describe()}")
    print(f"load average before: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    sbs.use_bytecode()
    limits = {
        "bare uffd fault round trip (p50)": f"{bare_fault_rtt_us():.1f} us",
        "loopback 4 KiB request/reply (p50)": f"{machine.loopback_rtt_us():.1f} us",
        "minimal uvloop fault + 4 KiB GET, free": f"{fault_floor_us(PAGE_SIZE):.1f} us",
        "peak RSS, asyncio + uvloop imported": f"{import_rss_kib(_FLOOR_MODULES) / 1024:.1f} MiB",
        "peak RSS, the daemon's modules imported":
            f"{import_rss_kib(_DAEMON_MODULES) / 1024:.1f} MiB",
    }
    for name, value in limits.items():
        print(f"  limit  {name:50} {value}")
    setups = [s for s in FAULT_SETUPS if not args.setups or s in args.setups.split(";")]
    runs: list[FaultRun] = []
    with criu_root_ready(), tempfile.TemporaryDirectory() as tmp:
        binary = _sbs_workload.build(Path(tmp) / "sbs_workload")
        for i in range(args.repeat):
            for setup in setups if i % 2 == 0 else setups[::-1]:  # ABBA: drift hits all alike
                machine.warm_memory(3 * args.size * 2**20)
                run = fault_run(setup, binary, args.size, args.touches)
                runs.append(run)
                print(f"  {setup}: " + (f"FAILED {run.error}" if run.error else
                      f"{len(run.latencies)} faults, p50 {pct_us(run.latencies, 0.5):.0f} us"),
                      file=sys.stderr, flush=True)
    print(f"load average after: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"\n{args.size} MiB region, {args.touches} random reads per restore "
          f"(reads of pages already present skipped), {args.repeat} restores per set-up, "
          f"interleaved; fault round trip as the restored copy times it, all restores pooled:")
    criu_p50 = criu_p99 = None
    for setup in setups:
        good = [r for r in runs if r.setup == setup and r.error is None]
        if not good:
            print(f"  {setup:46} FAILED")
            continue
        lat = [v for r in good for v in r.latencies]
        p50, p99 = pct_us(lat, 0.5), pct_us(lat, 0.99)
        per_run = ", ".join(f"{pct_us(r.latencies, 0.5):.0f}" for r in good)
        behind = [r.behind for r in good if r.behind is not None]
        queued = f"; {sum(behind)} sent behind background requests" if behind else ""
        if setup == "CRIU":
            criu_p50, criu_p99 = p50, p99
        ratio = f"  {p50 / criu_p50:.2f}x / {p99 / criu_p99:.2f}x CRIU's p50 / p99" \
            if criu_p50 and criu_p99 else ""
        print(f"  {setup:46} p50 {p50:6.0f} us  p99 {p99:7.0f} us  "
              f"({len(lat)} faults, {sum(r.skipped for r in good)} skipped{queued}; "
              f"p50 per restore {per_run}){ratio}")
        print(f"  {'':46} daemon peak RSS {max(r.daemon_rss_kib for r in good) / 1024:.1f} MiB, "
              f"CPU {statistics.median(r.daemon_cpu_s for r in good):.2f} s per restore "
              f"(start-up to exit)")
    for run in runs:
        if run.error:
            print(f"\nFAILED {run.setup}: {run.error}")


_FLOOR_MODULES = ("asyncio", "uvloop")
_DAEMON_MODULES = (*_FLOOR_MODULES, "lazymig.cli", "lazymig.cli.lazy_pages",
                   "lazymig.uffd.daemon", "lazymig.uffd.source", "lazymig.proto.images")
"""What ``lazymig lazy-pages`` imports before it serves (beside what those import)."""


def import_rss_kib(modules: tuple[str, ...]) -> int:
    """Peak RSS (KiB) of a fresh interpreter once it imported ``modules``: the floor under a
    daemon's (from bytecode, as use_bytecode left it)."""
    # VmHWM, not ru_maxrss: exec keeps the forking parent's peak in ru_maxrss.
    code = (f"import {', '.join(modules)}; print(next(line.split()[1] for line in "
            "open('/proc/self/status') if line.startswith('VmHWM')))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout)


def pct_us(values_us: list[float], q: float) -> float:
    ordered = sorted(values_us)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="256,1024", help="region sizes in MiB")
    parser.add_argument("--touches", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=1, choices=[1, 2])
    parser.add_argument("--no-limits", action="store_true",
                        help="skip the machine's limits (for A/B pairs of the daemon alone)")
    parser.add_argument("--criu", action="store_true",
                        help="instead: CRIU's daemon and lazymig's, restores of a CRIU dump "
                             "whose restored copy times its faults (needs root)")
    parser.add_argument("--size", type=int, default=256, help="--criu: region size in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="--criu: restores per set-up")
    parser.add_argument("--setups", default="",
                        help=f"--criu: ';'-separated, of: {'; '.join(FAULT_SETUPS)}")
    args = parser.parse_args()
    if args.criu:
        with report.recorded("daemon_vs_criu"):
            criu_faults(args)
        sys.exit(0)
    with report.recorded("daemon"):
        print(f"machine: {machine.describe()}")
        for name, value in ({} if args.no_limits else machine_limits()).items():
            print(f"  limit  {name:50} {value}")
        asyncio.run(main(args))
