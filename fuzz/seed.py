"""Write the seed corpus of each fuzz target from real messages and images.

    python -m fuzz.seed            # from the repository root, as root

Messages come from lazymig's own encoders (what a real peer sends: a daemon's
GETs, a dump pushing pages, a server's replies, a restorer's words, the
kernel's uffd messages in their layouts); images from a real dump of a
running process (``lazymig dump -R`` of ``sleep``) and from the small dump the
``images`` target damages. Seeds are named by their content, so rerunning adds
nothing twice. ``fuzz/run.py`` grows the corpus; ``fuzz/long.py`` minimises it.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from fuzz.targets import (
    IMAGE_KINDS,
    LAZY_BASE,
    TARGETS,
    VERSIONS,
    params_byte,
    request_pipeline,
    write_small_dump,
)
from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.handover import (
    Guarded,
    GuardianPresent,
    HandoverConnection,
    RestoreFinished,
    TaskHandover,
    TransferComplete,
    ZombieTask,
)
from lazymig.proto.handover import Role as HandoverRole
from lazymig.proto.pageserver import (
    AddPages,
    CloseReply,
    CloseRequest,
    GetReply,
    GetRequest,
    OpenReply,
    OpenRequest,
    PageData,
    PageServerConnection,
    ParentReply,
    ParentRequest,
    Role,
)
from lazymig.proto.uffd import EventCode
from lazymig.proto.wire import DstType, WireVersion

__all__ = ["CORPUS", "seeds"]

CORPUS = Path(__file__).with_name("corpus")


def _client_streams(version: WireVersion) -> list[bytes]:
    """What a lazy-pages daemon and a dump pushing images send to a page server."""
    streams = []
    lazy = PageServerConnection(Role.CLIENT, version)
    streams.append(b"".join(lazy.send(GetRequest(1000, LAZY_BASE + i * PAGE_SIZE, n))
                            for i, n in ((0, 1), (4, 16), (64, 3))) + lazy.send(CloseRequest()))
    push = PageServerConnection(Role.CLIENT, version)
    stream = push.send(OpenRequest(DstType.PID, 1000))
    stream += push.send(ParentRequest(DstType.PID, 1000))
    stream += push.send(AddPages(DstType.PID, 1000, LAZY_BASE, 2, PE.PRESENT))
    stream += push.send(PageData(bytes(2 * PAGE_SIZE), last=True))
    stream += push.send(AddPages(DstType.PID, 1000, LAZY_BASE + 4 * PAGE_SIZE, 8, PE.LAZY))
    stream += push.send(OpenRequest(DstType.SHMEM, 7, wants_reply=False))
    stream += push.send(CloseRequest(force=True))
    streams.append(stream)
    return streams


def _server_replies(version: WireVersion, spec: int) -> bytes:
    """A page server's answers to the pipeline the client target sends for ``spec``."""
    client = PageServerConnection(Role.CLIENT, version)
    server = PageServerConnection(Role.SERVER, version)
    for request in request_pipeline(spec):
        server.receive_data(client.send(request))
    out = b""
    for request in request_pipeline(spec):
        server.next_event()
        if isinstance(request, GetRequest):
            short = max(1, request.nr_pages - 1)  # CRIU clamps at a segment's end
            out += server.send(GetReply(request.pid, request.vaddr, short))
            out += server.send(PageData(bytes(short * PAGE_SIZE), last=True))
        elif isinstance(request, OpenRequest):
            out += server.send(OpenReply(has_parent=True))
        elif isinstance(request, ParentRequest):
            out += server.send(ParentReply(has_parent=False))
        else:
            out += server.send(CloseReply(0))
    return out


def _uffd_messages() -> bytes:
    """One message of each kind, in the kernel's ``struct uffd_msg`` layout."""
    return b"".join([
        struct.pack("=B7xQQI4x", EventCode.PAGEFAULT, 1, LAZY_BASE + 0x123, 4242),
        struct.pack("=B7xI20x", EventCode.FORK, 9),
        struct.pack("=B7xQQQ", EventCode.REMAP, LAZY_BASE, LAZY_BASE + 2**32, 4 * PAGE_SIZE),
        struct.pack("=B7xQQ8x", EventCode.REMOVE, LAZY_BASE, LAZY_BASE + PAGE_SIZE),
        struct.pack("=B7xQQ8x", EventCode.UNMAP, LAZY_BASE, LAZY_BASE + 2 * PAGE_SIZE),
    ])


def _handover_seeds() -> list[bytes]:
    """Both directions as lazymig speaks them, each behind a byte saying how it is cut."""
    restorer = HandoverConnection(HandoverRole.RESTORER)
    daemon = HandoverConnection(HandoverRole.DAEMON)
    said = [daemon.send(Guarded()), restorer.send(TaskHandover(1234, 0)),
            restorer.send(ZombieTask(77)), restorer.send(RestoreFinished()),
            restorer.send(GuardianPresent()), daemon.send(TransferComplete())]
    restorer_words = b"".join(seg.data for segs in said[1:5] for seg in segs)
    daemon_words = b"".join(seg.data for segs in (said[0], said[5]) for seg in segs)
    return [bytes([cut]) + words for cut in (0, 3) for words in (restorer_words, daemon_words)]


def _image_seeds(directory: Path) -> list[bytes]:
    seeds = []
    for index, kind in enumerate(IMAGE_KINDS):
        for path in sorted(directory.glob(kind.file_template.replace("{}", "*"))):
            seeds.append(bytes([index]) + path.read_bytes())
    return seeds


def _real_dump(directory: Path) -> Path:
    """Dump a running ``sleep`` with ``lazymig dump -R``: CRIU-format images of a real process."""
    directory.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        subprocess.run([sys.executable, "-m", "lazymig", "dump", "-t", str(sleeper.pid),
                        "-D", str(directory), "-R"], check=True, timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    return directory


def seeds() -> dict[str, list[bytes]]:
    """Every target's seeds."""
    found: dict[str, list[bytes]] = {name: [] for name in TARGETS}
    for version, cut in itertools.product(VERSIONS, (7, 64, 128)):
        for stream in _client_streams(version):
            found["pageserver_server"].append(params_byte(version, cut) + stream)
            found["wire_header"].append(stream[:version.header_size])
        for spec in (0x07 | 0x78 << 3, 0x802, 0x5 | 0x15 << 3):
            body = _server_replies(version, spec)
            found["pageserver_client"].append(params_byte(version, cut) + struct.pack("<H", spec)
                                              + body[:4096])
    found["handover"] += _handover_seeds()
    found["uffd_events"].append(_uffd_messages())
    with tempfile.TemporaryDirectory() as tmp:
        found["images"] += _image_seeds(write_small_dump(Path(tmp) / "small").path)
        found["images"] += _image_seeds(_real_dump(Path(tmp) / "real"))
    return found


def main() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{target}: {len(inputs)} seeds, {len(list(folder.iterdir()))} in the corpus")


if __name__ == "__main__":
    main()
