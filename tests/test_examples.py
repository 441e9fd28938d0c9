"""Every script in examples/ runs as is (small defaults) and says it succeeded.

Each is run the way its docstring says, with this interpreter, from the
repository root; each checks its own outcome (the migrated memory's checksum)
and exits 0 only when it holds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, timeout=180, check=False, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_every_example_is_tested() -> None:
    tested = {"orchestrator.py", "snapshot_attach.py", "two_hosts.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("loop", [[], ["--no-uvloop"]], ids=["default", "asyncio"])
def test_orchestrator(loop: list[str]) -> None:
    out = run_example("orchestrator.py", *loop).stdout
    crcs = re.findall(r"CRC ([0-9a-f]{8})", out)
    assert len(crcs) == 2 and crcs[0] == crcs[1], out
    assert "match" in out and "MISMATCH" not in out
    assert re.search(r"^\s+100\.0%", out, re.MULTILINE), out  # the progress reached the end
    assert "source killed" in out


@pytest.mark.parametrize("loop", [[], ["--no-uvloop"]], ids=["default", "asyncio"])
def test_snapshot_attach(loop: list[str]) -> None:
    out = run_example("snapshot_attach.py", *loop).stdout
    assert "0 MiB differ from the snapshot" in out, out
    assert "page server: 16384/16384 pages served" in out, out  # 64 MiB by default


def test_two_hosts() -> None:
    out = run_example("two_hosts.py").stdout
    found = re.search(r"source pid (\d+) printed \[(\d+), (\d+)\]; restored as pid (\d+), "
                      r"it goes on with \[(\d+), (\d+)\]", out)
    assert found is not None, out
    assert found[1] != found[4]  # a new pid
    assert int(found[5]) > int(found[2]) and found[6] == found[3]  # same memory, counting on
    assert "source killed" in out
