"""The orchestrator API: lazy migration as asyncio handles.

Every handle is an async context manager that owns its fds, processes and
tasks and cleans them up on an exception or a cancellation; awaiting a handle
directly runs it to its end. Each has ``done`` (its :class:`Outcome`, awaitable by
any number of tasks) and, where a transfer runs, ``progress()`` (an async
iterator of frozen snapshots). Errors are lazymig's own
(:class:`~lazymig.errors.LazyMigError`), with their cause chained. There is
no global state: run as many handles in one loop as you like, on asyncio's
loop or uvloop (:func:`run` picks uvloop when installed).

Source host:

* :func:`serve` freezes and dumps a process and serves its lazy pages
  (``lazymig dump --lazy-pages``); ``ready`` / ``address`` say where.
* :func:`serve_images` serves a dump or snapshot on disk (``lazymig page-server``);
  :func:`write_snapshot` writes such a snapshot of memory regions.

Destination host:

* :func:`lazy_pages` runs a lazy-pages daemon (``lazymig lazy-pages``);
  :meth:`LazyPages.restore` / :func:`restore_process` restore a dump through it
  (``lazymig restore --lazy-pages``); :func:`~lazymig.uffd.attach.attach`, called
  in a fresh process, hands the daemon regions of that process's own memory.
* :func:`receive` is both: the destination half of a migration.

Both: :func:`migrate`, the one call for a migration on one machine (the two
halves above, with the images dir copy as a step the caller may supply).
Across two hosts, run :func:`serve` on one and :func:`receive` on the other.

Example, the whole seed workflow on one machine::

    import lazymig

    async def main(pid: int) -> None:
        async with lazymig.migrate(pid) as migration:
            print("restored as", migration.process.pid, "after", migration.downtime, "s")
            async for p in migration.progress(interval=0.5):
                print(f"{p.fraction:6.1%}  {p.pages_on_demand} on demand, "
                      f"{p.pages_background} in the background")
        result = await migration.done
        print("fault p99", result.progress.fault_p99)

    lazymig.run(main(1234))
"""

from __future__ import annotations

from lazymig.orchestrate._handle import Outcome
from lazymig.orchestrate.destination import (
    Destination,
    LazyPages,
    RestoredProcess,
    TransferError,
    lazy_pages,
    receive,
    restore_process,
)
from lazymig.orchestrate.migration import CopyImages, Migration, MigrationResult, migrate
from lazymig.orchestrate.progress import ServeProgress, TransferProgress
from lazymig.orchestrate.runner import run
from lazymig.orchestrate.snapshot import write_snapshot
from lazymig.orchestrate.source import (
    Address,
    ImagesServer,
    PageServing,
    Source,
    serve,
    serve_images,
)

__all__ = [
    "Address",
    "CopyImages",
    "Destination",
    "ImagesServer",
    "LazyPages",
    "Migration",
    "MigrationResult",
    "Outcome",
    "PageServing",
    "RestoredProcess",
    "ServeProgress",
    "Source",
    "TransferError",
    "TransferProgress",
    "lazy_pages",
    "migrate",
    "receive",
    "restore_process",
    "run",
    "serve",
    "serve_images",
    "write_snapshot",
]
