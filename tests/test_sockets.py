"""Sockets migrate as the sockets they are: taken over on the source's host,
given by the caller elsewhere (lazymig/restore/sockets.py).

* A real TCP server (CPython's ``http.server``) migrated by ``lazymig.migrate``
  on one host serves from its restored copy: a request sent on a connection
  that waited in its backlog during the migration is answered too.
* A process writing on a TCP connection goes on writing on the same
  connection: its peer reads every number once, in order, across the move.
* Where the source is gone (a dump to disk, the source killed: as on another
  host), ``lazymig restore`` refuses, naming ``--inherit-fd fd[N]:socket:[INO]``;
  given a listening socket of the caller's that way, the server serves on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import free_port

import lazymig

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

WRITER = """
import itertools, socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for n in itertools.count(1):
    conn.sendall(b"%d\\n" % n)
    time.sleep(0.02)
"""

SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"hello from %d\\n" % len(conn.recv(100)))
"""


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as reply:
        body: bytes = reply.read()
        return body


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_tcp_server_serves_from_its_restored_copy(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    (tmp_path / "index.html").write_text("migrated\n")
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
            "--directory", str(tmp_path)]
    with started(argv, log) as source:
        await asyncio.to_thread(wait_for, lambda: "Serving HTTP" in log.read_text(),
                                "http.server did not start")
        assert await asyncio.to_thread(get, port) == b"migrated\n"
        async with lazymig.migrate(source.pid) as migration:
            restored = migration.process.pid
            # Connected while the source is frozen: it waits in the backlog.
            waiting = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port))
        try:
            with waiting:
                await asyncio.to_thread(waiting.sendall, b"GET / HTTP/1.0\r\n\r\n")
                reply = await asyncio.to_thread(waiting.makefile("rb").read)
            assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"migrated\n")
            assert await asyncio.to_thread(get, port) == b"migrated\n"
            served = re.findall(r'"GET / HTTP/1\.[01]" 200', await asyncio.to_thread(
                log.read_text))
            assert len(served) == 3
        finally:
            kill(restored)


@pytest.mark.asyncio
async def test_a_connection_is_the_same_after_the_migration(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            started([sys.executable, "-c", WRITER, str(server.getsockname()[1])],
                    tmp_path / "writer.log") as source:
        conn, _ = await asyncio.to_thread(server.accept)
        with conn, conn.makefile("rb") as lines:
            first = [int(await asyncio.to_thread(lines.readline)) for _ in range(5)]
            result = await asyncio.wait_for(lazymig.migrate(source.pid), 120)
            try:
                assert result.transfer.ok
                after = [int(await asyncio.to_thread(lines.readline)) for _ in range(40)]
                os.kill(result.restored.pid, 0)  # the restored one writes
            finally:
                kill(result.restored.pid)
    numbers = first + after
    assert numbers == list(range(1, len(numbers) + 1)), "a number was lost or repeated"


def test_elsewhere_the_restore_is_given_the_socket(tmp_path: Path) -> None:
    port, images, log = free_port(), tmp_path / "images", tmp_path / "server.log"
    images.mkdir()
    with started([sys.executable, "-c", SERVER, str(port)], log) as source:
        wait_for(lambda: "listening" in log.read_text(), "the server did not start")
        ino = next(fd.stat().st_ino for fd in Path(f"/proc/{source.pid}/fd").iterdir()
                   if str(fd.readlink()).startswith("socket:"))
        dumped = subprocess.run([sys.executable, "-m", "lazymig", "dump", "-t",
                                 str(source.pid), "-D", str(images)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert dumped.returncode == 0, dumped.stderr
        source.wait(timeout=10)  # killed by the dump, as by criu dump: its socket is gone
    restore = [sys.executable, "-m", "lazymig", "restore", "-D", str(images), "-d"]
    refused = subprocess.run(restore, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0
    assert f"was socket:[{ino}], which stayed on the source host" in refused.stderr
    assert f"--inherit-fd fd[N]:socket:[{ino}]" in refused.stderr
    with socket.create_server(("127.0.0.1", port)) as mine:  # the caller's, "on this host"
        restored = subprocess.run(
            [*restore, "--inherit-fd", f"fd[{mine.fileno()}]:socket:[{ino}]", "--pidfile",
             str(tmp_path / "pid")], capture_output=True, text=True, timeout=120,
            check=False, pass_fds=(mine.fileno(),))
        assert restored.returncode == 0, restored.stderr
    pid = int((tmp_path / "pid").read_text())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"ping")
            assert conn.makefile("rb").readline() == b"hello from 4\n"
    finally:
        kill(pid)
