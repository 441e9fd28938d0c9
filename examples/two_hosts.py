"""The two halves of a lazy migration, as they run on two hosts.

On the source host::

    python examples/two_hosts.py source PID --images-dir /srv/dump --address 10.0.0.1

prints ``LISTENING host:port`` once the process is frozen, its images are
written and its lazy pages are served; copy the images dir to the
destination then (scp, rsync, a shared volume). It exits once every lazy page
was served (the source process is killed then).

On the destination host, with the copy::

    python examples/two_hosts.py destination --images-dir /srv/dump --page-server 10.0.0.1:PORT

restores the process (it runs at once, under its pid, with this command's
stdout) and exits once all its memory has arrived, leaving it running.

Without arguments, it plays both hosts on this machine: it starts a small
workload, runs the two halves as two separate processes over 127.0.0.1 with
the images dir copied between them, and checks that the restored workload
goes on counting where the source stopped. Needs root (ptrace, userfaultfd).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lazymig

COUNTER = """
import sys, time
history = [bytes([n % 256]) * 4096 for n in range(int(sys.argv[1]) * 256)]  # memory to move
n = 0
while True:
    n += 1
    print(n, sum(page[0] for page in history), flush=True)
    time.sleep(0.2)
"""


async def source(pid: int, images_dir: str, address: str, port: int) -> None:
    async with lazymig.serve(pid, images_dir, address=address, port=port) as served:
        print(f"LISTENING {served.address}", flush=True)
        async for p in served.progress(interval=1.0):
            print(f"served {p.pages_served}/{p.pages_total} pages", file=sys.stderr)
    result = await served.done
    print(f"DONE {result.lazy_pages} lazy pages served; source {result.source.value}",
          flush=True)


async def destination(images_dir: str, page_server: str) -> None:
    host, _, port = page_server.rpartition(":")
    # stdio: the source's fds 0-2 (pipes to its parent) stayed behind; ours take their place
    async with lazymig.receive(images_dir, page_server=(host.strip("[]"), int(port)),
                               stdio=(0, 1, 2)) as dst:
        print(f"RESTORED {dst.process.pid}", flush=True)
    report = await dst.done
    progress = lazymig.TransferProgress.of(report)
    print(f"{progress.pages_on_demand} pages on demand, {progress.pages_background} in the "
          "background", file=sys.stderr)


def both_on_this_machine(mib: int) -> bool:
    """A workload, the source half and the destination half as separate processes."""
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory(prefix="lazymig-two-hosts-") as tmp:
        src_dir, dst_dir = Path(tmp, "source"), Path(tmp, "destination")
        src_dir.mkdir()
        workload = subprocess.Popen([sys.executable, "-c", COUNTER, str(mib)],
                                    stdout=subprocess.PIPE, text=True)
        assert workload.stdout is not None
        counted = [int(x) for x in workload.stdout.readline().split()]
        src = subprocess.Popen([*me, "source", str(workload.pid), "--images-dir", str(src_dir),
                                "--address", "127.0.0.1", "--port", "0"],
                               stdout=subprocess.PIPE, text=True)
        dst = None
        restored = 0
        try:
            assert src.stdout is not None
            listening = src.stdout.readline().split()
            assert listening[0] == "LISTENING", listening
            shutil.copytree(src_dir, dst_dir)  # the images cross to the other host
            dst = subprocess.Popen([*me, "destination", "--images-dir", str(dst_dir),
                                    "--page-server", listening[1]],
                                   stdout=subprocess.PIPE, text=True)
            assert dst.stdout is not None
            after: list[int] = []
            while not (restored and after):  # the restored workload shares that stdout
                line = dst.stdout.readline().split()
                if line[0] == "RESTORED":
                    restored = int(line[1])
                elif not after:
                    after = [int(x) for x in line]
            print(f"source pid {workload.pid} printed {counted}; restored as pid {restored}, "
                  f"it goes on with {after}")
            ok = dst.wait(timeout=60) == 0 and src.wait(timeout=60) == 0
            print(src.stdout.read().strip())
            return ok and after[0] > counted[0] and after[1] == counted[1]
        finally:
            if restored:
                os.kill(restored, signal.SIGKILL)
            for process in (workload, src, dst):
                if process is not None:
                    process.kill()
                    process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = parser.add_subparsers(dest="role")
    src = roles.add_parser("source", help="freeze, dump and serve a process")
    src.add_argument("pid", type=int)
    src.add_argument("--images-dir", required=True)
    src.add_argument("--address", default="0.0.0.0", help="where the page server listens")
    src.add_argument("--port", type=int, default=9876)
    dst = roles.add_parser("destination", help="restore it and fill its memory")
    dst.add_argument("--images-dir", required=True, help="the copy of the source's images")
    dst.add_argument("--page-server", required=True, metavar="HOST:PORT")
    parser.add_argument("--mib", type=int, default=16,
                        help="without a role: the workload's memory (MiB)")
    args = parser.parse_args()
    if args.role == "source":
        lazymig.run(source(args.pid, args.images_dir, args.address, args.port))
    elif args.role == "destination":
        lazymig.run(destination(args.images_dir, args.page_server))
    else:
        return 0 if both_on_this_machine(args.mib) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
