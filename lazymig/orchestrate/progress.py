"""Typed progress snapshots, and the async iterator that samples them.

The source side knows how many lazy pages it has served
(:class:`ServeProgress`); the destination side knows, per page, whether a
fault asked for it or the background fetch brought it, and how long faults
waited (:class:`TransferProgress`). Snapshots are frozen: sample as often as
you like, keep what you like.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lazymig.dump.server import PageServerStats
from lazymig.errors import ConfigurationError
from lazymig.uffd.daemon import DaemonReport

__all__ = ["ServeProgress", "TransferProgress", "poll"]

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """Where a lazy transfer stands, seen from the lazy-pages daemon (destination)."""

    pages_total: int
    """Lazy pages of every process handed over so far."""
    pages_on_demand: int
    """Pages copied in because a fault asked for them (with the fault's prefetch)."""
    pages_background: int
    """Pages copied in by the background fetch."""
    faults: int
    bytes_per_second: float
    """Average copy rate since the first process was handed over."""
    fault_p50: float | None
    """Median fault round trip, in seconds (None before the first fault is served)."""
    fault_p99: float | None
    elapsed: float
    """Seconds since the daemon started."""

    @property
    def pages_done(self) -> int:
        return self.pages_on_demand + self.pages_background

    @property
    def fraction(self) -> float:
        """Done, from 0 to 1 (1 when there is nothing to transfer)."""
        return self.pages_done / self.pages_total if self.pages_total else 1.0

    @classmethod
    def of(cls, report: DaemonReport) -> TransferProgress:
        """A snapshot of a (running or finished) daemon's report."""
        processes = report.processes
        copied = sum(p.pages_copied for p in processes)
        on_demand = sum(p.pages_on_demand for p in processes)
        latency = report.fault_latency()
        end = report.finished if report.finished is not None else time.monotonic()
        return cls(pages_total=sum(p.pages_total for p in processes),
                   pages_on_demand=on_demand, pages_background=copied - on_demand,
                   faults=sum(p.faults for p in processes),
                   bytes_per_second=report.throughput(),
                   fault_p50=latency.percentile(0.5), fault_p99=latency.percentile(0.99),
                   elapsed=end - report.started)


@dataclass(frozen=True, slots=True)
class ServeProgress:
    """Where a page server stands (source side)."""

    pages_total: int
    """Lazy pages it has to serve."""
    pages_served: int
    """Of those, pages sent at least once."""
    pages_sent: int
    """Pages sent, repeats included."""
    connections: int
    bytes_per_second: float
    """Average send rate since the server started."""
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.pages_served / self.pages_total if self.pages_total else 1.0

    @classmethod
    def of(cls, stats: PageServerStats) -> ServeProgress:
        return cls(pages_total=stats.lazy_pages,
                   pages_served=stats.lazy_pages - stats.pages_unserved,
                   pages_sent=stats.pages_sent, connections=stats.connections,
                   bytes_per_second=stats.throughput(),
                   elapsed=time.monotonic() - stats.started)


def poll(sample: Callable[[], P], finished: asyncio.Future[Any],
         interval: float) -> AsyncIterator[P]:
    """Yield ``sample()`` at once, then every ``interval`` seconds and once more when
    ``finished`` is done; then stop (the outcome itself is ``finished``'s)."""
    if interval <= 0:
        raise ConfigurationError(f"the progress interval must be positive, not {interval}")
    return _poll(sample, finished, interval)


async def _poll(sample: Callable[[], P], finished: asyncio.Future[Any],
                interval: float) -> AsyncIterator[P]:
    while True:
        ended = finished.done()
        yield sample()
        if ended:
            return
        await asyncio.wait([finished], timeout=interval)
