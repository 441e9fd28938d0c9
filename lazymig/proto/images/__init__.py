"""CRIU-compatible images: the schema, the file framing and a typed façade.

* The ``*.proto`` files here keep CRIU's message names, field names and
  numbers (package ``lazymig.criu``); ``*_pb2`` modules are generated from them
  (``python -m lazymig.proto.images.regen``) and committed.
* :class:`ImageReader`/:class:`ImageWriter` handle the v1.1 framing (magics, then
  u32-length-prefixed entries); :class:`PagesWriter` streams raw pages images.
* :class:`ImagesDir` reads and writes the images lazy migration needs
  (inventory, pstree, core, mm, pagemap, pages; open files through the generic
  entry readers and writers) and answers the two lazy-pages
  questions: which ranges are lazy (:meth:`ImagesDir.lazy_ranges`) and where a
  present page sits in the pages image (:meth:`ImagesDir.find_pages`).

This layer does file I/O only inside the reader and writer classes; it knows
nothing of sockets or asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lazymig.proto.images._dir import ImagesDir, ImagesWait, Pagemap, PagemapReader, PagemapWriter
from lazymig.proto.images._framing import (
    DEFAULT_MAX_ENTRY_SIZE,
    ImageReader,
    ImageWriter,
    PagesWriter,
)
from lazymig.proto.images._magic import (
    CRTOOLS_IMAGES_V1_1,
    IMG_COMMON_MAGIC,
    IMG_SERVICE_MAGIC,
    RAW_IMAGE_MAGIC,
    ImageKind,
)
from lazymig.proto.images._pagemap import PageIndex, PagemapEntry, PageRange, lazy_ranges

if TYPE_CHECKING:
    from lazymig.proto.images import (
        core_pb2,
        core_x86_pb2,
        creds_pb2,
        eventfd_pb2,
        eventpoll_pb2,
        fdinfo_pb2,
        fh_pb2,
        fifo_pb2,
        file_lock_pb2,
        fown_pb2,
        fs_pb2,
        fsnotify_pb2,
        inventory_pb2,
        memfd_pb2,
        mm_pb2,
        pagemap_pb2,
        pipe_data_pb2,
        pipe_pb2,
        pstree_pb2,
        regfile_pb2,
        rlimit_pb2,
        rseq_pb2,
        sa_pb2,
        siginfo_pb2,
        signalfd_pb2,
        sk_opts_pb2,
        sk_packet_pb2,
        sk_unix_pb2,
        timer_pb2,
        timerfd_pb2,
        vma_pb2,
    )

    InventoryEntry = inventory_pb2.inventory_entry
    PstreeEntry = pstree_pb2.pstree_entry
    CoreEntry = core_pb2.core_entry
    TaskCoreEntry = core_pb2.task_core_entry
    TaskKobjIdsEntry = core_pb2.task_kobj_ids_entry
    ThreadCoreEntry = core_pb2.thread_core_entry
    ThreadInfoX86 = core_x86_pb2.thread_info_x86
    UserX86RegsEntry = core_x86_pb2.user_x86_regs_entry
    UserX86FpregsEntry = core_x86_pb2.user_x86_fpregs_entry
    UserX86XsaveEntry = core_x86_pb2.user_x86_xsave_entry
    MmEntry = mm_pb2.mm_entry
    VmaEntry = vma_pb2.vma_entry
    PagemapHead = pagemap_pb2.pagemap_head
    SaEntry = sa_pb2.sa_entry
    FsEntry = fs_pb2.fs_entry
    CredsEntry = creds_pb2.creds_entry
    FdinfoEntry = fdinfo_pb2.fdinfo_entry
    FileEntry = fdinfo_pb2.file_entry
    FownEntry = fown_pb2.fown_entry
    RegFileEntry = regfile_pb2.reg_file_entry
    PipeEntry = pipe_pb2.pipe_entry
    FifoEntry = fifo_pb2.fifo_entry
    FileLockEntry = file_lock_pb2.file_lock_entry
    PipeDataEntry = pipe_data_pb2.pipe_data_entry
    MemfdFileEntry = memfd_pb2.memfd_file_entry
    MemfdInodeEntry = memfd_pb2.memfd_inode_entry
    EventfdFileEntry = eventfd_pb2.eventfd_file_entry
    EventpollFileEntry = eventpoll_pb2.eventpoll_file_entry
    EventpollTfdEntry = eventpoll_pb2.eventpoll_tfd_entry
    TimerfdEntry = timerfd_pb2.timerfd_entry
    SignalfdEntry = signalfd_pb2.signalfd_entry
    InotifyFileEntry = fsnotify_pb2.inotify_file_entry
    InotifyWdEntry = fsnotify_pb2.inotify_wd_entry
    FhEntry = fh_pb2.fh_entry
    UnixSkEntry = sk_unix_pb2.unix_sk_entry
    SkOptsEntry = sk_opts_pb2.sk_opts_entry
    SkPacketEntry = sk_packet_pb2.sk_packet_entry

_ALIASES = {
    "InventoryEntry": ("inventory_pb2", "inventory_entry"),
    "PstreeEntry": ("pstree_pb2", "pstree_entry"),
    "CoreEntry": ("core_pb2", "core_entry"),
    "TaskCoreEntry": ("core_pb2", "task_core_entry"),
    "TaskKobjIdsEntry": ("core_pb2", "task_kobj_ids_entry"),
    "ThreadCoreEntry": ("core_pb2", "thread_core_entry"),
    "ThreadInfoX86": ("core_x86_pb2", "thread_info_x86"),
    "UserX86RegsEntry": ("core_x86_pb2", "user_x86_regs_entry"),
    "UserX86FpregsEntry": ("core_x86_pb2", "user_x86_fpregs_entry"),
    "UserX86XsaveEntry": ("core_x86_pb2", "user_x86_xsave_entry"),
    "MmEntry": ("mm_pb2", "mm_entry"),
    "VmaEntry": ("vma_pb2", "vma_entry"),
    "PagemapHead": ("pagemap_pb2", "pagemap_head"),
    "SaEntry": ("sa_pb2", "sa_entry"),
    "FsEntry": ("fs_pb2", "fs_entry"),
    "CredsEntry": ("creds_pb2", "creds_entry"),
    "FdinfoEntry": ("fdinfo_pb2", "fdinfo_entry"),
    "FileEntry": ("fdinfo_pb2", "file_entry"),
    "FownEntry": ("fown_pb2", "fown_entry"),
    "RegFileEntry": ("regfile_pb2", "reg_file_entry"),
    "PipeEntry": ("pipe_pb2", "pipe_entry"),
    "FifoEntry": ("fifo_pb2", "fifo_entry"),
    "FileLockEntry": ("file_lock_pb2", "file_lock_entry"),
    "PipeDataEntry": ("pipe_data_pb2", "pipe_data_entry"),
    "MemfdFileEntry": ("memfd_pb2", "memfd_file_entry"),
    "MemfdInodeEntry": ("memfd_pb2", "memfd_inode_entry"),
    "EventfdFileEntry": ("eventfd_pb2", "eventfd_file_entry"),
    "EventpollFileEntry": ("eventpoll_pb2", "eventpoll_file_entry"),
    "EventpollTfdEntry": ("eventpoll_pb2", "eventpoll_tfd_entry"),
    "TimerfdEntry": ("timerfd_pb2", "timerfd_entry"),
    "SignalfdEntry": ("signalfd_pb2", "signalfd_entry"),
    "InotifyFileEntry": ("fsnotify_pb2", "inotify_file_entry"),
    "InotifyWdEntry": ("fsnotify_pb2", "inotify_wd_entry"),
    "FhEntry": ("fh_pb2", "fh_entry"),
    "UnixSkEntry": ("sk_unix_pb2", "unix_sk_entry"),
    "SkOptsEntry": ("sk_opts_pb2", "sk_opts_entry"),
    "SkPacketEntry": ("sk_packet_pb2", "sk_packet_entry"),
}
"""CamelCase names for the generated message classes (CRIU's C names)."""

__all__ = [
    "CRTOOLS_IMAGES_V1_1",
    "DEFAULT_MAX_ENTRY_SIZE",
    "IMG_COMMON_MAGIC",
    "IMG_SERVICE_MAGIC",
    "RAW_IMAGE_MAGIC",
    "CoreEntry",
    "CredsEntry",
    "EventfdFileEntry",
    "EventpollFileEntry",
    "EventpollTfdEntry",
    "FdinfoEntry",
    "FhEntry",
    "FifoEntry",
    "FileEntry",
    "FileLockEntry",
    "FownEntry",
    "FsEntry",
    "ImageKind",
    "ImageReader",
    "ImageWriter",
    "ImagesDir",
    "ImagesWait",
    "InotifyFileEntry",
    "InotifyWdEntry",
    "InventoryEntry",
    "MemfdFileEntry",
    "MemfdInodeEntry",
    "MmEntry",
    "PageIndex",
    "PageRange",
    "Pagemap",
    "PagemapEntry",
    "PagemapHead",
    "PagemapReader",
    "PagemapWriter",
    "PagesWriter",
    "PipeDataEntry",
    "PipeEntry",
    "PstreeEntry",
    "RegFileEntry",
    "SaEntry",
    "SignalfdEntry",
    "SkOptsEntry",
    "SkPacketEntry",
    "TaskCoreEntry",
    "TaskKobjIdsEntry",
    "ThreadCoreEntry",
    "ThreadInfoX86",
    "TimerfdEntry",
    "UnixSkEntry",
    "UserX86FpregsEntry",
    "UserX86RegsEntry",
    "UserX86XsaveEntry",
    "VmaEntry",
    "core_pb2",
    "core_x86_pb2",
    "creds_pb2",
    "eventfd_pb2",
    "eventpoll_pb2",
    "fdinfo_pb2",
    "fh_pb2",
    "fifo_pb2",
    "file_lock_pb2",
    "fown_pb2",
    "fs_pb2",
    "fsnotify_pb2",
    "inventory_pb2",
    "lazy_ranges",
    "memfd_pb2",
    "mm_pb2",
    "pagemap_pb2",
    "pipe_data_pb2",
    "pipe_pb2",
    "pstree_pb2",
    "regfile_pb2",
    "rlimit_pb2",
    "rseq_pb2",
    "sa_pb2",
    "siginfo_pb2",
    "signalfd_pb2",
    "sk_opts_pb2",
    "sk_packet_pb2",
    "sk_unix_pb2",
    "timer_pb2",
    "timerfd_pb2",
    "vma_pb2",
]


def __getattr__(name: str) -> Any:
    # The generated modules and their messages are imported on first use: protobuf's
    # runtime costs a daemon 4 MiB and 15 ms of start-up, and it reads its few fields
    # without it (_wire).
    module, attr = _ALIASES.get(name, (name, None))
    path = f"{__name__}.{module}"
    try:
        value = importlib.import_module(path) if module.endswith("_pb2") else None
    except ModuleNotFoundError as exc:
        if exc.name != path:  # a generated module that is there lacks something
            raise
        value = None
    if value is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if attr is not None:
        value = getattr(value, attr)
        globals()[name] = value
    return value
