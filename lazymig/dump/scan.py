"""Scanning a frozen process's memory: VMAs from /proc/PID/smaps, page presence
from /proc/PID/pagemap, and the list of page runs to dump, lazy or not.

The decisions follow CRIU (criu/proc_parse.c ``handle_vma``/``parse_vmflags``,
criu/mem.c ``should_dump_page``/``generate_iovs``/``is_stack``,
criu/include/vma.h ``vma_entry_can_be_lazy``):

* only private VMAs are dumped here: ``REGULAR`` and (``ANON_PRIVATE`` or
  ``FILE_PRIVATE``), below the task size (shared anonymous memory and memfds
  are dumped whole, once per object: :mod:`lazymig.dump.shmem`); the vsyscall page never, the vvar
  area never (the kernel provides it), the vDSO always (every page);
* a page is dumped when it is present or swapped, except a page of a private
  file mapping that is still the file's page (pagemap bit 61, "file-page or
  shared-anon": the restorer maps the file) and, when we can see PFNs (root),
  the shared zero page;
* a dumped page is lazy when its VMA can be lazy (private anonymous, not locked,
  not hugetlb, not vdso/vvar/vsyscall) and it is not the page holding a
  thread's stack pointer.

Everything but :func:`read_smaps`, :func:`read_pagemap`, :func:`zero_page_pfn`
and :func:`scan_process` is a pure function of its inputs.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import errno
import functools
import os
import re
from collections.abc import Iterable, Sequence
from typing import Final

from lazymig.errors import LazyMigOSError
from lazymig.linux import procfs
from lazymig.linux.vm import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    mmap_anonymous,
    munmap,
    pagemap_scan,
)
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    VmaStatus,
    vma_can_be_lazy,
)

__all__ = [
    "PM_FILE",
    "PM_PFN_MASK",
    "PM_PRESENT",
    "PM_SOFT_DIRTY",
    "PM_SWAP",
    "TASK_SIZE",
    "MemoryScan",
    "PageRun",
    "Vma",
    "maps_lines",
    "parse_smaps",
    "parse_smaps_and_lines",
    "plan_page_ranges",
    "plan_pages",
    "read_pagemap",
    "read_smaps",
    "scan_process",
    "should_dump_vma",
    "unsupported_mappings",
    "zero_page_pfn",
]

PM_PRESENT: Final = 1 << 63
PM_SWAP: Final = 1 << 62
PM_FILE: Final = 1 << 61
PM_SOFT_DIRTY: Final = 1 << 55
PM_PFN_MASK: Final = (1 << 55) - 1

#: Upper bound of x86_64 user space (5-level paging; 4-level stops at 2**47 - 4096).
#: Only the vsyscall page lies above it.
TASK_SIZE: Final = (1 << 56) - PAGE_SIZE

_O_RDWR: Final = 0o2

# madvise(2) advice numbers, as bit positions of vma_entry.madv (CRIU parse_vmflags).
_MADV_BITS: Final = {
    "sr": 2,   # MADV_SEQUENTIAL
    "rr": 1,   # MADV_RANDOM
    "dc": 10,  # MADV_DONTFORK
    "dd": 16,  # MADV_DONTDUMP
    "mg": 12,  # MADV_MERGEABLE
    "hg": 14,  # MADV_HUGEPAGE
    "nh": 15,  # MADV_NOHUGEPAGE
}
_FLAG_BITS: Final = {"gd": MAP_GROWSDOWN, "lo": MAP_LOCKED, "nr": MAP_NORESERVE,
                     "ht": MAP_HUGETLB}
_KNOWN_FLAGS: Final = frozenset(_MADV_BITS) | frozenset(_FLAG_BITS)
_DEVICE_FLAGS: Final = frozenset({"io", "pf"})

_REFUSED_STATUS: Final = VmaStatus.SYSVIPC | VmaStatus.AIORING | VmaStatus.UNSUPP
_FILE: Final = VmaStatus.FILE_SHARED | VmaStatus.FILE_PRIVATE

_RANGE_RE: Final = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")
_RUN_RE: Final = re.compile(rb"\x01+")

# Translate the top byte of each pagemap entry (bits 56..63) to 1 = dump, 0 = skip.
# Bit 7 = present, bit 6 = swapped, bit 5 = file-page/shared-anon.
_DUMP_ANON: Final = bytes(1 if b & 0xC0 else 0 for b in range(256))
_DUMP_FILE_PRIVATE: Final = bytes(1 if b & 0xC0 and not b & 0x20 else 0 for b in range(256))


@dataclasses.dataclass(frozen=True, slots=True)
class Vma:
    """One mapping, with the fields of CRIU's ``vma_entry`` (images/vma.proto).

    ``pgoff`` is the file offset in bytes (as /proc shows it and CRIU stores it).
    ``flags`` are mmap flags (MAP_PRIVATE/SHARED/ANONYMOUS/GROWSDOWN/LOCKED/
    NORESERVE/HUGETLB), ``status`` CRIU's VMA_AREA_* bits, ``madv`` a bit set of
    madvise advice numbers, ``fdflags`` the open mode a file mapping needs
    (O_RDONLY or O_RDWR). ``path`` is the pathname column of /proc/PID/maps
    (``""`` when anonymous; ``"[heap]"``, ``"[stack]"``, ``"[vdso]"``... for special
    mappings; it may end in ``" (deleted)"``). ``vm_flags`` are the raw
    two-letter VmFlags of smaps.

    One deliberate difference from CRIU: ``[stack]`` gets ``VmaStatus.STACK``
    (CRIU defines the bit but no longer sets it; nothing in CRIU reads it).
    Like CRIU, a MAP_GROWSDOWN VMA's ``start`` includes the guard page below it
    when there is room for one.
    """

    start: int
    end: int
    pgoff: int
    prot: int
    flags: int
    status: int
    madv: int = 0
    fdflags: int = 0
    dev: tuple[int, int] = (0, 0)
    inode: int = 0
    path: str = ""
    vm_flags: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.end - self.start

    @property
    def nr_pages(self) -> int:
        """Length in pages."""
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def is_file(self) -> bool:
        """Backed by a file (private or shared), not anonymous."""
        return self.status & (VmaStatus.FILE_PRIVATE | VmaStatus.FILE_SHARED) != 0

    @property
    def can_be_lazy(self) -> bool:
        """CRIU's ``vma_entry_can_be_lazy``."""
        return vma_can_be_lazy(self.flags, self.status)

    def contains(self, address: int) -> bool:
        """``start <= address < end``."""
        return self.start <= address < self.end


@dataclasses.dataclass(frozen=True, slots=True)
class PageRun:
    """``nr_pages`` consecutive pages from ``vaddr`` to dump, all lazy or all not.

    A run never crosses a VMA boundary.
    """

    vaddr: int
    nr_pages: int
    lazy: bool

    @property
    def end(self) -> int:
        """First address after the run."""
        return self.vaddr + (self.nr_pages << PAGE_SHIFT)


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryScan:
    """The VMAs of a process and the page runs to dump, in address order."""

    pid: int
    vmas: tuple[Vma, ...]
    runs: tuple[PageRun, ...]

    @property
    def lazy_pages(self) -> int:
        """Number of pages that stay on the source until faulted or pushed."""
        return sum(r.nr_pages for r in self.runs if r.lazy)

    @property
    def nonlazy_pages(self) -> int:
        """Number of pages copied before the process runs again."""
        return sum(r.nr_pages for r in self.runs if not r.lazy)


# -- parsing -------------------------------------------------------------------


def _classify(start: int, end: int, perms: str, pgoff: int, dev: tuple[int, int], inode: int,
              path: str, vm_flags: frozenset[str]) -> Vma:
    prot = ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))
    flags = MAP_SHARED if perms[3] == "s" else MAP_PRIVATE
    madv = 0
    status = 0
    for tok in vm_flags & _KNOWN_FLAGS:  # the few that matter, out of a dozen or so
        if tok in _FLAG_BITS:
            flags |= _FLAG_BITS[tok]
        else:
            madv |= 1 << _MADV_BITS[tok]
    fdflags = _O_RDWR if "sh" in vm_flags and "mw" in vm_flags else 0

    if path.startswith("/[aio]"):
        status = VmaStatus.AIORING
    elif path in ("[vsyscall]", "[vectors]"):
        status = VmaStatus.VSYSCALL
    elif path == "[vdso]":
        status = VmaStatus.REGULAR
        if prot & (PROT_READ | PROT_EXEC) == PROT_READ | PROT_EXEC:
            status |= VmaStatus.VDSO
    elif path in ("[vvar]", "[vvar_vclock]"):
        status = VmaStatus.REGULAR
        if prot & PROT_READ:
            status |= VmaStatus.VVAR
    elif path == "[heap]":
        status = VmaStatus.REGULAR | VmaStatus.HEAP
    elif path == "[stack]":
        status = VmaStatus.REGULAR | VmaStatus.STACK
    else:
        status = VmaStatus.REGULAR

    if not status & VmaStatus.VVAR and not _DEVICE_FLAGS.isdisjoint(vm_flags):
        # vmsplice cannot take VM_IO / VM_PFNMAP pages (CRIU parse_vmflags).
        status |= VmaStatus.UNSUPP

    if status & VmaStatus.AIORING:
        pass
    elif inode != 0:
        shared_anon = flags & MAP_SHARED and (path.startswith(("/SYSV", "/dev/zero (deleted)")))
        if shared_anon:
            flags |= MAP_ANONYMOUS
            status |= VmaStatus.ANON_SHARED
            if path.startswith("/SYSV"):
                status |= VmaStatus.SYSVIPC
        elif flags & MAP_PRIVATE:
            status |= VmaStatus.FILE_PRIVATE
        else:
            status |= VmaStatus.FILE_SHARED
        if path.startswith("/memfd:"):  # its contents are dumped, as shmem (CRIU's memfd.c)
            status |= VmaStatus.MEMFD
    else:
        status |= VmaStatus.ANON_SHARED if flags & MAP_SHARED else VmaStatus.ANON_PRIVATE
        flags |= MAP_ANONYMOUS
    return Vma(start=start, end=end, pgoff=pgoff, prot=prot, flags=flags, status=int(status),
               madv=madv, fdflags=fdflags, dev=dev, inode=inode, path=path, vm_flags=vm_flags)


def _vma_lines(text: str) -> list[tuple[str, str]]:
    """(header line, VmFlags value or "") of each VMA of /proc/PID/smaps or maps text.

    smaps ends each VMA's lines with its VmFlags line, so splitting there finds
    every header right after one: ~10 ms for 5,000 VMAs, where walking the
    125,000 lines of their smaps took 0.1-0.3 s. Text that is not laid out
    so (maps text, a kernel that adds lines after VmFlags) is walked line by line.
    """
    blocks = text.split("\nVmFlags:")
    if len(blocks) > 1:
        out = []
        header = blocks[0].partition("\n")[0]
        for block in blocks[1:]:
            if not _RANGE_RE.match(header):
                break
            flags, _, rest = block.partition("\n")
            out.append((header, flags))
            header = rest.partition("\n")[0]
        else:
            if not header:
                return out
    out = []
    pending: str | None = None
    for line in text.splitlines():
        if _RANGE_RE.match(line):
            if pending is not None:
                out.append((pending, ""))
            pending = line
        elif line.startswith("VmFlags:") and pending is not None:
            out.append((pending, line[8:]))
            pending = None
    if pending is not None:
        out.append((pending, ""))
    return out


def parse_smaps(text: str) -> list[Vma]:
    """Parse the text of /proc/PID/smaps (or /proc/PID/maps: no VmFlags then) into VMAs.

    Pure: no file is opened. Raises ``ValueError`` on a malformed header line.
    """
    return _parse_vma_lines(_vma_lines(text))


def parse_smaps_and_lines(text: str) -> tuple[list[Vma], list[str]]:
    """:func:`parse_smaps` and :func:`maps_lines` of the same text, split once. Pure."""
    pairs = _vma_lines(text)
    return _parse_vma_lines(pairs), [line for line, _ in pairs]


def _parse_vma_lines(pairs: Iterable[tuple[str, str]]) -> list[Vma]:
    vmas: list[Vma] = []
    prev_end = 0
    # Thousands of VMAs share a few VmFlags lines and devices: each parsed once.
    flag_sets: dict[str, frozenset[str]] = {}
    devs: dict[str, tuple[int, int]] = {}
    for line, flags in pairs:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise ValueError(f"malformed maps line: {line!r}")
        lo, hi = fields[0].split("-")
        vm_flags = flag_sets.get(flags)
        if vm_flags is None:
            vm_flags = flag_sets[flags] = frozenset(flags.split())
        dev = devs.get(fields[3])
        if dev is None:
            major, minor = fields[3].split(":")
            dev = devs[fields[3]] = (int(major, 16), int(minor, 16))
        vma = _classify(int(lo, 16), int(hi, 16), fields[1], int(fields[2], 16), dev,
                        int(fields[4]), fields[5].strip() if len(fields) > 5 else "", vm_flags)
        if vma.flags & MAP_GROWSDOWN and prev_end < vma.start:
            vma = dataclasses.replace(vma, start=vma.start - PAGE_SIZE)  # the guard page
        prev_end = vma.end
        vmas.append(vma)
    return vmas


def maps_lines(text: str) -> list[str]:
    """The VMA lines of /proc/PID/smaps or /proc/PID/maps text (the same in both). Pure."""
    return [line for line, _ in _vma_lines(text)]


def unsupported_mappings(vmas: Iterable[Vma]) -> list[str]:
    """Why these VMAs cannot be migrated (empty list: they can). Pure.

    Refused: SysV shm, hugetlb, VM_IO/VM_PFNMAP device memory, AIO rings and a
    mapping of a deleted file not carried (see
    :func:`~lazymig.dump.shmem.carried_deleted_files`: those are MEMFD).
    Allowed as CRIU does: shared anonymous memory (``/dev/zero (deleted)``)
    and memfd mappings (shared or private), whose contents are dumped (shmem
    images; a private mapping's own written pages as any private page's); a
    shared file mapping, which holds no data but the file's (the restorer maps
    the file again with its offset, protection and flags; writes reach the
    file). The vdso and vvar are private and fine.
    """
    reasons = []
    for v in vmas:
        if not v.status & _REFUSED_STATUS and not v.flags & MAP_HUGETLB and not (
                v.status & _FILE and not v.status & VmaStatus.MEMFD
                and v.path.endswith(" (deleted)")):
            continue  # the common case, without a string made (5,000 VMAs: 10 ms)
        where = f"{v.start:#x}-{v.end:#x} {v.path or '[anon]'}"
        if v.status & VmaStatus.SYSVIPC:
            reasons.append(f"SysV shared memory at {where}")
        elif v.status & VmaStatus.AIORING:
            reasons.append(f"AIO ring at {where}")
        elif v.flags & MAP_HUGETLB:
            reasons.append(f"hugetlb mapping at {where}")
        elif v.status & VmaStatus.UNSUPP:
            reasons.append(f"VM_IO/VM_PFNMAP mapping at {where}")
        elif v.status & _FILE and not v.status & VmaStatus.MEMFD \
                and v.path.endswith(" (deleted)"):
            kind = "shared" if v.status & VmaStatus.FILE_SHARED else "private"
            reasons.append(f"{kind} mapping of a deleted file at {where}")
    return reasons


def should_dump_vma(vma: Vma) -> bool:
    """CRIU's ``vma_area_is_private`` minus the vvar area (never dumped). Pure."""
    return (
        vma.status & VmaStatus.REGULAR != 0
        and vma.status & (VmaStatus.ANON_PRIVATE | VmaStatus.FILE_PRIVATE) != 0
        and vma.status & VmaStatus.VVAR == 0
        and vma.end <= TASK_SIZE
    )


def plan_pages(vmas: Sequence[Vma], pagemaps: Sequence[bytes | bytearray | memoryview], *,
               stack_pointers: Iterable[int] = (), zero_pfn: int | None = None) -> list[PageRun]:
    """Decide which pages to dump and which of them are lazy. Pure.

    ``pagemaps[i]`` holds the raw /proc/PID/pagemap entries (8 bytes each, host
    order) of ``vmas[i]``, or is empty for a VMA that :func:`should_dump_vma`
    rejects (it is not looked at). ``stack_pointers`` are the threads' ``rsp``:
    the page holding each is dumped non-lazily. ``zero_pfn`` is the PFN of the
    kernel's zero page, whose mappings are skipped (they read as zeros anyway);
    ``None`` disables that check (PFNs are hidden from unprivileged readers).
    """
    if len(pagemaps) != len(vmas):
        raise ValueError(f"{len(vmas)} VMAs but {len(pagemaps)} pagemaps")
    ranges: list[list[tuple[int, int]]] = []
    for vma, entries in zip(vmas, pagemaps, strict=True):
        if not should_dump_vma(vma) or vma.status & VmaStatus.VDSO:
            ranges.append([])
            continue
        raw = bytes(entries)
        if len(raw) != vma.nr_pages * 8:
            raise ValueError(f"pagemap for {vma.start:#x}-{vma.end:#x} has {len(raw)} bytes, "
                             f"expected {vma.nr_pages * 8}")
        table = _DUMP_FILE_PRIVATE if vma.status & VmaStatus.FILE_PRIVATE else _DUMP_ANON
        mask: bytes | bytearray = raw[7::8].translate(table)
        if zero_pfn:
            mask = _drop_zero_pages(raw, bytearray(mask), zero_pfn)
        ranges.append([m.span() for m in _RUN_RE.finditer(mask)])
    return plan_page_ranges(vmas, ranges, stack_pointers=stack_pointers)


def plan_page_ranges(vmas: Sequence[Vma], ranges: Sequence[Sequence[tuple[int, int]]], *,
                     stack_pointers: Iterable[int] = ()) -> list[PageRun]:
    """:func:`plan_pages` from the pages to dump of each VMA, already found. Pure.

    ``ranges[i]`` are the (first, stop) page indexes within ``vmas[i]`` to dump,
    sorted; ignored for VMAs :func:`should_dump_vma` rejects, and for the vDSO
    (every page of it is dumped).
    """
    if len(ranges) != len(vmas):
        raise ValueError(f"{len(vmas)} VMAs but {len(ranges)} page range lists")
    sp_pages = sorted({sp & ~(PAGE_SIZE - 1) for sp in stack_pointers})
    runs: list[PageRun] = []
    for vma, spans in zip(vmas, ranges, strict=True):
        if not should_dump_vma(vma):
            continue
        lazy = vma.can_be_lazy
        lo = bisect.bisect_left(sp_pages, vma.start)
        hi = bisect.bisect_left(sp_pages, vma.end)
        pinned = [(a - vma.start) >> PAGE_SHIFT for a in sp_pages[lo:hi]] if lazy else []
        for first, stop in [(0, vma.nr_pages)] if vma.status & VmaStatus.VDSO else spans:
            _emit(runs, vma.start, first, stop, lazy, pinned)
    return runs


def _drop_zero_pages(raw: bytes, mask: bytearray, zero_pfn: int) -> bytearray:
    """Clear the mask of present entries mapping the zero page (CRIU ``__page_is_zero``)."""
    low = (zero_pfn & ((1 << 48) - 1)).to_bytes(6, "little")
    high = (zero_pfn >> 48) & 0x7F  # byte 6 without the soft-dirty bit
    pos = raw.find(low)
    while pos >= 0:
        if pos & 7 == 0 and raw[pos + 6] & 0x7F == high and raw[pos + 7] & 0x80:
            mask[pos >> 3] = 0
        pos = raw.find(low, pos + 1)
    return mask


def _emit(runs: list[PageRun], base: int, first: int, stop: int, lazy: bool,
          pinned: list[int]) -> None:
    """Append pages [first, stop) of the VMA at ``base``; ``pinned`` pages go non-lazy."""
    at = first
    for p in pinned:
        if p < at or p >= stop:
            continue
        if p > at:
            runs.append(PageRun(base + (at << PAGE_SHIFT), p - at, lazy))
        addr = base + (p << PAGE_SHIFT)
        prev = runs[-1] if runs else None
        if prev is not None and not prev.lazy and prev.end == addr and prev.vaddr >= base:
            runs[-1] = PageRun(prev.vaddr, prev.nr_pages + 1, False)
        else:
            runs.append(PageRun(addr, 1, False))
        at = p + 1
    if at < stop:
        runs.append(PageRun(base + (at << PAGE_SHIFT), stop - at, lazy))


# -- I/O -------------------------------------------------------------------------

_PAGEMAP_CHUNK: Final = 1 << 20  # entries per pread (8 MiB): one pread for most VMAs


def read_smaps(pid: int) -> list[Vma]:
    """Parse /proc/PID/smaps. A missing process raises ``LazyMigOSError(ESRCH)``."""
    try:
        text = procfs.read_smaps(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise LazyMigOSError(errno.ESRCH, "read /proc/PID/smaps", pid=pid) from exc
    return parse_smaps(text)


def read_pagemap(fd: int, start: int, end: int) -> bytes:
    """The raw pagemap entries for [start, end) from an open /proc/PID/pagemap fd."""
    total = ((end - start) >> PAGE_SHIFT) * 8
    first = (start >> PAGE_SHIFT) * 8
    if total <= _PAGEMAP_CHUNK * 8:
        data = os.pread(fd, total, first)
    else:
        parts = [os.pread(fd, min(_PAGEMAP_CHUNK * 8, total - off), first + off)
                 for off in range(0, total, _PAGEMAP_CHUNK * 8)]
        data = b"".join(parts)
    if len(data) != total:
        raise LazyMigOSError(errno.EIO, f"short pagemap read at {start:#x}")
    return data


@functools.cache
def zero_page_pfn() -> int | None:
    """PFN of the kernel's shared zero page, or ``None`` if PFNs are hidden from us.

    Found as CRIU's kerndat does: read-fault a fresh anonymous page (it maps the
    zero page) and look its PFN up in our own pagemap.
    """
    addr = mmap_anonymous(PAGE_SIZE)
    try:
        ctypes.c_char.from_address(addr).value  # noqa: B018 - the read fault is the point
        fd = procfs.open_pagemap("self")
        try:
            entry = int.from_bytes(os.pread(fd, 8, (addr >> PAGE_SHIFT) * 8), "little")
        finally:
            os.close(fd)
    finally:
        munmap(addr, PAGE_SIZE)
    pfn = entry & PM_PFN_MASK
    return pfn if entry & PM_PRESENT and pfn else None


def scan_process(pid: int, *, stack_pointers: Iterable[int] = (), use_zero_pfn: bool = True,
                 vmas: Sequence[Vma] | None = None) -> MemoryScan:
    """Read smaps (unless ``vmas`` are given: read while the process was already
    frozen) and the pagemap of a (frozen) process and plan its page runs.

    PAGEMAP_SCAN (Linux 6.7+) finds the pages to dump in the kernel, as ranges;
    older kernels get the pagemap read entry by entry (8 bytes a page: 8 MiB and
    tens of milliseconds for 4 GiB, plus planning them in Python).
    """
    vmas = read_smaps(pid) if vmas is None else list(vmas)
    try:
        fd = procfs.open_pagemap(pid)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise LazyMigOSError(errno.ESRCH, "open /proc/PID/pagemap", pid=pid) from exc
    wanted = [should_dump_vma(v) and not v.status & VmaStatus.VDSO for v in vmas]
    try:
        try:
            ranges = _scan_all_ranges(fd, vmas, wanted, use_zero_pfn)
        except LazyMigOSError as exc:
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                raise
            pagemaps = [read_pagemap(fd, v.start, v.end) if want else b""
                        for v, want in zip(vmas, wanted, strict=True)]
            runs = plan_pages(vmas, pagemaps, stack_pointers=stack_pointers,
                              zero_pfn=zero_page_pfn() if use_zero_pfn else None)
        else:
            runs = plan_page_ranges(vmas, ranges, stack_pointers=stack_pointers)
    finally:
        os.close(fd)
    return MemoryScan(pid=pid, vmas=tuple(vmas), runs=tuple(runs))


#: An unwanted VMA up to this size is walked with its wanted neighbours by one
#: PAGEMAP_SCAN (what it finds there is dropped) rather than splitting the walk.
_BRIDGE_BYTES: Final = 16 << 20


def _scan_all_ranges(fd: int, vmas: Sequence[Vma], wanted: Sequence[bool],
                     skip_zero: bool) -> list[list[tuple[int, int]]]:
    """Page index ranges of each wanted VMA to dump (``[]`` for the others), by
    PAGEMAP_SCAN: present or swapped, not the file's own page
    (``_DUMP_FILE_PRIVATE``), not the zero page.

    One ioctl covers a stretch of wanted VMAs and the small unwanted ones between
    them, and its ranges are cut at the VMAs' bounds: one per VMA cost 25 ms for
    5,000 mappings.
    """
    skip = PAGE_IS_FILE | (PAGE_IS_PFNZERO if skip_zero else 0)
    out: list[list[tuple[int, int]]] = [[] for _ in vmas]
    i, n = 0, len(vmas)
    while i < n:
        if not wanted[i]:
            i += 1
            continue
        last = k = i
        while k + 1 < n and (wanted[k + 1] or vmas[k + 1].end - vmas[k + 1].start
                             <= _BRIDGE_BYTES):
            k += 1
            if wanted[k]:
                last = k
        found = pagemap_scan(fd, vmas[i].start, vmas[last].end, inverted=skip,
                             required=skip, anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        r = 0
        for idx in range(i, last + 1):
            if not wanted[idx]:
                continue
            v = vmas[idx]
            while r < len(found) and found[r][1] <= v.start:
                r += 1
            q = r
            mine = out[idx]
            while q < len(found) and found[q][0] < v.end:
                a, b = max(found[q][0], v.start), min(found[q][1], v.end)
                mine.append(((a - v.start) >> PAGE_SHIFT, (b - v.start) >> PAGE_SHIFT))
                q += 1
        i = last + 1
    return out
