"""Fuzz targets: every parser that reads what a peer or a file says.

Each target takes one input (bytes) and must return normally or raise nothing
but the error its parser documents for bad input (RemoteProtocolError,
ImageError): anything else, an assertion below included, is a crash. The
first bytes of an input choose the parameters (wire layout, how the stream is
cut into reads), the rest is the data. Used by ``fuzz/run.py`` (atheris,
coverage-guided) and by ``fuzz/seed.py``, which writes the seed corpus.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from lazymig.dump.store import ImagesPageStore
from lazymig.errors import ImageError, RemoteProtocolError
from lazymig.proto import handover as ho
from lazymig.proto.constants import MAP_ANONYMOUS, MAP_PRIVATE, PAGE_SIZE, PE, VmaStatus
from lazymig.proto.images import (
    CoreEntry,
    ImageKind,
    ImagesDir,
    MmEntry,
    PagemapEntry,
    PstreeEntry,
    TaskCoreEntry,
    VmaEntry,
)
from lazymig.proto.pageserver import (
    NEED_DATA,
    AddPages,
    CloseReply,
    CloseRequest,
    ConnectionClosed,
    GetReply,
    GetRequest,
    OpenReply,
    OpenRequest,
    PageData,
    PageServerConnection,
    ParentReply,
    ParentRequest,
    Role,
    State,
)
from lazymig.proto.spec import DECLARATIONS
from lazymig.proto.uffd import MSG_SIZE, decode_events
from lazymig.proto.wire import (
    DstType,
    WireVersion,
    decode_dst_id,
    encode_dst_id,
    pack_header,
    unpack_header,
)
from lazymig.uffd.handover import HandoverSession

__all__ = ["IMAGE_KINDS", "LAZY_BASE", "TARGETS", "VERSIONS", "params_byte",
           "request_pipeline", "write_small_dump"]

VERSIONS = list(WireVersion)
MAX_PAGES = 16
"""The codec's page bound in these targets: page data stays small, limits get hit."""
MAX_IN_FLIGHT = 8
IMAGE_KINDS = [ImageKind.INVENTORY, ImageKind.PSTREE, ImageKind.CORE, ImageKind.MM,
               ImageKind.PAGEMAP]
"""The images the ``images`` target replaces, by the input's first byte."""
LAZY_BASE = 0x7F0000000000
BUFFER_SLACK = 256
"""A codec may hold one partial read (plus a header) undrained, never more."""


def _params(data: bytes) -> tuple[WireVersion, int, bytes]:
    """(wire layout, bytes per read 1..128, the rest) from an input's first byte."""
    first = data[0] if data else 0
    return VERSIONS[first & 1], 1 + (first >> 1), data[1:]


def params_byte(version: WireVersion, cut: int) -> bytes:
    """The first byte that makes an input choose ``version`` and ``cut`` bytes per read."""
    return bytes([VERSIONS.index(version) | ((cut - 1) << 1)])


def _pieces(body: bytes, cut: int) -> list[bytes]:
    return [body[i:i + cut] for i in range(0, len(body), cut)]


def _check_bounded(conn: PageServerConnection, cut: int, in_flight: int) -> None:
    assert conn.buffered <= cut + BUFFER_SLACK, f"{conn.buffered} bytes left undrained"
    assert conn.unanswered <= in_flight


# ---------------------------------------------------------------- page server, server role


def _serve(conn: PageServerConnection) -> bool:
    """Answer what the peer asked, as a page server would; False after EOF."""
    while (event := conn.next_event()) is not NEED_DATA:
        if isinstance(event, GetRequest):
            assert 0 < event.nr_pages <= MAX_PAGES and event.vaddr % PAGE_SIZE == 0
            conn.send(GetReply(event.pid, event.vaddr, 1))
            conn.send(PageData(bytes(PAGE_SIZE), last=True))
        elif isinstance(event, OpenRequest) and event.wants_reply:
            conn.send(OpenReply(has_parent=False))
        elif isinstance(event, ParentRequest):
            conn.send(ParentReply(has_parent=False))
        elif isinstance(event, CloseRequest):
            conn.send(CloseReply(0))
        elif isinstance(event, AddPages):
            assert event.nr_pages > 0 and event.vaddr % PAGE_SIZE == 0
        elif isinstance(event, ConnectionClosed):
            return False
    return True


def pageserver_server(data: bytes) -> None:
    """Bytes a page client sends, fed to the server role in reads of any size."""
    version, cut, body = _params(data)
    conn = PageServerConnection(Role.SERVER, version, max_pages=MAX_PAGES,
                                max_in_flight=MAX_IN_FLIGHT)
    try:
        for piece in _pieces(body, cut):
            conn.receive_data(piece)
            _serve(conn)
            _check_bounded(conn, cut, MAX_IN_FLIGHT)
        conn.receive_data(b"")
        assert not _serve(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


# ---------------------------------------------------------------- page server, client role


def request_pipeline(spec: int) -> list[GetRequest | OpenRequest | ParentRequest | CloseRequest]:
    """A pipeline of up to 8 requests chosen by the bits of ``spec``."""
    made: list[GetRequest | OpenRequest | ParentRequest | CloseRequest] = []
    for i in range(1 + (spec & 7)):
        kind = (spec >> (3 + i)) & 3
        if kind in (0, 3):
            made.append(GetRequest(1000 + i, LAZY_BASE + i * 16 * PAGE_SIZE, 1 + i % 4))
        elif kind == 1:
            made.append(OpenRequest(DstType.PID, 1000 + i))
        else:
            made.append(ParentRequest(DstType.PID, 1000 + i))
    if spec & 0x800:
        made.append(CloseRequest())
    return made


def pageserver_client(data: bytes) -> None:
    """Bytes a page server answers, fed to the client role after a pipeline of requests."""
    version, cut, body = _params(data)
    spec, body = int.from_bytes(body[:2], "little"), body[2:]
    in_flight = MAX_IN_FLIGHT + 1  # the longest pipeline: 8 requests and a CLOSE
    conn = PageServerConnection(Role.CLIENT, version, max_pages=MAX_PAGES,
                                max_in_flight=in_flight)
    for request in request_pipeline(spec):
        conn.send(request)
    payload = 0
    try:
        for piece in [*_pieces(body, cut), b""]:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, GetReply):
                    assert payload == 0 and 0 < event.nr_pages <= MAX_PAGES
                    payload = event.nr_pages * PAGE_SIZE
                elif isinstance(event, PageData):
                    payload -= len(event.data)
                    assert payload >= 0 and event.last == (payload == 0)
                elif isinstance(event, ConnectionClosed):
                    break
            if piece:
                _check_bounded(conn, cut, in_flight)
    except RemoteProtocolError:
        assert conn.state is State.ERROR


# ---------------------------------------------------------------- wire header


def wire_header(data: bytes) -> None:
    """Any header decodes; the fast path agrees with the construct declaration."""
    for version in VERSIONS:
        raw = data[:version.header_size]
        if len(raw) < version.header_size:
            continue
        header = unpack_header(version, raw)
        declared = DECLARATIONS[version].parse(raw)
        assert (header.cmd, header.nr_pages, header.vaddr, header.dst_id) == (
            declared.cmd, declared.nr_pages, declared.vaddr, declared.dst_id)
        rebuilt = pack_header(version, header.code, header.flags, header.nr_pages,
                              header.vaddr, header.dst_id)
        assert unpack_header(version, rebuilt) == header
        try:
            dst_type, ident = decode_dst_id(header.dst_id)
        except ValueError:
            continue
        assert decode_dst_id(encode_dst_id(dst_type, ident)) == (dst_type, ident)


# ---------------------------------------------------------------- handover

async def _receive_all(session: HandoverSession) -> None:
    while not isinstance(event := await session.next_event(), ho.ConnectionClosed):
        if isinstance(event, ho.TaskHandover | ho.Forked):
            raise AssertionError(f"an fd arrived where none was sent: {event}")


def handover(data: bytes) -> None:
    """The restorer's stream as the daemon reads it, and the daemon's as a guardian does:
    first through the codec alone (each byte of the first one says how the rest is cut
    into reads), then through a real socket."""
    cut = 1 + (data[0] % 7 if data else 0)
    for role, finished in ((ho.Role.DAEMON, False), (ho.Role.RESTORER, True)):
        connection = ho.HandoverConnection(role, finished=finished)
        try:
            for off in range(1, len(data) + 1, cut):
                connection.receive_data(data[off:off + cut] or b"")
                while not isinstance(event := connection.next_event(), type(ho.NEED_DATA)):
                    assert not isinstance(event, ho.TaskHandover | ho.Forked)  # no fd was sent
                    if isinstance(event, ho.ConnectionClosed):
                        break
        except RemoteProtocolError:
            pass
        assert connection.take_unclaimed_fds() == []
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with sender, receiver:
        receiver.setblocking(False)
        sender.sendall(data[1:4097])
        sender.shutdown(socket.SHUT_WR)
        with HandoverSession(receiver, ho.Role.DAEMON) as session:
            try:
                _loop().run_until_complete(asyncio.wait_for(_receive_all(session), 5))
            except RemoteProtocolError:
                pass


# ---------------------------------------------------------------- uffd messages


def uffd_events(data: bytes) -> None:
    """What a read() of a userfaultfd returns (a confused or hostile kernel peer)."""
    try:
        events = decode_events(data)
    except RemoteProtocolError as exc:
        assert exc.field in ("length", "event")
        return
    assert len(events) * MSG_SIZE == len(data)


# ---------------------------------------------------------------- images

def write_small_dump(directory: Path) -> ImagesDir:
    """Pid 1 with two lazy VMAs of 4 pages and one non-lazy page, as CRIU lays it out."""
    directory.mkdir(parents=True, exist_ok=True)
    images = ImagesDir(directory)
    images.write_inventory()
    images.write_pstree([PstreeEntry(pid=1, ppid=0, pgid=1, sid=1, threads=[1])])
    images.write_core(1, CoreEntry(mtype=CoreEntry.X86_64, tc=TaskCoreEntry(
        task_state=1, exit_code=0, personality=0, flags=0, blk_sigset=0, comm="seed")))
    vmas = [(0x400000, 1), (LAZY_BASE, 4), (LAZY_BASE + 8 * PAGE_SIZE, 4)]
    mm = MmEntry(mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0,
                 mm_start_stack=0, mm_start_brk=0, mm_brk=0, mm_arg_start=0, mm_arg_end=0,
                 mm_env_start=0, mm_env_end=0, exe_file_id=0)
    for start, nr in vmas:
        mm.vmas.append(VmaEntry(start=start, end=start + nr * PAGE_SIZE, pgoff=0, shmid=0,
                                prot=3, flags=MAP_PRIVATE | MAP_ANONYMOUS,
                                status=VmaStatus.REGULAR | VmaStatus.ANON_PRIVATE, fd=-1))
    images.write_mm(1, mm)
    entries = [PagemapEntry(0x400000, 1, PE.PRESENT)]
    entries += [PagemapEntry(start, nr, PE.LAZY | PE.PRESENT) for start, nr in vmas[1:]]
    images.write_pagemap(1, 1, entries)
    with images.open_pages_writer(1) as pages:
        for i in range(9):
            pages.write(bytes([i]) * PAGE_SIZE)
    return images


class _Scratch:
    """Made once per fuzzing process, not per input: a loop, a dump to damage."""

    loop: asyncio.AbstractEventLoop | None = None
    dump: Path | None = None


def _loop() -> asyncio.AbstractEventLoop:
    if _Scratch.loop is None:
        _Scratch.loop = asyncio.new_event_loop()
        atexit.register(_Scratch.loop.close)
    return _Scratch.loop


def _images_dir() -> Path:
    """A scratch dir (in /dev/shm, or under ``$LAZYMIG_FUZZ_SCRATCH``) holding the small
    dump under good/. libFuzzer ends the process without Python's atexit, so a caller
    that runs targets under atheris names a dir it removes itself (tests/test_fuzz.py)."""
    if _Scratch.dump is None:
        shm = Path("/dev/shm")
        parent = os.environ.get("LAZYMIG_FUZZ_SCRATCH") or (shm if shm.is_dir() else None)
        _Scratch.dump = Path(tempfile.mkdtemp(prefix="lazymig-fuzz-", dir=parent))
        atexit.register(shutil.rmtree, _Scratch.dump, True)
        write_small_dump(_Scratch.dump / "good")
    return _Scratch.dump


def images(data: bytes) -> None:
    """One image of a small dump replaced by the input, read as the restore side does."""
    if not data:
        return
    kind, body = IMAGE_KINDS[data[0] % len(IMAGE_KINDS)], data[1:]
    base = _images_dir()
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base / "good", work)
    (work / kind.file_name(None if kind in (ImageKind.INVENTORY, ImageKind.PSTREE) else 1)
     ).write_bytes(body)
    images = ImagesDir(work)
    try:
        images.inventory()
        for entry in images.pstree():
            images.core(entry.pid)
        ranges = images.lazy_ranges(1)
        store = ImagesPageStore(images)
    except (ImageError, FileNotFoundError):
        return
    try:
        lazy = [(r.vaddr, r.nr_pages) for r in ranges]
        for vaddr, nr_pages in lazy:
            # What the server may hand out stays inside the dumped lazy ranges.
            for probe in (vaddr - PAGE_SIZE, vaddr, vaddr + (nr_pages - 1) * PAGE_SIZE):
                segment = store.lookup(1, probe, MAX_PAGES) if probe >= 0 else None
                got = 0 if segment is None else segment.length // PAGE_SIZE
                assert got == 0 or any(v <= probe and probe + got * PAGE_SIZE <= v + n * PAGE_SIZE
                                       for v, n in lazy)
    finally:
        store.close()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "pageserver_server": pageserver_server,
    "pageserver_client": pageserver_client,
    "wire_header": wire_header,
    "handover": handover,
    "uffd_events": uffd_events,
    "images": images,
}
