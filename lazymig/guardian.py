"""The guardian: a restored process never runs on holes, even if the lazy-pages daemon dies.

When the last reference to a userfaultfd closes, the kernel unregisters its
ranges and every page that never arrived reads as zeros, silently. The daemon
holds the only reference once the restorer lets go (CRIU's design), so a
daemon killed mid-transfer (SIGKILL, OOM, a crash) would leave the restored
process running on holes.

So the restorer does not let go: it hands a small guardian process (started
with ``python -m lazymig.guardian``) three fds, and only then lets the restored
process run:

* a duplicate of the process's uffd: while the guardian lives, the ranges stay
  registered and a missing page stops the faulting thread (frozen, not zeroed);
* its end of the restorer's UNIX connection to the daemon (the words are
  :mod:`lazymig.proto.handover`'s, the I/O :class:`~lazymig.uffd.handover.HandoverSession`'s):
  lazymig's daemon says GUARDED as it accepts the connection (the guardian
  answers GUARDIAN) and, after "restore finished", keeps it open; it sends the
  uffd of every child the process forks (FORKED, held too), and once every
  process handed over on it, and their children, are complete it says
  TRANSFER_COMPLETE and closes it. EOF after GUARDED without that word means
  the daemon is gone (the kernel closed its end) or gave up: the guardian
  kills the restored process and its descendants (SIGKILL), then lets go of
  the uffds. So does a word the daemon would never say. EOF before GUARDED is
  a daemon that does not speak this (CRIU's): the guardian stands aside with a
  warning (a reset then still kills: a daemon killed before it read the
  handover);
* a pidfd of the restored process: if it exits first, the guardian just ends.

After TRANSFER_COMPLETE the guardian closes its duplicate at once (the
daemon closed its own), so later faults are ordinary page faults again. The
dump side is not involved: the daemon's TCP connection closes with a reset when
it dies, and the page server keeps its source for a retry.

``criu restore`` leaves no guardian, so the daemon keeps one of its own for
every process it holds (:class:`DaemonGuardian`, started with ``python -m
lazymig.guardian --daemon FD NICE``): over a SOCK_SEQPACKET pair the daemon sends it
a duplicate of each uffd as it adopts the process (:data:`HOLD`), the process's
pidfd once it identified it (:data:`IDENTIFIED`, see
:mod:`lazymig.uffd.identify`), and :data:`RELEASE` once it is settled
(complete, exited, or killed by the daemon itself). If the daemon's end closes
before :data:`DAEMON_DONE` (SIGKILL, OOM, a crash), the guardian kills
every process it still holds that it can name, with its descendants, and keeps
holding the uffds of those it cannot (they stop at their next missing page)
until it is killed itself.

This module imports nothing heavy (no asyncio): the guardian starts in a fresh
interpreter while the restorer finishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from lazymig.linux.procfs import descendants, lowest_mappable, pidfd_pid

if TYPE_CHECKING:
    from lazymig.uffd.handover import HandoverSession

__all__ = [
    "DAEMON_DONE",
    "HOLD",
    "IDENTIFIED",
    "RELEASE",
    "DaemonGuardian",
    "guard",
    "spawn_guardian",
]

log = logging.getLogger(__name__)

HOLD: Final = b"LZHD"
"""Daemon → its own guardian, with a uffd as SCM_RIGHTS: hold it for process KEY
(image pid PID, handed over by RESTORER; a forked child of process PARENT, or 0),
followed by its lazy ranges (to name it should the daemon die first)."""
IDENTIFIED: Final = b"LZID"
"""Daemon → its own guardian, with a pidfd as SCM_RIGHTS: process KEY is that one."""
RELEASE: Final = b"LZRL"
"""Daemon → its own guardian: process KEY is settled; let go of its fds."""
DAEMON_DONE: Final = b"LZOK"
"""Daemon → its own guardian: every process is settled; the guardian ends."""
_RECORD = struct.Struct("=4sIIII")
"""A record to the daemon's own guardian: word, key, image pid, parent key, restorer."""
_RANGE = struct.Struct("=QQ")
_MAX_RANGES = 4096
"""Lazy ranges a HOLD carries at most (enough to tell a process by)."""
_RETRY = 0.5
"""Seconds between the guardian's looks at processes it could not name yet."""


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def spawn_guardian(connection: _HasFileno, uffd: int, pid: int) -> subprocess.Popen[bytes]:
    """Start a guardian for restored process ``pid`` (see the module docstring).

    ``connection`` is the restorer's session (or socket) with the daemon, after
    "restore finished"; ``uffd`` a duplicate of the process's uffd. The guardian gets its
    own copies of both (and a pidfd of ``pid``): the caller closes its own. It
    runs in a new session, with no stdin or stdout (it must not keep anyone's
    pipe open), and logs to the caller's stderr.
    """
    pidfd = os.pidfd_open(pid)
    try:
        fds = (connection.fileno(), uffd, pidfd)
        return subprocess.Popen(
            [sys.executable, "-m", "lazymig.guardian", *map(str, fds)],
            pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)
    finally:
        os.close(pidfd)


def _kill(pidfd: int, pid: int, reason: str) -> None:
    # Descendants first, collected while they are still linked to the process.
    doomed = descendants(pid) if pid > 0 else []
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    for child in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    log.error("lazymig guardian: killed restored process %d%s: %s; it must not run on pages "
              "that never arrived (the page server keeps the source: restore again)", pid,
              f" and its descendants {sorted(doomed)}" if doomed else "", reason)


def guard(connection_fd: int, uffd: int, pidfd: int) -> int:
    """Watch the daemon's connection and the restored process until one of them ends.

    Returns 0 when the process got every page (or exited), 1 when it was killed.
    """
    # Here, not at the top: the daemon's own guardian (guard_daemon) needs none of it,
    # and starts at once beside the daemon's first pages.
    from lazymig.proto.handover import Role  # noqa: PLC0415
    from lazymig.uffd.handover import HandoverSession  # noqa: PLC0415

    pid = pidfd_pid(pidfd)
    daemon = HandoverSession(socket.socket(fileno=connection_fd), Role.RESTORER,
                             finished=True)
    poller = select.poll()
    poller.register(connection_fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    held = [uffd]  # and the uffds of children it forked (FORKED)
    try:
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if connection_fd not in ready:
                return 0  # the restored process exited: nothing left to protect
            # The daemon's words first, to the last: a daemon that died and a process
            # killed meanwhile (by the daemon's own guardian) are both ready at once,
            # and that exit is no "exited" while the daemon's end says it went away.
            verdict = _hear(daemon, held)
            if verdict == "complete":
                return 0  # every page is in: faults are ordinary again
            if verdict == "foreign":
                # CRIU's daemon says nothing and closes when it exits, done or not:
                # nothing can be told apart, so stand aside rather than kill.
                log.warning("lazymig guardian: the lazy-pages daemon of process %d does "
                            "not report completion (not lazymig's?): not guarding it", pid)
                return 0
            if verdict is not None:
                _kill(pidfd, pid, verdict)
                return 1
    finally:
        daemon.close()
        for fd in held:
            os.close(fd)


def _hear(daemon: HandoverSession, held: list[int]) -> str | None:
    """What the daemon said since the last look: None (go on), "complete", "foreign"
    or why to kill. A forked child's uffd joins ``held``."""
    from lazymig.errors import BrokenResourceError, RemoteProtocolError  # noqa: PLC0415
    from lazymig.proto.handover import (  # noqa: PLC0415 (loaded by guard already)
        ConnectionClosed,
        Forked,
        Guarded,
        GuardianPresent,
        State,
        TransferComplete,
    )

    try:
        events = daemon.receive()
    except OSError as exc:  # a reset: a daemon killed before it even accepted us
        return f"the daemon's connection broke ({exc})"
    except RemoteProtocolError as exc:
        return f"the daemon broke the protocol ({exc}), which it never would"
    for event in events:
        if isinstance(event, Guarded):
            try:
                daemon.send_nowait(GuardianPresent())
            except BrokenResourceError:
                pass  # unanswered if the daemon is done already: what follows tells
        elif isinstance(event, Forked):
            held.append(event.fd)
        elif isinstance(event, TransferComplete):
            return "complete"
        elif isinstance(event, ConnectionClosed):
            # It answered GUARDED at once (GUARDING): a daemon that never said it is
            # not lazymig's.
            if daemon.connection.restorer_state is not State.GUARDING:
                return "foreign"
            return "the lazy-pages daemon went away before every page arrived"
    return None


# -- the daemon's own guardian ---------------------------------------------------------------


def _which(name: str) -> str | None:
    """``shutil.which`` for a plain name: shutil would load bz2 and lzma (0.6 MiB) into
    the daemon that starts us."""
    for directory in os.get_exec_path():
        path = Path(directory) / name
        if os.access(path, os.X_OK) and not path.is_dir():
            return str(path)
    return None


class DaemonGuardian:
    """The daemon's end of its own guardian (see the module docstring): every process
    the daemon holds stays held, or is killed, should the daemon die.

    Sends never block the daemon for long: each record is a few bytes (with at most
    one fd) into a socket buffer the guardian keeps draining.
    """

    def __init__(self) -> None:
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "lazymig.guardian", "--daemon", str(theirs.fileno()),
                str(os.getpriority(os.PRIO_PROCESS, 0))]
        # It starts as the first pages go out: its interpreter's start-up (~40 ms of CPU)
        # must not take a vCPU from them. Once up it takes the daemon's priority back.
        if (nice := _which("nice")) is not None:
            argv = [nice, "-n", "19", *argv]
        try:
            self.process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            self._socket.close()
            raise
        finally:
            theirs.close()
        self.closed = False

    def _send(self, word: bytes, key: int, pid: int = 0, parent: int = 0, restorer: int = 0,
              fds: list[int] | None = None, payload: bytes = b"") -> None:
        if self.closed:
            return
        try:
            socket.send_fds(self._socket, [_RECORD.pack(word, key, pid, parent, restorer)
                                           + payload], fds or [])
        except OSError as exc:  # it died: nothing holds for us any more
            log.error("the lazy-pages daemon's guardian (pid %d) is gone: %s",
                      self.process.pid, exc)
            self.closed = True

    def hold(self, key: int, pid: int, uffd: int, *, restorer: int,
             ranges: list[tuple[int, int]], parent: int = 0) -> None:
        """Hold ``uffd`` (a duplicate is sent) of process ``key``, image pid ``pid``
        with lazy ``ranges`` ``(vaddr, nr_pages)``, handed over by ``restorer``."""
        payload = b"".join(_RANGE.pack(*r) for r in ranges[:_MAX_RANGES])
        self._send(HOLD, key, pid, parent, restorer, [uffd], payload)

    def identified(self, key: int, pidfd: int) -> None:
        """Process ``key`` is the one behind ``pidfd`` (a duplicate is sent)."""
        self._send(IDENTIFIED, key, fds=[pidfd])

    def release(self, key: int) -> None:
        """Process ``key`` is settled: the guardian lets go of it."""
        self._send(RELEASE, key)

    def complete(self) -> None:
        """Every process is settled: the guardian ends (0)."""
        self._send(DAEMON_DONE, 0)
        self.close()

    def close(self) -> None:
        """Close the daemon's end: the guardian kills what it holds unless :meth:`complete`
        came first (as if the daemon died)."""
        self.closed = True
        self._socket.close()


@dataclass
class _Ward:
    """A process the daemon's guardian holds."""

    pid: int  # its image pid
    parent: int  # the key of the process it forked from, or 0
    restorer: int  # the pid that handed it over
    ranges: list[tuple[int, int]]
    uffds: list[int] = field(default_factory=list)
    pidfd: int | None = None

    def close(self) -> None:
        for fd in [*self.uffds, *([self.pidfd] if self.pidfd is not None else [])]:
            os.close(fd)
        self.uffds.clear()
        self.pidfd = None


def guard_daemon(connection_fd: int) -> int:
    """The daemon's own guardian (see :class:`DaemonGuardian`): 0 when the daemon said
    every process was settled, 1 when it went away first (what it held is killed)."""
    connection = socket.socket(fileno=connection_fd)
    wards: dict[int, _Ward] = {}
    poller = select.poll()
    poller.register(connection_fd, select.POLLIN)
    by_pidfd: dict[int, int] = {}
    while True:
        for fd, _ in poller.poll():
            if fd in by_pidfd:  # that process exited: nothing left to protect
                key = by_pidfd.pop(fd)
                poller.unregister(fd)
                wards.pop(key).close()
                continue
            try:
                data, fds, _, _ = socket.recv_fds(
                    connection, _RECORD.size + _MAX_RANGES * _RANGE.size, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                return _daemon_gone(wards)
            word, key, pid, parent, restorer = _RECORD.unpack_from(data)
            if word == HOLD:
                ranges = list(_RANGE.iter_unpack(data[_RECORD.size:]))
                wards.setdefault(key, _Ward(pid, parent, restorer, ranges)).uffds.extend(fds)
            elif word == IDENTIFIED and key in wards and fds:
                wards[key].pidfd = fds[0]
                by_pidfd[fds[0]] = key
                poller.register(fds[0], select.POLLIN)
            elif word == RELEASE and key in wards:
                ward = wards.pop(key)
                if ward.pidfd is not None:
                    by_pidfd.pop(ward.pidfd, None)
                    poller.unregister(ward.pidfd)
                ward.close()
            elif word == DAEMON_DONE:
                for ward in wards.values():
                    ward.close()
                return 0
            else:
                for extra in fds:
                    os.close(extra)


def _daemon_gone(wards: dict[int, _Ward]) -> int:
    """The daemon died before every process was settled: kill those it named (a
    forked child dies as a descendant of its parent), name the others if possible
    and kill them, and hold the uffds of those that cannot be named until they exit."""
    from lazymig.linux.uffd import memory_alive  # noqa: PLC0415 (only on this path)
    from lazymig.uffd.identify import Identified, identify, identify_forked  # noqa: PLC0415

    reason = "the lazy-pages daemon went away before every page arrived"
    probe = lowest_mappable()
    done: set[int] = set()
    told = False
    while True:
        for key, ward in wards.items():
            if key in done:
                continue
            if ward.pidfd is None and ward.parent not in done:
                # A forked child asks under its parent's image pid: it is one of the
                # children of its parent (its ``restorer``), never the process so named.
                claimed = [pidfd_pid(w.pidfd) for w in wards.values() if w.pidfd is not None]
                found = identify(ward.pid, ward.ranges, ward.restorer, claimed) \
                    if not ward.parent else \
                    identify_forked(ward.restorer, ward.ranges, claimed, {ward.pid})
                if isinstance(found, Identified):
                    ward.pidfd = found.pidfd
            if ward.pidfd is not None and (pid := pidfd_pid(ward.pidfd)) > 0:
                _kill(ward.pidfd, pid, reason)
            elif ward.parent not in done and any(memory_alive(fd, probe) for fd in ward.uffds):
                continue  # still there, unnamed: held
            done.add(key)
            ward.close()
        left = [w for key, w in wards.items() if key not in done]
        if not left:
            return 1
        if not told:
            told = True
            log.error("lazymig guardian (pid %d): %s; the processes of image pids %s could "
                      "not be identified: their userfaultfds stay held here, so they stop at "
                      "their next missing page instead of reading zeros, until they exit. Kill "
                      "them: processes of the restored tree with userfaultfd-registered "
                      "mappings covering their lazy ranges ('um' in /proc/PID/smaps VmFlags)",
                      os.getpid(), reason, sorted(w.pid for w in left))
        time.sleep(_RETRY)


def main(argv: list[str] | None = None) -> int:
    """``python -m lazymig.guardian CONNECTION_FD UFFD PIDFD`` (see :func:`spawn_guardian`),
    or ``python -m lazymig.guardian --daemon FD NICE`` (see :class:`DaemonGuardian`)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The restorer's terminal and signals are not ours: only the daemon's fate counts.
    for signo in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signo, signal.SIG_IGN)
    if args[:1] == ["--daemon"]:
        with contextlib.suppress(OSError):  # started niced (see DaemonGuardian)
            os.setpriority(os.PRIO_PROCESS, 0, int(args[2]))
        return guard_daemon(int(args[1]))
    connection_fd, uffd, pidfd = (int(a) for a in args)
    return guard(connection_fd, uffd, pidfd)


if __name__ == "__main__":
    sys.exit(main())
