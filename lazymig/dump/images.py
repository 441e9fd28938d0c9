"""Writing the images of a frozen process, as ``criu dump`` lays them out.

Writing only: the state comes read already (:class:`~lazymig.dump.state.ProcessState`,
read in one pass when the process was frozen). :func:`write_images` writes, into
a CRIU images directory:

* ``inventory.img`` (images v1.1, ``fdinfo_per_id``, the host's LSM);
* ``pstree.img`` (one entry: the dumped process is the root of its tree, with
  its threads);
* ``core-<tid>.img`` per thread: registers (as CRIU saves them, with the
  syscall-restart adjustment), fs_base/gs_base, the FPU state decoded from the
  raw xstate, blocked signals, the thread's queued signals (``signals_p``),
  the alternate signal stack, robust list, clear-tid address, rseq, creds,
  scheduling; the leader's also holds what is the process's (``tc``: signal
  dispositions, the process-wide queued signals ``signals_s``, rlimits,
  itimers...);
* ``mm-<pid>.img``: the mm fields, auxv and every VMA;
* ``pagemap-<pid>.img`` and ``pages-1.img``: with ``lazy_pages`` (``criu dump
  --lazy-pages``) the lazy-capable pages are PE_LAZY entries without data (they
  stay in the page pipes for the page server) and the others PE_PRESENT with
  their data in ``pages-1.img``; without it (a plain dump) every page has its
  data in ``pages-1.img``, lazy-capable ones flagged PE_LAZY|PE_PRESENT as
  CRIU does (so ``lazymig page-server --lazy-pages`` can serve them later);
* ``fdinfo-1.img``, ``files.img``, ``pipes-data.img``: the open files
  (:mod:`lazymig.dump.files`);
* ``shmem-pagemap-<shmid>.img`` and ``pages-<n>.img`` (n from 2) per shared
  anonymous or memfd object (:mod:`lazymig.dump.shmem`);
* ``lazymig-<pid>.img``: lazymig's own image (``lazymig_task_entry``) with what
  CRIU's schema has no place for: the raw xstate and its layout, rseq flags,
  the files behind the executable and the file mappings (``exe_file_id`` and
  the VMAs' ``shmid`` point into it), cwd, root, umask.

Every image but lazymig's own decodes with ``crit`` (CRIU 3.17 and later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from lazymig._version import __version__
from lazymig.dump.files import DumpedFiles, write_files
from lazymig.dump.shmem import is_shared_object, write_shmem
from lazymig.errors import ImageError
from lazymig.linux.cpuid import xstate_layout
from lazymig.linux.procfs import link_path, map_file_path, uptime
from lazymig.proto.constants import PAGE_SHIFT, PE, TASK_ALIVE, TASK_STOPPED
from lazymig.proto.images import (
    CoreEntry,
    CredsEntry,
    ImageKind,
    ImagesDir,
    InventoryEntry,
    MmEntry,
    PagemapEntry,
    PstreeEntry,
    SaEntry,
    TaskCoreEntry,
    TaskKobjIdsEntry,
    ThreadCoreEntry,
    ThreadInfoX86,
    UserX86FpregsEntry,
    UserX86RegsEntry,
    UserX86XsaveEntry,
    core_pb2,
    core_x86_pb2,
    inventory_pb2,
    lazymig_pb2,
    rlimit_pb2,
    rseq_pb2,
    siginfo_pb2,
    timer_pb2,
)

if TYPE_CHECKING:  # the restore side reads lazymig-N.img here: no dump machinery for it
    from lazymig.dump.pagepipe import PagePipes
    from lazymig.dump.scan import MemoryScan, PageRun, Vma
    from lazymig.dump.shmem import ShmemDump
    from lazymig.dump.state import ProcessState, ThreadState

__all__ = [
    "PAGES_ID",
    "TASK_ALIVE",
    "TASK_STOPPED",
    "DumpImages",
    "decode_fpregs",
    "pagemap_entries",
    "read_lazymig_entry",
    "write_images",
]

PAGES_ID: Final = 1
"""The pages image id lazymig's dumps use (``pages-1.img``), like CRIU's first one."""

_USER32_CS: Final = 0x23  # the code segment of 32-bit (compat) user mode

_SECCOMP_MODES: Final = {0: core_pb2.disabled, 1: core_pb2.strict, 2: core_pb2.filter}


# -- the FPU state: raw xstate to CRIU's user_x86_fpregs_entry -------------------------

# The legacy FXSAVE region (struct i387_fxsave_struct) and the XSAVE header.
_FXSAVE_HEAD: Final = struct.Struct("<HHHHQQII")  # cwd swd twd fop rip rdp mxcsr mxcsr_mask
# In the ptrace regset the kernel puts XCR0 in the first software-reserved
# word (asm/user.h USER_XSTATE_XCR0_WORD), where a signal frame has its
# fx_sw_bytes instead.
_XCR0_OFFSET: Final = 464
_XSAVE_HDR_OFFSET: Final = 512

# CRIU's user_x86_xsave_entry fields: (state component, field, element format).
_XSAVE_FIELDS: Final = (
    (2, "ymmh_space", "I"),
    (3, "bndreg_state", "Q"),
    (4, "bndcsr_state", "Q"),
    (5, "opmask_reg", "Q"),
    (6, "zmm_upper", "Q"),
    (7, "hi16_zmm", "Q"),
    (9, "pkru", "I"),
)


def _xfeatures(xstate: bytes) -> int | None:
    """XCR0 as the kernel reports it in an NT_X86_XSTATE regset (None: not an XSAVE area)."""
    if len(xstate) < _XSAVE_HDR_OFFSET + 64:
        return None
    (xcr0,) = struct.unpack_from("<Q", xstate, _XCR0_OFFSET)
    return int(xcr0) or None


def decode_fpregs(xstate: bytes,
                  layout: dict[int, tuple[int, int]] | None = None) -> UserX86FpregsEntry:
    """CRIU's ``user_x86_fpregs_entry`` from a raw NT_X86_XSTATE area.

    The FXSAVE fields always; the XSAVE part (``xstate_bv`` and the AVX,
    MPX, AVX-512 and PKRU components CRIU's schema names) when the area has
    an XSAVE header, for the components the CPU enables (XCR0) and whose
    offset ``layout`` (default: :func:`~lazymig.linux.cpuid.xstate_layout`) knows.
    """
    legacy = xstate[:512].ljust(512, b"\0")
    cwd, swd, twd, fop, rip, rdp, mxcsr, mxcsr_mask = _FXSAVE_HEAD.unpack_from(legacy)
    fp = UserX86FpregsEntry(
        cwd=cwd, swd=swd, twd=twd, fop=fop, rip=rip, rdp=rdp, mxcsr=mxcsr,
        mxcsr_mask=mxcsr_mask, st_space=struct.unpack_from("<32I", legacy, 32),
        xmm_space=struct.unpack_from("<64I", legacy, 160))
    xfeatures = _xfeatures(xstate)
    if xfeatures is None:
        return fp
    layout = xstate_layout() if layout is None else layout
    xsave = UserX86XsaveEntry(xstate_bv=struct.unpack_from("<Q", xstate, _XSAVE_HDR_OFFSET)[0])
    for feature, name, fmt in _XSAVE_FIELDS:
        where = layout.get(feature)
        if where is None or not xfeatures >> feature & 1:
            continue
        offset, size = where
        if offset + size <= len(xstate):
            count = size // struct.calcsize(fmt)
            getattr(xsave, name).extend(struct.unpack_from(f"<{count}{fmt}", xstate, offset))
    fp.xsave.CopyFrom(xsave)
    return fp


# -- building the entries ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _File:
    id: int
    path: str
    deleted: bool
    stat: os.stat_result | None


def _split_deleted(path: str) -> tuple[str, bool]:
    suffix = " (deleted)"
    return (path[: -len(suffix)], True) if path.endswith(suffix) else (path, False)


def _stat(path: str) -> os.stat_result | None:
    try:
        return Path(path).stat()
    except OSError:
        return None


def _file_table(pid: int, exe: str, vmas: Sequence[Vma]) -> tuple[list[_File], int, dict[int, int]]:
    """The files behind the executable and the file mappings, one id per file.

    Returns (files, exe id, {VMA start: file id}). Files are told apart by
    (st_dev, st_ino) of the mapped object (/proc/PID/map_files, which also
    reaches deleted files), falling back to the maps line's path.
    """
    files: list[_File] = []
    ids: dict[object, int] = {}

    def add(path: str, st: os.stat_result | None, fallback: object) -> int:
        key: object = (st.st_dev, st.st_ino) if st is not None else fallback
        if key not in ids:
            name, deleted = _split_deleted(path)
            ids[key] = len(files) + 1
            files.append(_File(len(files) + 1, name, deleted, st))
        return ids[key]

    exe_id = add(exe, _stat(link_path(pid, "exe")), ("exe", exe))
    by_vma = {}
    # A file mapped many times (page by page) is the same file for each VMA whose
    # maps line names the same device, inode and path: stat it once.
    seen: dict[tuple[tuple[int, int], int, str], int] = {}
    for v in vmas:
        if v.is_file:
            line = (v.dev, v.inode, v.path)
            file_id = seen.get(line)
            if file_id is None:
                st = _stat(map_file_path(pid, v.start, v.end))
                file_id = seen[line] = add(v.path, st, line)
            by_vma[v.start] = file_id
    return files, exe_id, by_vma


def _lsmtype() -> int:
    """The host's LSM as CRIU's kerndat sees it."""
    if Path("/sys/kernel/security/apparmor").exists():
        return inventory_pb2.APPARMOR
    if Path("/sys/fs/selinux/enforce").exists():
        return inventory_pb2.SELINUX
    return inventory_pb2.NO_LSM


def _uptime_us() -> int:
    try:
        seconds = uptime()
    except OSError:
        seconds = 0.0
    return int(seconds * 1_000_000)


def _ids(index: int = 1) -> TaskKobjIdsEntry:
    # Every kernel object of a process is its own; CRIU numbers them from 1, the
    # processes of a tree in pstree order (fdinfo-<files_id>.img is each one's).
    return TaskKobjIdsEntry(vm_id=index, files_id=index, fs_id=index, sighand_id=index)


def _inventory() -> InventoryEntry:
    return InventoryEntry(img_version=2, fdinfo_per_id=True, ns_per_id=True, root_ids=_ids(),
                          lsmtype=_lsmtype(), dump_uptime=_uptime_us())


def _pstree(state: ProcessState) -> PstreeEntry:
    # The dumped process is the root of the dumped tree: CRIU writes ppid 0 for it.
    return PstreeEntry(pid=state.pid, ppid=0, pgid=state.pgid, sid=state.sid,
                       threads=[t.tid for t in state.threads])


def _gpregs(thread: ThreadState) -> UserX86RegsEntry:
    r = thread.regs.with_syscall_restart()
    return UserX86RegsEntry(
        r15=r.r15, r14=r.r14, r13=r.r13, r12=r.r12, bp=r.rbp, bx=r.rbx, r11=r.r11, r10=r.r10,
        r9=r.r9, r8=r.r8, ax=r.rax, cx=r.rcx, dx=r.rdx, si=r.rsi, di=r.rdi, orig_ax=r.orig_rax,
        ip=r.rip, cs=r.cs, flags=r.eflags, sp=r.rsp, ss=r.ss, fs_base=r.fs_base,
        gs_base=r.gs_base, ds=r.ds, es=r.es, fs=r.fs, gs=r.gs,
        mode=core_x86_pb2.COMPAT if r.cs == _USER32_CS else core_x86_pb2.NATIVE)


def _signal_queue(signals: Sequence[bytes]) -> siginfo_pb2.signal_queue_entry:
    return siginfo_pb2.signal_queue_entry(
        signals=[siginfo_pb2.siginfo_entry(siginfo=raw) for raw in signals])


def _core(state: ProcessState, thread: ThreadState, index: int = 1) -> CoreEntry:
    info, tinfo = state, thread
    thread_core = ThreadCoreEntry(
        futex_rla=tinfo.robust_list[0], futex_rla_len=tinfo.robust_list[1],
        sched_nice=tinfo.sched[0], sched_policy=tinfo.sched[1], sched_prio=tinfo.sched[2],
        blk_sigset=thread.sigmask, pdeath_sig=tinfo.pdeath_sig,
        seccomp_mode=_SECCOMP_MODES.get(tinfo.seccomp_mode, core_pb2.disabled),
        comm=tinfo.comm)
    if tinfo.creds is not None:
        c = tinfo.creds
        thread_core.creds.CopyFrom(CredsEntry(
            uid=c.uids[0], euid=c.uids[1], suid=c.uids[2], fsuid=c.uids[3],
            gid=c.gids[0], egid=c.gids[1], sgid=c.gids[2], fsgid=c.gids[3],
            cap_inh=_cap_words(c.cap_inh), cap_prm=_cap_words(c.cap_prm),
            cap_eff=_cap_words(c.cap_eff), cap_bnd=_cap_words(c.cap_bnd), secbits=c.secbits,
            groups=list(c.groups)))
    if tinfo.pending_signals:
        thread_core.signals_p.CopyFrom(_signal_queue(tinfo.pending_signals))
    if tinfo.sigaltstack is not None:
        sp, size, flags = tinfo.sigaltstack
        thread_core.sas.ss_sp, thread_core.sas.ss_size, thread_core.sas.ss_flags = sp, size, flags
    if thread.rseq is not None and thread.rseq.rseq_abi_pointer:
        thread_core.rseq_entry.CopyFrom(rseq_pb2.rseq_entry(
            rseq_abi_pointer=thread.rseq.rseq_abi_pointer,
            rseq_abi_size=thread.rseq.rseq_abi_size, signature=thread.rseq.signature,
            rseq_cs_pointer=tinfo.rseq_cs))
    core = CoreEntry(
        mtype=CoreEntry.X86_64,
        thread_info=ThreadInfoX86(clear_tid_addr=tinfo.clear_tid_addr, gpregs=_gpregs(thread),
                                  fpregs=decode_fpregs(thread.xstate)),
        thread_core=thread_core)
    if thread.tid == state.pid:  # the task-wide part lives in the leader's core
        real, virt, prof = (timer_pb2.itimer_entry(isec=a, iusec=b, vsec=c_, vusec=d)
                            for a, b, c_, d in info.itimers)
        tc = TaskCoreEntry(
            task_state=TASK_STOPPED if state.was_stopped else TASK_ALIVE, exit_code=0,
            personality=info.personality, flags=info.task_flags, blk_sigset=thread.sigmask,
            comm=state.comm, timers=timer_pb2.task_timers_entry(real=real, virt=virt, prof=prof),
            rlimits=core_pb2.task_rlimits_entry(rlimits=[
                rlimit_pb2.rlimit_entry(cur=cur, max=mx) for cur, mx in info.rlimits]),
            sigactions=[SaEntry(sigaction=a.handler, flags=a.flags, restorer=a.restorer,
                                mask=a.mask) for a in state.sigactions],
            child_subreaper=info.child_subreaper)
        if state.shared_signals:
            tc.signals_s.CopyFrom(_signal_queue(state.shared_signals))
        if info.loginuid is not None:
            tc.loginuid = info.loginuid & 0xFFFF_FFFF
        if info.oom_score_adj is not None:
            tc.oom_score_adj = info.oom_score_adj
        core.tc.CopyFrom(tc)
        core.ids.CopyFrom(_ids(index))
    return core


def _cap_words(caps: int) -> list[int]:
    return [caps & 0xFFFF_FFFF, caps >> 32 & 0xFFFF_FFFF]


def _mm(state: ProcessState, vmas: Sequence[Vma], exe_id: int,
        file_ids: dict[int, int]) -> MmEntry:
    m, info = state.mm, state
    mm = MmEntry(
        mm_start_code=m.start_code, mm_end_code=m.end_code, mm_start_data=m.start_data,
        mm_end_data=m.end_data, mm_start_stack=m.start_stack, mm_start_brk=m.start_brk,
        mm_brk=m.brk, mm_arg_start=m.arg_start, mm_arg_end=m.arg_end,
        mm_env_start=m.env_start, mm_env_end=m.env_end, exe_file_id=exe_id,
        mm_saved_auxv=list(m.auxv))
    if info.dumpable is not None:
        mm.dumpable = info.dumpable
    if info.thp_disabled is not None:
        mm.thp_disabled = info.thp_disabled
    add = mm.vmas.add  # made in place: append() would copy each entry (5,000 VMAs)
    for v in vmas:
        shmid = v.inode if is_shared_object(v.status) else file_ids.get(v.start, 0)
        if v.is_file:
            add(start=v.start, end=v.end, pgoff=v.pgoff, shmid=shmid, prot=v.prot,
                flags=v.flags, status=v.status & 0xFFFF_FFFF, fd=-1, madv=v.madv,
                fdflags=v.fdflags)
        else:
            add(start=v.start, end=v.end, pgoff=v.pgoff, shmid=shmid, prot=v.prot,
                flags=v.flags, status=v.status & 0xFFFF_FFFF, fd=-1, madv=v.madv)
    return mm


def _lazymig_entry(state: ProcessState, files: Iterable[_File],
                   lazy_pages: bool) -> lazymig_pb2.lazymig_task_entry:
    info = state
    entry = lazymig_pb2.lazymig_task_entry(pid=state.pid, version=__version__,
                                           job_stopped=state.was_stopped, lazy_pages=lazy_pages)
    for t in state.threads:
        thread = entry.threads.add(tid=t.tid, xstate=t.xstate)
        if t.rseq is not None:
            thread.rseq_flags = t.rseq.flags
    for f in files:
        fe = entry.files.add(id=f.id, path=f.path)
        if f.deleted:
            fe.deleted = True
        if f.stat is not None:
            fe.dev, fe.inode = f.stat.st_dev, f.stat.st_ino
            fe.size, fe.mtime_ns = f.stat.st_size, f.stat.st_mtime_ns
    xfeatures = _xfeatures(state.threads[0].xstate) if state.threads else None
    if xfeatures is not None:
        entry.xfeatures = xfeatures
    for feature, (offset, size) in sorted(xstate_layout().items()):
        entry.xstate_layout.add(feature=feature, offset=offset, size=size)
    if info.cwd is not None:
        entry.cwd = info.cwd
    if info.root is not None:
        entry.root = info.root
    if info.umask is not None:
        entry.umask = info.umask
    return entry


def read_lazymig_entry(images: ImagesDir, pid: int) -> lazymig_pb2.lazymig_task_entry:
    """Read ``lazymig-<pid>.img``."""
    return images.read_entry(ImageKind.LAZYMIG, lazymig_pb2.lazymig_task_entry, pid)


# -- pagemap -------------------------------------------------------------------------


def pagemap_entries(present: Sequence[PageRun], lazy: Sequence[PageRun]) -> list[PagemapEntry]:
    """The pagemap of ``criu dump --lazy-pages``: PE_PRESENT entries for ``present``
    (whose data is in the pages image in this order) and PE_LAZY ones for ``lazy``.

    Raises:
        ImageError: ``present`` is not in address order (its bytes would not
            match the pagemap order CRIU reads them in), or runs overlap.
    """
    for a, b in itertools.pairwise(present):
        if b.vaddr < a.end:
            raise ImageError(f"non-lazy pages at {b.vaddr:#x} were written after those at "
                             f"{a.vaddr:#x}: the pages image would not be in address order")
    entries = sorted([PagemapEntry(r.vaddr, r.nr_pages, PE.PRESENT) for r in present]
                     + [PagemapEntry(r.vaddr, r.nr_pages, PE.LAZY) for r in lazy],
                     key=lambda e: e.vaddr)
    for prev, cur in itertools.pairwise(entries):
        if cur.vaddr < prev.end:
            raise ImageError(f"pagemap entries overlap at {cur.vaddr:#x}")
    return entries


def _plain_entries(runs: Sequence[PageRun], written: Sequence[PageRun]) -> list[PagemapEntry]:
    """The pagemap of a plain dump: every run has data; lazy-capable ones are
    PE_LAZY|PE_PRESENT. ``written`` (what reached the pages image, in byte
    order) must be ``runs`` in address order."""
    if _pages_of(written) != _pages_of(sorted(runs, key=lambda r: r.vaddr)):
        raise ImageError("the pages image does not hold the dumped pages in address order")
    return [PagemapEntry(r.vaddr, r.nr_pages, PE.LAZY | PE.PRESENT if r.lazy else PE.PRESENT)
            for r in sorted(runs, key=lambda r: r.vaddr)]


def _lazy_entries(runs: Sequence[PageRun], held: Sequence[PageRun]) -> list[PageRun]:
    """The lazy runs of the scan, one pagemap entry each (not one per page pipe:
    a 4 GiB region is then one entry, not 4096 that every reader parses), after
    checking that the page pipes hold (or will hold) exactly those pages."""
    lazy = sorted((r for r in runs if r.lazy), key=lambda r: r.vaddr)
    if _pages_of(lazy) != _pages_of(held):
        raise ImageError("the page pipes do not hold the lazy pages of the scan")
    return lazy


def _pages_of(runs: Iterable[PageRun]) -> list[tuple[int, int]]:
    """Runs as merged (vaddr, nr_pages) spans, to compare orders."""
    out: list[tuple[int, int]] = []
    start = end = -1  # the span being joined, in bytes
    for r in runs:
        if r.vaddr != end:
            if start >= 0:
                out.append((start, (end - start) >> PAGE_SHIFT))
            start = r.vaddr
        end = r.vaddr + (r.nr_pages << PAGE_SHIFT)
    if start >= 0:
        out.append((start, (end - start) >> PAGE_SHIFT))
    return out


# -- writing ----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class DumpImages:
    """The images one dump wrote; :meth:`remove` deletes them (a failed dump)."""

    images: ImagesDir
    paths: list[Path] = dataclasses.field(default_factory=list)
    nonlazy_pages: int = 0
    """Pages whose data is in ``pages-1.img``."""
    lazy_pages: int = 0
    """Pages left to the page server (PE_LAZY without data)."""

    def remove(self) -> None:
        """Delete every image written (idempotent)."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.paths.clear()

    def add(self, other: DumpImages) -> None:
        """Count ``other``'s images and pages in these (a tree's processes into its dump)."""
        self.paths += other.paths
        self.nonlazy_pages += other.nonlazy_pages
        self.lazy_pages += other.lazy_pages


def write_images(images: ImagesDir, state: ProcessState, scan: MemoryScan,
                 pipes: PagePipes, *, lazy_pages: bool,
                 open_files: DumpedFiles | None = None, index: int = 1,
                 in_tree: bool = False, shmem: ShmemDump | None = None,
                 in_parent: Sequence[PageRun] = ()) -> DumpImages:
    """Write every image of the frozen process; drains the non-lazy page pipes.

    ``index`` numbers the process in its dumped tree (1 for the root): its
    ``pages-<index>.img``, kernel object ids and ``fdinfo-<index>.img``. With
    ``in_tree`` only the process's own images are written; the tree's dump
    (:mod:`lazymig.dump.tree`) writes ``files.img``, ``pstree.img``, the
    inventory and (``shmem``, which writes each shared object once)
    ``memfd-inode.img`` once for all its processes. ``in_parent``: pages left
    out of ``scan`` because the parent images hold them (pre-copy), PE_PARENT
    entries.

    With ``lazy_pages`` the lazy pipes are left untouched (the page server's);
    without it, ``pipes`` must hold every page of ``scan`` as non-lazy (collect
    them so) and all go into ``pages-1.img``. ``open_files`` are the open
    files (:func:`~lazymig.dump.files.collect_files`; None: none). Blocking:
    run it off the event loop. On failure the images written so far are removed and the error
    propagates. ``inventory.img`` is written last: its presence marks a
    complete dump.
    """
    out = DumpImages(images)
    try:
        with images.open_pages_writer(index) as pages:
            written = pipes.drain_nonlazy(pages)
        out.paths.append(pages.path)
        if lazy_pages:
            lazy = _lazy_entries(scan.runs, pipes.lazy_runs())
            entries = pagemap_entries(written, lazy)
            out.lazy_pages = sum(r.nr_pages for r in lazy)
        else:
            entries = _plain_entries(scan.runs, written)
        out.nonlazy_pages = sum(r.nr_pages for r in written)
        if in_parent:
            entries = sorted(entries + [PagemapEntry(r.vaddr, r.nr_pages, PE.PARENT)
                                        for r in in_parent], key=lambda e: e.vaddr)
        out.paths.append(images.write_pagemap(state.pid, index, entries))
        files, exe_id, file_ids = _file_table(state.pid, state.mm.exe, scan.vmas)
        for thread in state.threads:
            out.paths.append(images.write_core(thread.tid, _core(state, thread, index)))
        out.paths.append(images.write_mm(state.pid, _mm(state, scan.vmas, exe_id, file_ids)))
        own_files = open_files or DumpedFiles()
        if in_tree:
            out.paths.append(images.write_entries(ImageKind.FDINFO, own_files.fds, index))
        else:
            out.paths += write_files(images, own_files)
        if shmem is not None:  # a tree's: each process's objects get pages ids of their own
            out.paths += shmem.write(images, state.pid, scan.vmas, own_files.memfds,
                                     (index << 16) + 1)
        else:
            out.paths += write_shmem(images, state.pid, scan.vmas, own_files.memfds,
                                     PAGES_ID + 1)
        if not in_tree:
            out.paths.append(images.write_pstree([_pstree(state)]))
        extra = _lazymig_entry(state, files, lazy_pages)
        for file_id, name in sorted(own_files.external.items()):
            extra.external_files.add(file_id=file_id, name=name)
        out.paths.append(images.write_entries(ImageKind.LAZYMIG, [extra], state.pid))
        if not in_tree:
            out.paths.append(images.write_inventory(_inventory()))
    except BaseException:
        out.remove()
        raise
    return out
