"""Restore side: userfaultfd, lazy-range bookkeeping, page sources and the daemon."""

from __future__ import annotations

from lazymig.linux.uffd import UffdError
from lazymig.uffd.attach import attach
from lazymig.uffd.daemon import SOCKET_NAME, DaemonReport, LazyPagesDaemon, ProcessReport
from lazymig.uffd.ranges import CopyRange, LazyRanges, PageState, Request
from lazymig.uffd.source import LocalPageSource, PageChunk, PageSource, RemotePageSource
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
    "PageSource",
    "PageState",
    "ProcessReport",
    "RemotePageSource",
    "Request",
    "Uffd",
    "UffdError",
    "attach",
    "kernel_features",
]
