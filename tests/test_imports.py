"""What each command loads: a heavy module that comes back into a command's imports fails here.

Each command is a fresh process whose start-up is part of a migration's downtime,
and what the lazy-pages daemon loads stays resident while it serves. Each case
runs in a fresh interpreter: it does what the command does before it works (or,
for a daemon and a page server, what they do to read a dump on disk), then lists
``sys.modules``. This checks imports, not timings (benchmarks/startup.py times them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lazydump import write_lazy_dump

LIGHT = {"asyncio", "uvloop", "ssl", "google.protobuf", "construct", "ptrace", "typing",
         "logging", "dataclasses", "pathlib", "socket", "shutil"}
"""Not loaded by ``lazymig --help`` or ``--version``: little more than argparse."""
PROTOBUF = {"google.protobuf", "lazymig.proto.images.core_pb2"}
DUMP_SIDE = {"lazymig.dump.freeze", "lazymig.dump.scan", "lazymig.dump.pagepipe",
             "lazymig.dump.state", "construct", "ptrace"}

CASES: dict[str, tuple[str, set[str]]] = {
    "lazymig --help, --version": (
        "import lazymig.cli; lazymig.cli.build_parser()", LIGHT),
    "lazymig lazy-pages until its socket listens": (
        "import lazymig.cli; from lazymig._listen import listen_unix",
        {"asyncio", "uvloop", "ssl", "google.protobuf", "dataclasses"}),
    "lazymig lazy-pages serving": (
        "import uvloop, lazymig.cli\n"
        "from lazymig.cli.lazy_pages import _start\n"
        "from lazymig.proto.images import ImagesDir\n"
        "from lazymig.uffd.daemon import LazyPagesDaemon\n"
        "from lazymig.uffd.source import LocalPageSource, RemotePageSource\n"
        "LazyPagesDaemon.from_images(LocalPageSource(ImagesDir(DUMP)), DUMP).source.abort()",
        PROTOBUF | DUMP_SIDE | {"shutil", "bz2", "lzma"}),
    "lazymig page-server serving a dump on disk": (
        "import uvloop, lazymig.cli\n"
        "from lazymig.dump.server import PageServer\n"
        "from lazymig.dump.store import ImagesPageStore\n"
        "from lazymig.proto.images import ImagesDir\n"
        "ImagesPageStore(ImagesDir(DUMP)).close()",
        PROTOBUF | DUMP_SIDE),
    # Until ready: the page server is made (its module loaded) after the images.
    "lazymig dump, no pre-dump before it, until ready": (
        "import uvloop, lazymig.cli, lazymig.cli.dump, lazymig.dump.dumper",
        {"lazymig.dump.precopy", "lazymig.dump.track", "lazymig.dump.keeper",
         "lazymig.proto.uffd", "lazymig.dump.server", "lazymig.proto.pageserver",
         "lazymig.tls", "construct",
         # a process without event-loop files or sockets (dump/files._inspect_anon)
         "lazymig.dump.anon_files", "lazymig.linux.sockdiag"}),
    "lazymig restore": (
        "import lazymig.cli.restore, lazymig.restore",
        DUMP_SIDE - {"ptrace"} | {"lazymig.uffd.daemon", "lazymig.dump.anon_files"}),
}


def loaded(code: str, dump: Path) -> set[str]:
    """The modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = f"import sys\nDUMP = {str(dump)!r}\n{code}\nprint(__import__('json').dumps(" \
             "sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("case", CASES)
def test_a_command_does_not_load_what_it_does_not_need(case: str, tmp_path: Path) -> None:
    code, forbidden = CASES[case]
    write_lazy_dump(tmp_path, {1000: [(0x7F00_0000_0000, 4)]})
    modules = loaded(code, tmp_path)
    assert "lazymig" in modules  # the case ran
    assert sorted(forbidden & modules) == []
