"""Connection loss between two test hosts: the veth link between two network namespaces
goes down and up while a restored process waits for its pages.

The set-up is tests/test_netns.py's, from the lazymig pytest plugin (source
namespace: ``lazymig dump --lazy-pages``; destination namespace: ``lazymig
lazy-pages --page-server`` on a copy of the images). The link is taken down
for a second before the restore, so that the first requests (the restore's
own faults, the restored process's, the background fetch) meet a dead link:
no reset arrives, the daemon's stall watchdog gives the connection up,
reconnection attempts fail (no route) until the link is back, then every
unanswered request is sent again. Once the process runs the link goes down
(two seconds) and up twice more, while the transfer may still run.
Then the daemon and the dumper exit 0 and the restored region is compared
page by page with the source's (tests/test_reconnect.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import PORT, on_uvloop, restore_and_compare
from reliability import Recorder

from lazymig.testing import HostPair
from lazymig.testing.plugin import StartCommand, StartWorkload

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and ptrace need root"),
]


async def set_link(hosts: HostPair, up: bool) -> None:
    """The source namespace's end of the veth pair, down or up (the pair with it)."""
    await asyncio.to_thread(hosts.set_link, up)


async def flap(hosts: HostPair, restored: asyncio.Event, times: int) -> None:
    """Link up after a second (the restore itself touches lazy pages, and its ptrace
    waits are bounded: a short outage), then, once the process runs, down for two
    seconds and up again ``times`` more times."""
    await asyncio.sleep(1.0)
    await set_link(hosts, up=True)
    await restored.wait()
    for _ in range(times):
        await set_link(hosts, up=False)
        await asyncio.sleep(2.0)
        await set_link(hosts, up=True)
        await asyncio.sleep(0.5)


@pytest.mark.asyncio
@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
async def test_the_veth_link_down_and_up_during_a_migration(
        lazymig_hosts: HostPair, lazymig_workload: StartWorkload,
        lazymig_command: StartCommand, tmp_path: Path, reliability: Recorder) -> None:
    hosts = lazymig_hosts
    loop = on_uvloop()
    source_images, images = tmp_path / "source", tmp_path / "destination"
    source_images.mkdir()
    w = lazymig_workload("c", mib=16)
    before = w.next_check()
    dumper = await lazymig_command("dump", "-t", str(w.pid), "--lazy-pages", "--address",
                                   hosts.source.address, "--port", str(PORT), "-D",
                                   source_images, host=hosts.source, uvloop=loop)
    await asyncio.to_thread(shutil.copytree, source_images, images)
    daemon = await lazymig_command("lazy-pages", "--page-server", "--address",
                                   hosts.source.address, "--port", str(PORT), "-D", images,
                                   "--stall-timeout", "0.3", "--reconnect-attempts", "1000",
                                   "--reconnect-timeout", "60", host=hosts.destination,
                                   uvloop=loop)
    await set_link(hosts, up=False)
    restored = asyncio.Event()
    flapping = asyncio.create_task(flap(hosts, restored, times=2))
    try:
        await restore_and_compare(images, w.ready, before, daemon.process, dumper.process,
                                  restored)
    finally:
        restored.set()
        await flapping
    assert w.proc.wait(timeout=5) == -signal.SIGKILL  # the source is gone only now
    # The first faults met the dead link: the connection was given up and re-established.
    log = daemon.log()
    assert "no reply from the page server for 0.3 s" in log, log
    assert "re-established" in log, log
    reliability.record(
        "Faults injected", "network link down and up between two namespaces",
        tried="the veth link down before the restore, then down and up twice while the "
              "restored 16 MiB process ran",
        held="the daemon noticed the dead link, reconnected; memory equal page by page; "
             "the source killed only at the end")
