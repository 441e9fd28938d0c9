"""The page-server header, in both of CRIU's layouts (declared in :mod:`lazymig.proto.spec`).

CRIU sends ``struct page_server_iov`` raw, in host byte order::

    /* v1: CRIU 2016 ... 4.1.x, 24 bytes */      /* v2: CRIU 4.2+, 32 bytes */
    struct page_server_iov {                     struct page_server_iov {
            u32 cmd;                                     u32 cmd;
            u32 nr_pages;                                /* 4 bytes padding */
            u64 vaddr;                                   u64 nr_pages;
            u64 dst_id;                                  u64 vaddr;
    };                                                   u64 dst_id;
                                                 };

``cmd`` is ``(flags << 16) | code``; the flags are pagemap flags (:class:`PE`).
``dst_id`` is ``(id << 8) | type`` for the image commands and the raw virtual
pid for ``PS_IOV_GET``. Nothing on the wire says which layout is spoken: the
version is a parameter of every codec (:class:`WireVersion`), never a global.

The construct declarations (:data:`lazymig.proto.spec.HEADER_V1` and
``HEADER_V2``) are the single source of truth; :func:`pack_header`/:func:`unpack_header`
use a ``struct.Struct`` with the same layout (about 70x faster), and the test
suite proves the two agree for every command.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from lazymig.proto.constants import PE

__all__ = [
    "PS_CMD_BITS",
    "PS_TYPE_BITS",
    "Cmd",
    "DstType",
    "Header",
    "WireVersion",
    "decode_dst_id",
    "encode_dst_id",
    "pack_header",
    "unpack_header",
]

PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
PS_TYPE_BITS = 8
PS_TYPE_MASK = (1 << PS_TYPE_BITS) - 1


class Cmd(enum.IntEnum):
    """Page-server command codes, numbered as CRIU has since v3.5 (2017)."""

    ADD = 1
    """Legacy "add pages": implies PE.PRESENT, page data follows."""
    HOLE = 2
    """Legacy "hole": implies PE.PARENT, no data."""
    OPEN = 3
    """Legacy open of an image target; no reply."""
    OPEN2 = 4
    """Open an image target; the server replies one byte, has_parent."""
    PARENT = 5
    """Does a parent image exist? The server replies a 4-byte int."""
    ADD_F = 6
    """Pagemap entry with flags in cmd's high bits; data follows iff PE.PRESENT."""
    GET = 7
    """Lazy pages: the daemon asks the dump side for pages."""
    CLOSE = 0x1023
    """End of session; the server replies a 4-byte status."""
    FORCE_CLOSE = 0x1024
    """End of session on a socket passed with --ps-socket; same reply."""


class DstType(enum.IntEnum):
    """The low byte of an image command's dst_id."""

    PID = 1
    SHMEM = 2


# Type bytes that CRIU's decode_pm still accepts from old peers (CR_FD_* numbers).
_LEGACY_TYPES = {10: DstType.PID, 11: DstType.PID, 16: DstType.PID, 17: DstType.PID,
                 27: DstType.SHMEM, 28: DstType.SHMEM, 29: DstType.SHMEM,
                 32: DstType.SHMEM, 33: DstType.SHMEM, 34: DstType.SHMEM}


class WireVersion(enum.Enum):
    """Which ``page_server_iov`` layout a connection speaks."""

    V1 = "v1"
    """24-byte header, u32 nr_pages: CRIU up to 4.1.x."""
    V2 = "v2"
    """32-byte header, u64 nr_pages: CRIU 4.2 and later (the default)."""

    @property
    def header_size(self) -> int:
        return _FAST[self].size

    @property
    def header_struct(self) -> struct.Struct:
        """The header as a ``struct.Struct`` (cmd, nr_pages, vaddr, dst_id), for decoding in
        place with ``unpack_from``; the same layout as :func:`unpack_header`."""
        return _FAST[self]

    @property
    def max_nr_pages(self) -> int:
        """The largest nr_pages the layout can carry."""
        return 0xFFFF_FFFF if self is WireVersion.V1 else 0xFFFF_FFFF_FFFF_FFFF


# Hot path: the same layouts as struct formats ("=" is host order, no implicit padding).
_FAST = {WireVersion.V1: struct.Struct("=IIQQ"), WireVersion.V2: struct.Struct("=I4xQQQ")}


@dataclass(frozen=True, slots=True)
class Header:
    """One decoded ``page_server_iov``: the raw fields, cmd split into code and flags."""

    code: int
    flags: int
    nr_pages: int
    vaddr: int
    dst_id: int

    @property
    def cmd(self) -> int:
        return (self.flags << PS_CMD_BITS) | self.code


def pack_header(version: WireVersion, code: int, flags: int, nr_pages: int, vaddr: int,
                dst_id: int) -> bytes:
    """Build the header bytes. Raises ``struct.error`` for out-of-range fields."""
    return _FAST[version].pack((flags << PS_CMD_BITS) | code, nr_pages, vaddr, dst_id)


def unpack_header(version: WireVersion, buf: bytes | bytearray | memoryview,
                  offset: int = 0) -> Header:
    """Decode one header from ``buf`` at ``offset`` (which must hold enough bytes)."""
    cmd, nr_pages, vaddr, dst_id = _FAST[version].unpack_from(buf, offset)
    return Header(cmd & PS_CMD_MASK, cmd >> PS_CMD_BITS, nr_pages, vaddr, dst_id)


def encode_dst_id(type_: DstType, id_: int) -> int:
    """``dst_id`` of an image command: ``(id << 8) | type``."""
    return (id_ << PS_TYPE_BITS) | int(type_)


def decode_dst_id(dst_id: int) -> tuple[DstType, int]:
    """Split an image command's ``dst_id``; raises ValueError for an unknown type byte."""
    type_byte = dst_id & PS_TYPE_MASK
    if type_byte in (DstType.PID, DstType.SHMEM):
        return DstType(type_byte), dst_id >> PS_TYPE_BITS
    if type_byte in _LEGACY_TYPES:
        return _LEGACY_TYPES[type_byte], dst_id >> PS_TYPE_BITS
    raise ValueError(f"unknown dst_id type byte {type_byte}")


VALID_FLAGS = PE.PARENT | PE.LAZY | PE.PRESENT
