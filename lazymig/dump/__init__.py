"""Dump side: freezing, scanning, page pipes, images and the page server.

The high-level API is :class:`LazyDump` (``criu dump --lazy-pages``) and
:func:`dump` (a plain ``criu dump``), from :mod:`lazymig.dump.dumper`. They
are imported on first use, so that importing a submodule (the restore side
uses :mod:`lazymig.dump.store`) does not load ptrace and the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazymig._lazy import lazy_exports

if TYPE_CHECKING:
    from lazymig.dump.dumper import DumpResult, LazyDump, SourceFate, dump

__all__ = ["DumpResult", "LazyDump", "SourceFate", "dump"]

__getattr__, __dir__ = lazy_exports(__name__, {"lazymig.dump.dumper": __all__})
