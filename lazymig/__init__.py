"""lazymig: post-copy ("lazy pages") memory migration as an asyncio library.

Linux only, Python 3.11+. Wire- and image-compatible with CRIU's remote lazy pages.

The orchestrator API (:mod:`lazymig.orchestrate`) is available from here::

    import lazymig

    result = lazymig.run(lazymig.migrate(pid))      # dump, serve, restore, fill
    print(result.restored.pid, f"{result.downtime:.3f} s down")

``import lazymig`` loads nothing else: every name below is imported on first
use (the CLI's start-up is part of a migration's downtime).
"""

from __future__ import annotations

from lazymig._lazy import lazy_exports
from lazymig._version import __version__

TYPE_CHECKING = False  # typing is not imported either (mypy reads this block)
if TYPE_CHECKING:
    from lazymig.dump.dumper import DumpResult, SourceFate
    from lazymig.dump.precopy import PreCopy, PreCopyOptions, RoundReport
    from lazymig.errors import (
        BrokenResourceError,
        BusyResourceError,
        ClosedResourceError,
        ConfigurationError,
        ImageError,
        LazyMigError,
        LazyMigOSError,
        LocalProtocolError,
        ProtocolError,
        RemoteProtocolError,
    )
    from lazymig.orchestrate import (
        Address,
        CopyImages,
        Destination,
        ImagesServer,
        LazyPages,
        Migration,
        MigrationResult,
        Outcome,
        PageServing,
        RestoredProcess,
        ServeProgress,
        Source,
        TransferError,
        TransferProgress,
        lazy_pages,
        migrate,
        receive,
        restore_process,
        run,
        serve,
        serve_images,
        write_snapshot,
    )
    from lazymig.proto.wire import WireVersion
    from lazymig.restore.restorer import RestoreResult
    from lazymig.uffd.attach import attach
    from lazymig.uffd.daemon import DaemonReport, ProcessReport

_LAZY = {
    "lazymig.errors": ["BrokenResourceError", "BusyResourceError", "ClosedResourceError",
                       "ConfigurationError", "ImageError", "LazyMigError", "LazyMigOSError",
                       "LocalProtocolError", "ProtocolError", "RemoteProtocolError"],
    "lazymig.orchestrate": ["Address", "CopyImages", "Destination", "ImagesServer", "LazyPages",
                            "Migration", "MigrationResult", "Outcome", "PageServing",
                            "RestoredProcess",
                            "ServeProgress", "Source", "TransferError", "TransferProgress",
                            "lazy_pages", "migrate", "receive", "restore_process", "run",
                            "serve", "serve_images", "write_snapshot"],
    "lazymig.dump.dumper": ["DumpResult", "SourceFate"],
    "lazymig.dump.precopy": ["PreCopy", "PreCopyOptions", "RoundReport"],
    "lazymig.restore.restorer": ["RestoreResult"],
    "lazymig.uffd.attach": ["attach"],
    "lazymig.uffd.daemon": ["DaemonReport", "ProcessReport"],
    "lazymig.proto.wire": ["WireVersion"],
}

__all__ = [
    "Address",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "ConfigurationError",
    "CopyImages",
    "DaemonReport",
    "Destination",
    "DumpResult",
    "ImageError",
    "ImagesServer",
    "LazyMigError",
    "LazyMigOSError",
    "LazyPages",
    "LocalProtocolError",
    "Migration",
    "MigrationResult",
    "Outcome",
    "PageServing",
    "PreCopy",
    "PreCopyOptions",
    "ProcessReport",
    "ProtocolError",
    "RemoteProtocolError",
    "RestoreResult",
    "RestoredProcess",
    "RoundReport",
    "ServeProgress",
    "Source",
    "SourceFate",
    "TransferError",
    "TransferProgress",
    "WireVersion",
    "__version__",
    "attach",
    "lazy_pages",
    "migrate",
    "receive",
    "restore_process",
    "run",
    "serve",
    "serve_images",
    "write_snapshot",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
