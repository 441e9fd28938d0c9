"""The construct declarations of every raw struct lazymig speaks: the specification.

* ``struct page_server_iov`` in both of CRIU's layouts (:data:`HEADER_V1`,
  :data:`HEADER_V2`; see :mod:`lazymig.proto.wire`);
* ``struct uffd_msg`` and the ``struct uffdio_*`` ioctl arguments (see
  :mod:`lazymig.proto.uffd`).

Each is declared once, here, with its C declaration quoted. The codecs use a
``struct.Struct`` mirror of each on the hot path (about 70x faster), and the
tests prove every mirror agrees with its declaration (tests/test_wire.py,
tests/test_uffd_proto.py). Nothing at run time imports this module: construct
costs a running daemon 20 ms of start-up and 3 MiB of memory for nothing.
"""

from __future__ import annotations

from construct import (  # type: ignore[import-untyped]
    Bytes,
    Int8un,
    Int16un,
    Int32un,
    Int64sn,
    Int64un,
    Padded,
    Padding,
    Struct,
    Switch,
    this,
)

from lazymig.proto.uffd import EventCode
from lazymig.proto.wire import WireVersion

__all__ = [
    "DECLARATIONS",
    "HEADER_V1",
    "HEADER_V2",
    "uffd_msg",
    "uffdio_api",
    "uffdio_continue",
    "uffdio_copy",
    "uffdio_move",
    "uffdio_poison",
    "uffdio_range",
    "uffdio_register",
    "uffdio_writeprotect",
    "uffdio_zeropage",
]

# --------------------------------------------------------------------------- page server

HEADER_V1 = Struct(
    "cmd" / Int32un,
    "nr_pages" / Int32un,
    "vaddr" / Int64un,
    "dst_id" / Int64un,
)
"""``struct page_server_iov`` as CRIU up to 4.1.x lays it out (24 bytes)."""

HEADER_V2 = Struct(
    "cmd" / Int32un,
    Padding(4),
    "nr_pages" / Int64un,
    "vaddr" / Int64un,
    "dst_id" / Int64un,
)
"""``struct page_server_iov`` as CRIU 4.2+ lays it out (32 bytes, padding after cmd)."""

DECLARATIONS = {WireVersion.V1: HEADER_V1, WireVersion.V2: HEADER_V2}

# --------------------------------------------------------------------------- userfaultfd

uffd_msg = Struct(
    "event" / Int8un,
    "reserved1" / Int8un,
    "reserved2" / Int16un,
    "reserved3" / Int32un,
    "arg"
    / Switch(
        this.event,
        {
            EventCode.PAGEFAULT: Padded(
                24, Struct("flags" / Int64un, "address" / Int64un, "ptid" / Int32un)
            ),
            EventCode.FORK: Padded(24, Struct("ufd" / Int32un)),
            EventCode.REMAP: Struct("from_" / Int64un, "to" / Int64un, "len" / Int64un),
            EventCode.REMOVE: Padded(24, Struct("start" / Int64un, "end" / Int64un)),
            EventCode.UNMAP: Padded(24, Struct("start" / Int64un, "end" / Int64un)),
        },
        default=Bytes(24),
    ),
)
"""``struct uffd_msg`` (32 bytes, packed)::

    struct uffd_msg {
        __u8  event;
        __u8  reserved1;
        __u16 reserved2;
        __u32 reserved3;
        union {
            struct { __u64 flags; __u64 address; union { __u32 ptid; } feat; } pagefault;
            struct { __u32 ufd; } fork;
            struct { __u64 from; __u64 to; __u64 len; } remap;
            struct { __u64 start; __u64 end; } remove;   /* also unmap */
            struct { __u64 reserved1, reserved2, reserved3; } reserved;
        } arg;
    } __packed;
"""

uffdio_api = Struct("api" / Int64un, "features" / Int64un, "ioctls" / Int64un)
"""``struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; /* out */ };``"""

uffdio_range = Struct("start" / Int64un, "len" / Int64un)
"""``struct uffdio_range { __u64 start; __u64 len; };``"""

uffdio_register = Struct("range" / uffdio_range, "mode" / Int64un, "ioctls" / Int64un)
"""``struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; /* out */ };``"""

uffdio_copy = Struct(
    "dst" / Int64un, "src" / Int64un, "len" / Int64un, "mode" / Int64un, "copy" / Int64sn
)
"""``struct uffdio_copy { __u64 dst, src, len, mode; __s64 copy; /* out */ };``"""

uffdio_zeropage = Struct("range" / uffdio_range, "mode" / Int64un, "zeropage" / Int64sn)
"""``struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; };``"""

uffdio_writeprotect = Struct("range" / uffdio_range, "mode" / Int64un)
"""``struct uffdio_writeprotect { struct uffdio_range range; __u64 mode; };``"""

uffdio_continue = Struct("range" / uffdio_range, "mode" / Int64un, "mapped" / Int64sn)
"""``struct uffdio_continue { struct uffdio_range range; __u64 mode; __s64 mapped; };``"""

uffdio_poison = Struct("range" / uffdio_range, "mode" / Int64un, "updated" / Int64sn)
"""``struct uffdio_poison { struct uffdio_range range; __u64 mode; __s64 updated; };``"""

uffdio_move = Struct(
    "dst" / Int64un, "src" / Int64un, "len" / Int64un, "mode" / Int64un, "move" / Int64sn
)
"""``struct uffdio_move { __u64 dst, src, len, mode; __s64 move; /* out */ };``"""
