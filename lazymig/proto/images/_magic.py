"""Image kinds, their magics and file names (CRIU criu/include/magic.h, criu/image-desc.c).

Images v1.1 (inventory ``img_version`` 2) start with two little-endian u32:
``IMG_COMMON_MAGIC`` and the kind's own magic. Two exceptions:

* ``inventory.img`` starts with ``INVENTORY_MAGIC`` alone;
* service files (stats, irmap-cache) use ``IMG_SERVICE_MAGIC`` instead of the
  common one;

and raw images (``pages-<id>.img``) have no magic at all.
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "CRTOOLS_IMAGES_V1",
    "CRTOOLS_IMAGES_V1_1",
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "RAW_IMAGE_MAGIC",
    "U32",
    "ImageKind",
]

CRTOOLS_IMAGES_V1 = 1
"""Old images without the common magic (CRIU still reads them; lazymig does not)."""
CRTOOLS_IMAGES_V1_1 = 2
"""The ``img_version`` lazymig writes and reads: every image but inventory has two magics."""

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
RAW_IMAGE_MAGIC = 0x0

U32 = struct.Struct("<I")
"""A little-endian u32: the magics and the size word before each protobuf entry."""


class ImageKind(enum.Enum):
    """An image kind; the value is CRIU's type magic (``ImageKind(0x56084025)`` is PAGEMAP).

    Only the kinds lazymig reads or writes, plus a few that are handy to
    recognise, are listed; :attr:`LAZYMIG` is lazymig's own. Aliases in magic.h
    (``SHMEM_PAGEMAP_MAGIC`` is ``PAGEMAP_MAGIC``) map to one member.
    """

    INVENTORY = 0x58313116
    PSTREE = 0x50273030
    CORE = 0x55053847
    IDS = 0x54432030
    MM = 0x57492820
    VMAS = 0x54123737
    PAGEMAP = 0x56084025
    PAGES = RAW_IMAGE_MAGIC
    CREDS = 0x54023547
    FS = 0x51403912
    SIGACT = 0x55344201
    FDINFO = 0x56213732
    FILES = 0x56303138
    PIPES_DATA = 0x56453709
    FIFO_DATA = 0x59333054
    FILE_LOCKS = 0x54323616
    SK_QUEUES = 0x56264026
    MEMFD_INODE = 0x48453499
    REG_FILES = 0x50363636
    RLIMIT = 0x57113925
    STATS = 0x57093306
    IRMAP_CACHE = 0x57004059
    LAZYMIG = 0x4C5A4D31
    """lazymig's own per-task image (``lazymig-<pid>.img``, one ``lazymig_task_entry``);
    not a CRIU magic, so crit cannot decode it."""

    @property
    def magic(self) -> int:
        """The kind's own magic (0 for raw images)."""
        return int(self.value)

    @property
    def is_raw(self) -> bool:
        """Raw images (pages) have no magic and no protobuf entries."""
        return self.value == RAW_IMAGE_MAGIC

    @property
    def leading_magic(self) -> int | None:
        """The magic written before the kind's own one, or None if there is none."""
        if self is ImageKind.INVENTORY or self.is_raw:
            return None
        if self in (ImageKind.STATS, ImageKind.IRMAP_CACHE):
            return IMG_SERVICE_MAGIC
        return IMG_COMMON_MAGIC

    @property
    def header(self) -> bytes:
        """The bytes an image of this kind starts with (empty for raw images)."""
        if self.is_raw:
            return b""
        lead = self.leading_magic
        head = b"" if lead is None else U32.pack(lead)
        return head + U32.pack(self.magic)

    @property
    def file_template(self) -> str:
        """CRIU's file name; ``{}`` stands for the pid or id (``core-{}.img``)."""
        return _TEMPLATES[self]

    def file_name(self, ident: int | str | None = None) -> str:
        """The image's file name, e.g. ``ImageKind.MM.file_name(42) == "mm-42.img"``.

        *ident* is the pid for per-task images, the pages id for PAGES and
        ``"dump"`` or ``"restore"`` for STATS.

        Raises:
            ValueError: *ident* is missing or negative for a per-task kind, or
                given for a kind that has a single image per dump.
        """
        template = _TEMPLATES[self]
        if "{}" not in template:
            if ident is not None:
                raise ValueError(f"there is one {self.name} image per dump: no id expected")
            return template
        if ident is None:
            raise ValueError(f"{self.name} images are per task or per id: pass one")
        if isinstance(ident, int) and ident < 0:
            raise ValueError(f"{self.name} image id must not be negative, got {ident}")
        return template.format(ident)


_TEMPLATES: dict[ImageKind, str] = {
    ImageKind.INVENTORY: "inventory.img",
    ImageKind.PSTREE: "pstree.img",
    ImageKind.CORE: "core-{}.img",
    ImageKind.IDS: "ids-{}.img",
    ImageKind.MM: "mm-{}.img",
    ImageKind.VMAS: "vmas-{}.img",
    ImageKind.PAGEMAP: "pagemap-{}.img",
    ImageKind.PAGES: "pages-{}.img",
    ImageKind.CREDS: "creds-{}.img",
    ImageKind.FS: "fs-{}.img",
    ImageKind.SIGACT: "sigacts-{}.img",
    ImageKind.FDINFO: "fdinfo-{}.img",
    ImageKind.FILES: "files.img",
    ImageKind.PIPES_DATA: "pipes-data.img",
    ImageKind.FIFO_DATA: "fifo-data.img",
    ImageKind.FILE_LOCKS: "filelocks.img",
    ImageKind.SK_QUEUES: "sk-queues.img",
    ImageKind.MEMFD_INODE: "memfd-inode.img",
    ImageKind.REG_FILES: "reg-files.img",
    ImageKind.RLIMIT: "rlimit-{}.img",
    ImageKind.STATS: "stats-{}",
    ImageKind.IRMAP_CACHE: "irmap-cache",
    ImageKind.LAZYMIG: "lazymig-{}.img",
}
