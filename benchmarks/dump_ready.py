"""``lazymig dump --lazy-pages`` from its start until it is ready, beside another tree's.

    sudo .venv/bin/python benchmarks/dump_ready.py [--vs /path/to/other/tree]
        [--cases 64,threads,1g,maps] [--repeat 9] [--out benchmarks/results/FILE]

Each run starts pattern.c (lazymig's test workload) in a session of its own,
waits until it sleeps to its next tick, then starts ``python -m lazymig dump -t
PID -D DIR --lazy-pages --port 0 --status-fd FD`` as a fresh process and times it
until its ready byte (the images are written and the page server listens; what
a user's downtime pays for the dump). Printed for each: the wall time, and the
CPU time the dump's threads had used by then (``/proc/PID/task/*/schedstat``,
which the load of other processes moves far less than the wall time). Then the
dump is stopped (SIGTERM: the source is left stopped) and the workload killed.

``--vs TREE`` interleaves runs of the lazymig package of another source tree
(``PYTHONPATH=TREE``, run from a neutral directory so that neither tree shadows
the other), A B A B..., and prints the ratio pair by pair: this tree's over
TREE's. Cases: ``64`` (64 MiB), ``1g`` (1 GiB), ``threads`` (64 MiB, 8
threads), ``maps`` (64 MiB and 5,000 mappings, pattern.c's ``--maps``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine  # noqa: E402
from many_mappings import wait_set_up  # noqa: E402

from lazymig.testing.workload import build_c_workload  # noqa: E402

CASES: dict[str, tuple[str, ...]] = {
    "64": ("--mib", "64"),
    "threads": ("--mib", "64", "--threads", "8"),
    "1g": ("--mib", "1024"),
    "maps": ("--mib", "64", "--maps", "5000"),
}


def cpu_seconds(pid: int) -> float:
    """The CPU time every thread of ``pid`` has used so far."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def one_dump(tree: Path, binary: Path, case: str, work: Path) -> tuple[float, float]:
    """One dump of a fresh workload by the lazymig of ``tree``: wall and CPU seconds
    from its start until ready."""
    images = Path(tempfile.mkdtemp(dir=work))
    source = subprocess.Popen([str(binary), *CASES[case], "--interval-ms", "1000",
                               "--maps-dir", str(images)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_set_up(source.pid, timeout=60)
        r, w = os.pipe()
        env = dict(os.environ, PYTHONPATH=str(tree))
        started = time.perf_counter()
        dump = subprocess.Popen(
            [sys.executable, "-m", "lazymig", "dump", "-t", str(source.pid), "-D",
             str(images), "--lazy-pages", "--address", "127.0.0.1", "--port", "0",
             "--status-fd", str(w)], pass_fds=(w,), env=env, cwd="/",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 60)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(dump.pid)
            if not ready or os.read(r, 1) != b"\0":
                _, err = dump.communicate(timeout=10)
                raise RuntimeError(f"lazymig dump never got ready: {err.decode()[-2000:]}")
        finally:
            os.close(r)
            dump.send_signal(signal.SIGTERM)
            dump.communicate(timeout=30)
    finally:
        source.kill()
        source.wait(timeout=10)
    return wall, cpu


def main(args: argparse.Namespace) -> int:
    trees = [HERE.parent] + ([args.vs.resolve()] if args.vs else [])
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say(f"# lazymig dump --lazy-pages until ready, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    say(f"machine: {machine.describe()}")
    say(f"load average at the start: {os.getloadavg()}")
    say(f"A = {trees[0]}" + (f", B = {trees[1]} (interleaved A B A B...)" if args.vs else ""))
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_c_workload(tmp)
        for case in args.cases.split(","):
            runs: list[list[tuple[float, float]]] = [[] for _ in trees]
            for _ in range(args.repeat):
                for i, tree in enumerate(trees):
                    runs[i].append(one_dump(tree, binary, case, Path(tmp)))
            for name, these in zip("AB", runs, strict=False):
                walls, cpus = [w for w, _ in these], [c for _, c in these]
                say(f"{case:8} {name}: wall median {statistics.median(walls):.3f} s (min "
                    f"{min(walls):.3f}), CPU until ready median {statistics.median(cpus):.3f} s "
                    f"(min {min(cpus):.3f}), {len(these)} runs")
            if args.vs:
                a, b = runs
                say(f"{case:8} A/B pair by pair: wall median "
                    f"{statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True)):.2f}, "
                    f"CPU median "
                    f"{statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True)):.2f}")
    say(f"load average at the end: {os.getloadavg()}")
    if args.out:
        args.out.write_text("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vs", type=Path, help="another lazymig source tree, interleaved")
    parser.add_argument("--cases", default="64,threads,1g,maps")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (ptrace)")
    sys.exit(main(arguments))
