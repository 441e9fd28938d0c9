"""Dump side: freezing, scanning, page pipes, images and the page server.

The high-level API is :class:`LazyDump` (``criu dump --lazy-pages``) and
:func:`dump` (a plain ``criu dump``), from :mod:`lazymig.dump.dumper`. They
are imported on first use, so that importing a submodule (the restore side
uses :mod:`lazymig.dump.store`) does not load ptrace and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazymig.dump.dumper import DumpResult, LazyDump, SourceFate, dump

__all__ = ["DumpResult", "LazyDump", "SourceFate", "dump"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lazymig.dump.dumper"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
