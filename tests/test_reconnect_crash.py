"""The lazy-pages daemon killed mid-transfer (SIGKILL: no clean-up of its own).

Its uffds close with it, so without more the restored process's missing pages
would read as zeros. The restorer's guardian (lazymig.guardian) holds a
duplicate of the uffd and the restorer's connection to the daemon: it sees the
connection end without "transfer complete" and kills the restored process
before it touches a page that never came. The daemon's TCP connection ends with
a reset, so the page server keeps the source: a new daemon and a new restore
then complete the migration, checked page by page.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reconnect import restore_and_compare
from test_restore import _wait_ready, c_workload, cli, free_port, on_uvloop, restore_with_output
from workloads import Check, Workload

from lazymig.guardian import GUARDED, TRANSFER_COMPLETE, spawn_guardian
from lazymig.linux.ptrace import process_alive
from lazymig.uffd.uffd import Uffd

__all__ = ["c_workload"]  # the fixture, shared with test_restore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]


@pytest.mark.asyncio
async def test_a_killed_daemon_leaves_no_process_on_holes_and_the_source_for_a_retry(
        tmp_path: Path, c_workload: Path) -> None:
    port = str(free_port())
    loop = on_uvloop()
    # The workload sleeps 2 s between checks: its region is still lazy when the daemon dies.
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "2000"]) as w:
        before = w.next_check(timeout=10)
        with cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(tmp_path), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(_wait_ready, dr, dumper, "lazymig dump")
            daemon_args = ("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                           port, "-D", str(tmp_path))
            with cli(*daemon_args, "--no-background", uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(_wait_ready, lr, daemon, "lazymig lazy-pages")
                restorer, _, lines = await restore_with_output(tmp_path, lazy_pages=True)
                try:
                    daemon.send_signal(signal.SIGKILL)
                    assert await asyncio.to_thread(daemon.wait, 10) == -signal.SIGKILL
                    printed: list[Check] = []
                    with contextlib.suppress(EOFError):  # until its stdout closes
                        while not printed or printed[-1].bad == 0:
                            printed.append(await asyncio.to_thread(lines.next_check, 10.0))
                    # Killed by the guardian, not run on zeros (a hole would count as bad).
                    assert all((c.sum, c.bad) == (before.sum, 0) for c in printed), printed
                    assert await asyncio.to_thread(restorer.wait) == -signal.SIGKILL
                    assert restorer.guardian is not None
                    assert await asyncio.to_thread(restorer.guardian.wait, 10) == 1
                finally:
                    restorer.kill()
                    lines.close()
            # The source is intact and still served: restore again with a new daemon.
            assert dumper.poll() is None
            with cli(*daemon_args, uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(_wait_ready, lr, daemon, "lazymig lazy-pages")
                await restore_and_compare(tmp_path, w.ready, before, daemon, dumper)
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # released only now


# -- the guardian alone: a real guardian process, a real child, a socketpair for the daemon --

@contextlib.contextmanager
def guarded_child(unread: bytes = b"") -> Iterator[tuple[
        socket.socket, subprocess.Popen[bytes], subprocess.Popen[str], int]]:
    """A child (a shell whose own child sleeps) under a guardian; yields the daemon's end
    of the connection (holding ``unread`` from the restorer), the guardian, the child
    and the grandchild's pid."""
    child = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    daemon_end, restorer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with restorer_end, Uffd.open() as uffd:
            restorer_end.sendall(unread)
            guardian = spawn_guardian(restorer_end, uffd.fd, child.pid)
        yield daemon_end, guardian, child, grandchild
    finally:
        daemon_end.close()
        for pid in (child.pid, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait(timeout=10)
        guardian.wait(timeout=10)


def test_the_guardian_lets_go_once_the_transfer_is_complete() -> None:
    with guarded_child() as (daemon_end, guardian, child, _):
        daemon_end.sendall(GUARDED)
        daemon_end.sendall(TRANSFER_COMPLETE)
        assert guardian.wait(timeout=10) == 0
        daemon_end.close()  # the daemon's exit changes nothing any more
        assert child.poll() is None


@pytest.mark.parametrize("then", ["close", "garbage", "reset"])
def test_the_guardian_kills_when_the_daemon_goes_away(then: str) -> None:
    with guarded_child(unread=b"\0" * 8 if then == "reset" else b"") as (
            daemon_end, guardian, child, grandchild):
        if then == "reset":
            # Killed before it read the handover (or accepted at all): closing with the
            # restorer's records unread resets the connection.
            daemon_end.close()
        elif then == "garbage":
            daemon_end.sendall(GUARDED + b"OOPS")
        else:
            daemon_end.sendall(GUARDED)
            daemon_end.close()  # as the kernel does for a killed daemon
        assert guardian.wait(timeout=10) == 1
        assert child.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10  # SIGKILL was sent; dying takes a moment
        while process_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not process_alive(grandchild)  # its descendants too


def test_the_guardian_stands_aside_for_a_daemon_that_never_said_guarded() -> None:
    """CRIU's daemon closes the connection when it exits, complete or not, and says
    nothing: killing then would kill healthy processes."""
    with guarded_child() as (daemon_end, guardian, child, _):
        daemon_end.close()
        assert guardian.wait(timeout=10) == 0
        assert child.poll() is None


def test_the_guardian_ends_with_its_process() -> None:
    with guarded_child() as (daemon_end, guardian, child, _):
        daemon_end.sendall(GUARDED)
        child.kill()
        assert guardian.wait(timeout=10) == 0
