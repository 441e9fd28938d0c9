"""Restore side: userfaultfd, lazy-range bookkeeping, page sources and the daemon.

The names below are imported on first use, except :func:`attach`, which shares
its module's name (the submodule, once imported, would shadow a lazy name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lazymig._lazy import lazy_exports
from lazymig.uffd.attach import attach

if TYPE_CHECKING:
    from lazymig.linux.uffd import UffdError
    from lazymig.uffd.daemon import (
        SOCKET_NAME,
        DaemonReport,
        LazyPagesDaemon,
        ProcessReport,
        ProcessState,
    )
    from lazymig.uffd.ranges import CopyRange, LazyRanges, PageState, Request
    from lazymig.uffd.source import (
        LocalPageSource,
        PageChunk,
        PageSink,
        PageSource,
        RemotePageSource,
    )
    from lazymig.uffd.uffd import DEFAULT_FEATURES, FeatureUnavailableError, Uffd, kernel_features

__all__ = [
    "DEFAULT_FEATURES",
    "SOCKET_NAME",
    "CopyRange",
    "DaemonReport",
    "FeatureUnavailableError",
    "LazyPagesDaemon",
    "LazyRanges",
    "LocalPageSource",
    "PageChunk",
    "PageSink",
    "PageSource",
    "PageState",
    "ProcessReport",
    "ProcessState",
    "RemotePageSource",
    "Request",
    "Uffd",
    "UffdError",
    "attach",
    "kernel_features",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "lazymig.linux.uffd": ["UffdError"],
    "lazymig.uffd.daemon": ["SOCKET_NAME", "DaemonReport", "LazyPagesDaemon", "ProcessReport",
                            "ProcessState"],
    "lazymig.uffd.ranges": ["CopyRange", "LazyRanges", "PageState", "Request"],
    "lazymig.uffd.source": ["LocalPageSource", "PageChunk", "PageSink", "PageSource",
                            "RemotePageSource"],
    "lazymig.uffd.uffd": ["DEFAULT_FEATURES", "FeatureUnavailableError", "Uffd",
                          "kernel_features"],
})
