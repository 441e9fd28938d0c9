"""Start-up of the commands: they listen (and say ready) before they load the machinery.

``lazymig lazy-pages`` binds its socket and writes its ``--status-fd`` byte
before it imports the daemon or reads the images; a restorer that connects
in between waits in the socket's backlog. To make "in between" certain, not
likely, the daemon's images dir has a FIFO in place of ``pstree.img``: its
start-up blocks on it until the test writes the image, after the restorer
(a child that attach()es its memory, as ``criu restore`` hands over a uffd)
has handed over. The pages come from lazymig's page server, in the test's
process (which read the images before the FIFO went in).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    finish,
    free_port,
    layout,
    listening_process,
    on_uvloop,
    spawn,
    stop,
    until,
)
from lazydump import page_pattern, write_lazy_dump

from lazymig._listen import SOCKET_NAME
from lazymig.dump.server import PageServer
from lazymig.dump.store import ImagesPageStore
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.cli import LazymigCommand
from lazymig.uffd.source import RemotePageSource

DUMP = layout(1, pages=64)
(PID, [(VADDR, NR_PAGES)]), = DUMP.items()


def dump_and_server(tmp_path: Path) -> tuple[Path, PageServer]:
    """A dump on disk and lazymig's page server for it (listening on loopback)."""
    images = tmp_path / "images"
    images.mkdir()
    server = PageServer(ImagesPageStore(write_lazy_dump(images, DUMP)), address="127.0.0.1",
                        port=0)
    server.listen()
    return images, server


def gate(images: Path) -> bytes:
    """Put a FIFO in place of pstree.img (the daemon's start-up waits on it); returns the
    image's bytes, to be written into the FIFO."""
    pstree = images / "pstree.img"
    data = pstree.read_bytes()
    pstree.unlink()
    os.mkfifo(pstree)
    return data


def waits_on_a_fault(pid: int) -> bool:
    """Process ``pid`` sleeps in the kernel on a userfaultfd fault."""
    return Path(f"/proc/{pid}/wchan").read_text() == "handle_userfault"


def daemon_command(tmp_path: Path, images: Path, server: PageServer) -> LazymigCommand:
    return LazymigCommand(["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                           server.port, "-D", images], log_path=tmp_path / "daemon.log",
                          uvloop=on_uvloop())


@pytest.mark.asyncio
async def test_a_restorer_that_connected_before_the_daemon_loop_started_is_served(
        tmp_path: Path) -> None:
    images, server = dump_and_server(tmp_path)
    pstree = gate(images)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(60), daemon_command(tmp_path, images, server) as daemon:
        child = await spawn(images / SOCKET_NAME, PID, VADDR, NR_PAGES, "touch")
        assert child.stdout is not None
        assert await child.stdout.readline() == b"attached\n"  # handed over, now faulting
        assert "listening on" not in daemon.log()  # the daemon's loop has not begun
        await asyncio.to_thread((images / "pstree.img").write_bytes, pstree)
        code, out = await finish(child)
        assert code == 0, out
        assert f"touched: {NR_PAGES}/{NR_PAGES} pages match" in out
        assert await daemon.wait() == 0, daemon.log()
        assert await serving is True  # every page served, then CLOSE
    server.store.close()
    log = daemon.log()
    assert f"pid {PID}: complete, UFFD transferred pages: ({NR_PAGES}/{NR_PAGES})" in log, log


@pytest.mark.asyncio
async def test_a_failed_start_up_holds_the_restorers_already_queued(tmp_path: Path) -> None:
    """The images turn out unreadable after the daemon said ready: the process handed
    over meanwhile must not run on zeros. It is held at its first missing page, new
    restorers are refused, and the command waits for a stop signal."""
    images, server = dump_and_server(tmp_path)
    gate(images)
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(60), daemon_command(tmp_path, images, server) as daemon:
        child = await spawn(images / SOCKET_NAME, PID, VADDR, NR_PAGES, "touch")
        try:
            assert child.stdout is not None
            assert await child.stdout.readline() == b"attached\n"
            await asyncio.to_thread((images / "pstree.img").write_bytes, b"not an image")
            await until(lambda: "before the start-up failed" in daemon.log())
            assert "1 restorer(s) handed processes over" in daemon.log()
            assert not (images / SOCKET_NAME).exists()  # nobody else connects
            assert daemon.process.poll() is None
            # Held: faulting on its first page, which never comes.
            await until(lambda: waits_on_a_fault(child.pid))
            assert child.returncode is None
        finally:
            child.kill()  # as the log says, before the daemon goes
            await child.wait()
        daemon.process.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 128 + signal.SIGTERM
    await stop(serving)
    server.store.close()
    assert "pstree.img" in daemon.log(), daemon.log()  # the error itself


@pytest.mark.asyncio
async def test_a_failed_start_up_with_nobody_queued_exits_at_once(tmp_path: Path) -> None:
    """No page server there: the error and exit status 1, as before the early listen."""
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    async with asyncio.timeout(60), LazymigCommand(
            ["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(free_port()),
             "-D", images], log_path=tmp_path / "daemon.log", uvloop=on_uvloop()) as daemon:
        assert await daemon.wait() == 1
    assert "cannot connect to the page server" in daemon.log(), daemon.log()
    assert not (images / SOCKET_NAME).exists()


@pytest.mark.asyncio
async def test_a_daemon_started_before_its_page_server_waits_for_it(tmp_path: Path) -> None:
    """--wait-for-page-server: an orchestrator may start the daemon (and hand it a
    process) before the dump side listens."""
    images = tmp_path / "images"
    images.mkdir()
    store = ImagesPageStore(write_lazy_dump(images, DUMP))
    port = free_port()
    async with asyncio.timeout(60), LazymigCommand(
            ["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
             "--wait-for-page-server", "30", "-D", images], log_path=tmp_path / "daemon.log",
            uvloop=on_uvloop()) as daemon:
        child = await spawn(images / SOCKET_NAME, PID, VADDR, NR_PAGES, "touch")
        assert child.stdout is not None
        assert await child.stdout.readline() == b"attached\n"
        await until(lambda: "waiting up to 30 s for the page server" in daemon.log())
        async with PageServer(store, address="127.0.0.1", port=port) as server:
            serving = asyncio.create_task(server.serve())
            code, out = await finish(child)
            assert code == 0, out
            assert await daemon.wait() == 0, daemon.log()
            assert await serving is True
    store.close()


@pytest.mark.asyncio
async def test_a_prepared_daemon_whose_dump_dies_before_its_images_fails_at_once(
        tmp_path: Path) -> None:
    """--wait-for-page-server: the daemon connects to the dump's socket, which listens from
    the dump's start, and waits for the images. A dump killed (or failed) before it wrote
    them resets the connection queued in its backlog: the daemon must fail then, not when
    its --wait-for-page-server seconds are spent. The dump is played by a process that
    only listens (as `lazymig dump` does before its images are written), killed -9."""
    images = tmp_path / "images"
    images.mkdir()  # empty: the dump has not written anything yet
    port = free_port()
    dump = await listening_process(port)
    try:
        async with asyncio.timeout(90), LazymigCommand(
                ["lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
                 "--wait-for-page-server", "600", "-D", images],
                log_path=tmp_path / "daemon.log", uvloop=on_uvloop()) as daemon:
            await until(lambda: "connected to page server" in daemon.log())
            dump.kill()
            await dump.wait()
            async with asyncio.timeout(30):  # not the 600 s it would wait for the images
                status = await daemon.wait()
            assert status == 1, daemon.log()
    finally:
        if dump.returncode is None:
            dump.kill()
            await dump.wait()
    assert "the page server went away before a complete dump came" in daemon.log()
    assert not (images / SOCKET_NAME).exists()


# -- lazymig page-server ------------------------------------------------------------------------


def page_server_command(tmp_path: Path, images: Path, port: int) -> LazymigCommand:
    """``lazymig page-server``, not waited for: it says ready only once its images are
    read, and these tests hold them back (:func:`gate`)."""
    return LazymigCommand(["page-server", "--lazy-pages", "--address", "127.0.0.1", "--port",
                           port, "-D", images], log_path=tmp_path / "page-server.log",
                          uvloop=on_uvloop(), ready=False)


async def connect_when_listening(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect as soon as the command listens (its first act)."""
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_daemon_that_connected_before_the_page_server_loaded_its_images_is_served(
        tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    pstree = gate(images)
    port = free_port()
    async with asyncio.timeout(60), page_server_command(tmp_path, images, port) as server:
        _, writer = await connect_when_listening(port)
        writer.close()  # it listens: now a daemon's connection
        source = await RemotePageSource.connect("127.0.0.1", port)
        request = asyncio.ensure_future(source.get(PID, VADDR, NR_PAGES))
        await asyncio.sleep(0)  # the GET is on its way
        assert "listening on" not in server.log()  # the server has not even begun
        await asyncio.to_thread((images / "pstree.img").write_bytes, pstree)
        chunk = await request
        assert chunk.nr_pages == NR_PAGES
        assert bytes(chunk.data[:PAGE_SIZE]) == page_pattern(PID, VADDR)
        chunk.release()
        await source.aclose()
        assert await server.wait() == 0, server.log()


@pytest.mark.asyncio
async def test_a_failed_page_server_start_up_resets_the_daemons_already_connected(
        tmp_path: Path) -> None:
    """Reset, not held: their restores must fail now, not wait for pages that will never
    come (issue 14). The command said nothing on --status-fd yet: an orchestrator that
    waits for it has started no restore."""
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    gate(images)
    port = free_port()
    async with asyncio.timeout(60), page_server_command(tmp_path, images, port) as server:
        reader, writer = await connect_when_listening(port)
        await asyncio.to_thread((images / "pstree.img").write_bytes, b"not an image")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        assert await server.wait() == 1, server.log()
        assert "1 lazy-pages daemon(s) had connected before the start-up failed" in server.log()
        assert "pstree.img" in server.log()  # the error itself
        with pytest.raises(ConnectionRefusedError):  # nobody else connects
            await asyncio.open_connection("127.0.0.1", port)
        writer.close()


# -- what the commands import ------------------------------------------------------------------

_NEVER_IN_A_DAEMON = ("construct", "pdb", "lazymig.tls", "lazymig.dump", "lazymig.orchestrate",
                      "lazymig.restore", "lazymig.proto.spec")

_PROBE = """
import atexit, sys
import lazymig._listen as listen

real, early = listen.listen_unix, []

def spy(path):
    early.extend(m for m in ("asyncio", "uvloop", "google.protobuf") if m in sys.modules)
    return real(path)

listen.listen_unix = spy
atexit.register(lambda: print("before listening:", early, "\\n" + " ".join(sorted(sys.modules))))
from lazymig.cli import main
sys.exit(main())
"""


def test_the_lazy_pages_command_imports_only_what_it_needs(tmp_path: Path) -> None:
    """`lazymig lazy-pages --page-server` (no --tls) listens before it imports asyncio or
    protobuf, and never loads construct (the wire specification: the codecs use
    struct), TLS, the dump side, the restorer or the orchestrator. Its start-up
    runs to the page-server connection, refused here."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    run = subprocess.run([sys.executable, str(script), "lazy-pages", "--page-server", "--address",
                          "127.0.0.1", "--port", str(free_port()), "-D", str(images)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "cannot connect to the page server" in run.stderr, run.stderr
    early, loaded = run.stdout.split("\n", 1)
    early = early.strip()
    assert early == "before listening: []", early
    modules = set(loaded.split())
    assert {"lazymig.uffd.daemon", "lazymig.uffd.source", "asyncio", "uvloop"} <= modules
    leaked = sorted(m for m in modules if m.startswith(_NEVER_IN_A_DAEMON))
    assert not leaked, leaked


_READY_PROBE = """
import os, sys
import lazymig.cli.page_server as command

def spy(status_fd):
    print(" ".join(sorted(sys.modules)), flush=True)
    os._exit(0)

command.signal_ready = spy
from lazymig.cli import main
sys.exit(main())
"""


def test_the_page_server_says_ready_before_it_loads_its_event_loop(tmp_path: Path) -> None:
    """`lazymig page-server` reads the images, then says ready, and only then loads
    logging, asyncio and uvloop, most of its start-up (a daemon that connects meanwhile
    waits in the backlog): what can fail on the dump fails before ready."""
    script = tmp_path / "probe.py"
    script.write_text(_READY_PROBE)
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    run = subprocess.run([sys.executable, str(script), "-v", "page-server", "--lazy-pages",
                          "--address", "127.0.0.1", "--port", str(free_port()), "-D", str(images)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    modules = set(run.stdout.split())
    assert "lazymig.proto.images" in modules  # the images were read
    early = sorted(m for m in ("asyncio", "uvloop", "logging", "ssl", "ctypes",
                               "google.protobuf", "lazymig.dump.server") if m in modules)
    assert early == [], early


@pytest.mark.parametrize(("package", "not_yet"), [
    ("lazymig.uffd", ["lazymig.uffd.daemon", "lazymig.uffd.source", "lazymig.proto.images"]),
    ("lazymig.dump", ["lazymig.dump.dumper", "lazymig.linux.ptrace"]),
])
def test_package_attributes_are_imported_on_first_use(package: str, not_yet: list[str]) -> None:
    code = f"""
import importlib, sys
package = importlib.import_module({package!r})
early = [m for m in {not_yet!r} if m in sys.modules]
names = {{name: getattr(package, name) for name in package.__all__}}
print(early, sorted(names) == sorted(package.__all__), set(package.__all__) <= set(dir(package)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["[]", "True", "True"], out


@pytest.mark.asyncio
async def test_a_status_fd_on_stdout_is_not_closed_under_the_loop(tmp_path: Path) -> None:
    """``--status-fd 1``: fd 1 is pointed at /dev/null, not closed, so no connection
    takes fd 1 (libuv aborted when it closed such a socket: exit status -SIGABRT)."""
    images = tmp_path / "images"
    images.mkdir()
    write_lazy_dump(images, DUMP)
    port = free_port()
    log = tmp_path / "page-server.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lazymig", "-v", *([] if on_uvloop() else ["--no-uvloop"]),
            "page-server", "--lazy-pages", "--address", "127.0.0.1", "--port", str(port),
            "--status-fd", "1", "-D", str(images), stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert await process.stdout.read(1) == b"\0"
            source = await RemotePageSource.connect("127.0.0.1", port)
            chunk = await source.get(PID, VADDR, NR_PAGES)
            assert bytes(chunk.data[:PAGE_SIZE]) == page_pattern(PID, VADDR)
            chunk.release()
            await source.aclose()
            assert await process.wait() == 0, log.read_text()
            assert await process.stdout.read() == b""  # nothing after the status byte
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
