"""A user's type checker sees lazymig as installed, and nothing untyped behind it.

A scratch project outside the repository imports lazymig and runs ``mypy --strict``
on it: the editable install that scripts/setup.sh makes must be visible to it
(setuptools' default import hook is not), and lazymig's own modules must not pass
on their untyped dependencies (construct, python-ptrace) as errors of the user's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

USER_CODE = '''
import lazymig
from lazymig.dump import LazyDump
from lazymig.linux.ptrace import Tracee
from lazymig.proto.spec import HEADER_V2
from lazymig.testing import Pattern, StartWorkload


async def main(pid: int) -> float:
    async with lazymig.migrate(pid) as migration:
        downtime: float = migration.downtime
    result = await migration.done
    print(result.dump.source.value, LazyDump, Tracee, HEADER_V2)
    return downtime


def expected(start: StartWorkload) -> Pattern:
    return Pattern.of(start("c").ready)
'''


def mypy(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (project / "user.py").write_text(USER_CODE)
    environ = {k: v for k, v in os.environ.items() if k != "MYPYPATH"} | env
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "user.py"], cwd=project, env=environ, capture_output=True,
                          text=True, check=False, timeout=300)


def test_mypy_finds_the_installed_package(tmp_path: Path) -> None:
    run = mypy(tmp_path)
    assert run.returncode == 0, (
        f"{run.stdout}{run.stderr}\n(an editable install made before scripts/setup.sh "
        "used editable_mode=compat hides lazymig from mypy: run scripts/setup.sh again)")


def test_no_untyped_import_of_lazymig_reaches_the_user(tmp_path: Path) -> None:
    """A copy of lazymig's source on the user's path (MYPYPATH): outside site-packages,
    its modules are checked as the user's own, imports and all."""
    shutil.copytree(REPO / "lazymig", tmp_path / "src" / "lazymig",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "project").mkdir()
    run = mypy(tmp_path / "project", MYPYPATH=str(tmp_path / "src"))
    for module in ("ptrace.binding", "ptrace.error", "construct"):
        assert f'"{module}"' not in run.stdout, run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
