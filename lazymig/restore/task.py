"""What a restore needs of a dump, read from the images and checked first.

:func:`load_task` reads the images of a process dumped by ``lazymig dump``
(pstree, core, mm, pagemap, ``lazymig-<pid>.img``) and refuses, before any
process is created, what the restorer cannot rebuild faithfully: more than one
process, SysV shared memory, AIO rings and device mappings, a shared object
without its contents, special mappings, 32-bit tasks, another CPU's
xstate layout, a non-root process holding capabilities, mapped files that
changed since the dump, open files that are gone, changed or of a kind the
restorer does not reopen (:func:`check_files`), fds that stayed on the
source host the caller gives nothing for (:func:`plan_given_fds`), lazy pages
without a lazy-pages daemon, and dumps written by CRIU (no
``lazymig-<pid>.img``). Pure reading and checking: nothing here touches a
process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Final

from lazymig.dump.files import SAFE_CHAR_DEVICES, STDIO_FDS, DumpedFiles, read_files
from lazymig.dump.images import read_lazymig_entry
from lazymig.dump.shmem import is_shared_object, shmem_pagemap_path
from lazymig.errors import ConfigurationError, ImageError, LazyMigError
from lazymig.linux.cpuid import xstate_layout
from lazymig.proto.constants import (
    MAP_SHARED,
    PROT_WRITE,
    TASK_ALIVE,
    TASK_STOPPED,
    VmaStatus,
)
from lazymig.proto.images import (
    CoreEntry,
    FileEntry,
    ImageKind,
    ImagesDir,
    MemfdInodeEntry,
    MmEntry,
    PagemapEntry,
    PageRange,
    PstreeEntry,
    core_x86_pb2,
    fdinfo_pb2,
    lazy_ranges,
    lazymig_pb2,
)
from lazymig.restore.anon_files import ANON_TYPES, anon_refusal
from lazymig.restore.threads import DumpedThread

__all__ = ["DumpedTask", "FdInheritance", "InheritFd", "UnsupportedDumpError", "check_files",
           "load_process", "load_task", "plan_given_fds"]

_INHERIT_RE: Final = re.compile(r"fd\[(\d+)\]:(.+)")


@dataclasses.dataclass(frozen=True, slots=True)
class InheritFd:
    """``--inherit-fd fd[FD]:NAME`` (CRIU's): the caller's fd ``fd`` takes the place
    of the dumped file ``name`` (``pipe:[INO]``, ``socket:[INO]``, a path)."""

    fd: int
    name: str
    optional: bool = False
    """Found by the restorer itself (a socket taken over, restore/sockets.py): a
    process of a tree that has no such file ignores it."""

    @classmethod
    def parse(cls, text: str) -> InheritFd:
        """Parse ``fd[N]:NAME``; raises ConfigurationError."""
        m = _INHERIT_RE.fullmatch(text)
        if m is None:
            raise ConfigurationError(f"--inherit-fd {text!r}: expected fd[N]:NAME, e.g. "
                                     "fd[1]:pipe:[12345] or fd[3]:/var/log/app.log")
        return cls(int(m[1]), m[2])


@dataclasses.dataclass(frozen=True, slots=True)
class FdInheritance:
    """What the caller hands the restored process in place of dumped fds."""

    stdio: bool = False
    """fds 0, 1, 2 are the helper's (the API's ``stdio=``), whatever was dumped."""
    inherit: Sequence[InheritFd] = ()
    shell_job: bool = False
    """External fds among 0-2 are the helper's own (the restorer's unless ``stdio``)."""


def _names(files: DumpedFiles) -> dict[int, str]:
    """{file id: the name --inherit-fd matches it by}."""
    names = {}
    for f in files.files:
        if f.id in files.external:
            names[f.id] = files.external[f.id]
        elif f.HasField("pipe"):
            names[f.id] = f"pipe:[{f.pipe.pipe_id}]"
        elif f.HasField("reg"):
            names[f.id] = f.reg.name
    return names


def plan_given_fds(pid: int, files: DumpedFiles, how: FdInheritance) -> dict[int, int]:
    """{fd of the restored process: the helper's fd that takes its place}.

    Raises:
        UnsupportedDumpError: an external fd nothing takes the place of, named
            with what to pass.
        ConfigurationError: an ``--inherit-fd`` name no dumped file has.
    """
    names = _names(files)
    given: dict[int, int] = {}
    for inh in how.inherit:
        ids = [i for i, name in names.items() if name == inh.name]
        if not ids and inh.optional:
            continue
        if not ids:
            known = ", ".join(sorted(set(names.values()))) or "none"
            raise ConfigurationError(f"--inherit-fd fd[{inh.fd}]:{inh.name}: process {pid} had "
                                     f"no file {inh.name} open (its files: {known})")
        if inh.fd < STDIO_FDS and how.stdio:
            raise ConfigurationError(f"--inherit-fd fd[{inh.fd}]: fd {inh.fd} is given by "
                                     "stdio already")
        for i in ids:
            given.update((fd, inh.fd) for fd, _ in files.fds_of(i))
    if how.stdio:
        given.update((fd, fd) for fd in range(STDIO_FDS) if fd not in given)
    for file_id, name in files.external.items():
        for fd, _ in files.fds_of(file_id):
            if fd in given:
                continue
            if how.shell_job and fd < STDIO_FDS:
                given[fd] = fd
                continue
            raise UnsupportedDumpError(
                f"fd {fd} of process {pid} was {name}, which stayed on the source host: "
                f"give the restored process a fd of yours for it (--inherit-fd fd[N]:{name}, "
                "or stdio= in the API), or its restorer's own fd "
                f"{fd} (--shell-job, as CRIU)")
    return given

_UNSUPPORTED_STATUS: Final = (
    (VmaStatus.SYSVIPC, "a System V shared memory segment"),
    (VmaStatus.SOCKET, "a socket mapping"),
    (VmaStatus.AIORING, "an AIO ring"),
    (VmaStatus.UNSUPP, "a VM_IO/VM_PFNMAP mapping"),
)


class UnsupportedDumpError(LazyMigError):
    """The dump holds something the restorer cannot rebuild faithfully; the
    message names it. Raised before any process is created."""


@dataclasses.dataclass(frozen=True, slots=True)
class DumpedTask:
    """One dumped process, as the restorer uses it."""

    pid: int
    """The pid at dump time (the daemon's key for its pages)."""
    pgid: int
    sid: int
    """Process group and session at dump time (pstree)."""
    core: CoreEntry
    mm: MmEntry
    extra: lazymig_pb2.lazymig_task_entry
    pages_id: int
    entries: tuple[PagemapEntry, ...]
    lazy: tuple[PageRange, ...]
    """PE_LAZY ranges cut at VMA boundaries (what a lazy restore registers)."""
    files: DumpedFiles
    """The open files."""
    threads: tuple[DumpedThread, ...] = ()
    """Its threads but the leader (whose state is ``core``), in pstree order."""
    given_fds: dict[int, int] = dataclasses.field(default_factory=dict)
    """{fd: the helper's fd that takes its place} (:func:`plan_given_fds`)."""
    memfds: dict[int, MemfdInodeEntry] = dataclasses.field(default_factory=dict)
    """``memfd-inode.img`` by inode id (= shmid)."""
    _paths: dict[int, str] = dataclasses.field(init=False, repr=False, compare=False)

    @property
    def xstate(self) -> bytes:
        """The leader's raw xstate."""
        return next((t.xstate for t in self.extra.threads if t.tid == self.pid), b"")

    def file_path(self, file_id: int) -> str:
        """The path of lazymig file ``file_id``."""
        try:
            return self._paths[file_id]
        except KeyError:
            raise ImageError(f"lazymig-{self.pid}.img has no file with id {file_id}") from None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_paths", {f.id: f.path for f in self.extra.files})


def load_task(images: ImagesDir, *, lazy_pages: bool,
              fds: FdInheritance | None = None, pid: int | None = None) -> DumpedTask:
    """Read and check the dump in ``images``.

    Args:
        images: the images directory.
        pid: the process of a tree to load (default: the dump must hold one).
        lazy_pages: the restore hands the lazy pages to a lazy-pages daemon
            (``restore --lazy-pages``); without it every page must have data.
        fds: what the caller hands the restored process in place of dumped
            fds (default: nothing; external ones are refused then).

    Raises:
        UnsupportedDumpError: what cannot be restored, named.
        ImageError: missing or malformed images.
    """
    try:
        tree = images.pstree()
    except FileNotFoundError as exc:
        raise ImageError(f"no pstree.img in {images.path}: not a dump directory") from exc
    if pid is not None:  # one process of a tree (lazymig.restore.tree)
        tree = [e for e in tree if e.pid == pid]
    elif len(tree) != 1:
        raise UnsupportedDumpError(f"the dump holds {len(tree)} processes: restore it with "
                                   "lazymig.restore.tree.TreeRestorer")
    return load_process(images, tree[0], lazy_pages=lazy_pages, fds=fds)


def load_process(images: ImagesDir, entry: PstreeEntry, *, lazy_pages: bool,
                 fds: FdInheritance | None = None, core: CoreEntry | None = None
                 ) -> DumpedTask:
    """:func:`load_task` of the process of pstree entry ``entry``, for a caller that
    has read ``pstree.img`` already (and its ``core``: a tree's loader reads each
    process's to tell zombies apart), so that nothing is read twice."""
    pid = entry.pid
    if not entry.threads or entry.threads[0] != pid:
        raise ImageError(f"pstree.img lists threads {list(entry.threads)} for process {pid}, "
                         "not its leader first")
    if not images.image_path(ImageKind.LAZYMIG, pid).exists():
        raise UnsupportedDumpError(f"no lazymig-{pid}.img in {images.path}: the dump was not "
                                   "written by `lazymig dump` (CRIU dumps need `criu restore`)")
    extra = read_lazymig_entry(images, pid)
    if core is None:
        core = images.core(pid)
    mm = images.mm(pid)
    xstates = {t.tid: t.xstate for t in extra.threads}
    threads = tuple(DumpedThread(tid, images.core(tid), xstates.get(tid, b""))
                    for tid in entry.threads[1:])
    if any(c.thread_info.gpregs.mode != core_x86_pb2.NATIVE
           for c in (core, *(t.core for t in threads))):
        raise UnsupportedDumpError(f"process {pid} is a 32-bit (compat) task")
    if core.tc.task_state not in (TASK_ALIVE, TASK_STOPPED):
        raise UnsupportedDumpError(f"process {pid} was dumped in task state "
                                   f"{core.tc.task_state} (dead or zombie)")
    creds = core.thread_core.creds
    if core.thread_core.HasField("creds") and creds.uid and any(creds.cap_prm):
        raise UnsupportedDumpError(f"process {pid} runs as uid {creds.uid} with capabilities: "
                                   "restoring them is not implemented")
    _check_xstate(pid, extra)
    mapped = {f.id: f for f in extra.files}
    checked: set[tuple[int, bool]] = set()
    for v in mm.vmas:
        where = f"{v.start:#x}-{v.end:#x}"
        for bit, what in _UNSUPPORTED_STATUS:
            if v.status & bit:
                raise UnsupportedDumpError(f"process {pid} has {what} at {where}")
        if is_shared_object(v.status):
            if not shmem_pagemap_path(images, v.shmid).exists():
                raise ImageError(f"the shared memory at {where} of process {pid} has no "
                                 f"shmem-pagemap-{v.shmid}.img in {images.path}")
        elif v.flags & MAP_SHARED and not v.status & VmaStatus.FILE_SHARED:
            raise UnsupportedDumpError(f"process {pid} has a shared mapping at {where}")
        elif v.status & (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED):
            # A file mapped shared and writable may have changed: others write it too.
            changed_ok = bool(v.status & VmaStatus.FILE_SHARED
                              and (v.prot & PROT_WRITE or v.fdflags))
            if (v.shmid, changed_ok) not in checked:  # once per file, not per VMA
                _check_file(pid, mapped.get(v.shmid), v.shmid, where, changed_ok=changed_ok,
                            dumped=lambda inode: shmem_pagemap_path(images, inode).exists())
                checked.add((v.shmid, changed_ok))
    files = read_files(images, core.ids.files_id if core.HasField("ids") else 1)
    files.external = {e.file_id: e.name for e in extra.external_files}
    files.locks = [lock for lock in files.locks if lock.pid == pid]  # a tree's image: its own
    given = plan_given_fds(pid, files, fds or FdInheritance())
    memfds: dict[int, MemfdInodeEntry] = {}
    if images.image_path(ImageKind.MEMFD_INODE).exists():
        # Those of this process (in a tree the image holds every process's).
        used = {v.shmid for v in mm.vmas if v.status & VmaStatus.MEMFD} | {
            f.memfd.inode_id for f in files.files if f.HasField("memfd") and files.fds_of(f.id)}
        memfds = {e.inode_id: e for e in images.read_entries(ImageKind.MEMFD_INODE,
                                                             MemfdInodeEntry)
                  if e.inode_id in used}
    # Missing tmpfs files whose contents were dumped are made again (restore/shmem.py).
    again = {f.path for f in extra.files if f.HasField("inode") and not f.deleted
             and shmem_pagemap_path(images, f.inode).exists()}
    check_files(pid, files, given, memfds, again)
    for inode in memfds:
        if not shmem_pagemap_path(images, inode).exists():
            raise ImageError(f"the memfd {memfds[inode].name!r} of process {pid} has no "
                             f"shmem-pagemap-{inode}.img in {images.path}")
    pagemap = images.pagemap(pid)
    entries = tuple(pagemap.entries)
    if not lazy_pages:
        missing = next((e for e in entries if e.is_lazy and not e.has_data), None)
        if missing is not None:
            raise UnsupportedDumpError(
                f"pages at {missing.vaddr:#x} were left on the source's page server (a "
                "`dump --lazy-pages` dump): restore it with --lazy-pages and a lazy-pages daemon")
    lazy: tuple[PageRange, ...] = ()
    if lazy_pages:
        # From the VMAs parsed above: ImagesDir.lazy_ranges reads them again without
        # protobuf (for the daemon), in Python: 25 ms for 5,000 VMAs.
        try:
            lazy = tuple(lazy_ranges(entries, [(v.start, v.end) for v in mm.vmas]))
        except ConfigurationError as exc:
            raise ImageError(str(exc), path=images.image_path(ImageKind.MM, pid)) from exc
    return DumpedTask(pid=pid, pgid=entry.pgid, sid=entry.sid, core=core, mm=mm,
                      extra=extra, pages_id=pagemap.pages_id, entries=entries, lazy=lazy,
                      files=files, threads=threads, given_fds=given, memfds=memfds)


def _check_xstate(pid: int, extra: lazymig_pb2.lazymig_task_entry) -> None:
    dumped = {c.feature: (c.offset, c.size) for c in extra.xstate_layout}
    here = xstate_layout()
    for feature, layout in dumped.items():
        if here.get(feature) != layout:
            raise UnsupportedDumpError(
                f"process {pid} was dumped on a CPU whose xstate component {feature} is at "
                f"{layout}, here it is at {here.get(feature)}: FPU state cannot be restored")


def _check_file(pid: int, entry: lazymig_pb2.lazymig_file_entry | None, file_id: int,
                where: str, *, changed_ok: bool = False,
                dumped: Callable[[int], bool] = lambda inode: False) -> None:
    """Refuse a mapped file that is not here as it was; but one missing whose
    contents were dumped (``dumped(inode)``: a tmpfs file) is made again."""
    if entry is None:
        raise ImageError(f"the file mapping at {where} of process {pid} names file id "
                         f"{file_id}, which lazymig-{pid}.img does not hold")
    if entry.deleted:
        raise UnsupportedDumpError(f"process {pid} maps the deleted file {entry.path} at {where}")
    try:
        st = Path(entry.path).stat()
    except FileNotFoundError:
        if entry.HasField("inode") and dumped(entry.inode):
            return  # recreate_tmpfs_files makes it again
        raise UnsupportedDumpError(f"process {pid} maps {entry.path} at {where}, which does "
                                   "not exist here") from None
    except OSError as exc:
        raise UnsupportedDumpError(f"process {pid} maps {entry.path} at {where}, which cannot "
                                   f"be opened here: {exc.strerror}") from exc
    if entry.HasField("size") and not changed_ok \
            and (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
        raise UnsupportedDumpError(f"{entry.path} (mapped at {where} by process {pid}) changed "
                                   "since the dump (size or mtime differ)")


def check_files(pid: int, files: DumpedFiles, given: Sequence[int] | dict[int, int] = (),
                memfds: Collection[int] = (), again: Collection[str] = ()) -> None:
    """Refuse the open files :func:`~lazymig.restore.files.restore_files` could not
    reopen as they were (but those whose every fd is in ``given``, and those of
    ``again`` missing here: the restore makes them again, see
    :func:`~lazymig.restore.shmem.recreate_tmpfs_files`).

    Raises:
        UnsupportedDumpError: a file that is gone, of another kind, or whose size
            changed (as CRIU; but a file open write-only for append, like a log
            others write to too, may have grown).
        ImageError: an fd names a file the images do not hold.
    """
    ids = {f.id for f in files.files}
    for e in files.fds:
        if e.id not in ids:
            raise ImageError(f"fd {e.fd} of process {pid} names file id {e.id}, which "
                             "files.img does not hold")
    for f in files.files:
        numbers = [fd for fd, _ in files.fds_of(f.id)]
        if all(fd in given for fd in numbers) or f.id in files.external:
            continue  # the caller's fds take its place (external ones: planned already)
        fds = ", ".join(str(fd) for fd in numbers)
        if f.type == fdinfo_pb2.PIPE and f.HasField("pipe"):
            continue
        if f.type == fdinfo_pb2.FIFO and f.HasField("fifo"):
            _check_fifo(pid, fds, files, f)
            continue
        if f.type in ANON_TYPES:
            if (why := anon_refusal(files, f)) is not None:
                raise UnsupportedDumpError(f"fd {fds} of process {pid}: {why}")
            continue
        if f.type == fdinfo_pb2.MEMFD and f.HasField("memfd"):
            if f.memfd.inode_id not in memfds:
                raise ImageError(f"fd {fds} of process {pid} is a memfd (inode "
                                 f"{f.memfd.inode_id}) that memfd-inode.img does not hold")
            continue
        if f.type != fdinfo_pb2.REG or not f.HasField("reg"):
            raise UnsupportedDumpError(f"fd {fds} of process {pid} is of kind "
                                       f"{fdinfo_pb2.fd_types.Name(f.type)}, which lazymig "
                                       "does not restore")
        if f.reg.name not in again or Path(f.reg.name).exists():
            _check_reg(pid, fds, f)


def _check_fifo(pid: int, fds: str, files: DumpedFiles, f: FileEntry) -> None:
    regf = next((r for r in files.files if r.id == f.fifo.regf_id and r.HasField("reg")), None)
    if regf is None:
        raise ImageError(f"fd {fds} of process {pid} is a named FIFO whose path entry (file "
                         f"id {f.fifo.regf_id}) files.img does not hold")
    try:
        st = Path(regf.reg.name).stat()
    except OSError as exc:
        raise UnsupportedDumpError(f"fd {fds} of process {pid} had the named FIFO "
                                   f"{regf.reg.name} open, which cannot be opened here: "
                                   f"{exc.strerror} (make it with mkfifo)") from exc
    if not stat.S_ISFIFO(st.st_mode):
        raise UnsupportedDumpError(f"fd {fds} of process {pid} had the named FIFO "
                                   f"{regf.reg.name} open; here it is another kind of file")


def _check_reg(pid: int, fds: str, f: FileEntry) -> None:
    name = f.reg.name
    try:
        st = Path(name).stat()
    except OSError as exc:
        raise UnsupportedDumpError(f"fd {fds} of process {pid} had {name} open, which cannot "
                                   f"be opened here: {exc.strerror}") from exc
    if stat.S_ISCHR(f.reg.mode):
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if not stat.S_ISCHR(st.st_mode) or SAFE_CHAR_DEVICES.get(dev) != name:
            raise UnsupportedDumpError(f"fd {fds} of process {pid} had the device {name} open; "
                                       f"here {name} is another file")
    elif stat.S_IFMT(st.st_mode) != stat.S_IFMT(f.reg.mode):
        raise UnsupportedDumpError(f"fd {fds} of process {pid} had {name} open; here it is "
                                   "another kind of file")
    elif stat.S_ISREG(st.st_mode) and f.reg.HasField("size") and st.st_size != f.reg.size \
            and f.reg.flags & (os.O_ACCMODE | os.O_APPEND) != os.O_WRONLY | os.O_APPEND:
        # As CRIU, but a file open write-only for append (a log others may write
        # to as well) may have grown: nothing the process does depends on its size.
        raise UnsupportedDumpError(f"{name} (open on fd {fds} of process {pid}) changed since "
                                   f"the dump: {st.st_size} bytes, {f.reg.size} then")
