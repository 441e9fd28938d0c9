"""A pre-started lazymig command for lazy_vs_full.py: interpreter start-up and imports
happen before the clock runs, so downtime measures lazymig, not Python's start.

    _lvf_worker.py            (then one line on stdin: the command's argv as JSON)

It imports what the commands need, writes ``ready`` to stderr, reads the argv,
runs ``lazymig.cli.main(argv)`` (exactly what the ``lazymig`` command runs),
then writes ``done <CLOCK_MONOTONIC> <exit status> <peak RSS KiB> <CPU seconds>`` to
stderr (CPU: user + system of this process).
Peak RSS is VmHWM of this process (reset by exec, unlike wait4's ru_maxrss).
"""

from __future__ import annotations

import json
import os
import sys
import time

# Imported before the clock runs (the commands import them when they run).
import lazymig.dump
import lazymig.restore
import lazymig.uffd.daemon  # noqa: F401
from lazymig.cli import main


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    print("ready", file=sys.stderr, flush=True)
    argv = json.loads(sys.stdin.readline())
    status = main(argv)
    cpu = os.times()
    print(f"done {time.monotonic():.6f} {status} {vm_hwm_kib()} {cpu.user + cpu.system:.3f}",
          file=sys.stderr, flush=True)
    sys.exit(status)
