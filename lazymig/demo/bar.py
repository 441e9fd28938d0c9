"""The demo's progress bar: one line per transfer snapshot."""

from __future__ import annotations

from lazymig.orchestrate.progress import TransferProgress
from lazymig.proto.constants import PAGE_SIZE

__all__ = ["progress_line"]

_MIB = 1 << 20


def progress_line(p: TransferProgress, width: int = 30) -> str:
    """``[#########.........]  31%  80/256 MiB  12 faults  0.45 GB/s``."""
    filled = round(p.fraction * width)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {p.fraction:4.0%}  "
            f"{p.pages_done * PAGE_SIZE / _MIB:.0f}/{p.pages_total * PAGE_SIZE / _MIB:.0f} MiB  "
            f"{p.pages_on_demand} on demand, {p.pages_background} in the background  "
            f"{p.bytes_per_second / 1e9:.2f} GB/s")
