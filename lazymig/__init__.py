"""lazymig: post-copy ("lazy pages") memory migration as an asyncio library.

Linux only, Python 3.11+. Wire- and image-compatible with CRIU's remote lazy pages.
"""

from __future__ import annotations

from lazymig._version import __version__
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

__all__ = [
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "ConfigurationError",
    "ImageError",
    "LazyMigError",
    "LazyMigOSError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "__version__",
]
