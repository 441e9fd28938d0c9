"""Real ``criu restore --lazy-pages`` under lazymig's daemon: the page server (``criu dump
--lazy-pages``) killed mid-transfer, then the daemon stopped (SIGTERM) or killed
(SIGKILL). criu hands its uffds over with image pids of the tree's own pid namespace
and without thread ids; the daemon names each process when the restore finished
(smaps VmFlags ``um``, ``NSpid``) and kills it itself (SIGTERM), or its guardian
does (SIGKILL). criu_pattern checks every page of its area before each tick line it
prints: none may report a bad page.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from criu_peer import (
    LOOPS,
    ChrootDir,
    CriuError,
    WireTap,
    Workload,
    criu,
    failure_context,
    kill_restored,
    lazymig_argv,
    start_lazy_dump,
    start_with_status_fd,
    stop,
)
from helpers import process_state

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="real CRIU needs root (chroot, ptrace, userfaultfd, namespaces)"),
]

PATIENT = ["--reconnect-attempts", "1000", "--reconnect-timeout", "600"]


def wait_logged(log: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (content := log.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon never logged {text!r}:\n{content[-3000:]}")
        time.sleep(0.02)
    return content


def wait_gone(pid: int, timeout: float = 20) -> bool:
    """Wait (without killing it) until ``pid`` is gone or a zombie."""
    deadline = time.monotonic() + timeout
    while process_state(pid) not in ("", "Z"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # tap reset
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_criu_restored_tree_dies_with_the_daemon_when_its_pages_cannot_come(
        chroot_dir: ChrootDir, workload_binary: Path, loop: str, how: signal.Signals) -> None:
    d = chroot_dir
    workload = Workload(d, workload_binary, mib=4, children=1)
    procs: list[subprocess.Popen[bytes]] = []
    daemon_log = d.host / "lazymig-lazy-pages.log"
    try:
        workload.start()
        workload.wait_ticks({}, 2, timeout=10)
        dump, port = start_lazy_dump(d, workload)
        procs.append(dump)
        dumped = workload.output()
        # ~8 s for both processes' 4 MiB: the page server dies with most still lazy.
        tap = WireTap(port, rate=1e6)
        with daemon_log.open("wb") as err:
            daemon = start_with_status_fd(
                lazymig_argv("lazy-pages", "--page-server", "--address", "127.0.0.1",
                             "--port", str(tap.port), "--wire", "v1", "--no-background",
                             *PATIENT, "-D", str(d.host), loop=loop),
                what="lazymig lazy-pages", stderr=err.fileno())
        procs.append(daemon)
        criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
             "--pidfile", d.inside("restored.pid"), log="restore.log")
        root = int((d.host / "restored.pid").read_text())
        wait_logged(daemon_log, "pid 1 is process")
        wait_logged(daemon_log, "pid 2 is process")

        dump.kill()  # the page server dies mid-transfer; its source with it
        workload.kill()
        wait_logged(daemon_log, "reconnecting")  # the restored tree waits for pages
        assert process_state(root) not in ("", "Z"), "the restored tree did not wait"
        daemon.send_signal(how)
        status = daemon.wait(30)
        assert wait_gone(root), f"the restored tree lives on:\n{daemon_log.read_text()[-3000:]}"

        text = daemon_log.read_text()
        if how == signal.SIGTERM:
            assert status == 128 + signal.SIGTERM, text[-3000:]
            assert f"process {root} (image pid 1) killed" in text, text[-3000:]
        else:
            assert status == -signal.SIGKILL
            wait_logged(daemon_log, "lazymig guardian: killed restored process")
        # What the restored processes printed after the dump: never a page that differs.
        after = workload.output().ticks[len(dumped.ticks):]
        assert all(t.bad_pages == 0 for t in after), after
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        with contextlib.suppress(Exception):
            kill_restored(d)
        workload.kill()
