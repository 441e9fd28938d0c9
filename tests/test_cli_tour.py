"""The README's CLI tour, run as a script, step by step.

The ``src#`` lines go to one bash, the ``dst#`` lines to another, one at a time
and as the README writes them, with only what names a machine replaced: the
workload's pid, ``127.0.0.1`` for the source host, a free port for 9876, a
directory of each "host" for ``/tmp``, and ``cp`` for ``scp``. Each step must
exit 0 (its ``$?`` is echoed back after it); the ``--status-fd`` steps are what
make the order safe. Then the restored process must print the source's
checksum, every page having arrived, and the source must be gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import code_blocks, free_port

from lazymig.linux.ptrace import process_alive
from lazymig.testing.workload import Check, Workload, build_c_workload, parse_check

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace, userfaultfd and PR_SET_MM need root"),
]


def tour() -> list[tuple[str, str]]:
    """``(host, command)`` of each step of the README's CLI tour."""
    (block,) = [b for b in code_blocks((REPO / "README.md").read_text(), "sh") if "src#" in b]
    steps = []
    for line in block.splitlines():
        host, _, command = line.partition("# ")
        assert host in ("src", "dst"), f"a tour line without a host prompt: {line!r}"
        steps.append((host, command))
    return steps


class Shell:
    """A bash fed one command at a time; each step returns its exit status and output."""

    def __init__(self, name: str, cwd: Path, bin_dir: Path) -> None:
        self.name = name
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(["bash", "--norc", "--noprofile", "-s"], cwd=cwd,
                                         env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr,
                                         start_new_session=True)

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f'{command}\necho "__step__ $?"\n'.encode())
        self.proc.stdin.flush()
        out, deadline = b"", time.monotonic() + timeout
        while (end := re.search(rb"__step__ (\d+)\n", out)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"{self.name}# {command}: no end after {timeout} s; "
                                     f"stderr: {self.stderr_path.read_text()}")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"{self.name}'s bash exited at {command!r}: "
                                     f"{self.stderr_path.read_text()}")
            out += chunk
        return int(end.group(1)), out[:end.start()].decode()

    def close(self) -> None:
        """Kill the shell and whatever it started (its session); idempotent."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[dict[str, Shell]]:
    bin_dir = Path(sys.executable).parent  # `lazymig` as installed, the venv's
    shells = {}
    try:
        for name in ("src", "dst"):
            (tmp_path / name).mkdir()
            shells[name] = Shell(name, tmp_path / name, bin_dir)
        yield shells
    finally:
        for shell in shells.values():
            shell.close()


def on_host(command: str, host: str, tmp_path: Path, pid: int, port: int) -> str:
    """The README's command with the machine-specific names of this test."""
    command = command.replace("scp -r", "cp -r").replace("dst:/tmp/", "{DST}/")
    command = command.replace("/tmp/", f"{tmp_path / host}/").replace("{DST}", str(tmp_path /
                                                                                  "dst"))
    return command.replace("<pid>", str(pid)).replace("<src>", "127.0.0.1").replace(
        "9876", str(port))



def last_check(path: Path, timeout: float = 10.0) -> Check:
    """The last whole CHECK line the restored process wrote to ``path``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in path.read_text().splitlines(keepends=True)
                 if line.startswith("CHECK") and line.endswith("\n")]
        if lines:
            return parse_check(lines[-1])
        assert time.monotonic() < deadline, f"no CHECK line in {path}: {path.read_text()!r}"
        time.sleep(0.05)


def test_the_readme_cli_tour_runs_as_a_script(tmp_path: Path, hosts: dict[str, Shell]) -> None:
    steps = tour()
    assert any("--status-fd" in command for _, command in steps)
    exe = build_c_workload(tmp_path / "workload")
    with Workload([str(exe), "--mib", "8", "--interval-ms", "20"]) as w:
        before = w.next_check()
        port = free_port()
        restored = None
        try:
            for host, readme_command in steps:
                command = on_host(readme_command, host, tmp_path, w.pid, port)
                status, out = hosts[host].run(command)
                assert status == 0, (f"{host}# {readme_command} exited {status}: {out}; "
                                     f"stderr: {hosts[host].stderr_path.read_text()}")
                if re.fullmatch(r"cat \S+\.pid", readme_command.split(" #")[0].strip()):
                    restored = int(out)
                    assert process_alive(restored)
            assert restored is not None, "the tour never shows the restored pid"
            check = last_check(tmp_path / "dst" / "1.out")
            assert check.same_memory(before), (check, before)
            assert w.proc.wait(timeout=10) == -signal.SIGKILL  # the source, once served
        finally:  # the dumper first: a traced workload is reaped once its tracer is gone
            for shell in hosts.values():
                shell.close()
            if restored is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(restored, signal.SIGKILL)
