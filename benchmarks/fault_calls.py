"""Python calls per page fault in the lazy-pages daemon: the fault path's work, counted.

    .venv/bin/python benchmarks/fault_calls.py [--touches 2000] [--loop uvloop|asyncio]

A child attaches 64 MiB to a daemon running in this process (background fetch
off, lazymig's page server in its own process) and reads random pages; every
Python function call and every call into C made in this process while it does
(``sys.setprofile`` events, the daemon's other tasks included) is counted and
divided by the faults the daemon served. Counting does not depend on the
machine's load, unlike timing: it shows what a change of the fault path costs
or saves in interpreted work. The daemon runs with ``fault_poll=0``: the reads of a
spin for a reply are as many as the reply takes, which is timing again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import uvloop
from daemon import BASE, HERE, PID, _listening_port
from lazydump import write_lazy_dump

from lazymig.uffd import LazyPagesDaemon, RemotePageSource

NR_PAGES = 16384  # 64 MiB


async def count(touches: int) -> tuple[int, int, collections.Counter[str]]:
    """Faults served and profile events while a child faults."""
    py = sys.executable
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        images = Path(tmp)
        write_lazy_dump(images, {PID: [(BASE, NR_PAGES)]})
        server = await asyncio.create_subprocess_exec(
            py, "-m", "lazymig", "page-server", "--lazy-pages", "-D", str(images),
            "--address", "127.0.0.1", "--port", "0", "--status-fd", "1",
            stdout=asyncio.subprocess.PIPE)
        assert server.stdout is not None
        await server.stdout.readexactly(1)
        source = await RemotePageSource.connect("127.0.0.1", _listening_port(server.pid))
        daemon = LazyPagesDaemon.from_images(source, images, background=False, fault_poll=0)
        running = asyncio.create_task(daemon.run())
        await daemon.ready.wait()
        toucher = await asyncio.create_subprocess_exec(
            py, str(HERE / "_toucher.py"), str(daemon.socket_path), str(PID), hex(BASE),
            str(NR_PAGES), str(touches), "wait", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=64 << 20)
        assert toucher.stdin is not None and toucher.stdout is not None
        while not daemon.report.processes:  # noqa: ASYNC110 (the daemon has no event for it)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # its identification (a thread) is done
        calls: collections.Counter[str] = collections.Counter()

        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event == "call":
                calls[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
            elif event == "c_call":
                calls[f"C {getattr(arg, '__qualname__', arg)}"] += 1

        toucher.stdin.write(b"\n")
        await toucher.stdin.drain()
        sys.setprofile(profile)
        try:
            await toucher.stdout.readline()
        finally:
            sys.setprofile(None)
        faults = daemon.report.processes[0].faults
        await toucher.wait()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        server.terminate()
        await server.wait()
    return faults, sum(calls.values()), calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--touches", type=int, default=2000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--top", type=int, default=0, help="also print the N most called")
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    faults, events, calls = run(count(args.touches))
    print(f"{args.loop}: {faults} faults, {events / faults:.1f} Python and C calls per fault")
    for name, n in calls.most_common(args.top):
        print(f"  {n / faults:6.2f}  {name}")


if __name__ == "__main__":
    main()
