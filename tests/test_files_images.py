"""The open-file images without a process: write_files/read_files round trip, a
pipes-data image cut short, and a dump without file images."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazymig.dump.files import FD_CLOEXEC, DumpedFiles, read_files, write_files
from lazymig.errors import ImageError
from lazymig.proto.images import (
    FdinfoEntry,
    FileEntry,
    FownEntry,
    ImageKind,
    ImagesDir,
    PipeDataEntry,
    PipeEntry,
    RegFileEntry,
    fdinfo_pb2,
)

ZERO = FownEntry(uid=0, euid=0, signum=0, pid_type=0, pid=0)


def sample() -> DumpedFiles:
    return DumpedFiles(
        fds=[FdinfoEntry(id=1, flags=FD_CLOEXEC, type=fdinfo_pb2.REG, fd=3),
             FdinfoEntry(id=1, flags=0, type=fdinfo_pb2.REG, fd=42),
             FdinfoEntry(id=2, flags=0, type=fdinfo_pb2.PIPE, fd=4),
             FdinfoEntry(id=3, flags=0, type=fdinfo_pb2.PIPE, fd=5)],
        files=[FileEntry(type=fdinfo_pb2.REG, id=1, reg=RegFileEntry(
                   id=1, flags=0o102001, pos=14, fown=ZERO, name="/var/log/x", size=20)),
               FileEntry(type=fdinfo_pb2.PIPE, id=2, pipe=PipeEntry(
                   id=2, pipe_id=777, flags=0o4000, fown=ZERO)),
               FileEntry(type=fdinfo_pb2.PIPE, id=3, pipe=PipeEntry(
                   id=3, pipe_id=777, flags=0o1, fown=ZERO))],
        pipe_data=[(PipeDataEntry(pipe_id=777, bytes=9, size=65536), b"in-flight"),
                   (PipeDataEntry(pipe_id=778, bytes=0, size=4096), b"")])


def test_file_images_round_trip(tmp_path: Path) -> None:
    images = ImagesDir(tmp_path)
    written = sample()
    paths = write_files(images, written)
    assert sorted(p.name for p in paths) == ["fdinfo-1.img", "files.img", "pipes-data.img"]
    back = read_files(images)
    assert (back.fds, back.files, back.pipe_data) == (written.fds, written.files,
                                                      written.pipe_data)
    assert back.fds_of(1) == [(3, True), (42, False)]
    assert back.file(2).pipe.pipe_id == 777


def test_a_cut_pipe_payload_is_an_image_error(tmp_path: Path) -> None:
    images = ImagesDir(tmp_path)
    write_files(images, sample())
    path = images.image_path(ImageKind.PIPES_DATA)
    raw = path.read_bytes()
    path.write_bytes(raw[:raw.index(b"in-flight") + 4])
    with pytest.raises(ImageError, match="truncated extra payload: 4 of 9 bytes"):
        read_files(images)


def test_a_dump_without_file_images_has_no_files(tmp_path: Path) -> None:
    files = read_files(ImagesDir(tmp_path))
    assert (files.fds, files.files, files.pipe_data) == ([], [], [])
