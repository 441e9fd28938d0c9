"""The tracking keeper: holds a source's dirty-tracking userfaultfd between two
``lazymig pre-dump --track-mem`` commands (or a pre-dump and the ``dump``).

CRIU's soft-dirty bits live in the kernel between its commands; a write-protect
userfaultfd lives only as long as an fd refers to it. So ``pre-dump`` leaves a
small process (started with ``python -m lazymig.dump.keeper FD PIDFD``) holding
a copy of it, in a session of its own, and writes :data:`RECORD` into the
images dir: the source, its start time, the keeper and the fd number there. The
next command takes a copy with ``pidfd_getfd`` (:func:`take`) and, once the
tracking ends, stops the keeper (:func:`stop`).

The keeper ends by itself when the source exits. While it lives, the source's
private memory stays registered (async write-protect: no fault ever waits for
anyone; a write costs one minor fault after each scan): a chain abandoned
after a pre-dump is ended with ``kill KEEPER`` (its pid is in the log and in
:data:`RECORD`), which drops the registration with the last reference.

The keeper is a fresh interpreter: this module imports little.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

from lazymig.linux.procfs import read_stat
from lazymig.linux.vm import pidfd_getfd

__all__ = ["RECORD", "KeeperRecord", "spawn", "stop", "take"]

RECORD: Final = "lazymig-track.json"
"""The record a ``pre-dump --track-mem`` leaves in its images dir."""


@dataclasses.dataclass(frozen=True, slots=True)
class KeeperRecord:
    """Where a source's tracking userfaultfd is kept."""

    pid: int
    """The source."""
    start_time: int
    """The source's start time (/proc/PID/stat field 22): not a reused pid."""
    keeper: int
    fd: int
    """The uffd's number in the keeper."""

    def write(self, images_dir: Path) -> None:
        (images_dir / RECORD).write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def read(cls, images_dir: Path) -> KeeperRecord:
        """The record of ``images_dir`` (FileNotFoundError without one)."""
        fields = json.loads((images_dir / RECORD).read_text())
        return cls(**{f.name: int(fields[f.name]) for f in dataclasses.fields(cls)})


def _start_time(pid: int) -> int:
    return read_stat(pid)[1][22]


def spawn(pid: int, uffd: int) -> KeeperRecord:
    """Start a keeper holding a copy of ``uffd`` (source ``pid``'s tracking fd)."""
    pidfd = os.pidfd_open(pid)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lazymig.dump.keeper", str(uffd),
                                 str(pidfd)], pass_fds=(uffd, pidfd), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(pidfd)
    return KeeperRecord(pid=pid, start_time=_start_time(pid), keeper=proc.pid, fd=uffd)


def take(record: KeeperRecord) -> int:
    """A copy of the kept uffd (close-on-exec), after checking the source is the
    one the record names.

    Raises:
        ProcessLookupError: the keeper or the source is gone (the tracking with it).
    """
    try:
        if _start_time(record.pid) != record.start_time:
            raise ProcessLookupError(errno.ESRCH, f"process {record.pid} is not the one "
                                     "tracked (it exited, and its pid was reused)")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"the tracked process {record.pid} "
                                 "exited") from None
    keeper = os.pidfd_open(record.keeper)
    try:
        return pidfd_getfd(keeper, record.fd)
    finally:
        os.close(keeper)


def stop(record: KeeperRecord, timeout: float = 5.0) -> None:
    """Stop the keeper (it lets go of the uffd); fine if it is gone already."""
    try:
        keeper = os.pidfd_open(record.keeper)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(keeper, signal.SIGTERM)
        select.select([keeper], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(keeper)


def main(argv: list[str]) -> int:
    """The keeper: hold fd ``argv[0]`` until the source (pidfd ``argv[1]``) exits
    or SIGTERM comes."""
    uffd, pidfd = int(argv[0]), int(argv[1])
    os.set_inheritable(uffd, False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.chdir("/")  # keeps no mount busy
    select.select([pidfd], [], [])  # readable once the source exited
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
