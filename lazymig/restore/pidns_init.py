"""Pid 1 of a restored tree's own pid namespace (see :mod:`lazymig.restore.pids`).

Run by path, ``python -I -S pidns_init.py ROOT READY_FD``: stdlib only, so that it
starts in a few ms and imports nothing of the restorer's. It does what an init
must and nothing else:

* it reaps every process of the namespace whose parent exited (the kernel
  makes it their parent), so that no zombie stays;
* it lives as long as the namespace has any other process: its own exit would
  SIGKILL them all. The restored root is not its child (the restorer is the
  root's parent, as for a restore without a namespace, and gets its exit
  status); so it waits for READY_FD to reach EOF (the restorer closes it once
  the root exists), takes a pidfd of the root (``ROOT``, the root's pid in
  the namespace) and exits 0 once the root is gone and it has no child left.
  Every process of the namespace descends from the root, so none is left then.

Signals from outside the namespace reach it only if it handles them: it
handles none but SIGCHLD, so only SIGKILL ends it early, and that kills the
whole namespace (the restorer's way out of a failed restore).
"""

from __future__ import annotations

import os
import select
import signal
import sys


def _reap() -> bool:
    """Reap every child that exited; False once there is no child at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def main(argv: list[str]) -> int:
    """``ROOT READY_FD``: see the module docstring."""
    root, ready = int(argv[0]), int(argv[1])
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while os.read(ready, 64):  # EOF: the root exists (or the restore failed)
        pass
    os.close(ready)
    try:
        pidfd: int | None = os.pidfd_open(root)
    except ProcessLookupError:
        pidfd = None
    while True:
        if not _reap() and pidfd is None:
            return 0
        ready_fds, _, _ = select.select([wake_r] if pidfd is None else [wake_r, pidfd], [], [])
        if pidfd in ready_fds:  # the root exited: its orphans are ours by now
            os.close(pidfd)
            pidfd = None
        if wake_r in ready_fds:
            while True:
                try:
                    os.read(wake_r, 64)
                except BlockingIOError:
                    break


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
