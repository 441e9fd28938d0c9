"""Benchmark child: fetch every lazy page of a dump from a page server, discarding it.

    python _page_reader.py IMAGES_DIR PID PORT [CA CERT KEY]

A bare client (struct, blocking socket, no lazymig codec): two GETs of up to
1024 pages in flight, replies read into one reused buffer. Prints one JSON line.
With CA CERT KEY it speaks TLS (Python's ssl), presenting CERT.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
import time

from lazymig.proto.images import ImagesDir

HEADER = struct.Struct("=I4xQQQ")  # v2
GET, CLOSE = 7, 0x1023


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """MSG_WAITALL, which TLS sockets do not take."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("page server closed the connection")
        data += chunk
    return data


def main() -> None:
    images, pid, port = ImagesDir(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    requests = [(vaddr + off * 4096, min(1024, nr - off))
                for vaddr, nr in images.lazy_ranges(pid) for off in range(0, nr, 1024)]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if len(sys.argv) > 4:
        ctx = ssl.create_default_context(cafile=sys.argv[4])
        ctx.load_cert_chain(sys.argv[5], sys.argv[6])
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    buf = memoryview(bytearray(1024 * 4096))
    start = time.perf_counter()
    total = 0
    queue = list(requests)
    outstanding: list[tuple[int, int]] = []

    def send_next() -> None:
        while queue and len(outstanding) < 2:
            vaddr, nr = queue.pop(0)
            sock.sendall(HEADER.pack(GET, nr, vaddr, pid))
            outstanding.append((vaddr, nr))

    send_next()
    while outstanding:
        vaddr, nr = outstanding.pop(0)
        header = recv_exactly(sock, HEADER.size)
        _, got, reply_vaddr, _ = HEADER.unpack(header)
        assert reply_vaddr == vaddr and 0 < got <= nr
        if got < nr:  # a short reply: ask for the rest later
            queue.insert(0, (vaddr + got * 4096, nr - got))
        send_next()
        left = got * 4096
        while left:
            left -= sock.recv_into(buf, min(left, len(buf)))
        total += got * 4096
    elapsed = time.perf_counter() - start
    sock.sendall(HEADER.pack(CLOSE, 0, 0, 0))
    recv_exactly(sock, 4)
    if isinstance(sock, ssl.SSLSocket):
        sock = sock.unwrap()  # close_notify, then the server's
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    print(json.dumps({"bytes": total, "seconds": elapsed}), flush=True)


if __name__ == "__main__":
    main()
