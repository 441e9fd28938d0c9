"""``lazymig dump`` and ``lazymig restore`` beside ``criu dump`` and ``criu restore``,
on a small process and on processes whose dump and restore work grows with
their mappings (issue 16).

    sudo .venv/bin/python benchmarks/many_mappings.py [--repeat 5] [--cases small,maps,runs]
        [--out benchmarks/results/many_mappings.txt]

The workload is pattern.c, lazymig's own test workload (``lazymig.testing``),
built statically so that one binary runs both under lazymig and in CRIU's
chroot (scripts/criu-peer.sh). Cases (:data:`CASES`; ``workload_args`` gives
the same process to other benchmarks):

* ``small``: ``--mib 4``, some twenty mappings;
* ``maps``: ``--maps 5000``: 5,000 one-page mappings, a quarter of them files
  mapped once each, a quarter one file mapped page by page (private and
  shared in turn), half anonymous (read-write, read-only, read-exec);
* ``runs``: ``--runs 16384``: one VMA of 32,768 pages, every other one written.

Every command is started as a fresh process, as a user starts it, and timed
from its start to its exit: ``lazymig dump -t PID -D DIR`` and ``criu dump -t
PID -D DIR`` (each kills its source), then ``lazymig restore -D DIR -d`` and
``criu restore -D DIR -d``. Images go below the chroot's /tmp for both, on one
file system. lazymig's source runs on the host, CRIU's in the chroot as the
init of its own pid namespace (what CRIU needs, see tests/criu_peer.py).
lazymig runs from bytecode compiled first, as an installed package does. The
floor of any Python command (``python -c pass``) is printed beside. Figures
are min / median of ``--repeat`` runs, the cases and tools interleaved; the
load average is printed at the start and the end. Nothing is asserted; every
process started is killed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402
from criu_peer import ChrootDir, chroot_argv, criu, criu_root_ready, kill_pid  # noqa: E402

from lazymig.testing.workload import C_SOURCE  # noqa: E402

CASES: dict[str, tuple[str, ...]] = {
    "small": ("--mib", "4"),
    "maps": ("--mib", "4", "--maps", "5000"),
    "runs": ("--mib", "4", "--runs", "16384"),
}
LABELS = {"small": "small (4 MiB)", "maps": "5,000 mappings", "runs": "16,384 runs"}
_SLEEPING = ("230",)  # clock_nanosleep: the workload is set up and waits for its tick


def workload_args(case: str, files: Path) -> list[str]:
    """pattern.c's arguments for ``case`` (its files, for ``maps``, in ``files``)."""
    return [*CASES[case], "--interval-ms", "1000", "--maps-dir", str(files)]


def build_static(dest: Path) -> Path:
    """pattern.c, statically linked (it runs in CRIU's chroot as it does on the host)."""
    subprocess.run(["gcc", "-static", "-O2", "-pthread", "-o", str(dest), str(C_SOURCE)],
                   check=True, capture_output=True, timeout=120)
    return dest


def wait_set_up(pid: int, timeout: float = 20.0) -> None:
    """Until ``pid`` sleeps to its next tick (its mappings are all made)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/syscall").read_text().split()[0] in _SLEEPING:
                return
        time.sleep(0.01)
    raise TimeoutError(f"workload {pid} never went to sleep")


def lazymig(*args: str) -> tuple[float, str]:
    """Run ``lazymig ARGS``; its wall time and stdout."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lazymig", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, check=False)
    took = time.monotonic() - started
    if proc.returncode:
        raise RuntimeError(f"lazymig {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    return took, proc.stdout


def run_lazymig(d: ChrootDir, binary: Path, case: str) -> tuple[float, float]:
    """One dump and one restore by lazymig; their wall times."""
    files, images = d.host / "lazymig-files", d.host / "lazymig-images"
    files.mkdir()
    images.mkdir()
    source = subprocess.Popen([str(binary), *workload_args(case, files)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_set_up(source.pid)
        dumped, _ = lazymig("dump", "-t", str(source.pid), "-D", str(images))
        source.wait(timeout=10)
        restored, out = lazymig("restore", "-D", str(images), "-d")
        kill_pid(int(out.split()[-1]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            source.kill()
        source.wait(timeout=10)
    return dumped, restored


def run_criu(d: ChrootDir, binary: Path, case: str) -> tuple[float, float]:
    """One dump and one restore by CRIU in its chroot; their wall times."""
    (d.host / "criu-files").mkdir()
    (d.host / "criu-images").mkdir()
    shutil.copy2(binary, d.host / "pattern")
    args = " ".join(workload_args(case, Path(d.inside("criu-files"))))
    script = f"exec {d.inside('pattern')} {args} >/dev/null 2>&1 </dev/null"
    unshare = subprocess.Popen(
        chroot_argv("unshare", "--pid", "--fork", "setsid", "/bin/sh", "-c", script), cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    restored = 0
    try:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split():
            if time.monotonic() > deadline:
                raise TimeoutError("the chroot's workload never started")
            time.sleep(0.01)
        pid = int(children.read_text().split()[0])
        wait_set_up(pid)
        images = d.inside("criu-images")
        dumped = criu(d, "dump", "-t", str(pid), "-D", images, log="dump.log", verbosity=2)
        unshare.wait(timeout=10)
        took = criu(d, "restore", "-D", images, "-d", "--pidfile", d.inside("restored.pid"),
                    log="restore.log", verbosity=2)
        restored = int((d.host / "restored.pid").read_text())
    finally:
        if restored:
            kill_pid(restored)
        stop_unshare(unshare)
    return dumped, took


def stop_unshare(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def python_floor(repeat: int = 5) -> float:
    """Median wall time of ``python -c pass``."""
    times = []
    for _ in range(repeat):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def use_bytecode() -> None:
    """Run lazymig as an installed package runs: from bytecode (compiled now, into the
    tree's __pycache__, which git ignores), whatever PYTHONDONTWRITEBYTECODE says."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(HERE.parent / "lazymig")],
                   check=True)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(times: Sequence[float]) -> str:
    if not times:
        return "failed"
    if len(times) == 1:
        return f"{times[0]:.3f}"
    return f"{min(times):.3f} / {statistics.median(times):.3f}"


def table(results: dict[tuple[str, str], list[tuple[float, float]]],
          cases: Sequence[str]) -> Iterator[str]:
    yield ("| process | lazymig dump | criu dump | lazymig restore | criu restore "
           "| restore: lazymig / criu (medians) |")
    yield "| --- | ---: | ---: | ---: | ---: | ---: |"
    for case in cases:
        ours, theirs = results[(case, "lazymig")], results[(case, "criu")]
        ratio = "-"
        if ours and theirs:
            mine = statistics.median(r for _, r in ours)
            ratio = f"{mine / statistics.median(r for _, r in theirs):.1f}x"
        yield (f"| {LABELS[case]} | {fmt([d for d, _ in ours])} | {fmt([d for d, _ in theirs])} "
               f"| {fmt([r for _, r in ours])} | {fmt([r for _, r in theirs])} | {ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say(f"machine: {machine.describe()}; {load()} at the start")
    use_bytecode()
    say(f"python -c pass: {python_floor():.3f} s (median of 5), the floor of any "
        "lazymig command")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (case, tool): [] for case in cases for tool in ("lazymig", "criu")}
    failures: list[str] = []
    with criu_root_ready(), tempfile.TemporaryDirectory() as tmp:
        binary = build_static(Path(tmp) / "pattern")
        for _ in range(args.repeat):
            for case in cases:
                for tool, run in (("lazymig", run_lazymig), ("criu", run_criu)):
                    with ChrootDir.temporary(f"many-maps-{tool}-") as d:
                        try:
                            results[(case, tool)].append(run(d, binary, case))
                        except Exception as exc:  # reported; the others go on
                            failures.append(f"{tool}, {case}: {exc}")
                    print(f"  {tool}, {case}: {results[(case, tool)][-1:]}", file=sys.stderr)
    say()
    say(f"wall seconds of each command, min / median of {args.repeat} runs:")
    say()
    for line in table(results, cases):
        say(line)
    say()
    say(f"{load()} at the end")
    for failure in failures:
        say(f"FAILED {failure}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
