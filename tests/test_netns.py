"""End to end across two test hosts on one machine: two network namespaces.

A source namespace and a destination namespace joined by a veth pair
(10.231.X.1/30 and 10.231.X.2/30, X chosen per test; ``lo`` up in each):

* ``lazymig dump --lazy-pages`` runs in the source namespace, its page server
  listening on 10.231.X.1 (the workload stays in the root namespace: ptrace
  works across network namespaces, only the page server's socket matters);
* the images directory is copied to a second directory (the dump is
  self-contained), from which ``lazymig lazy-pages --page-server`` and
  ``lazymig restore --lazy-pages -d`` run in the destination namespace;
* the restored process (new pid) keeps printing the source's checksums with
  bad=0, the daemon and the dumper exit 0, the source is killed, and the
  memory went through the veth pair (its byte counters).

Skipped only when the namespaces cannot be made (not root, ``ip netns add``
fails); they are deleted at the end in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_restore import _wait_ready, c_workload, on_uvloop, restore_and_check
from workloads import Workload, python_workload_argv

__all__ = ["c_workload"]  # the fixture, shared with test_restore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and ptrace need root"),
]

PORT = 27  # CRIU's default: free in a fresh namespace
IP = shutil.which("ip") or "ip"


@dataclasses.dataclass(frozen=True)
class Hosts:
    """Two network namespaces joined by a veth pair."""

    src: str
    dst: str
    src_addr: str
    dst_addr: str
    src_if: str

    def tx_bytes(self) -> int:
        """Bytes sent by the source namespace's end of the veth pair."""
        return int(_ip("netns", "exec", self.src, "cat",
                       f"/sys/class/net/{self.src_if}/statistics/tx_bytes"))


def _ip(*args: str) -> str:
    return subprocess.run([IP, *args], check=True, capture_output=True, text=True,
                          timeout=10).stdout.strip()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    src, dst = f"lazymig-src-{tag}", f"lazymig-dst-{tag}"
    net = f"10.231.{secrets.randbelow(256)}"
    src_if, dst_if = f"lmS{tag[-6:]}", f"lmD{tag[-6:]}"
    made: list[str] = []
    try:
        for ns in (src, dst):
            try:
                _ip("netns", "add", ns)
            except (OSError, subprocess.SubprocessError) as e:
                err = getattr(e, "stderr", "") or e
                pytest.skip(f"cannot create a network namespace ({ns}): {err}")
            made.append(ns)
        # Created in the source namespace, one end moved: nothing in the root one.
        _ip("-n", src, "link", "add", src_if, "type", "veth", "peer", "name", dst_if,
            "netns", dst)
        for ns, ifname, addr in ((src, src_if, f"{net}.1"), (dst, dst_if, f"{net}.2")):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Hosts(src, dst, f"{net}.1", f"{net}.2", src_if)
    finally:
        for ns in made:
            subprocess.run([IP, "netns", "del", ns], check=False, capture_output=True,
                           timeout=10)


@contextlib.contextmanager
def cli_in(ns: str, *args: str, loop: bool) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``lazymig ARGS --status-fd W`` in network namespace ``ns`` (``ip netns exec``
    execs it: the Popen's pid is lazymig's); yields it and the status fd's read end."""
    r, w = os.pipe()
    argv = [IP, "netns", "exec", ns, sys.executable, "-m", "lazymig", "-v",
            "--uvloop" if loop else "--no-uvloop", *args, "--status-fd", str(w)]
    proc = subprocess.Popen(argv, pass_fds=(w,), text=True, stderr=subprocess.PIPE)
    os.close(w)
    try:
        yield proc, r
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _same_inode(a: str, b: str) -> None:
    assert Path(a).stat().st_ino == Path(b).stat().st_ino, (a, b)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_lazy_migration_between_two_network_namespaces(
        kind: str, hosts: Hosts, tmp_path: Path, c_workload: Path) -> None:
    loop = on_uvloop()
    mib = 32 if kind == "c" else 8
    argv = ([str(c_workload), "--mib", str(mib), "--interval-ms", "50"] if kind == "c"
            else python_workload_argv("--mib", str(mib), "--interval-ms", "50"))
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    port = str(PORT)
    with Workload(argv) as w:
        before = w.next_check()
        with cli_in(hosts.src, "dump", "-t", str(w.pid), "--lazy-pages", "--address",
                    hosts.src_addr, "--port", port, "-D", str(source_images),
                    loop=loop) as (dumper, dr):
            await asyncio.to_thread(_wait_ready, dr, dumper, "lazymig dump")
            # "Copied to the destination": the daemon and restore see only the copy.
            await asyncio.to_thread(shutil.copytree, source_images, images)
            sent_before = hosts.tx_bytes()
            with cli_in(hosts.dst, "lazy-pages", "--page-server", "--address",
                        hosts.src_addr, "--port", port, "-D", str(images),
                        loop=loop) as (daemon, lr):
                await asyncio.to_thread(_wait_ready, lr, daemon, "lazymig lazy-pages")
                restored_pid = await restore_and_check(
                    images, before, loop, daemon, dumper,
                    wrapper=[IP, "netns", "exec", hosts.dst], log_dir=images.parent,
                    # Restored in the destination namespace (`ip netns add` bind-mounts it).
                    check_pid=lambda pid: _same_inode(f"/proc/{pid}/ns/net",
                                                      f"/run/netns/{hosts.dst}"))
        assert restored_pid != w.pid
        assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone
    # The workload's memory crossed the veth pair, from the source namespace.
    assert hosts.tx_bytes() - sent_before >= mib << 20
