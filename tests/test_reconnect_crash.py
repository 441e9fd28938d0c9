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
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    Child,
    cli,
    free_port,
    on_uvloop,
    restore_and_compare,
    restore_with_output,
    run_daemon,
    stop,
    wait_ready,
)
from lazydump import write_lazy_dump
from reliability import Recorder

from lazymig.guardian import DaemonGuardian, spawn_guardian
from lazymig.linux.ptrace import process_alive
from lazymig.proto.handover import (
    ConnectionClosed,
    Forked,
    Guarded,
    GuardianPresent,
    RestoreFinished,
    Role,
    TaskHandover,
    TransferComplete,
)
from lazymig.proto.images import ImagesDir
from lazymig.testing.workload import Check, Workload
from lazymig.uffd.handover import HandoverSession
from lazymig.uffd.source import LocalPageSource
from lazymig.uffd.uffd import DEFAULT_FEATURES, Uffd

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]


@pytest.mark.asyncio
async def test_a_killed_daemon_leaves_no_process_on_holes_and_the_source_for_a_retry(
        tmp_path: Path, c_workload: Path, reliability: Recorder) -> None:
    port = str(free_port())
    loop = on_uvloop()
    # The workload sleeps 2 s between checks: its region is still lazy when the daemon dies.
    with Workload([str(c_workload), "--mib", "8", "--interval-ms", "2000"]) as w:
        before = w.next_check(timeout=10)
        with cli("dump", "-t", str(w.pid), "--lazy-pages", "--address", "127.0.0.1",
                 "--port", port, "-D", str(tmp_path), uvloop=loop) as (dumper, dr):
            assert dr is not None
            await asyncio.to_thread(wait_ready, dr, dumper, "lazymig dump")
            daemon_args = ("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                           port, "-D", str(tmp_path))
            with cli(*daemon_args, "--no-background", uvloop=loop) as (daemon, lr):
                assert lr is not None
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
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
                await asyncio.to_thread(wait_ready, lr, daemon, "lazymig lazy-pages")
                await restore_and_compare(tmp_path, w.ready, before, daemon, dumper)
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # released only now
    reliability.record(
        "Faults injected", "lazy-pages daemon killed (SIGKILL) mid-transfer",
        tried="SIGKILL of `lazymig lazy-pages` while a restored 8 MiB process had lazy pages",
        held="its guardian killed the restored process before it read a hole; the source "
             "stayed frozen and intact; a second daemon and restore completed the migration")


# -- the guardian alone: a real guardian process, a real child, a socketpair for the daemon --

@contextlib.contextmanager
def guarded_child(unread: bytes = b"") -> Iterator[tuple[
        HandoverSession, subprocess.Popen[bytes], subprocess.Popen[str], int]]:
    """A child (a shell whose own child sleeps) under a guardian; yields the daemon's end
    of the connection (holding ``unread`` from the restorer; blocking, with a timeout),
    the guardian, the child and the grandchild's pid."""
    child = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    daemon_sock, restorer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon_sock.settimeout(10)
    daemon_end = HandoverSession(daemon_sock, Role.DAEMON, finished=True)  # after the handover
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
        daemon_end.send_nowait(Guarded())
        daemon_end.send_nowait(TransferComplete())
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
            daemon_end.send_nowait(Guarded())
            daemon_sock = socket.socket(fileno=os.dup(daemon_end.fileno()))
            with daemon_sock:
                daemon_sock.sendall(b"OOPS")  # no word of the protocol
        else:
            daemon_end.send_nowait(Guarded())
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
        daemon_end.send_nowait(Guarded())
        child.kill()
        assert guardian.wait(timeout=10) == 0


def userfaultfds(pid: int) -> int:
    """How many userfaultfds process ``pid`` holds."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (it starts up)
            count += str(fd.readlink()) == "anon_inode:[userfaultfd]"
    return count


def in_poll(pid: int) -> bool:
    """Process ``pid`` sleeps in poll(2) (x86_64 syscall 7)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "7"
    return False


def wait_for(what: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 10
    while not what() and time.monotonic() < deadline:
        time.sleep(0.01)
    return what()


def test_the_guardian_holds_the_uffds_of_forked_children() -> None:
    with guarded_child() as (daemon_end, guardian, child, _), Uffd.open() as forked:
        daemon_end.send_nowait(Guarded())
        assert daemon_end.receive() == [GuardianPresent()]  # then a forked child's uffd may go
        daemon_end.send_nowait(Forked(forked.fd))
        assert wait_for(lambda: userfaultfds(guardian.pid) == 2)
        daemon_end.send_nowait(TransferComplete())
        assert guardian.wait(timeout=10) == 0
        assert child.poll() is None


@pytest.mark.asyncio
@pytest.mark.parametrize("guarded", [True, False])
async def test_the_daemon_hands_a_forked_childs_uffd_to_the_guardian(
        tmp_path: Path, guarded: bool) -> None:
    """A process (tests/uffd_child.py) handed over as a restorer does; it forks, and its
    child reads lazy pages through the daemon. With a guardian, the FORK event's uffd
    reaches it, and when the daemon goes away before completion the guardian kills
    the process. Without one (CRIU's restorer never reads), no fd is sent into a
    socket nobody reads: it would keep the child's uffd alive."""
    async with asyncio.timeout(60):
        child = await Child.start(16, int(DEFAULT_FEATURES))
        guardian: subprocess.Popen[bytes] | None = None
        try:
            pid = 4321
            write_lazy_dump(tmp_path, {pid: [(child.addr, child.npages)]})
            daemon, running = await run_daemon(tmp_path, LocalPageSource(ImagesDir(tmp_path)),
                                               background=False)
            with await HandoverSession.connect(daemon.socket_path) as conn:
                await conn.send(TaskHandover(pid, child.uffd.fd))
                await conn.send(RestoreFinished())
                if guarded:
                    guardian = spawn_guardian(conn, child.uffd.fd, child.pid)
                    conn.close()
                    # Once it waits in poll(2) it has answered GUARDED: the daemon knows
                    # it is there before the fork (else a short-lived child may be gone
                    # before the daemon learns where to send its uffd).
                    assert await asyncio.to_thread(wait_for, lambda: in_poll(guardian.pid))
                child.uffd.close()
                grandchild = await child.call(op="fork", addr=child.addr, n=4)
                assert grandchild["from"] == "grandchild" and len(grandchild["sha"]) == 4
                assert (await child.recv())["from"] == "child"
                if guardian is not None:
                    assert await asyncio.to_thread(
                        wait_for, lambda: userfaultfds(guardian.pid) == 2)
                await stop(running)  # the daemon goes away with pages still lazy
                if guardian is None:
                    # GUARDED, then EOF: a FORKED (to no guardian) would break the protocol.
                    heard = conn.receive() + conn.receive()
                    assert heard in ([Guarded()], [Guarded(), ConnectionClosed()])
            if guardian is not None:
                assert await asyncio.to_thread(guardian.wait, 10) == 1
                assert await asyncio.to_thread(child.proc.wait, 10) == -signal.SIGKILL
        finally:
            await child.stop()
            if guardian is not None:
                guardian.kill()
                guardian.wait()


# -- the daemon's own guardian alone: a real guardian, a real child and its real uffd --

@contextlib.asynccontextmanager
async def daemon_guarded_child() -> AsyncIterator[tuple[DaemonGuardian, Child]]:
    """A child holding a registered region (tests/uffd_child.py) and a guardian the way
    the daemon starts one; both gone afterwards."""
    child = await Child.start(16, int(DEFAULT_FEATURES))
    guardian = DaemonGuardian()
    try:
        yield guardian, child
    finally:
        guardian.close()
        await child.stop()
        if guardian.process.poll() is None:
            guardian.process.kill()
        await asyncio.to_thread(guardian.process.wait, 10)


@pytest.mark.asyncio
@pytest.mark.parametrize("named_by", ["daemon", "guardian"])
async def test_the_daemons_guardian_kills_what_it_holds_when_the_daemon_dies(
        named_by: str) -> None:
    """The daemon named the process (its pidfd came), or had not yet: the guardian then
    names it from the ranges and the restorer that came with the uffd."""
    async with asyncio.timeout(30), daemon_guarded_child() as (guardian, child):
        guardian.hold(1, 4321, child.uffd.fd, restorer=os.getpid(),
                      ranges=[(child.addr, child.npages)])
        if named_by == "daemon":
            pidfd = os.pidfd_open(child.pid)
            guardian.identified(1, pidfd)
            os.close(pidfd)
        guardian.close()  # as the kernel does when the daemon dies
        assert await asyncio.to_thread(guardian.process.wait, 10) == 1
        assert await asyncio.to_thread(child.proc.wait, 10) == -signal.SIGKILL


@pytest.mark.asyncio
async def test_the_daemons_guardian_lets_go_of_what_is_settled() -> None:
    async with asyncio.timeout(30), daemon_guarded_child() as (guardian, child):
        guardian.hold(1, 4321, child.uffd.fd, restorer=os.getpid(),
                      ranges=[(child.addr, child.npages)])
        guardian.release(1)  # complete (or killed by the daemon itself)
        guardian.close()
        assert await asyncio.to_thread(guardian.process.wait, 10) == 1
        assert child.proc.poll() is None
    async with asyncio.timeout(30), daemon_guarded_child() as (guardian, child):
        guardian.hold(1, 4321, child.uffd.fd, restorer=os.getpid(),
                      ranges=[(child.addr, child.npages)])
        guardian.complete()  # every process settled: the daemon ends
        assert await asyncio.to_thread(guardian.process.wait, 10) == 0
        assert child.proc.poll() is None


@pytest.mark.asyncio
async def test_the_daemons_guardian_holds_a_process_it_cannot_name_until_it_exits() -> None:
    """Ranges no process has registered: nothing to kill, so the uffd stays held (the
    process would stop at a missing page) until the process is gone."""
    async with asyncio.timeout(30), daemon_guarded_child() as (guardian, child):
        guardian.hold(1, 4321, child.uffd.fd, restorer=os.getpid(),
                      ranges=[(child.addr + 2**40, 1)])
        guardian.close()
        with pytest.raises(subprocess.TimeoutExpired):
            await asyncio.to_thread(guardian.process.wait, 2)
        assert userfaultfds(guardian.process.pid) == 1 and child.proc.poll() is None
        child.proc.kill()
        await asyncio.to_thread(child.proc.wait, 10)
        assert await asyncio.to_thread(guardian.process.wait, 10) == 1
