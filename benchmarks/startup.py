"""Start-up of lazymig's commands and the lazy-pages daemon's peak memory, beside the floors.

    .venv/bin/python benchmarks/startup.py [--runs 9] [--sizes 64,512] [--vs DIR]
        [--out benchmarks/results/startup.txt]

Every command is a fresh process, as a user's shell starts it (``python -m lazymig``,
from bytecode compiled first, as an installed package runs), interleaved round by
round so that drift hits each alike; medians of ``--runs``:

* floors: ``python -c pass``, ``import asyncio``, and asyncio + uvloop + protobuf (what a
  command on uvloop that reads CRIU's images cannot do without): exec to exit;
* ``--version``, the ``--help`` of each command, and ``lazymig restore -d`` of a sleeping
  process dumped once by ``lazymig dump`` (the restored copy is killed after): exec to
  exit, with the peak RSS (GNU time);
* ``lazymig page-server --lazy-pages`` of a dump on disk and ``lazymig lazy-pages
  --page-server`` (fed by a lazymig page server started once): exec until ready
  (the byte on ``--status-fd``) and until serving (the "listening on" log line);
* the daemon's peak RSS over a whole lazy restore of each size in ``--sizes`` (a child
  attaches the region and waits while the background fetch pulls every page; then it
  checks them all): it must not grow with the region.

``--vs DIR`` runs lazymig from another source tree too (e.g. ``git archive main | tar
-x -C DIR``), in turn with this one: the "before" of an A/B. Numbers are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import machine  # noqa: E402
import report  # noqa: E402
from helpers import free_port  # noqa: E402
from lazydump import write_lazy_dump  # noqa: E402

MIB = 1 << 20
PAGE = 4096
BASE = 0x7F00_0000_0000
FLOORS = {
    "python -c pass": "pass",
    "import asyncio": "import asyncio",
    "import asyncio, uvloop, protobuf": "import asyncio, uvloop, google.protobuf.message",
}
HELP = ["--version", "--help", "restore --help", "lazy-pages --help", "page-server --help"]
_SERVING = re.compile(r"^(\S+ \S+) \S+ INFO: .*listening on", re.M)


def lazymig(*args: str) -> list[str]:
    return [sys.executable, "-m", "lazymig", *args]


def gnu_time(argv: list[str], rss_file: Path) -> list[str]:
    return ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv]


def peak_kib(rss_file: Path) -> int:
    return int(rss_file.read_text().split()[-1])


def exec_to_exit(argv: list[str], rss_file: Path) -> tuple[float, int, bytes]:
    began = time.monotonic()
    done = subprocess.run(gnu_time(argv, rss_file), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=True)
    return time.monotonic() - began, peak_kib(rss_file), done.stdout


def until_ready(argv: list[str], log: Path) -> tuple[float, float]:
    """Start ``argv`` (a lazymig command given ``--status-fd``, logging at -v into ``log``):
    seconds from exec until the status byte, and until its log says its loop serves.
    The command is stopped (SIGTERM) afterwards."""
    read, write = os.pipe()
    spawned = time.time()
    began = time.monotonic()
    with log.open("w") as err:
        proc = subprocess.Popen([*argv, "--status-fd", str(write)], pass_fds=(write,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    os.close(write)
    try:
        if os.read(read, 1) != b"\0":
            raise RuntimeError(f"{argv[3:]} exited before it was ready: {log.read_text()}")
        ready = time.monotonic() - began
        deadline = time.monotonic() + 30
        while (match := _SERVING.search(log.read_text(errors="replace"))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[3:]} never served: {log.read_text()}")
            time.sleep(0.002)
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        return ready, stamp.timestamp() - spawned
    finally:
        os.close(read)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def dumped_sleeper(images: Path) -> None:
    """``lazymig dump`` of a sleeping process (its fds /dev/null: nothing stays behind)."""
    sleeper = subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    time.sleep(0.2)
    try:
        subprocess.run(lazymig("dump", "-t", str(sleeper.pid), "-D", str(images)), check=True)
    finally:
        sleeper.kill()
        sleeper.wait()


def restore_once(images: Path, rss_file: Path) -> tuple[float, int]:
    seconds, kib, out = exec_to_exit(lazymig("restore", "-D", str(images), "-d"), rss_file)
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(out), signal.SIGKILL)
    return seconds, kib


def daemon_peak_kib(work: Path, mib: int, port: int) -> int:
    """Peak RSS of ``lazymig lazy-pages`` over the lazy restore of ``mib`` MiB: a child
    attaches the region, the background fetch pulls it all, then the child checks it."""
    images = work / f"dump-{mib}"
    if not images.exists():
        images.mkdir()
        write_lazy_dump(images, {1000: [(BASE, mib * MIB // PAGE)]})
    rss_file = work / "daemon.rss"
    with (work / "server.log").open("w") as log:
        server = subprocess.Popen(lazymig("page-server", "--lazy-pages", "-D", str(images),
                                          "--address", "127.0.0.1", "--port", str(port)),
                                  stderr=log)
    try:
        daemon = subprocess.Popen(gnu_time(lazymig(
            "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
            "--wait-for-page-server", "30", "-D", str(images)), rss_file))
        child = subprocess.Popen([sys.executable, str(HERE.parent / "tests" / "lazy_child.py"),
                                  str(images / "lazy-pages.socket"), "1000", hex(BASE),
                                  str(mib * MIB // PAGE), "wait"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if daemon.wait(timeout=300) != 0:
            raise RuntimeError(f"the daemon failed on {mib} MiB")
        out, _ = child.communicate(b"\n", timeout=60)
        if child.returncode != 0:
            raise RuntimeError(f"the child read wrong pages: {out.decode()}")
        return peak_kib(rss_file)
    finally:
        server.kill()
        server.wait()


def fmt(values: list[float], unit: str = "s") -> str:
    if unit == "MiB":
        return f"{statistics.median(values) / 1024:5.1f} MiB"
    return f"{statistics.median(values):.3f} s (min {min(values):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--sizes", default="64,512", help="MiB, comma-separated")
    parser.add_argument("--vs", type=Path, metavar="DIR",
                        help="a second source tree, run in turn with this one (the before)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out.resolve() if args.out else None  # the runs chdir away
    trees = {"this tree": HERE.parent, **({"--vs tree": args.vs.resolve()} if args.vs else {})}
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for tree in trees.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "lazymig")],
                       check=True, stdout=subprocess.DEVNULL)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    def use(tree: str) -> None:
        """lazymig from ``tree`` for the commands started next."""
        os.environ["PYTHONPATH"] = str(trees[tree])

    say(f"# lazymig start-up, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    say(machine.describe())
    for name, tree in trees.items():
        say(f"{name}: {tree}")
    say(f"load average before: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    times: dict[str, dict[str, list[float]]] = {}
    peaks: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lazymig-startup-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # `python -m` puts the cwd first on sys.path: PYTHONPATH picks the tree
        rss_file = work / "rss"
        sleeper_images = work / "sleeper"
        sleeper_images.mkdir()
        disk = work / "disk"
        disk.mkdir()
        write_lazy_dump(disk, {1000: [(BASE, 16 * MIB // PAGE)]})
        use("this tree")
        dumped_sleeper(sleeper_images)
        port = free_port()
        feeder = subprocess.Popen(lazymig("page-server", "--lazy-pages", "--keep-serving", "-D",
                                          str(disk), "--address", "127.0.0.1", "--port",
                                          str(port)), stderr=subprocess.DEVNULL)
        tree = "this tree"

        def record(label: str, seconds: float, kib: float | None = None) -> None:
            times.setdefault(label, {}).setdefault(tree, []).append(seconds)
            if kib is not None:
                peaks.setdefault(label, {}).setdefault(tree, []).append(kib)

        def page_server() -> None:
            ready, serving = until_ready(
                lazymig("-v", "page-server", "--lazy-pages", "-D", str(disk), "--address",
                        "127.0.0.1", "--port", "0"), work / "ps.log")
            record("lazymig page-server: ready", ready)
            record("lazymig page-server: serving", serving)

        def lazy_pages() -> None:
            daemon_dir = work / "daemon"
            daemon_dir.mkdir(exist_ok=True)
            ready, serving = until_ready(
                lazymig("-v", "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                        str(port), "-D", str(disk), "--socket", str(daemon_dir / "d.sock")),
                work / "lp.log")
            record("lazymig lazy-pages: ready", ready)
            record("lazymig lazy-pages: serving", serving)

        commands: list[Callable[[], None]] = [
            *(lambda words=words: record(
                f"lazymig {words}", *exec_to_exit(lazymig(*words.split()), rss_file)[:2])
              for words in HELP),
            lambda: record("lazymig restore -d (a sleeping process)",
                           *restore_once(sleeper_images, rss_file)),
            page_server, lazy_pages]
        try:
            for _ in range(args.runs):  # interleaved: drift hits each tree alike
                tree = "this tree"
                for label, code in FLOORS.items():
                    record(label, *exec_to_exit([sys.executable, "-c", code], rss_file)[:2])
                for tree in trees:
                    use(tree)
                    for command in commands:
                        command()
            say(f"exec until exit (or ready / serving), median of {args.runs} (min), "
                "peak RSS" + (", and the ratio of the medians" if args.vs else "")
                + "; the first rows are the limits of any Python command here:")
            for label, by_tree in times.items():
                row = [f"{fmt(values)}" + (f" {fmt(peaks[label][name], 'MiB')}"
                                           if label in peaks else "")
                       for name, values in by_tree.items()]
                if len(by_tree) == 2:
                    a, b = (statistics.median(v) for v in by_tree.values())
                    row.append(f"{a / b:.2f}x")
                say(f"  {label:<40} " + "   ".join(row))
            say("lazymig lazy-pages, peak RSS over a whole lazy restore:")
            for mib in (int(s) for s in args.sizes.split(",")):
                row = []
                for name in trees:
                    use(name)
                    row.append(f"{name} {daemon_peak_kib(work, mib, free_port()) / 1024:5.1f} MiB")
                say(f"  {mib:5d} MiB region: " + ", ".join(row))
        finally:
            feeder.kill()
            feeder.wait()
    say(f"load average after: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if out:
        out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    with report.recorded("startup"):
        status = main()
    sys.exit(status)
