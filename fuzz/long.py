"""Fuzz every target (or those named) for longer, by hand, and minimise the corpus.

    python -m fuzz.long [--seconds 600] [TARGET ...]      # from the repository root

Each target runs under atheris for ``--seconds`` from its corpus in the repo,
writing what it finds to a scratch directory; then libFuzzer's merge keeps the
smallest set of inputs that covers everything either had, and that set
replaces ``fuzz/corpus/TARGET``. The run (seconds, inputs, coverage, corpus
size) is appended to ``fuzz/long-runs.json``, which the reliability record
quotes. A crash stops the script with the crashing input left in ``fuzz/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fuzz.targets import TARGETS

__all__ = ["LIBFUZZER_LIMITS", "LONG_RUNS", "parse_stats"]

FUZZ = Path(__file__).resolve().parent
LONG_RUNS = FUZZ / "long-runs.json"
LIBFUZZER_LIMITS = ["-rss_limit_mb=512", "-timeout=10", "-max_len=8192"]
"""No input may take 512 MB, hang 10 s, or be longer than 8 KiB (keeps the corpus small)."""


def parse_stats(output: str) -> dict[str, int]:
    """Runs, seconds, coverage and corpus size from libFuzzer's closing lines."""
    stats: dict[str, int] = {}
    for line in output.splitlines():
        words = line.split()
        if line.startswith("Done ") and "runs in" in line:
            stats["runs"], stats["seconds"] = int(words[1]), int(words[4])
        elif "cov:" in words and ("DONE" in words or "INITED" in words):
            stats["cov"] = int(words[words.index("cov:") + 1])
            stats["corpus"] = int(words[words.index("corp:") + 1].split("/")[0])
    return stats


def _fuzz(target: str, seconds: int, found: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "fuzz.run", target, f"-max_total_time={seconds}",
         *LIBFUZZER_LIMITS, f"-artifact_prefix={FUZZ}/", str(found), str(FUZZ / "corpus" / target)],
        cwd=FUZZ.parent, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{target} crashed:\n{done.stderr[-4000:]}")
    return parse_stats(done.stderr)


def _minimise(target: str, found: Path) -> int:
    corpus = FUZZ / "corpus" / target
    merged = found.parent / "merged"
    merged.mkdir()
    subprocess.run([sys.executable, "-m", "fuzz.run", target, "-merge=1", *LIBFUZZER_LIMITS,
                    str(merged), str(corpus), str(found)],
                   cwd=FUZZ.parent, capture_output=True, check=True)
    if not any(merged.iterdir()):
        sys.exit(f"{target}: the merge kept nothing; fuzz/corpus/{target} left as it was")
    shutil.rmtree(corpus)
    shutil.copytree(merged, corpus)
    return len(list(corpus.iterdir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    runs = json.loads(LONG_RUNS.read_text()) if LONG_RUNS.exists() else []
    for target in args.targets or TARGETS:
        with tempfile.TemporaryDirectory() as tmp:
            found = Path(tmp) / "found"
            found.mkdir()
            stats = _fuzz(target, args.seconds, found)
            stats["corpus"] = _minimise(target, found)
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        runs.append({"target": target, "date": when, **stats})
        LONG_RUNS.write_text(json.dumps(runs, indent=1) + "\n")
        print(f"{target}: {stats}")


if __name__ == "__main__":
    main()
