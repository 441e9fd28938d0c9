"""Coverage-guided fuzzing (atheris) of every parser, a few seconds per target, and the
corpus in fuzz/corpus replayed input by input.

A target fails on anything but its documented bad-input error, on its own
invariants (fuzz/targets.py), on an input that runs 10 s, or when the process
passes 512 MB (libFuzzer's -timeout and -rss_limit_mb). ``python -m fuzz.long``
runs them longer by hand and minimises the corpus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import Recorder

from fuzz.long import LIBFUZZER_LIMITS, LONG_RUNS, parse_stats
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
SECONDS = 3

WHAT = {
    "pageserver_server": "page-server codec, server role (what a client sends), v1 and v2",
    "pageserver_client": "page-server codec, client role (replies to pipelined requests)",
    "wire_header": "page-server header: fast path against the construct declaration",
    "handover": "restore-to-daemon handover words, and the stream over a real socket",
    "uffd_events": "userfaultfd message decoder",
    "images": "image readers (inventory, pstree, core, mm, pagemap) and the server's page store",
}


def _longest_by_hand(target: str) -> str:
    if not LONG_RUNS.exists():
        return ""
    runs = [r for r in json.loads(LONG_RUNS.read_text()) if r["target"] == target]
    if not runs:
        return ""
    best = max(runs, key=lambda r: r["seconds"])
    return (f"; by hand (fuzz/long.py): {best['runs']} inputs in {best['seconds']} s "
            f"on {best['date'][:10]}")


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_survives_coverage_guided_fuzzing(target: str, tmp_path: Path,
                                                  reliability: Recorder) -> None:
    found = tmp_path / "found"  # new inputs go here, not into the repo's corpus
    found.mkdir()
    scratch = tmp_path / "scratch"  # the targets' small dump, which libFuzzer's exit leaves
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", target, f"-max_total_time={SECONDS}",
         *LIBFUZZER_LIMITS, f"-artifact_prefix={tmp_path}/", str(found), str(CORPUS / target)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "LAZYMIG_FUZZ_SCRATCH": str(scratch)})
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("found", "scratch"))
    assert done.returncode == 0 and not crashes, done.stderr[-4000:]
    stats = parse_stats(done.stderr)
    assert stats["runs"] > 0, done.stderr[-2000:]
    reliability.record(
        "Inputs fuzzed", WHAT[target],
        tried=f"atheris: {stats['runs']} inputs in {stats['seconds']} s from "
              f"{len(list((CORPUS / target).iterdir()))} corpus seeds, coverage {stats['cov']}"
              + _longest_by_hand(target),
        held="no crash, no input over 10 s, RSS under 512 MB")


@pytest.mark.parametrize("target", list(TARGETS))
def test_corpus_replays(target: str) -> None:
    inputs = sorted((CORPUS / target).iterdir())
    assert inputs, f"fuzz/corpus/{target} is empty: run python -m fuzz.seed"
    for path in inputs:
        TARGETS[target](path.read_bytes())
