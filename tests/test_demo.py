"""The main job: `lazymig demo` migrates a live process's region over loopback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("loop", ["--uvloop", "--no-uvloop"])
def test_demo_migrates_and_the_checksums_match(loop: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lazymig", loop, "demo", "--size", "16"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    source = next(line.split()[-1] for line in lines if "source checksum" in line)
    destination = next(line for line in lines if "destination checksum" in line)
    assert f"{source}  (match)" in destination
    assert "pages copied 4096 / 4096" in done.stdout
    assert "WARNING" not in done.stderr and "ERROR" not in done.stderr, done.stderr
