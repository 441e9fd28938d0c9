"""Numbers shared by the wire protocol, the images and the memory scanner.

Sources: CRIU criu/include/pagemap.h (PE_*), criu/include/image.h (VMA_*),
mmap(2) (PROT_*, MAP_*: the one home of these numbers, for the images and for
mmaps made here or injected), criu/tls.c (the default TLS files). Values are CRIU's, so
images, the wire and the options stay compatible.
"""

from __future__ import annotations

import enum

TYPE_CHECKING = False  # the CLI's --help loads no typing
if TYPE_CHECKING:
    from typing import Final

PAGE_SIZE = 4096
PAGE_SHIFT = 12

LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"
"""``struct linger`` {on 1, 0 s} for SO_LINGER: close() sends a reset (the peer sees
an error, not an end)."""

LINGER_OFF = bytes(8)
"""``struct linger`` {off, 0 s}: close() ends the connection as usual."""

TIMEVAL = "@qq"
"""``struct timeval`` {tv_sec, tv_usec} of SO_SNDTIMEO/SO_RCVTIMEO, as a ``struct``
format (this module imports nothing, for the command line's start-up)."""

KSIGACTION = "<QQQQ"
"""The kernel's ``struct sigaction`` {handler, flags, restorer, mask} of
rt_sigaction(2), as a ``struct`` format."""

ACTION_SIGNALS = tuple(sig for sig in range(1, 65) if sig not in (9, 19))
"""The signals whose action a dump keeps (core's ``sigactions``, in this order):
1 to SIGRTMAX (64) but SIGKILL and SIGSTOP, whose action cannot change."""

# CRIU's core tc.task_state values (compel's COMPEL_TASK_*).
TASK_ALIVE = 1
"""A running task."""
TASK_DEAD = 2
"""A zombie: its exit status is restored, no memory."""
TASK_STOPPED = 3
"""A job-control stopped task (it is restored stopped)."""

PARENT_LINK = "parent"
"""The link from an images dir to its parent dump (``criu dump --prev-images-dir``),
whose pages the PE_PARENT pagemap entries refer to."""


class PE(enum.IntFlag):
    """Pagemap entry flags (also the flags in a page-server cmd's high 16 bits)."""

    PARENT = 1
    LAZY = 2
    PRESENT = 4


class VmaStatus:
    """CRIU's VMA_AREA_* status bits of vma_entry.status (criu/include/image.h).

    Plain ints, not an ``enum.IntFlag``: every ``status & VmaStatus.X`` on an
    IntFlag builds a flag object (~3 us), which cost tenths of a second over
    the 5,000 VMAs of a dump or a restore.
    """

    REGULAR: Final = 1 << 0
    STACK: Final = 1 << 1
    VSYSCALL: Final = 1 << 2
    VDSO: Final = 1 << 3
    HEAP: Final = 1 << 5
    FILE_PRIVATE: Final = 1 << 6
    FILE_SHARED: Final = 1 << 7
    ANON_SHARED: Final = 1 << 8
    ANON_PRIVATE: Final = 1 << 9
    SYSVIPC: Final = 1 << 10
    SOCKET: Final = 1 << 11
    VVAR: Final = 1 << 12
    AIORING: Final = 1 << 13
    MEMFD: Final = 1 << 14
    UNSUPP: Final = 1 << 31


PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2

MADV_DONTNEED = 4

EFD_SEMAPHORE = 1
"""eventfd2's flag, kept in an eventfd entry's flags (dumped and restored)."""


def vma_can_be_lazy(flags: int, status: int) -> bool:
    """CRIU's ``vma_entry_can_be_lazy``: private anonymous, not locked or hugetlb,
    and not the vdso, vvar or vsyscall page."""
    return (
        flags & MAP_ANONYMOUS != 0
        and flags & MAP_PRIVATE != 0
        and flags & (MAP_LOCKED | MAP_HUGETLB) == 0
        and status & (VmaStatus.VDSO | VmaStatus.VVAR | VmaStatus.VSYSCALL) == 0
    )


# CRIU's default TLS files (criu/tls.c), here so that the command line can show
# them without importing ssl, nor pathlib (lazymig.tls re-exports them as Paths).
DEFAULT_CACERT = "/etc/pki/CA/cacert.pem"
DEFAULT_CACRL = "/etc/pki/CA/cacrl.pem"
DEFAULT_CERT = "/etc/pki/criu/cert.pem"
DEFAULT_KEY = "/etc/pki/criu/private/key.pem"
