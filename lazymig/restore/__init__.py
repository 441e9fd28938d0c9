"""Restore side: rebuild a process dumped by ``lazymig dump`` (``criu restore``).

:func:`restore` / :class:`Restorer` start a new process, rebuild the dumped
address space and state in it, hand its lazy pages to a lazy-pages daemon
(``lazy_pages=True``) and let it run. :func:`load_task` reads and checks a dump
first and raises :class:`UnsupportedDumpError` for what cannot be restored.
"""

from __future__ import annotations

from lazymig.restore.restorer import RestoreError, Restorer, RestoreResult, restore
from lazymig.restore.task import DumpedTask, InheritFd, UnsupportedDumpError, load_task

__all__ = [
    "DumpedTask",
    "InheritFd",
    "RestoreError",
    "RestoreResult",
    "Restorer",
    "UnsupportedDumpError",
    "load_task",
    "restore",
]
