"""VMA parsing and the lazy/non-lazy page plan: pure functions on synthetic input,
then one scan of this very process."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from lazymig.dump.scan import (
    PM_FILE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    PageRun,
    Vma,
    parse_smaps,
    plan_pages,
    read_pagemap,
    scan_process,
    should_dump_vma,
    unsupported_mappings,
    zero_page_pfn,
)
from lazymig.dump.shmem import is_shared_object, mark_deleted_files
from lazymig.linux.vm import AnonMapping
from lazymig.proto.constants import (
    MAP_ANONYMOUS,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    VmaStatus,
)
from lazymig.testing.workload import Workload, build_c_workload

SMAPS = """\
00400000-00401000 r-xp 00000000 fe:00 123                                /usr/bin/prog
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd ex mr mw me
00600000-00602000 rw-p 00002000 fe:00 123                                /usr/bin/prog
VmFlags: rd wr mr mw me ac
01000000-01021000 rw-p 00000000 00:00 0                                  [heap]
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000010000 rw-p 00000000 00:00 0
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac sr dd
7f0000020000-7f0000021000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me lo ac
7f0000030000-7f0000031000 rw-s 00000000 00:01 999                        /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms
7f0000040000-7f0000041000 rw-s 00000000 00:01 32768                      /SYSV00000000 (deleted)
VmFlags: rd wr sh mr mw me ms
7f0000050000-7f0000250000 rw-p 00000000 00:0f 4242                       /anon_hugepage (deleted)
VmFlags: rd wr mr mw me ht
7f0000300000-7f0000301000 rw-s 00000000 fe:00 77                         /var/data file
VmFlags: rd wr sh mr mw me
7f0000400000-7f0000407000 r--s 00000000 fe:00 78             /usr/lib/gconv/gconv-modules.cache
VmFlags: rd sh mr me
7f0000500000-7f0000501000 r--s 00000000 00:01 79                         /memfd:sealed (deleted)
VmFlags: rd sh mr me
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffc00100000-7ffc00104000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd
7ffc00104000-7ffc00106000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
"""


def by_path(vmas: list[Vma]) -> dict[str, Vma]:
    return {v.path or f"anon@{v.start:#x}": v for v in vmas}


def test_parse_smaps_statuses_and_flags() -> None:
    vmas = parse_smaps(SMAPS)
    assert len(vmas) == 15
    text, data = vmas[0], vmas[1]
    assert (text.start, text.end, text.prot, text.pgoff) == (0x400000, 0x401000, 5, 0)
    assert text.flags == MAP_PRIVATE
    assert text.status == VmaStatus.REGULAR | VmaStatus.FILE_PRIVATE
    assert text.dev == (0xFE, 0) and text.inode == 123 and text.is_file
    assert data.pgoff == 0x2000 and data.prot == 3

    heap = by_path(vmas)["[heap]"]
    assert heap.status == VmaStatus.REGULAR | VmaStatus.HEAP | VmaStatus.ANON_PRIVATE
    assert heap.flags == MAP_PRIVATE | MAP_ANONYMOUS and heap.can_be_lazy

    anon = vmas[3]
    assert anon.status == VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE
    assert anon.madv == (1 << 2) | (1 << 16)  # MADV_SEQUENTIAL, MADV_DONTDUMP
    locked = vmas[4]
    assert locked.flags & MAP_LOCKED and not locked.can_be_lazy

    shm, sysv = vmas[5], vmas[6]
    assert shm.status & VmaStatus.ANON_SHARED and shm.flags & MAP_ANONYMOUS | MAP_SHARED
    assert shm.fdflags == os.O_RDWR
    assert sysv.status & VmaStatus.SYSVIPC
    huge = vmas[7]
    assert huge.flags & MAP_HUGETLB
    shared_file = vmas[8]
    assert shared_file.path == "/var/data file"  # spaces survive
    assert shared_file.status == VmaStatus.REGULAR | VmaStatus.FILE_SHARED
    memfd = vmas[10]
    assert memfd.status == VmaStatus.REGULAR | VmaStatus.FILE_SHARED | VmaStatus.MEMFD

    stack = by_path(vmas)["[stack]"]
    assert stack.flags & MAP_GROWSDOWN and stack.status & VmaStatus.STACK
    assert stack.start == 0x7FFC00000000 - PAGE_SIZE  # guard page included, as CRIU does

    vvar, vdso, vsys = vmas[12], vmas[13], vmas[14]
    assert vvar.status == VmaStatus.REGULAR | VmaStatus.VVAR | VmaStatus.ANON_PRIVATE
    assert not vvar.status & VmaStatus.UNSUPP  # io/pf are expected on the vvar
    assert vdso.status == VmaStatus.REGULAR | VmaStatus.VDSO | VmaStatus.ANON_PRIVATE
    assert vsys.status & VmaStatus.VSYSCALL and not vsys.status & VmaStatus.REGULAR
    assert not any(v.can_be_lazy for v in (vvar, vdso, vsys))


def test_unsupported_mappings_name_each_cause() -> None:
    reasons = unsupported_mappings(parse_smaps(SMAPS))
    assert len(reasons) == 2
    assert "SysV" in reasons[0]
    assert "hugetlb" in reasons[1]
    # Shared anonymous memory, memfds and shared file mappings are migrated.
    assert not any(w in r for r in reasons for w in ("/dev/zero", "/var/data", "memfd", "gconv"))
    more = parse_smaps("7f0000000000-7f0000001000 rw-p 00000000 00:01 80 /memfd:x (deleted)\n"
                       "7f0000001000-7f0000002000 rw-s 00000000 fe:00 81 /tmp/gone (deleted)\n")
    more += parse_smaps("7f0000002000-7f0000003000 r--p 00000000 fe:00 82 /tmp/old.so (deleted)\n")
    # A memfd mapped private is dumped; deleted files not carried (not marked MEMFD) are not.
    assert [r.split(" at ")[0] for r in unsupported_mappings(more)] == [
        "shared mapping of a deleted file", "private mapping of a deleted file"]
    io = parse_smaps("7f0000000000-7f0000001000 rw-p 00000000 00:05 10 /dev/mem\n"
                     "VmFlags: rd wr io pf\n")
    assert "VM_IO" in unsupported_mappings(io)[0]


def test_deleted_files_carried_are_shmem_objects() -> None:
    vmas = parse_smaps(
        "7f0000000000-7f0000001000 rw-s 00000000 00:1b 81 /dev/shm/sem.a (deleted)\n"
        "7f0000001000-7f0000002000 rw-s 00000000 fe:00 82 /tmp/gone (deleted)\n"
        "7f0000002000-7f0000003000 rw-s 00000000 00:1b 83 /dev/shm/psm_b\n"
        "7f0000003000-7f0000004000 rw-p 00000000 00:1b 84 /dev/shm/priv (deleted)\n"
        "7f0000004000-7f0000005000 r--p 00000000 fe:00 85 /tmp/lib.so (deleted)\n")
    marked = mark_deleted_files(vmas, {((0, 0x1B), 81), ((0, 0x1B), 84)})
    assert [bool(v.status & VmaStatus.MEMFD) for v in marked] == [True, False, False, True,
                                                                  False]
    assert [is_shared_object(v.status) for v in marked] == [True, False, False, True, False]
    assert unsupported_mappings(marked) == [
        "shared mapping of a deleted file at 0x7f0000001000-0x7f0000002000 /tmp/gone (deleted)",
        "private mapping of a deleted file at 0x7f0000004000-0x7f0000005000 /tmp/lib.so "
        "(deleted)"]


def test_should_dump_vma() -> None:
    dumped = [v.path or "anon" for v in parse_smaps(SMAPS) if should_dump_vma(v)]
    assert dumped == ["/usr/bin/prog", "/usr/bin/prog", "[heap]", "anon", "anon",
                      "/anon_hugepage (deleted)", "[stack]", "[vdso]"]


def pm(*entries: int) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)


ANON = Vma(0x10000, 0x18000, 0, 3, MAP_PRIVATE | MAP_ANONYMOUS,
           VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE)


def test_plan_present_swapped_and_holes() -> None:
    zero = 0x2A4C
    entries = pm(PM_PRESENT | 7, 0, PM_SWAP | 99, PM_PRESENT | PM_SOFT_DIRTY | 8,
                 PM_PRESENT | zero, PM_PRESENT | PM_SOFT_DIRTY | zero, 0, PM_PRESENT | 12)
    runs = plan_pages([ANON], [entries], zero_pfn=zero)
    assert runs == [PageRun(0x10000, 1, True), PageRun(0x12000, 2, True),
                    PageRun(0x17000, 1, True)]
    # Without a zero-page PFN the zero-page mappings are dumped like any page.
    runs = plan_pages([ANON], [entries])
    assert runs == [PageRun(0x10000, 1, True), PageRun(0x12000, 4, True),
                    PageRun(0x17000, 1, True)]


def test_plan_stack_pointer_pages_are_not_lazy() -> None:
    entries = pm(*[PM_PRESENT | i for i in range(8)])
    runs = plan_pages([ANON], [entries], stack_pointers=[0x13FF8, 0x14000, 0x99999000])
    assert runs == [PageRun(0x10000, 3, True), PageRun(0x13000, 2, False),
                    PageRun(0x15000, 3, True)]
    assert plan_pages([ANON], [entries], stack_pointers=[0x10000])[0] == PageRun(0x10000, 1, False)


def test_plan_file_private_skips_unmodified_file_pages() -> None:
    vma = Vma(0x600000, 0x604000, 0, 3, MAP_PRIVATE, VmaStatus.REGULAR | VmaStatus.FILE_PRIVATE,
              inode=5, path="/lib/x.so")
    entries = pm(PM_PRESENT | PM_FILE | 1, PM_PRESENT | 2, PM_SWAP | 3, 0)
    assert plan_pages([vma], [entries]) == [PageRun(0x601000, 2, False)]


def test_plan_special_areas() -> None:
    vmas = parse_smaps(SMAPS)
    pagemaps: list[bytes] = []
    for v in vmas:
        if should_dump_vma(v) and not v.status & VmaStatus.VDSO:
            pagemaps.append(pm(*[PM_PRESENT | 1] * v.nr_pages))
        else:
            pagemaps.append(b"")
    runs = plan_pages(vmas, pagemaps)
    vdso = next(v for v in vmas if v.path == "[vdso]")
    assert PageRun(vdso.start, 2, False) in runs  # every vDSO page, never lazy
    assert not any(r.vaddr < 0x401000 and r.vaddr >= 0x400000 and r.lazy for r in runs)
    covered = {r.vaddr for r in runs}
    for v in vmas:
        if v.path in ("[vvar]", "[vsyscall]") or v.flags & MAP_SHARED:
            assert v.start not in covered
    locked = vmas[4]
    assert PageRun(locked.start, 1, False) in runs
    heap = next(v for v in vmas if v.path == "[heap]")
    assert PageRun(heap.start, heap.nr_pages, True) in runs
    # Runs never cross a VMA boundary, and come in address order.
    assert [r.vaddr for r in runs] == sorted(r.vaddr for r in runs)


def test_plan_rejects_wrong_pagemap_length() -> None:
    with pytest.raises(ValueError, match="expected 64"):
        plan_pages([ANON], [pm(PM_PRESENT)])
    with pytest.raises(ValueError):
        plan_pages([ANON], [])


def test_scan_this_process() -> None:
    """Touched anonymous memory is lazy; untouched is absent; a read-only touch
    maps the zero page, which is skipped when we can see PFNs (root)."""
    n = 16
    with AnonMapping(n * PAGE_SIZE) as region:
        addr = region.address
        # No transparent huge pages: a merged neighbour VMA could make the first write
        # fault map 2 MiB, or the reads map the huge zero page (another PFN).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.madvise(addr, n * PAGE_SIZE, 15) == 0  # MADV_NOHUGEPAGE
        for i in range(0, 8):
            ctypes.c_char.from_address(addr + i * PAGE_SIZE).value = b"\x01"
        for i in range(8, 12):
            _ = ctypes.c_char.from_address(addr + i * PAGE_SIZE).value  # read: the zero page
        scan = scan_process(os.getpid())
    runs = [r for r in scan.runs if addr <= r.vaddr < addr + n * PAGE_SIZE]
    if zero_page_pfn() is None:
        assert runs == [PageRun(addr, 12, True)]
    else:
        assert runs == [PageRun(addr, 8, True)]
    assert any(v.path == "[vdso]" for v in scan.vmas)
    assert scan.lazy_pages >= 8 and scan.nonlazy_pages >= 1


@pytest.mark.parametrize("args", [
    ("--mib", "8", "--locked-kib", "64"),
    # Hundreds of small VMAs, shared ones between private ones: one PAGEMAP_SCAN
    # walks across them and its ranges are cut at each VMA's bounds.
    ("--mib", "4", "--maps", "400", "--shared-kib", "64"),
], ids=["locked", "many-maps"])
def test_pagemap_scan_and_the_pagemap_entries_agree(tmp_path: Path,
                                                    args: tuple[str, ...]) -> None:
    """PAGEMAP_SCAN (ranges from the kernel) plans exactly what reading the pagemap
    entry by entry plans, on a stopped process with anonymous, file-private, locked,
    stack and vDSO pages, and with many mappings of files and memory."""
    with Workload([str(build_c_workload(tmp_path)), *args, "--maps-dir", str(tmp_path)]) as w:
        os.kill(w.pid, signal.SIGSTOP)
        try:
            while Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                time.sleep(0.01)
            by_scan = scan_process(w.pid, stack_pointers=[w.ready.addr])
            fd = os.open(f"/proc/{w.pid}/pagemap", os.O_RDONLY)
            try:
                pagemaps = [read_pagemap(fd, v.start, v.end) if should_dump_vma(v) and
                            not v.status & VmaStatus.VDSO else b"" for v in by_scan.vmas]
            finally:
                os.close(fd)
        finally:
            os.kill(w.pid, signal.SIGCONT)
    by_entries = plan_pages(by_scan.vmas, pagemaps, stack_pointers=[w.ready.addr],
                            zero_pfn=zero_page_pfn())
    assert list(by_scan.runs) == by_entries
    mib = int(args[args.index("--mib") + 1])
    locked = 16 if "--locked-kib" in args else 0  # 64 KiB locked: never lazy
    assert by_scan.lazy_pages >= mib * 256 and by_scan.nonlazy_pages >= locked + 1
