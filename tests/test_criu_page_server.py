"""``lazymig page-server --lazy-pages`` on CRIU's dumps on disk, beside CRIU's own
``criu page-server --lazy-pages`` (real CRIU 4.1.1, in the chroot of scripts/criu-peer.sh).

* A restored process that exits before every page was fetched: ``criu lazy-pages``
  closes the session, and the page server ends, as CRIU's does (issue 14: lazymig's
  waited for another client for ever). With ``--keep-serving`` it serves the next
  restore of the same dump instead.
* A tree holding a zombie: CRIU writes only core-N.img for it (task_state 2, no
  mm-N.img). lazymig's page server reads the dump as CRIU wrote it, and the tree is
  restored lazily from it.

The replies to ``criu lazy-pages`` pass a throttled :class:`~criu_peer.WireTap`, so
that the pages are still lazy when the restored process is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from criu_peer import (
    ChrootDir,
    CriuError,
    WireLog,
    WireTap,
    check_restored_ticks,
    chroot_argv,
    criu,
    dump_workload,
    kill_pid,
    lazymig_argv,
    log_errors,
    start_with_status_fd,
    stop,
)
from helpers import free_port

from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.images import ImageKind, ImagesDir

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="real CRIU needs root (chroot, ptrace, userfaultfd, namespaces)"),
]

SERVERS = [("criu", None), ("lazymig", "uvloop"), ("lazymig", "no-uvloop")]
"""Which page server serves the dump on disk, and lazymig's loop: CRIU's is the baseline."""
RATE = 8e6
"""Bytes/s the tap lets through to criu lazy-pages: 32 MiB of lazy pages take 4 s."""


class Server:
    """A page server for the dump in ``d``: CRIU's or lazymig's (``--wire v1``)."""

    def __init__(self, d: ChrootDir, kind: str, loop: str | None, *extra: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = d.host / ("lazymig-page-server.log" if kind == "lazymig"
                             else "page-server.log")
        if kind == "lazymig":
            assert loop is not None
            with self.log.open("wb") as err:
                self.proc = start_with_status_fd(
                    lazymig_argv("page-server", "--lazy-pages", "-D", str(d.host), "--address",
                                 "127.0.0.1", "--port", str(self.port), "--wire", "v1", *extra,
                                 loop=loop),
                    what="lazymig page-server", stderr=err.fileno())
        else:
            self.proc = start_with_status_fd(
                chroot_argv("criu", "page-server", "--lazy-pages", "-D", d.inner, "--address",
                            "127.0.0.1", "--port", str(self.port)),
                what="criu page-server", log=self.log.name)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def lazy_restore(d: ChrootDir, server: Server, *, rate: float | None = RATE,
                 kill: bool = False) -> Iterator[tuple[int, subprocess.Popen[bytes], WireLog]]:
    """``criu lazy-pages`` (through a tap throttled to ``rate``) and ``criu restore
    --lazy-pages -d`` of the dump in ``d``; ``kill``: the restored tree is killed at
    once. Yields its pid, the daemon and the tap's log (complete once the daemon
    exited); the tree is killed on leaving, and a failure comes with the logs."""
    tap = WireTap(server.port, rate=rate)
    daemon: subprocess.Popen[bytes] | None = None
    restored = 0
    (d.host / "restored.pid").unlink(missing_ok=True)
    try:
        daemon = start_with_status_fd(
            chroot_argv("criu", "lazy-pages", "--page-server", "--address", "127.0.0.1",
                        "--port", str(tap.port), "-D", d.inner),
            what="criu lazy-pages", log="lazy-pages.log")
        criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached", "--pidfile",
             d.inside("restored.pid"), log="restore.log")
        restored = int((d.host / "restored.pid").read_text())
        if kill:
            kill_pid(restored)
        yield restored, daemon, tap.log
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n--- lazy-pages.log:\n{log_errors(d.host / 'lazy-pages.log')}"
                             f"\n--- {server.log.name}:\n{server.text()[-3000:]}") from exc
    finally:
        if restored:
            kill_pid(restored)
        if daemon is not None:
            stop(daemon)


def lazy_pages_of(images: ImagesDir) -> int:
    return sum(r.nr_pages for e in images.pstree() if images.has_memory(e.pid)
               for r in images.lazy_ranges(e.pid))


def pages_served(wire: WireLog) -> int:
    return len({(pid, vaddr + i * PAGE_SIZE) for _, n, vaddr, pid in wire.replies
                for i in range(n)})


# -- a process that exits before every page was fetched ---------------------------------------


@pytest.mark.parametrize(("kind", "loop"), SERVERS)
def test_the_page_server_ends_when_its_client_closes_the_session_early(
        chroot_dir: ChrootDir, workload_binary: Path, kind: str, loop: str | None) -> None:
    """The restored process is killed at once: ``criu lazy-pages`` sees it gone, sends
    CLOSE and exits; the page server, CRIU's or lazymig's, ends too (exit status 0)."""
    d = chroot_dir
    dump_workload(d, workload_binary, mib=32, children=0, measure={})
    lazy = lazy_pages_of(ImagesDir(d.host))
    server = Server(d, kind, loop)
    try:
        with lazy_restore(d, server, kill=True) as (_, daemon, wire):
            assert daemon.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
            try:
                rc = server.proc.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the {kind} page server still runs after the session "
                                     f"ended:\n{server.text()[-3000:]}") from None
            assert rc == 0, server.text()[-3000:]
        served = pages_served(wire)
        assert 0 < served < lazy, f"{served} of {lazy} pages served: not an early exit"
        if kind == "lazymig":
            last = server.text().strip().splitlines()[-1]
            never = re.search(rf"with (\d+) of {lazy} lazy pages never served", last)
            assert never is not None and 0 < int(never[1]) < lazy, last
            assert "the page server for this dump on disk ends" in last, last
    finally:
        stop(server.proc)


@pytest.mark.parametrize("loop", ["uvloop", "no-uvloop"])
def test_keep_serving_serves_the_next_restore_of_the_same_dump(
        chroot_dir: ChrootDir, workload_binary: Path, loop: str) -> None:
    """``--keep-serving``: the first restore is killed early, the second one runs with
    its memory intact from the same server, which still runs afterwards."""
    d = chroot_dir
    workload, dumped = dump_workload(d, workload_binary, mib=16, children=0, measure={})
    server = Server(d, "lazymig", loop, "--keep-serving")
    try:
        with lazy_restore(d, server, kill=True) as (_, daemon, _):
            assert daemon.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
        with lazy_restore(d, server, rate=None) as (_, daemon, _):
            check_restored_ticks(workload, dumped)
            assert daemon.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
        assert server.proc.poll() is None, server.text()[-3000:]
        assert server.text().count("serving on for the next restore") == 2, server.text()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == -signal.SIGTERM
    finally:
        stop(server.proc)


# -- a tree holding a zombie -----------------------------------------------------------------

ZOMBIE_MAKER = """#!/bin/sh
# A child that exits at once and is never reaped (criu_pattern waits for nobody).
/bin/true &
exec "${0%/*}/criu_pattern" "$@"
"""


@pytest.mark.parametrize("loop", ["uvloop", "no-uvloop"])
def test_criu_restores_a_tree_with_a_zombie_from_lazymig_page_server(
        chroot_dir: ChrootDir, workload_binary: Path, tmp_path: Path, loop: str) -> None:
    d = chroot_dir
    script = tmp_path / "zombie_then_pattern"  # Workload copies it into d
    script.write_text(ZOMBIE_MAKER)
    script.chmod(0o755)
    (d.host / "criu_pattern").write_bytes(workload_binary.read_bytes())
    (d.host / "criu_pattern").chmod(0o755)
    workload, dumped = dump_workload(d, script, mib=16, children=0, measure={})
    images = ImagesDir(d.host)
    tree = images.pstree()
    assert len(tree) == 2, tree
    zombie = tree[1].pid
    assert images.core(zombie).tc.task_state == 2  # TASK_DEAD
    assert not images.image_path(ImageKind.MM, zombie).exists()
    server = Server(d, "lazymig", loop)
    try:
        with lazy_restore(d, server, rate=None) as (_, daemon, _):
            check_restored_ticks(workload, dumped)
            assert daemon.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
            assert server.proc.wait(30) == 0, server.text()[-3000:]
        assert "transfer complete" in server.text(), server.text()[-3000:]
    finally:
        stop(server.proc)
