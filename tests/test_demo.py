"""The main job: `lazymig demo` migrates a live process lazily over loopback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("loop", "memory"), [("--uvloop", []), ("--no-uvloop", ["--cold"])])
def test_demo_migrates_and_the_checksums_match(loop: str, memory: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "lazymig", loop, "demo", "--size", "16",
                           *memory], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    source = next(line.split()[-1] for line in lines if "source checksum" in line)
    restored = next(line for line in lines if "restored checksum" in line)
    assert f"{source}  (match)" in restored  # printed by the restored process itself
    words = lines[0].split()  # "... pid OLD migrated ... to pid NEW"
    old_pid, new_pid = int(words[words.index("pid") + 1]), int(words[-1])
    assert old_pid != new_pid
    assert "source killed" in done.stdout  # every lazy page was served
    served = re.search(r"(\d+) lazy pages served", done.stdout)
    split = re.search(r"(\d+) pages on demand .* (\d+) in the background", done.stdout)
    assert served is not None and split is not None
    assert int(split[1]) + int(split[2]) == int(served[1])
    assert re.search(r"round trip p50 (\d+ us|-), p99 (\d+ us|-)", done.stdout)
    assert re.search(r"downtime \d+\.\d+ s, from the dump's start", done.stdout)
    touched = "not touched first (--cold)" if memory else "touched first (48 MiB)"
    assert f"guest memory {touched}" in done.stdout
    # stderr is not a terminal: the progress bar's final state, and nothing else
    assert done.stderr.startswith("[" + "#" * 30 + "] 100%"), done.stderr
    assert "WARNING" not in done.stderr and "ERROR" not in done.stderr, done.stderr
