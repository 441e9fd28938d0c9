"""End to end across two test hosts on one machine, with the lazymig pytest plugin.

The hosts come from the ``lazymig_hosts`` fixture (lazymig.testing.netns): two
network namespaces joined by a veth pair (and, where a test takes both, plain
loopback). The source's workload stays in the root namespace (ptrace works
across network namespaces, only the page server's socket matters):

* ``lazymig dump --lazy-pages`` runs on the source host, its page server
  listening on the source's address;
* the images directory is copied to a second directory (the dump is
  self-contained), from which ``lazymig lazy-pages --page-server`` and
  ``lazymig restore --lazy-pages -d`` run on the destination host;
* the restored process (new pid, in the destination namespace) keeps printing
  the source's checksums with bad=0, the daemon and the dumper exit 0, the
  source is killed, and the memory went through the veth pair (its byte
  counters);
* restored through the API instead, its memory is compared page by page with
  the pattern, on loopback and across the namespaces.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import PORT, free_port, on_uvloop, restore_and_check

import lazymig
from lazymig.testing import HostPair, Pattern, assert_memory_equal
from lazymig.testing.plugin import StartCommand, StartWorkload

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and ptrace need root"),
]


def page_server_port(hosts: HostPair) -> int:
    """CRIU's default port in a fresh namespace; on loopback, one free now."""
    return PORT if hosts.kind == "netns" else free_port()


@pytest.mark.asyncio
@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
@pytest.mark.parametrize("kind", ["c", "python"])
async def test_lazy_migration_between_two_network_namespaces(
        kind: str, lazymig_hosts: HostPair, lazymig_workload: StartWorkload,
        lazymig_command: StartCommand, tmp_path: Path) -> None:
    hosts = lazymig_hosts
    loop = on_uvloop()
    mib = 32 if kind == "c" else 8
    w = lazymig_workload(kind, mib=mib)
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    before = w.next_check()
    dumper = await lazymig_command("dump", "-t", str(w.pid), "--lazy-pages", "--address",
                                   hosts.source.address, "--port", str(PORT), "-D",
                                   source_images, host=hosts.source, uvloop=loop)
    # "Copied to the destination": the daemon and restore see only the copy.
    await asyncio.to_thread(shutil.copytree, source_images, images)
    sent_before = hosts.bytes_sent()
    daemon = await lazymig_command("lazy-pages", "--page-server", "--address",
                                   hosts.source.address, "--port", str(PORT), "-D", images,
                                   host=hosts.destination, uvloop=loop)

    def in_destination(pid: int) -> None:
        assert hosts.destination.owns(pid)

    restored_pid = await restore_and_check(
        images, before, loop, daemon.process, dumper.process,
        wrapper=hosts.destination.command([]), log_dir=tmp_path, check_pid=in_destination)
    assert restored_pid != w.pid
    assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone
    # The workload's memory crossed the veth pair, from the source namespace.
    assert hosts.bytes_sent() - sent_before >= mib << 20
    # A client across a network gets its pages spliced (on loopback they are copied).
    assert "(pages spliced)" in dumper.log()


@pytest.mark.asyncio
async def test_restored_memory_equals_the_source_page_by_page(
        lazymig_hosts: HostPair, lazymig_workload: StartWorkload,
        lazymig_command: StartCommand, tmp_path: Path) -> None:
    """Page server and daemon as commands on the two hosts, the process restored through
    the API (the daemon's socket is a path: it crosses namespaces), its memory compared
    with the workload's pattern once the daemon has exited."""
    hosts = lazymig_hosts
    w = lazymig_workload("c", mib=16)
    expected = Pattern.of(w.ready)
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    port = str(page_server_port(hosts))
    dumper = await lazymig_command("dump", "-t", str(w.pid), "--lazy-pages", "--address",
                                   hosts.source.address, "--port", port, "-D", source_images,
                                   host=hosts.source)
    await asyncio.to_thread(shutil.copytree, source_images, images)
    daemon = await lazymig_command("lazy-pages", "--page-server", "--address",
                                   hosts.source.address, "--port", port, "-D", images,
                                   host=hosts.destination)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        async with asyncio.timeout(120), \
                lazymig.restore_process(images, stdio=(devnull, devnull, devnull)) as process:
            assert await daemon.wait() == 0  # every page is in: the uffd is closed
            assert await dumper.wait() == 0
            await assert_memory_equal(process.pid, expected)
            assert await process.kill() == -signal.SIGKILL
    finally:
        os.close(devnull)
