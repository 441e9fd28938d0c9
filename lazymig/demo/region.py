"""A region of anonymous memory at a fixed address, for the demo's two processes."""

from __future__ import annotations

import struct
import zlib

from lazymig.linux.vm import local_view, mmap_anonymous
from lazymig.proto.constants import PAGE_SIZE as PAGE

__all__ = ["PAGE", "fill_pattern", "map_region", "region_crc32"]


def map_region(address: int, pages: int) -> None:
    """Map ``pages`` private anonymous pages at exactly ``address``."""
    mmap_anonymous(pages * PAGE, at=address)


def fill_pattern(address: int, pages: int) -> None:
    """Write page ``i`` as the 16-byte record (i, address) repeated."""
    region = local_view(address, pages * PAGE)
    for i in range(pages):
        region[i * PAGE:(i + 1) * PAGE] = struct.pack("<QQ", i, address) * (PAGE // 16)


def region_crc32(address: int, pages: int, chunk_pages: int = 256, *, crc: int = 0) -> int:
    """CRC-32 of the region, read in order (on a lazily filled region: faults),
    continuing from ``crc``."""
    for first in range(0, pages, chunk_pages):
        n = min(chunk_pages, pages - first)
        crc = zlib.crc32(local_view(address + first * PAGE, n * PAGE), crc)
    return crc
