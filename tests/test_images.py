"""CRIU image framing, pagemap rules and the ImagesDir façade (no crit needed here)."""

from __future__ import annotations

import gc
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import mm_entry, vma, x86_core
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lazymig.errors import ClosedResourceError, ConfigurationError, ImageError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images import (
    FsEntry,
    ImageKind,
    ImageReader,
    ImagesDir,
    ImageWriter,
    InventoryEntry,
    PageIndex,
    PagemapEntry,
    PagemapReader,
    PageRange,
    PagesWriter,
    PstreeEntry,
    TaskKobjIdsEntry,
    inventory_pb2,
    lazy_ranges,
    pagemap_pb2,
    pstree_pb2,
)
from lazymig.proto.images._dir import _vma_bounds
from lazymig.proto.images._wire import fields as wire_fields

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


# -- magics and names ---------------------------------------------------------------------


def test_headers_and_names() -> None:
    assert ImageKind.PAGEMAP.header == bytes.fromhex("1943565425400856")
    assert ImageKind.INVENTORY.header == struct.pack("<I", 0x58313116)
    assert ImageKind.PAGES.header == b""
    assert ImageKind.STATS.header[:4] == struct.pack("<I", 0x55105940)
    assert ImageKind(0x57492820) is ImageKind.MM
    assert ImageKind.PAGEMAP.file_name(42) == "pagemap-42.img"
    assert ImageKind.PAGES.file_name(1) == "pages-1.img"
    assert ImageKind.CORE.file_name(7) == "core-7.img"
    assert ImageKind.INVENTORY.file_name() == "inventory.img"
    assert ImageKind.STATS.file_name("dump") == "stats-dump"
    with pytest.raises(ValueError):
        ImageKind.MM.file_name()
    with pytest.raises(ValueError):
        ImageKind.PSTREE.file_name(1)
    with pytest.raises(ValueError):
        ImageKind.MM.file_name(-1)


def test_pagemap_bytes_match_criu(tmp_path: Path) -> None:
    ImagesDir(tmp_path).write_pagemap(1, 1, [PagemapEntry(0x400000, 3, PE.PRESENT)])
    assert (tmp_path / "pagemap-1.img").read_bytes() == bytes.fromhex(
        "1943565425400856" "0200000008 01" "0b000000 0880808002 1003 2004 2803".replace(" ", ""))


# -- framing ------------------------------------------------------------------------------


def write_raw(path: Path, kind: ImageKind, payloads: list[bytes]) -> list[int]:
    with ImageWriter(path, kind) as w:
        return [w.write_payload(p) for p in payloads]


def read_raw(path: Path, kind: ImageKind | None = None) -> list[bytes]:
    with ImageReader(path, kind) as r:
        out = []
        while (p := r.read_payload()) is not None:
            out.append(p)
        return out


@FAST
@given(payloads=st.lists(st.binary(max_size=300), max_size=20),
       kind=st.sampled_from([ImageKind.INVENTORY, ImageKind.PAGEMAP, ImageKind.STATS]))
def test_framing_round_trip(tmp_path: Path, payloads: list[bytes], kind: ImageKind) -> None:
    path = tmp_path / "x.img"
    offsets = write_raw(path, kind, payloads)
    assert read_raw(path, kind) == payloads
    assert read_raw(path) == payloads  # kind from the magic
    assert offsets == [len(kind.header) + sum(4 + len(p) for p in payloads[:i])
                       for i in range(len(payloads))]
    assert path.stat().st_size == len(kind.header) + sum(4 + len(p) for p in payloads)


def _sample_pagemap(path: Path) -> bytes:
    ImagesDir(path.parent).write_pagemap(int(path.name.split("-")[1].split(".")[0]), 3, [
        PagemapEntry(0x1000, 1, PE.PRESENT),
        PagemapEntry(0x400000, 2**33, PE.LAZY | PE.PRESENT),
        PagemapEntry(0x7FFF_0000_0000, 17, PE.PARENT),
    ])
    return path.read_bytes()


def _consume(path: Path) -> None:
    """Read the image at *path* completely as a pagemap."""
    with PagemapReader(path) as r:
        list(r)


def test_truncation_at_every_offset(tmp_path: Path) -> None:
    path = tmp_path / "pagemap-1.img"
    data = _sample_pagemap(path)
    boundaries = set()  # where the head and each entry end: valid shorter images
    pos = len(ImageKind.PAGEMAP.header)
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4 + size
        boundaries.add(pos)
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        if cut in boundaries:
            _consume(path)  # a shorter but well-formed image
            continue
        with pytest.raises(ImageError) as info:
            _consume(path)
        assert info.value.path == str(path)
        assert info.value.offset is not None and 0 <= info.value.offset <= cut
        assert str(path) in str(info.value)


@FAST
@given(data=st.data())
def test_random_damage_raises_image_error(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "pagemap-1.img"
    good = _sample_pagemap(path)
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(damaged) - 1))
        damaged[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(damaged)))
    damaged = damaged[:cut] + data.draw(st.binary(max_size=40))
    path.write_bytes(bytes(damaged))
    try:
        _consume(path)
    except ImageError as exc:
        assert exc.path == str(path)
        assert exc.offset is not None and 0 <= exc.offset <= len(damaged)


_DECODERS: list[Callable[[ImagesDir], object]] = [
    lambda d: list(d.pagemap(1).entries),
    lambda d: d.mm(1),
    lambda d: d.core(1),
    lambda d: d.pstree(),
    lambda d: d.inventory(),
    lambda d: d.read_entries(ImageKind.FS, FsEntry, 1),
]
_FILES = ["pagemap-1.img", "mm-1.img", "core-1.img", "pstree.img", "inventory.img", "fs-1.img"]


@FAST
@given(which=st.integers(0, len(_DECODERS) - 1), body=st.binary(max_size=200),
       with_header=st.booleans())
def test_garbage_raises_image_error(tmp_path: Path, which: int, body: bytes,
                                    with_header: bool) -> None:
    name = _FILES[which]
    kind = {"pagemap": ImageKind.PAGEMAP, "mm": ImageKind.MM, "core": ImageKind.CORE,
            "pstree.img": ImageKind.PSTREE, "inventory.img": ImageKind.INVENTORY,
            "fs": ImageKind.FS}[name.split("-")[0]]
    (tmp_path / name).write_bytes((kind.header if with_header else b"") + body)
    try:
        _DECODERS[which](ImagesDir(tmp_path))
    except ImageError as exc:
        assert exc.path == str(tmp_path / name)


def test_bad_magics(tmp_path: Path) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ImageError, match="bad magic 0x04030201") as info:
        ImageReader(path, ImageKind.MM)
    assert info.value.offset == 0
    path.write_bytes(struct.pack("<II", 0x54564319, 0x12345678))
    with pytest.raises(ImageError, match="unknown image magic") as info:
        ImageReader(path)
    assert info.value.offset == 4
    path.write_bytes(ImageKind.PSTREE.header)
    with pytest.raises(ImageError, match="PSTREE image, not MM") as info:
        ImageReader(path, ImageKind.MM)
    path.write_bytes(struct.pack("<II", 0x55105940, ImageKind.MM.magic))  # service + MM
    with pytest.raises(ImageError, match="cannot follow"):
        ImageReader(path)
    path.write_bytes(ImageKind.MM.header[:6])
    with pytest.raises(ImageError, match="truncated magic") as info:
        ImageReader(path, ImageKind.MM)
    assert info.value.offset == 4
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="truncated magic"):
        ImageReader(path)


def test_absurd_length_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(ImageKind.PSTREE.header + struct.pack("<I", 0xFFFF_FFF0) + b"x" * 10)
    with ImageReader(path) as r, pytest.raises(ImageError, match="exceeds the limit") as info:
        r.read_payload()
    assert info.value.offset == 8
    with ImageReader(path, max_entry_size=16) as r, pytest.raises(ImageError):
        r.read_payload()


def test_missing_required_fields(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    write_raw(d.image_path(ImageKind.PSTREE), ImageKind.PSTREE,
              [pstree_pb2.pstree_entry(pid=1).SerializePartialToString()])
    with pytest.raises(ImageError, match="lacks required fields: ppid, pgid, sid") as info:
        d.pstree()
    assert info.value.offset == 8
    with pytest.raises(ImageError, match="lacks required fields"):
        d.write_pstree([PstreeEntry(pid=1)])
    assert no_temp_files(tmp_path)


def test_read_one_wants_exactly_one(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    fs = FsEntry(cwd_id=1, root_id=2, umask=0o22)
    d.write_entries(ImageKind.FS, [], 1)
    with pytest.raises(ImageError, match="no fs_entry"):
        d.read_entry(ImageKind.FS, FsEntry, 1)
    d.write_entries(ImageKind.FS, [fs, fs], 1)
    with pytest.raises(ImageError, match="after the last entry"):
        d.read_entry(ImageKind.FS, FsEntry, 1)
    d.write_entries(ImageKind.FS, [fs], 1)
    assert d.read_entry(ImageKind.FS, FsEntry, 1) == fs


def test_reader_misuse(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        ImageReader(tmp_path / "pages-1.img", ImageKind.PAGES)
    with pytest.raises(FileNotFoundError):
        ImageReader(tmp_path / "nope.img")
    write_raw(tmp_path / "x.img", ImageKind.MM, [b""])
    r = ImageReader(tmp_path / "x.img")
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(ClosedResourceError):
        r.read_payload()


# -- atomic writers -----------------------------------------------------------------------


def test_writer_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "pstree.img"
    path.write_bytes(b"old")
    entry = PstreeEntry(pid=1, ppid=0, pgid=1, sid=1)
    with ImageWriter(path, ImageKind.PSTREE) as w:
        w.write(entry)
        assert path.read_bytes() == b"old"
    assert ImagesDir(tmp_path).pstree() == [entry]
    assert no_temp_files(tmp_path)
    with pytest.raises(RuntimeError), ImageWriter(path, ImageKind.PSTREE, fsync=True) as w:
        w.write(entry)
        raise RuntimeError("boom")
    assert ImagesDir(tmp_path).pstree() == [entry]
    assert no_temp_files(tmp_path)


def test_writer_close_abort_and_misuse(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "a.img", ImageKind.MM, fsync=True)
    w.write_payload(b"123")
    w.close()
    w.close()
    assert w.closed and (tmp_path / "a.img").exists()
    with pytest.raises(ClosedResourceError):
        w.write_payload(b"")
    w = ImageWriter(tmp_path / "b.img", ImageKind.MM)
    w.abort()
    w.abort()
    assert not (tmp_path / "b.img").exists() and no_temp_files(tmp_path)
    with pytest.raises(ConfigurationError):
        ImageWriter(tmp_path / "c.img", ImageKind.PAGES)


def test_forgotten_writer_warns_and_cleans_up(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "a.img", ImageKind.MM)
    w.write_payload(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del w
        gc.collect()
    assert any(issubclass(c.category, ResourceWarning) for c in caught)
    assert list(tmp_path.iterdir()) == []


def test_large_image_is_flushed_in_chunks(tmp_path: Path) -> None:
    payloads = [bytes([i % 256]) * 1000 for i in range(1000)]  # ~1 MB, several flushes
    write_raw(tmp_path / "x.img", ImageKind.PSTREE, payloads)
    assert read_raw(tmp_path / "x.img") == payloads


# -- pages writer -------------------------------------------------------------------------


def page(n: int) -> bytes:
    return bytes([n % 256]) * PAGE_SIZE


def test_pages_writer_chunks(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    with PagesWriter(path) as w:
        w.write(page(1))
        w.write(memoryview(page(2) + page(3))[:PAGE_SIZE + 100])
        w.write(bytearray(page(3)[100:]))
        assert w.size == 3 * PAGE_SIZE and w.nr_pages == 3
        assert not path.exists()
    assert path.read_bytes() == page(1) + page(2) + page(3)


def test_pages_writer_rejects_partial_pages(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    w = PagesWriter(path)
    w.write(b"x" * 100)
    with pytest.raises(ImageError, match="whole number") as info:
        w.close()
    assert info.value.offset == 100
    assert not path.exists() and no_temp_files(tmp_path)


def test_pages_writer_splices_from_a_pipe(tmp_path: Path) -> None:
    data = b"".join(page(i) for i in range(300))  # larger than a pipe's buffer
    r, wfd = os.pipe()

    def feed() -> None:
        with os.fdopen(wfd, "wb") as f:
            f.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with PagesWriter(tmp_path / "pages-1.img") as w:
            w.write(page(7))
            assert w.write_from_fd(r, len(data) - PAGE_SIZE) == len(data) - PAGE_SIZE
            assert w.write_from_fd(r, 10 * PAGE_SIZE) == PAGE_SIZE  # EOF after one page
            assert w._splice  # the pipe path really used splice(2)
    finally:
        feeder.join()
        os.close(r)
    assert (tmp_path / "pages-1.img").read_bytes() == page(7) + data


def test_pages_writer_copies_from_a_regular_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(page(1) + page(2))
    fd = os.open(src, os.O_RDONLY)
    try:
        with PagesWriter(tmp_path / "pages-2.img") as w:
            assert w.write_from_fd(fd, 2 * PAGE_SIZE) == 2 * PAGE_SIZE
            with pytest.raises(ConfigurationError):
                w.write_from_fd(fd, -1)
    finally:
        os.close(fd)
    assert (tmp_path / "pages-2.img").read_bytes() == page(1) + page(2)


def test_pages_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError), PagesWriter(tmp_path / "pages-1.img") as w:
        w.write(page(1))
        w.write_from_fd(-1, PAGE_SIZE)
    assert list(tmp_path.iterdir()) == []


# -- pagemap entries ----------------------------------------------------------------------


def test_pagemap_entry_validation() -> None:
    assert PagemapEntry(0x1000, 1, 4).flags is PE.PRESENT  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        PagemapEntry(0x1001, 1, PE.PRESENT)
    with pytest.raises(ConfigurationError):
        PagemapEntry(0x1000, 0, PE.PRESENT)
    with pytest.raises(ConfigurationError):
        PagemapEntry((1 << 64) - PAGE_SIZE, 2, PE.PRESENT)
    assert PagemapEntry((1 << 64) - PAGE_SIZE, 1, PE.PRESENT).end == 1 << 64


def pe_pb(**kw: int | bool) -> pagemap_pb2.pagemap_entry:
    entry = pagemap_pb2.pagemap_entry(vaddr=0x10000)
    for name, value in kw.items():
        setattr(entry, name, value)
    return entry


@pytest.mark.parametrize(("fields", "nr_pages", "flags"), [
    ({"compat_nr_pages": 3}, 3, PE.PRESENT),  # legacy: no flags => PRESENT
    ({"compat_nr_pages": 3, "in_parent": True}, 3, PE.PARENT),  # legacy in_parent
    ({"compat_nr_pages": 3, "in_parent": False}, 3, PE.PRESENT),
    ({"compat_nr_pages": 3, "flags": 6}, 3, PE.LAZY | PE.PRESENT),
    ({"compat_nr_pages": 3, "flags": 2, "in_parent": True}, 3, PE.LAZY | PE.PARENT),
    ({"compat_nr_pages": 0, "flags": 4, "nr_pages": 2**40}, 2**40, PE.PRESENT),  # CRIU 4.2
    ({"compat_nr_pages": 5, "flags": 4, "nr_pages": 7}, 7, PE.PRESENT),  # field 5 wins
    ({"compat_nr_pages": 5, "flags": 4, "nr_pages": 0}, 5, PE.PRESENT),  # field 5 zero
])
def test_pagemap_entry_compat_rules(fields: dict[str, int | bool], nr_pages: int,
                                    flags: PE) -> None:
    assert PagemapEntry.from_fields(wire_fields(pe_pb(**fields).SerializeToString())) == \
        PagemapEntry(0x10000, nr_pages, flags)


U64 = st.integers(0, 2**64 - 1)


@FAST
@given(pids=st.lists(st.integers(0, 2**32 - 1), max_size=5),
       vmas=st.lists(st.tuples(U64, U64), max_size=20), state=st.none() | st.integers(0, 9))
def test_fields_read_without_protobuf_agree_with_protobuf(
        tmp_path: Path, pids: list[int], vmas: list[tuple[int, int]], state: int | None) -> None:
    """What a daemon reads without protobuf's runtime (pstree pids, a task's state, VMA
    bounds; pagemap entries above) is what protobuf reads."""
    d = ImagesDir(tmp_path)
    d.write_pstree([PstreeEntry(pid=p, ppid=0, pgid=p, sid=p) for p in pids])
    d.write_mm(1, mm_entry([vma(a, b) for a, b in vmas]))
    core = x86_core()
    if state is None:
        core.ClearField("tc")
    else:
        core.tc.task_state = state
    d.write_core(1, core)
    assert d.pstree_pids() == [e.pid for e in d.pstree()]
    assert d._read_one_fields(ImageKind.MM, 1, "mm_entry", _vma_bounds) == vmas
    assert d.has_memory(1) == (state is None or state in (1, 3))


@pytest.mark.parametrize(("payload", "what"), [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x12\x05ab", "runs past the end"),
    (b"\x0b", "wire type 3"),
    (b"\x10\x01", "required field pid is missing"),
    (b"\x0a\x01a", "pid is not an integer"),
])
def test_fields_read_without_protobuf_refuse_damage(tmp_path: Path, payload: bytes,
                                                     what: str) -> None:
    d = ImagesDir(tmp_path)
    offsets = write_raw(d.image_path(ImageKind.PSTREE), ImageKind.PSTREE,
                        [pstree_pb2.pstree_entry(pid=1, ppid=0, pgid=1, sid=1)
                         .SerializeToString(), payload])
    with pytest.raises(ImageError, match=what) as info:
        d.pstree_pids()
    assert info.value.offset == offsets[1]


def test_pagemap_entry_to_pb_fills_both_counts() -> None:
    small = PagemapEntry(0x1000, 0xFFFF_FFFF, PE.LAZY).to_pb()
    assert (small.compat_nr_pages, small.nr_pages, small.flags) == (0xFFFF_FFFF, 0xFFFF_FFFF, 2)
    assert not small.HasField("in_parent")
    big = PagemapEntry(0x1000, 2**32, PE.PRESENT).to_pb()
    assert (big.compat_nr_pages, big.nr_pages) == (0, 2**32)


def test_pagemap_round_trip(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    entries = [PagemapEntry(0x1000, 1, PE.PRESENT),
               PagemapEntry(0x2000, 2**32 + 1, PE.LAZY | PE.PRESENT),
               PagemapEntry(0x7FFF_F000_0000, 5, PE.LAZY),
               PagemapEntry(0x7FFF_F001_0000, 5, PE.PARENT)]
    d.write_pagemap(42, 0x10001, entries)
    assert d.pagemap(42) == (0x10001, entries)
    with d.open_pagemap(42) as r:
        assert r.pages_id == 0x10001
        assert next(iter(r)) == entries[0]


def test_pagemap_writer_wants_order(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    with pytest.raises(ConfigurationError, match="out of order"):
        d.write_pagemap(1, 1, [PagemapEntry(0x5000, 2, PE.PRESENT),
                               PagemapEntry(0x6000, 1, PE.PRESENT)])
    assert list(tmp_path.iterdir()) == []


def test_pagemap_reader_checks_entries(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    path = d.image_path(ImageKind.PAGEMAP, 1)
    head = pagemap_pb2.pagemap_head(pages_id=1).SerializeToString()
    ok = pe_pb(compat_nr_pages=2, flags=4).SerializeToString()
    for bad, what in [
        (pe_pb(compat_nr_pages=1, flags=4).SerializeToString(), "out of order"),
        (pagemap_pb2.pagemap_entry(vaddr=0x10010, compat_nr_pages=1).SerializeToString(),
         "not a page address"),
        (pagemap_pb2.pagemap_entry(vaddr=0x20000, compat_nr_pages=0).SerializeToString(),
         "has 0 pages"),
    ]:
        offsets = write_raw(path, ImageKind.PAGEMAP, [head, ok, bad])
        with pytest.raises(ImageError, match=what) as info:
            d.pagemap(1)
        assert info.value.offset == offsets[2]
    write_raw(path, ImageKind.PAGEMAP, [])
    with pytest.raises(ImageError, match="no pagemap_head"):
        d.pagemap(1)


# -- lazy ranges and page offsets ---------------------------------------------------------

P = PAGE_SIZE


def test_lazy_ranges_cut_at_vmas() -> None:
    entries = [PagemapEntry(0x10 * P, 4, PE.PRESENT),                   # not lazy
               PagemapEntry(0x20 * P, 0x30, PE.LAZY | PE.PRESENT),      # spans 3 VMAs + holes
               PagemapEntry(0x60 * P, 2, PE.LAZY),                      # outside every VMA
               PagemapEntry(0x70 * P, 4, PE.LAZY)]                      # inside one VMA
    vmas = [(0x70 * P, 0x80 * P), (0x10 * P, 0x28 * P), (0x28 * P, 0x30 * P),
            (0x40 * P, 0x48 * P)]
    assert lazy_ranges(entries, vmas) == [
        (0x20 * P, 8), (0x28 * P, 8), (0x40 * P, 8), (0x70 * P, 4)]
    assert lazy_ranges(entries, vmas)[0] == PageRange(0x20 * P, 8)
    assert PageRange(0x20 * P, 8).end == 0x28 * P
    assert lazy_ranges(entries, []) == []


def test_lazy_ranges_reject_bad_input() -> None:
    e = [PagemapEntry(0, 1, PE.LAZY)]
    with pytest.raises(ConfigurationError):
        lazy_ranges(e, [(0, 100)])
    with pytest.raises(ConfigurationError):
        lazy_ranges(e, [(0, 2 * P), (P, 3 * P)])
    with pytest.raises(ConfigurationError):
        lazy_ranges([PagemapEntry(P, 1, PE.LAZY), PagemapEntry(0, 2, PE.LAZY)], [])


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[PagemapEntry], list[tuple[int, int]]]:
    """Random sorted pagemap entries and VMAs over a 64-page window."""
    def runs(flag_choices: list[PE]) -> Iterator[tuple[int, int, PE]]:
        pos = draw(st.integers(0, 3))
        while pos < 64:
            n = draw(st.integers(1, 8))
            yield pos, min(n, 64 - pos), draw(st.sampled_from(flag_choices))
            pos += n + draw(st.integers(0, 3))

    flags = [PE.PRESENT, PE.LAZY, PE.LAZY | PE.PRESENT, PE.PARENT, PE.LAZY | PE.PARENT]
    entries = [PagemapEntry(s * P, n, f) for s, n, f in runs(flags)]
    vmas = [(s * P, (s + n) * P) for s, n, _ in runs([PE.PRESENT])]
    return entries, draw(st.permutations(vmas))


@settings(max_examples=60, deadline=None)
@given(layout=layouts())
def test_lazy_ranges_property(layout: tuple[list[PagemapEntry], list[tuple[int, int]]]) -> None:
    entries, vmas = layout
    ranges = lazy_ranges(entries, vmas)
    lazy_pages = {e.vaddr // P + i for e in entries if PE.LAZY in e.flags
                  for i in range(e.nr_pages)}
    vma_pages = {i for s, e in vmas for i in range(s // P, e // P)}
    got = [r.vaddr // P + i for r in ranges for i in range(r.nr_pages)]
    assert sorted(got) == got and len(set(got)) == len(got)
    assert set(got) == lazy_pages & vma_pages
    for r in ranges:  # each range inside one VMA and one entry
        assert any(s <= r.vaddr and r.end <= e for s, e in vmas)
        assert any(e.vaddr <= r.vaddr and r.end <= e.end for e in entries)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), probe=st.tuples(st.integers(0, 70), st.integers(1, 10)))
def test_page_index_property(layout: tuple[list[PagemapEntry], list[tuple[int, int]]],
                             probe: tuple[int, int]) -> None:
    entries, _ = layout
    where: dict[int, int] = {}  # page number -> byte offset, the brute-force way
    offset = 0
    for e in entries:
        if PE.PRESENT in e.flags and PE.PARENT not in e.flags:
            for i in range(e.nr_pages):
                where[e.vaddr // P + i] = offset
                offset += P
    index = PageIndex(entries)
    assert index.size == offset and index.nr_pages == len(where)
    first, count = probe
    pages = range(first, first + count)
    if all(p in where for p in pages) and all(where[p] == where[first] + (p - first) * P
                                              for p in pages):
        assert index.offset(first * P, count) == where[first]
    else:
        assert index.offset(first * P, count) is None


def test_page_index_examples() -> None:
    entries = [PagemapEntry(0x10 * P, 2, PE.PRESENT), PagemapEntry(0x12 * P, 3, PE.LAZY),
               PagemapEntry(0x15 * P, 1, PE.LAZY | PE.PRESENT),
               PagemapEntry(0x16 * P, 1, PE.PRESENT), PagemapEntry(0x20 * P, 1, PE.PARENT),
               PagemapEntry(0x30 * P, 4, PE.PRESENT)]
    index = PageIndex(entries)
    assert [off for _, off in index] == [0, 2 * P, 3 * P, 4 * P]
    assert len(index) == 4
    assert index.offset(0x11 * P) == P
    assert index.offset(0x12 * P) is None  # lazy only: no data
    assert index.offset(0x15 * P, 2) == 2 * P  # spans two adjacent entries
    assert index.offset(0x16 * P, 2) is None
    assert index.offset(0x20 * P) is None  # in the parent
    assert index.offset(0x33 * P) == 7 * P
    assert index.offset(0x8 * P) is None
    with pytest.raises(ConfigurationError):
        index.offset(0x10 * P + 1)
    with pytest.raises(ConfigurationError):
        index.offset(0x10 * P, 0)


# -- ImagesDir ----------------------------------------------------------------------------


def test_inventory_round_trip(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    d.write_inventory()
    inv = d.inventory()
    assert (inv.img_version, inv.fdinfo_per_id) == (2, True)
    custom = InventoryEntry(img_version=2, fdinfo_per_id=True, ns_per_id=True,
                            root_ids=TaskKobjIdsEntry(vm_id=1, files_id=2, fs_id=3,
                                                      sighand_id=4),
                            lsmtype=inventory_pb2.APPARMOR,
                            dump_uptime=123456789, dump_criu_run_id="abc", allow_uprobes=True)
    d.write_inventory(custom)
    assert d.inventory() == custom
    assert (tmp_path / "inventory.img").read_bytes()[:4] == struct.pack("<I", 0x58313116)
    with pytest.raises(ConfigurationError):
        d.write_inventory(InventoryEntry(img_version=1))
    write_raw(tmp_path / "inventory.img", ImageKind.INVENTORY,
              [InventoryEntry(img_version=1).SerializeToString()])
    with pytest.raises(ImageError, match="unsupported images version 1"):
        d.inventory()


def test_pstree_core_mm_round_trip(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path)
    tree = [PstreeEntry(pid=10, ppid=1, pgid=10, sid=10, threads=[10, 11]),
            PstreeEntry(pid=12, ppid=10, pgid=10, sid=10, threads=[12])]
    d.write_pstree(tree)
    assert d.pstree() == tree
    core = x86_core()
    d.write_core(11, core)
    assert d.core(11) == core
    assert d.core(11).thread_info.gpregs.ip == 0x7F00_DEAD_BEEF
    mm = mm_entry([vma(0x400000, 0x401000), vma(0x7F0000000000, 0x7F0000100000)])
    d.write_mm(10, mm)
    assert d.mm(10) == mm
    fs = FsEntry(cwd_id=3, root_id=4)
    assert d.write_entries(ImageKind.FS, [fs], 10) == tmp_path / "fs-10.img"
    assert d.read_entries(ImageKind.FS, FsEntry, 10) == [fs]
    assert repr(d) == f"ImagesDir({str(tmp_path)!r})"
    with pytest.raises(FileNotFoundError):
        d.mm(99)


def test_lazy_ranges_and_find_pages_end_to_end(tmp_path: Path) -> None:
    d = ImagesDir(tmp_path, fsync=True)
    heap, anon = 0x0100_0000, 0x7F00_0000_0000
    d.write_mm(5, mm_entry([vma(heap, heap + 8 * P), vma(anon, anon + 4 * P),
                            vma(anon + 4 * P, anon + 16 * P)]))
    entries = [PagemapEntry(heap, 2, PE.PRESENT),
               PagemapEntry(heap + 4 * P, 2, PE.LAZY | PE.PRESENT),
               PagemapEntry(anon + 2 * P, 6, PE.LAZY),
               PagemapEntry(anon + 8 * P, 2, PE.PRESENT)]
    d.write_pagemap(5, 1, entries)
    with d.open_pages_writer(1) as w:
        for n in range(6):
            w.write(page(n))
    assert d.lazy_ranges(5) == [(heap + 4 * P, 2), (anon + 2 * P, 2), (anon + 4 * P, 4)]
    assert d.find_pages(5, heap + 4 * P) == (d.pages_path(1), 2 * P)
    assert d.find_pages(5, anon + 2 * P) is None
    path, index = d.page_index(5)
    assert path == tmp_path / "pages-1.img"
    assert path.stat().st_size == index.size
    for e, off in index:
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(P) == page(off // P)
            assert e.has_data
    d.write_mm(5, mm_entry([vma(heap, heap + 3 * P), vma(heap + 2 * P, heap + 8 * P)]))
    with pytest.raises(ImageError, match="overlaps") as info:
        d.lazy_ranges(5)
    assert info.value.path == str(tmp_path / "mm-5.img")


@FAST
@given(ids=st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_pstree_property_round_trip(tmp_path: Path, ids: list[int]) -> None:
    assume(len(set(ids)) == len(ids))
    d = ImagesDir(tmp_path)
    tree = [PstreeEntry(pid=i, ppid=0, pgid=i, sid=i, threads=[i]) for i in ids]
    d.write_pstree(tree)
    assert d.pstree() == tree
