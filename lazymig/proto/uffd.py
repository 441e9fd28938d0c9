"""The userfaultfd uAPI as data: struct layouts, constants, and message decoding.

Pure: no I/O, no ctypes. The structs are declared once in construct (the
reference, with the C declaration quoted, in :mod:`lazymig.proto.spec`) and
mirrored here by ``struct.Struct`` objects; ``tests/test_uffd_proto.py`` proves
the two agree and that every ioctl number matches the ``_IOC`` formula.

Source: include/uapi/linux/userfaultfd.h (Linux 6.18). All fields are in host
byte order (``=`` in ``struct`` terms, ``...n`` in construct terms).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from lazymig.errors import RemoteProtocolError

__all__ = [
    "API_STRUCT",
    "CONTINUE_STRUCT",
    "COPY_STRUCT",
    "DEFAULT_FEATURES",
    "MOVE_STRUCT",
    "MSG_SIZE",
    "NR_USERFAULTFD",
    "PAGEFAULT_STRUCT",
    "RANGE_STRUCT",
    "REGISTER_STRUCT",
    "UFFDIO_API",
    "UFFDIO_CONTINUE",
    "UFFDIO_COPY",
    "UFFDIO_MOVE",
    "UFFDIO_POISON",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_WRITEPROTECT",
    "UFFDIO_ZEROPAGE",
    "UFFD_API",
    "UFFD_USER_MODE_ONLY",
    "USERFAULTFD_IOC_NEW",
    "WRITEPROTECT_STRUCT",
    "ZEROPAGE_STRUCT",
    "ContinueMode",
    "CopyMode",
    "Event",
    "EventCode",
    "Feature",
    "Fork",
    "Ioctl",
    "MoveMode",
    "Pagefault",
    "PagefaultFlag",
    "RegisterMode",
    "Remap",
    "Remove",
    "Unmap",
    "WriteprotectMode",
    "ZeropageMode",
    "decode_events",
    "feature_names",
]

# --------------------------------------------------------------------------- constants

UFFD_API: Final = 0xAA
"""The only API version; UFFDIO_API must be called with it once per fd."""

UFFD_USER_MODE_ONLY: Final = 1
"""userfaultfd() flag: handle user-mode faults only (allowed to any user)."""

NR_USERFAULTFD: Final = {"x86_64": 323, "aarch64": 282, "i386": 374, "i686": 374, "armv7l": 388}
"""The userfaultfd syscall number, by machine (``os.uname().machine``)."""

MSG_SIZE: Final = 32
"""sizeof(struct uffd_msg); read() returns a multiple of it."""

# ioctl request numbers: _IOC(dir, 0xAA, nr, sizeof(arg)); checked in tests.
USERFAULTFD_IOC_NEW: Final = 0xAA00  # _IO(0xAA, 0x00) on /dev/userfaultfd
UFFDIO_API: Final = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER: Final = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_UNREGISTER: Final = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
UFFDIO_WAKE: Final = 0x8010AA02  # _IOR(0xAA, 0x02, struct uffdio_range)
UFFDIO_COPY: Final = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_ZEROPAGE: Final = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
UFFDIO_MOVE: Final = 0xC028AA05  # _IOWR(0xAA, 0x05, struct uffdio_move), Linux 6.8+
UFFDIO_WRITEPROTECT: Final = 0xC018AA06  # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_CONTINUE: Final = 0xC020AA07  # _IOWR(0xAA, 0x07, struct uffdio_continue)
UFFDIO_POISON: Final = 0xC020AA08  # _IOWR(0xAA, 0x08, struct uffdio_poison), Linux 6.6+


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks returned by UFFDIO_API and UFFDIO_REGISTER
    (``1 << _UFFDIO_*``, the ioctl's ``nr``)."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits of ``uffdio_api.features``."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


DEFAULT_FEATURES: Final = (
    Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
)
"""What CRIU's restorer asks for (criu/uffd.c ``uffd_open``)."""


def feature_names(features: int) -> list[str]:
    """Name every set bit of ``features`` (``0x...`` for bits without a name)."""
    names = []
    bit = 1
    while bit <= features:
        if features & bit:
            try:
                names.append(Feature(bit).name or hex(bit))
            except ValueError:
                names.append(hex(bit))
        bit <<= 1
    return names


class EventCode(enum.IntEnum):
    """UFFD_EVENT_* values of ``uffd_msg.event``."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    """UFFD_PAGEFAULT_FLAG_* bits of ``uffd_msg.arg.pagefault.flags``."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class RegisterMode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_* bits of ``uffdio_register.mode``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class CopyMode(enum.IntFlag):
    """UFFDIO_COPY_MODE_* bits of ``uffdio_copy.mode``."""

    DONTWAKE = 1 << 0
    WP = 1 << 1


class ZeropageMode(enum.IntFlag):
    """UFFDIO_ZEROPAGE_MODE_* bits of ``uffdio_zeropage.mode``."""

    DONTWAKE = 1 << 0


class WriteprotectMode(enum.IntFlag):
    """UFFDIO_WRITEPROTECT_MODE_* bits of ``uffdio_writeprotect.mode``."""

    WP = 1 << 0
    DONTWAKE = 1 << 1


class ContinueMode(enum.IntFlag):
    """UFFDIO_CONTINUE_MODE_* bits of ``uffdio_continue.mode``."""

    DONTWAKE = 1 << 0
    WP = 1 << 1


class MoveMode(enum.IntFlag):
    """UFFDIO_MOVE_MODE_* bits of ``uffdio_move.mode``."""

    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


# --------------------------------------------------------------------------- hot-path mirrors

API_STRUCT: Final = struct.Struct("=QQQ")  # api, features, ioctls
RANGE_STRUCT: Final = struct.Struct("=QQ")  # start, len
REGISTER_STRUCT: Final = struct.Struct("=QQQQ")  # start, len, mode, ioctls
COPY_STRUCT: Final = struct.Struct("=QQQQq")  # dst, src, len, mode, copy
ZEROPAGE_STRUCT: Final = struct.Struct("=QQQq")  # start, len, mode, zeropage
WRITEPROTECT_STRUCT: Final = struct.Struct("=QQQ")  # start, len, mode
CONTINUE_STRUCT: Final = struct.Struct("=QQQq")  # start, len, mode, mapped
MOVE_STRUCT: Final = struct.Struct("=QQQQq")  # dst, src, len, mode, move

_PAGEFAULT: Final = struct.Struct("=B7xQQI4x")  # event, flags, address, ptid
PAGEFAULT_STRUCT: Final = _PAGEFAULT
"""A UFFD_EVENT_PAGEFAULT message (event, flags, address, ptid): the daemon's fault
path unpacks it in place, without an event object."""
_FORK: Final = struct.Struct("=B7xI20x")  # event, ufd
_REMAP: Final = struct.Struct("=B7xQQQ")  # event, from, to, len
_REMOVE: Final = struct.Struct("=B7xQQ8x")  # event, start, end (also UNMAP)

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Pagefault:
    """A thread touched a missing (or write-protected, or minor) page.

    ``address`` is page-aligned unless the fd has ``Feature.EXACT_ADDRESS``;
    ``ptid`` is 0 unless it has ``Feature.THREAD_ID``.
    """

    address: int
    flags: int = 0
    ptid: int = 0

    @property
    def write(self) -> bool:
        """The fault was a write access."""
        return bool(self.flags & PagefaultFlag.WRITE)


@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked; ``ufd`` is a new uffd for the child, already
    installed in the reading process's fd table (adopt it or close it)."""

    ufd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap() moved ``length`` bytes from ``from_`` to ``to``."""

    from_: int
    to: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """madvise(MADV_DONTNEED/REMOVE) dropped ``[start, end)``; the range stays registered."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """munmap() (or a shrinking mremap) removed ``[start, end)``."""

    start: int
    end: int


Event = Pagefault | Fork | Remap | Remove | Unmap
"""Any decoded userfaultfd message."""


def decode_events(data: bytes | bytearray | memoryview) -> list[Event]:
    """Decode what one read() of a uffd returned: zero or more 32-byte messages.

    Raises:
        RemoteProtocolError: the length is not a multiple of 32, or an event
            code is unknown (``field`` is ``"length"`` or ``"event"``).
    """
    size = len(data)
    if size % MSG_SIZE:
        raise RemoteProtocolError(
            f"uffd read returned {size} bytes, not a multiple of {MSG_SIZE}", field="length"
        )
    events: list[Event] = []
    append = events.append
    for off in range(0, size, MSG_SIZE):
        code = data[off]
        if code == EventCode.PAGEFAULT:
            _, flags, address, ptid = _PAGEFAULT.unpack_from(data, off)
            append(Pagefault(address, flags, ptid))
        elif code == EventCode.REMOVE:
            _, start, end = _REMOVE.unpack_from(data, off)
            append(Remove(start, end))
        elif code == EventCode.UNMAP:
            _, start, end = _REMOVE.unpack_from(data, off)
            append(Unmap(start, end))
        elif code == EventCode.REMAP:
            _, from_, to, length = _REMAP.unpack_from(data, off)
            append(Remap(from_, to, length))
        elif code == EventCode.FORK:
            _, ufd = _FORK.unpack_from(data, off)
            append(Fork(ufd))
        else:
            raise RemoteProtocolError(
                f"unknown uffd event code {code:#x} at offset {off}", field="event"
            )
    return events
