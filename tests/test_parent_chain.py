"""PE_PARENT pages found through a chain of parent dumps (lazymig.restore.parent),
on images written here: the nearest level with data wins; a broken chain is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazymig.dump.precopy import link_parent
from lazymig.errors import ImageError
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images import ImagesDir, PagemapEntry
from lazymig.restore.parent import ParentChain, write_parent_pages

PID = 42
A = 0x10000
B = A + 2 * PAGE_SIZE


def level(path: Path, entries: list[PagemapEntry], data: bytes,
          parent: Path | None = None) -> ImagesDir:
    path.mkdir()
    images = ImagesDir(path)
    images.write_pagemap(PID, 1, entries)
    images.pages_path(1).write_bytes(data)
    if parent is not None:
        link_parent(path, parent)
    return images


def test_the_nearest_parent_with_data_wins(tmp_path: Path) -> None:
    first = tmp_path / "1"
    level(first, [PagemapEntry(A, 3, PE.PRESENT)], b"1" * 3 * PAGE_SIZE)
    second = tmp_path / "2"
    level(second, [PagemapEntry(A, 2, PE.PARENT), PagemapEntry(B, 1, PE.PRESENT)],
          b"2" * PAGE_SIZE, first)
    child = level(tmp_path / "3", [PagemapEntry(A, 3, PE.PARENT)], b"", second)
    pieces = list(ParentChain(child, PID).locate(A, B + PAGE_SIZE))
    assert pieces == [(A, 2 * PAGE_SIZE, first / "pages-1.img", 0),
                      (B, PAGE_SIZE, second / "pages-1.img", 0)]
    assert list(ParentChain(child, PID).locate(A + PAGE_SIZE, B)) == [
        (A + PAGE_SIZE, PAGE_SIZE, first / "pages-1.img", PAGE_SIZE)]


def test_a_page_no_parent_has_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "1"
    level(first, [PagemapEntry(A, 1, PE.PRESENT)], b"1" * PAGE_SIZE)
    child = level(tmp_path / "2", [PagemapEntry(A, 2, PE.PARENT)], b"", first)
    with pytest.raises(ImageError, match=f"page {A + PAGE_SIZE:#x} is in the parent"):
        list(ParentChain(child, PID).locate(A, A + 2 * PAGE_SIZE))


def test_a_missing_parent_link_is_named_before_anything_is_written(tmp_path: Path) -> None:
    entries = [PagemapEntry(A, 1, PE.PARENT)]
    child = level(tmp_path / "2", entries, b"")
    with pytest.raises(ImageError, match="no working parent link"):
        write_parent_pages(0, child, PID, entries)  # pid 0: nothing may be written
