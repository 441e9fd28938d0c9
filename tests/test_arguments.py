"""Wrong arguments are refused where they come in, with a LazyMigError that names the
call (or the option) and what is wrong, before anything is frozen or connected: not an
OverflowError from a socket call, an unpacking ValueError, or a bare PermissionError."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import attach_and_read

import lazymig
from lazymig.cli import main
from lazymig.testing.workload import Workload, build_c_workload

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace of arbitrary processes needs root")


@pytest.mark.parametrize("command", ["dump -t 1 -D /tmp", "page-server --lazy-pages -D /tmp",
                                     "lazy-pages -D /tmp"])
def test_a_port_out_of_range_is_an_option_error(command: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--port", "80000"])
    assert exited.value.code == 2
    assert "argument --port: '80000' is not a TCP port number (0 to 65535)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("port", [80000, -1])
def test_the_api_refuses_a_port_out_of_range(port: int, tmp_path: Path) -> None:
    calls: list[tuple[str, Callable[[], object]]] = [
        ("lazymig.serve", lambda: lazymig.serve(1, tmp_path, port=port)),
        ("lazymig.serve_images", lambda: lazymig.serve_images(tmp_path, port=port)),
        ("lazymig.migrate", lambda: lazymig.migrate(1, port=port)),
        ("lazymig.lazy_pages", lambda: lazymig.lazy_pages(tmp_path, page_server=("::1", port)))]
    for call, make in calls:
        with pytest.raises(lazymig.ConfigurationError,
                           match=f"^{call}: port {port} is not a TCP port number"):
            make()


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:http", ":9876", "[::1]",
                                 ("127.0.0.1",), ("127.0.0.1", "9876")])
def test_a_page_server_address_that_is_not_one_is_named(bad: object, tmp_path: Path) -> None:
    with pytest.raises(lazymig.ConfigurationError,
                       match=r"^lazymig\.lazy_pages: (page_server|port '9876')"):
        lazymig.lazy_pages(tmp_path, page_server=bad)  # type: ignore[arg-type]
    with pytest.raises(lazymig.ConfigurationError,
                       match=r"^lazymig\.receive: (page_server|port '9876')"):
        lazymig.receive(tmp_path, page_server=bad)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "[127.0.0.1]:{port}"])
async def test_a_host_port_string_is_a_page_server_address(address: str,
                                                           tmp_path: Path) -> None:
    """"host:port" is taken as it is written: a snapshot served from disk fills a
    region through a daemon given the server's address as a string."""
    where, memory = 0x6D0000000000, bytes(range(256)) * 16 * 8
    await lazymig.write_snapshot(tmp_path, [(where, memory)], pid=7)
    async with asyncio.timeout(60), lazymig.serve_images(tmp_path) as server, \
            lazymig.lazy_pages(tmp_path, page_server=address.format(
                port=server.address.port)) as daemon:
        crc = await attach_and_read(daemon.socket_path, 7, where, len(memory))
    assert crc == zlib.crc32(memory)


def test_an_images_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    a_file = tmp_path / "hostname"
    a_file.write_text("host\n")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("lazymig.serve", lambda: lazymig.serve(1, a_file)),
        ("lazymig.migrate", lambda: lazymig.migrate(1, images_dir=a_file)),
        ("lazymig.lazy_pages", lambda: lazymig.lazy_pages(a_file)),
        ("lazymig.restore_process", lambda: lazymig.restore_process(a_file))]
    for call, make in calls:
        with pytest.raises(lazymig.ConfigurationError,
                           match=f"^{call}: images_dir {a_file} is not a directory"):
            make()
    with pytest.raises(lazymig.ConfigurationError,
                       match=f"^lazymig.serve: images_dir {tmp_path / 'no'} does not exist"):
        lazymig.serve(1, tmp_path / "no")


@ROOT
def test_the_cli_dump_says_an_images_dir_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "hostname"
    a_file.write_text("host\n")
    run = subprocess.run([sys.executable, "-m", "lazymig", "dump", "-t", str(os.getpid()),
                          "-D", str(a_file)], check=False, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert f"images directory {a_file} is not a directory" in run.stderr


@pytest.fixture
def workload_of_another_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workload]:
    """The C workload running as nobody (from a directory nobody may enter)."""
    base = Path(tempfile.mkdtemp(prefix="lazymig-nobody-"))
    try:
        base.chmod(0o755)
        exe = build_c_workload(base)
        for parent in (exe.parent, exe):
            parent.chmod(0o755)
        with Workload(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       str(exe), "--mib", "1"]) as w:
            yield w
    finally:
        shutil.rmtree(base, ignore_errors=True)


@ROOT
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_another_users_process_without_cap_sys_resource_is_refused_before_the_freeze(
        tmp_path: Path, workload_of_another_user: Workload) -> None:
    w = workload_of_another_user
    run = subprocess.run(["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource",
                          sys.executable, "-m", "lazymig", "dump", "-t", str(w.pid),
                          "-D", str(tmp_path)], check=False, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert (f"dumping pid {w.pid}: reading its resource limits (prlimit) was refused: it "
            "runs as another user") in run.stderr
    assert "CAP_SYS_RESOURCE" in run.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written
    w.next_check()  # and it runs on
