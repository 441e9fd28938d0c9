"""A page server's client that fails without a word: its host dies or its link is cut,
so that no reset ever arrives. The connection must turn into an error within seconds
(TCP keepalive), not wait for ever (issue 14: a failed peer is an error, not a hang).

``lazymig page-server`` runs in one network namespace, a client that sent a GET runs
in another, and the veth pair between them goes down.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lazydump import write_lazy_dump
from test_daemon import layout
from test_restore import on_uvloop

from lazymig.testing import HostPair
from lazymig.testing.cli import LazymigCommand

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

PORT = 27  # free in a fresh namespace
DUMP = layout(1, pages=16)
(PID, [(VADDR, NR_PAGES)]), = DUMP.items()

CLIENT = """
import socket, struct, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
sock.sendall(struct.pack("=IIQQ", 7, int(sys.argv[5]), int(sys.argv[4]), int(sys.argv[3])))
want = 24 + int(sys.argv[5]) * 4096
got = 0
while got < want:
    got += len(sock.recv(want - got))
print("GOT", flush=True)
time.sleep(120)  # silent from now on; the link goes down under it
"""


@pytest.mark.asyncio
@pytest.mark.parametrize("lazymig_hosts", ["netns"], indirect=True)
async def test_a_client_behind_a_dead_link_is_an_error_within_seconds(
        lazymig_hosts: HostPair, tmp_path: Path) -> None:
    hosts = lazymig_hosts
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    command = LazymigCommand(["page-server", "--lazy-pages", "--address", hosts.source.address,
                              "--port", PORT, "--wire", "v1", "-D", images],
                             host=hosts.source, log_path=tmp_path / "page-server.log",
                             uvloop=on_uvloop())
    async with asyncio.timeout(60), command as server:
        client = await asyncio.create_subprocess_exec(
            *hosts.destination.command([sys.executable, "-c", CLIENT, hosts.source.address,
                                        str(PORT), str(PID), str(VADDR), str(NR_PAGES)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert client.stdout is not None
            assert await client.stdout.readline() == b"GOT\n"
            await asyncio.to_thread(hosts.set_link, False)
            # Keepalive: 5 s idle, then 3 probes 2 s apart: about 11 s.
            async with asyncio.timeout(30):
                status = await server.wait()
            assert status == 0, server.log()
            assert "Connection timed out" in server.log(), server.log()
        finally:
            client.kill()
            await client.wait()
