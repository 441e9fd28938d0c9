"""A region of anonymous memory at a fixed address, for the demo's two processes."""

from __future__ import annotations

import ctypes
import mmap
import struct
import zlib

PAGE = mmap.PAGESIZE
_MAP_FIXED_NOREPLACE = 0x100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]


def map_region(address: int, pages: int) -> None:
    """Map ``pages`` private anonymous pages at exactly ``address``."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE
    got = _libc.mmap(address, pages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if got != address:
        raise OSError(ctypes.get_errno(), f"cannot map {pages} pages at {address:#x}")


def fill_pattern(address: int, pages: int) -> None:
    """Write page ``i`` as the 16-byte record (i, address) repeated."""
    for i in range(pages):
        ctypes.memmove(address + i * PAGE, struct.pack("<QQ", i, address) * (PAGE // 16), PAGE)


def region_crc32(address: int, pages: int, chunk_pages: int = 256, *, crc: int = 0) -> int:
    """CRC-32 of the region, read in order (on a lazily filled region: faults),
    continuing from ``crc``."""
    for first in range(0, pages, chunk_pages):
        n = min(chunk_pages, pages - first)
        crc = zlib.crc32(ctypes.string_at(address + first * PAGE, n * PAGE), crc)
    return crc
