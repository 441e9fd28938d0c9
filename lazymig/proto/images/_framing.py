"""Image framing: magics, then u32-length-prefixed protobuf entries until EOF.

Grammar (after pycriu's ``images.py``)::

    IMAGE ::= [LEADING_MAGIC] MAGIC { ENTRY }     # v1.1; inventory has no LEADING_MAGIC
    ENTRY ::= SIZE PAYLOAD                        # SIZE: u32, little-endian
    PAGES ::= { PAGE }                            # raw, 4096-byte pages, no magic

Readers stream entries one at a time and turn any damage (bad magic, a
truncated length or payload, an absurd length, undecodable protobuf, missing
required fields) into :class:`~lazymig.errors.ImageError` naming the file and
the byte offset where the damaged part starts.

Writers are atomic: they write to a hidden temporary file in the target
directory and ``os.replace`` it over the final name only when closed without
an error, so a reader never sees half an image. On an exception (or
:meth:`abort`) the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Self, TypeVar

from lazymig.errors import ClosedResourceError, ConfigurationError, ImageError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.images._magic import (
    IMG_COMMON_MAGIC,
    IMG_SERVICE_MAGIC,
    U32,
    ImageKind,
)
from lazymig.proto.images._wire import Fields, fields

__all__ = [
    "DEFAULT_MAX_ENTRY_SIZE",
    "ImageReader",
    "ImageWriter",
    "PagesWriter",
]

if TYPE_CHECKING:  # protobuf's runtime only where a message is built: not in the daemon
    from google.protobuf.message import Message

M = TypeVar("M", bound="Message")
T = TypeVar("T")

StrPath = str | os.PathLike[str]

DEFAULT_MAX_ENTRY_SIZE = 64 << 20
"""Largest entry a reader accepts by default (64 MiB).

CRIU's entries are small (an mm_entry with ten thousand VMAs is well under a
megabyte); a larger length means a corrupt image, and refusing it up front
keeps a damaged file from making us allocate gigabytes.
"""

_WRITE_BUFFER = 256 << 10
_COPY_CHUNK = 1 << 20


def _missing_fields(entry: Message) -> str:
    # In the runtime but not in types-protobuf's stub of Message.
    find = getattr(entry, "FindInitializationErrors", None)
    return ", ".join(find()) if find is not None else "?"


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _AtomicFile:
    """A temporary file next to *path* that replaces *path* on :meth:`commit`."""

    __slots__ = ("_fsync", "fd", "path", "tmp")

    def __init__(self, path: StrPath, *, fsync: bool) -> None:
        self.path = Path(path)
        self._fsync = fsync
        import tempfile  # only writers need it: 1 MiB a reader need not load

        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        self.fd = fd
        self.tmp: Path | None = Path(tmp)

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def commit(self) -> None:
        fd, self.fd = self.fd, -1
        try:
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        assert self.tmp is not None
        self.tmp.replace(self.path)
        self.tmp = None
        if self._fsync:
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def abort(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        tmp, self.tmp = self.tmp, None
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class _AtomicWriterBase:
    """Shared close/abort/context-manager logic of the writers."""

    _file: _AtomicFile

    @property
    def path(self) -> Path:
        """The final path of the image (it exists only after a successful close)."""
        return self._file.path

    @property
    def closed(self) -> bool:
        """True once the writer was closed or aborted."""
        return not self._file.open

    def _check_open(self) -> None:
        if not self._file.open:
            raise ClosedResourceError(f"writer for {self._file.path} is closed")

    def _finish(self) -> None:
        """Flush whatever is buffered; validate. Called by :meth:`close`."""

    def close(self) -> None:
        """Finish the image and move it into place. Idempotent.

        If finishing fails the temporary file is removed and the exception
        propagates; the final path is left untouched.
        """
        if not self._file.open:
            return
        try:
            self._finish()
            self._file.commit()
        except BaseException:
            self._file.abort()
            raise

    def abort(self) -> None:
        """Drop the image: remove the temporary file, leave the final path untouched."""
        self._file.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and file.open:
            warnings.warn(f"image writer for {file.path} was never closed; dropping it",
                          ResourceWarning, stacklevel=2)
            file.abort()


class ImageWriter(_AtomicWriterBase):
    """Write a protobuf image: the kind's magics, then length-prefixed entries.

    Entries are buffered and written in large chunks; nothing reaches the
    final path until :meth:`close`. Use as a context manager::

        with ImageWriter(path, ImageKind.PSTREE) as w:
            w.write(entry)

    Args:
        path: the final file name (its directory must exist).
        kind: the image kind; raw kinds (PAGES) are refused, use
            :class:`PagesWriter`.
        fsync: fsync the file and its directory on close.
    """

    def __init__(self, path: StrPath, kind: ImageKind, *, fsync: bool = False) -> None:
        if kind.is_raw:
            raise ConfigurationError(f"{kind.name} images are raw: use PagesWriter")
        self.kind = kind
        self._file = _AtomicFile(path, fsync=fsync)
        self._buf = bytearray(kind.header)
        self._offset = len(self._buf)

    @property
    def offset(self) -> int:
        """Bytes written so far (the offset the next entry will start at)."""
        return self._offset

    def write(self, entry: Message) -> int:
        """Append one entry; return the byte offset at which it starts.

        Raises:
            ImageError: the entry lacks required fields (CRIU would reject it).
            ClosedResourceError: the writer is closed.
        """
        from google.protobuf.message import EncodeError

        self._check_open()
        try:
            payload = entry.SerializeToString()
        except EncodeError as exc:
            raise ImageError(f"{entry.DESCRIPTOR.name} lacks required fields: "
                             f"{_missing_fields(entry)}",
                             path=self._file.path, offset=self._offset) from exc
        return self.write_payload(payload)

    def write_payload(self, payload: bytes | bytearray | memoryview) -> int:
        """Append one already-serialised entry; return its byte offset."""
        self._check_open()
        size = memoryview(payload).nbytes
        if size > 0x7FFF_FFFF:  # crit reads the length as a signed int
            raise ImageError(f"entry of {size} bytes is too large for an image",
                             path=self._file.path, offset=self._offset)
        start = self._offset
        self._buf += U32.pack(size)
        self._buf += payload
        self._offset += 4 + size
        if len(self._buf) >= _WRITE_BUFFER:
            self._flush()
        return start

    def write_extra(self, data: bytes | bytearray | memoryview) -> None:
        """Append raw bytes after the entry just written (CRIU's "extra" payload,
        e.g. a pipe's queued data after its ``pipe_data_entry``)."""
        self._check_open()
        self._buf += data
        self._offset += memoryview(data).nbytes
        if len(self._buf) >= _WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            _write_all(self._file.fd, self._buf)
            self._buf.clear()

    def _finish(self) -> None:
        self._flush()


class PagesWriter(_AtomicWriterBase):
    """Write a raw ``pages-<id>.img``: 4096-byte pages, no magic, no framing.

    Data goes straight to the file descriptor (no buffering in Python), so a
    multi-gigabyte image never sits in memory. Data can come from buffers
    (:meth:`write`) or from a file descriptor (:meth:`write_from_fd`), which
    uses ``splice(2)`` when the source is a pipe, so pages collected in pipes
    on the dump side are never copied through user space.

    On close the size must be a whole number of pages, else the image is
    dropped and :class:`~lazymig.errors.ImageError` is raised.

    Args:
        path: the final file name.
        fsync: fsync the file and its directory on close.
    """

    def __init__(self, path: StrPath, *, fsync: bool = False) -> None:
        self._file = _AtomicFile(path, fsync=fsync)
        self._size = 0
        self._splice = True

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def nr_pages(self) -> int:
        """Whole pages written so far."""
        return self._size // PAGE_SIZE

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append *data* (any length; the total must end on a page boundary). Returns its size."""
        self._check_open()
        view = memoryview(data).cast("B")
        _write_all(self._file.fd, view)
        self._size += view.nbytes
        return view.nbytes

    def write_from_fd(self, fd: int, nbytes: int) -> int:
        """Move *nbytes* from the file descriptor *fd* into the image.

        Uses ``os.splice`` (zero copy) when possible, else ``read``/``write``.
        *fd* should be blocking; a non-blocking one may raise
        :class:`BlockingIOError` when it runs dry, after part of the data was
        moved (:attr:`size` tells how much).

        Returns:
            The bytes moved: *nbytes*, or fewer if *fd* reached end of file.
        """
        self._check_open()
        if nbytes < 0:
            raise ConfigurationError(f"nbytes must not be negative, got {nbytes}")
        done = 0
        while done < nbytes:
            want = nbytes - done
            n = -1
            if self._splice:
                try:
                    n = os.splice(fd, self._file.fd, want)
                except OSError as exc:
                    # EINVAL: neither end may be a pipe, or the file system
                    # cannot splice; nothing was moved, so fall back.
                    if exc.errno != errno.EINVAL:
                        raise
                    self._splice = False
            if n < 0:
                chunk = os.read(fd, min(want, _COPY_CHUNK))
                _write_all(self._file.fd, chunk)
                n = len(chunk)
            if n == 0:
                break
            done += n
            self._size += n
        return done

    def _finish(self) -> None:
        if self._size % PAGE_SIZE:
            raise ImageError(f"pages image of {self._size} bytes is not a whole number of "
                             f"{PAGE_SIZE}-byte pages", path=self._file.path, offset=self._size)


class ImageReader:
    """Read a protobuf image entry by entry.

    The magics are checked on open. With ``kind=None`` the kind is taken from
    the file's magic. Use as a context manager::

        with ImageReader(path, ImageKind.PSTREE) as r:
            for entry in r.entries(pstree_pb2.pstree_entry):
                ...

    Args:
        path: the image file.
        kind: the expected kind, or None to accept any known kind.
        max_entry_size: entries longer than this are treated as corruption.

    Raises:
        ImageError: bad or truncated magic, or a kind other than *kind*.
        OSError: the file cannot be opened (e.g. :class:`FileNotFoundError`).
    """

    def __init__(self, path: StrPath, kind: ImageKind | None = None, *,
                 max_entry_size: int = DEFAULT_MAX_ENTRY_SIZE) -> None:
        if kind is not None and kind.is_raw:
            raise ConfigurationError(f"{kind.name} images are raw and have no entries")
        self.path = Path(path)
        self.max_entry_size = max_entry_size
        self._offset = 0
        self._entry_offset = 0
        self._file: BinaryIO | None = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self.kind = self._read_magic(kind)
        except BaseException:
            self.close()
            raise

    def _error(self, message: str, offset: int) -> ImageError:
        return ImageError(message, path=self.path, offset=offset)

    def _read_u32(self, what: str) -> int:
        start = self._offset
        data = self._stream().read(4)
        if len(data) < 4:
            raise self._error(f"truncated {what}: {len(data)} of 4 bytes", start)
        self._offset += 4
        return int(U32.unpack(data)[0])

    def _read_magic(self, expected: ImageKind | None) -> ImageKind:
        first = self._read_u32("magic")
        if first == ImageKind.INVENTORY.magic:
            kind = ImageKind.INVENTORY
        elif first in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            second = self._read_u32("magic")
            try:
                kind = ImageKind(second)
            except ValueError:
                raise self._error(f"unknown image magic 0x{second:08x}", 4) from None
            if kind.is_raw or kind.leading_magic != first:
                raise self._error(f"image magic 0x{second:08x} ({kind.name}) cannot follow "
                                  f"0x{first:08x}", 4)
        else:
            want = "" if expected is None else f" (want {expected.header[:4].hex()})"
            raise self._error(f"bad magic 0x{first:08x}{want}", 0)
        if expected is not None and kind is not expected:
            raise self._error(f"this is a {kind.name} image, not {expected.name}",
                              0 if kind is ImageKind.INVENTORY else 4)
        return kind

    def _stream(self) -> BinaryIO:
        if self._file is None:
            raise ClosedResourceError(f"reader for {self.path} is closed")
        return self._file

    @property
    def offset(self) -> int:
        """Byte offset of the next unread entry."""
        return self._offset

    @property
    def entry_offset(self) -> int:
        """Byte offset at which the entry read last starts."""
        return self._entry_offset

    def read_payload(self) -> bytes | None:
        """Return the next entry's raw protobuf bytes, or None at end of file.

        Raises:
            ImageError: truncated length or payload, or a length over the bound.
        """
        stream = self._stream()
        start = self._offset
        head = stream.read(4)
        if not head:
            return None
        if len(head) < 4:
            raise self._error(f"truncated entry length: {len(head)} of 4 bytes", start)
        size = int(U32.unpack(head)[0])
        if size > self.max_entry_size:
            raise self._error(f"entry length {size} exceeds the limit of "
                              f"{self.max_entry_size} bytes (corrupt image?)", start)
        payload = stream.read(size)
        if len(payload) < size:
            raise self._error(f"truncated entry: {len(payload)} of {size} bytes", start)
        self._entry_offset = start
        self._offset = start + 4 + size
        return payload

    def read_extra(self, size: int) -> bytes:
        """Read the ``size`` raw bytes that follow the entry just read (see
        :meth:`ImageWriter.write_extra`), or raise ImageError if the image ends first."""
        data = self._stream().read(size)
        if len(data) < size:
            raise self._error(f"truncated extra payload: {len(data)} of {size} bytes",
                              self._offset)
        self._offset += size
        return data

    def decode(self, payload: bytes, entry_type: type[M], offset: int) -> M:
        """Decode *payload* (found at *offset*) as *entry_type*, or raise ImageError."""
        from google.protobuf.message import DecodeError

        entry = entry_type()
        try:
            entry.ParseFromString(payload)
        except (DecodeError, ValueError, RecursionError) as exc:
            raise self._error(f"undecodable {entry_type.DESCRIPTOR.name}: {exc}", offset) from exc
        if not entry.IsInitialized():
            raise self._error(f"{entry_type.DESCRIPTOR.name} lacks required fields: "
                              f"{_missing_fields(entry)}", offset)
        return entry

    def read_fields(self, name: str, extract: Callable[[Fields], T]) -> T | None:
        """The next entry read without protobuf's runtime (:mod:`._wire`): ``extract``
        of its fields (it raises ValueError if they are not a ``name``), or None at
        end of file. For the few fields a daemon reads; everything else uses
        :meth:`read`."""
        payload = self.read_payload()
        if payload is None:
            return None
        try:
            return extract(fields(payload))
        except ConfigurationError as exc:
            raise self._error(str(exc), self._entry_offset) from exc
        except ValueError as exc:
            raise self._error(f"undecodable {name}: {exc}", self._entry_offset) from exc

    def read(self, entry_type: type[M]) -> M | None:
        """Return the next entry decoded as *entry_type*, or None at end of file."""
        payload = self.read_payload()
        if payload is None:
            return None
        return self.decode(payload, entry_type, self._entry_offset)

    def read_one(self, entry_type: type[M]) -> M:
        """Return the image's only entry; raise ImageError if there is none or more."""
        entry = self.read(entry_type)
        if entry is None:
            raise self._error(f"no {entry_type.DESCRIPTOR.name} entry", self._offset)
        self.expect_end()
        return entry

    def expect_end(self) -> None:
        """Raise ImageError unless the image ends here."""
        if self._stream().read(1):
            raise self._error("unexpected data after the last entry", self._offset)

    def entries(self, entry_type: type[M]) -> Iterator[M]:
        """Yield the remaining entries, each decoded as *entry_type*."""
        while (entry := self.read(entry_type)) is not None:
            yield entry

    def close(self) -> None:
        """Close the file. Idempotent."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._file is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
