"""Workloads only lazymig's own tests run: ``criu_pattern.c`` (for real CRIU), ``fds.c``
and ``fds.py`` (open files and pipes).

The pattern workloads live in :mod:`lazymig.testing.workload`, where users'
test suites find them too; their names are re-exported here only for tests
written before the move (new tests import lazymig.testing.workload).
"""

from __future__ import annotations

from pathlib import Path

from lazymig.testing.workload import (
    Check,
    Ready,
    Workload,
    build_c_workload,
    expected_page,
    parse_check,
    python_workload_argv,
)

__all__ = [
    "WORKLOAD_DIR",
    "Check",
    "Ready",
    "Workload",
    "build_c_workload",
    "expected_page",
    "parse_check",
    "python_workload_argv",
]

WORKLOAD_DIR = Path(__file__).resolve().parent
