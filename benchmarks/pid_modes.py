"""What keeping the dumped pids costs a restore: one dumped tree (a Python parent with
three children) restored N times under one pid mode, each restore's tree killed
before the next.

    .venv/bin/python benchmarks/pid_modes.py MODE [N]     (default N: 10)

MODE: ``namespace`` (the source stays stopped and holds the pids: a pid namespace of
the tree's own, with its init), ``original`` (the source is gone: the pids are taken
here again) or ``new`` (``new_pids=True``: the kernel's pids, as before). Prints the
median, min and max of ``RestoreResult.seconds`` (from starting the helper to the
tree running). Needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lazymig.dump import dump
from lazymig.linux.procfs import pid_in_use
from lazymig.proto.images import ImagesDir
from lazymig.restore import Restorer

TREE = """
import os, signal, time
for _ in range(3):
    if os.fork() == 0:
        while True:
            signal.pause()
print("READY", flush=True)
while True:
    time.sleep(1)
"""


def start_tree() -> subprocess.Popen[bytes]:
    source = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    assert source.stdout is not None and source.stdout.readline() == b"READY\n"
    return source


def wait_free(pids: list[int]) -> None:
    while any(pid_in_use(p) for p in pids):
        time.sleep(0.01)


async def main(mode: str, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="lazymig-pid-modes-") as images:
        source = await asyncio.to_thread(start_tree)
        await dump(source.pid, images, tree=True, leave_running=mode == "namespace")
        if mode == "namespace":
            os.killpg(source.pid, signal.SIGSTOP)  # it holds the dumped pids meanwhile
        pids = [e.pid for e in ImagesDir(images).pstree()]
        seconds = []
        try:
            for _ in range(runs):
                if mode == "original":  # the last run's tree, reaped by init
                    await asyncio.to_thread(wait_free, pids)
                restorer = Restorer(Path(images), stdio=(0, 1, 2), new_pids=mode == "new")
                result = await restorer.run()
                seconds.append(result.seconds)
                for pid in restorer.tree_pids.values():
                    os.kill(pid, signal.SIGKILL)
                restorer.kill()
        finally:
            with contextlib.suppress(ProcessLookupError):  # killed by the dump unless namespace
                os.killpg(source.pid, signal.SIGKILL)
            source.wait()
    print(f"{mode}: {runs} restores of a 4-process tree, seconds median "
          f"{statistics.median(seconds):.4f} min {min(seconds):.4f} max {max(seconds):.4f}; "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10))
