"""A page server's clients when something fails (issue 14: a failed peer is an error
within seconds, not a hang, and it never takes the server down with it).

* A client that fails without a word: its host dies or its link is cut, so that no
  reset ever arrives. ``lazymig page-server`` runs in one network namespace, a client
  that sent a GET runs in another, and the veth pair between them goes down: the
  connection turns into an error within seconds (TCP keepalive).
* A client that connects while the server is out of fds: accept() fails with EMFILE;
  the server tries again and serves it once fds are back.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import layout, on_uvloop
from lazydump import page_pattern, write_lazy_dump

from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.wire import WireVersion
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


# -- a shortage of fds when a client connects ---------------------------------------------------


@pytest.mark.asyncio
async def test_a_client_that_comes_while_fds_run_out_is_served_once_they_are_back(
        tmp_path: Path) -> None:
    """accept() fails with EMFILE: the client waits in the backlog and is served once an
    fd is free again, and the server goes on (it raised out of serve() before)."""
    store = ImagesPageStore(write_lazy_dump(tmp_path, DUMP))
    server = PageServer(store, address="127.0.0.1", port=0, wire=WireVersion.V1)
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        async with asyncio.timeout(30), server:
            serving = asyncio.ensure_future(server.serve())
            client = socket.socket()
            client.setblocking(False)
            in_use = sum(1 for _ in os.scandir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (in_use - 1, limits[1]))
            try:
                await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", server.port))
                await asyncio.sleep(0.2)  # the server tried, and failed, to accept it
                assert not serving.done()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            reader, writer = await asyncio.open_connection(sock=client)
            writer.write(struct.pack("=IIQQ", 7, NR_PAGES, VADDR, PID))
            reply = await reader.readexactly(24 + NR_PAGES * PAGE_SIZE)
            assert struct.unpack_from("=IIQQ", reply)[1:] == (NR_PAGES, VADDR, PID)
            assert reply[24:24 + PAGE_SIZE] == page_pattern(PID, VADDR)
            writer.close()
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
    finally:
        store.close()
