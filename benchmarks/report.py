"""Rewrite a benchmark's own section of docs/benchmarks.md from what it printed.

A benchmark wraps its run in :func:`recorded`::

    with report.recorded("daemon"):
        asyncio.run(main())

Everything the run prints to stdout is still printed; once the block ends
without an exception, that output replaces the text between the section's
markers in docs/benchmarks.md (the section is appended if it has none yet)::

    <!-- benchmark:daemon begin -->
    ...
    <!-- benchmark:daemon end -->

Markdown table lines (``| ... |``) are kept as a table, every other line goes
into a text block. The section starts with the command line, the date and the
load average at the start and the end of the run, because on a shared machine
a number means little without the load it was measured under.

A saved output (benchmarks/results/NAME.txt) is published the same way:

    .venv/bin/python benchmarks/report.py daemon benchmarks/results/daemon.txt
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def begin_marker(name: str) -> str:
    return f"<!-- benchmark:{name} begin -->"


def end_marker(name: str) -> str:
    return f"<!-- benchmark:{name} end -->"


def render(lines: Sequence[str], provenance: str) -> str:
    """A section body: the provenance line, then ``lines`` (tables kept, the rest fenced)."""
    out = [provenance, ""]
    text: list[str] = []

    def flush_text() -> None:
        while text and not text[-1].strip():
            text.pop()
        if text:
            out.extend(["```text", *text, "```", ""])
        text.clear()

    in_table = False
    for raw in lines:
        line = raw.rstrip()
        if line.lstrip().startswith("|"):
            if not in_table:
                flush_text()
            out.append(line.strip())
            in_table = True
            continue
        if in_table:
            out.append("")
            in_table = False
        if text or line.strip():
            text.append(line)
    flush_text()
    return "\n".join(out).rstrip() + "\n"


def replace_section(document: str, name: str, body: str) -> str:
    """``document`` with section ``name`` holding ``body`` (appended if it has no markers)."""
    begin, end = begin_marker(name), end_marker(name)
    start = document.find(begin)
    stop = document.find(end, start)
    if start < 0 or stop < 0:
        return f"{document.rstrip()}\n\n## {name}\n\n{begin}\n{body}{end}\n"
    return f"{document[:start]}{begin}\n{body}{document[stop:]}"


def publish(name: str, lines: Sequence[str], provenance: str, doc: Path = DOC) -> None:
    """Rewrite section ``name`` of ``doc`` (atomically: a reader never sees half a file)."""
    document = doc.read_text() if doc.exists() else "# Benchmarks\n"
    updated = replace_section(document, name, render(lines, provenance))
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(updated)
    tmp.replace(doc)


class _Tee(io.TextIOBase):
    """Writes go to ``stream`` and are kept."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


@contextlib.contextmanager
def recorded(name: str, doc: Path = DOC) -> Iterator[None]:
    """Print as usual; if the block ends normally, publish what it printed as ``name``."""
    command = " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    started = datetime.datetime.now(datetime.UTC)
    load_before = _load()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    provenance = (f"`{command}`, run {started:%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs, "
                  f"load average {load_before} at the start and {_load()} at the end "
                  "(a shared machine: other work may have run meanwhile).")
    publish(name, tee.kept.getvalue().splitlines(), provenance, doc)
    print(f"(published as section {name!r} of {doc})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Publish a saved benchmark output.")
    parser.add_argument("name", help="the section (the benchmark's name, e.g. daemon)")
    parser.add_argument("output", type=Path, help="its saved output (benchmarks/results/...)")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    try:
        shown = args.output.resolve().relative_to(DOC.parent.parent)
    except ValueError:
        shown = args.output
    publish(args.name, args.output.read_text().splitlines(),
            f"From `{shown}`, a saved run of the benchmark (its header line says how it ran).",
            args.doc)


if __name__ == "__main__":
    main()
