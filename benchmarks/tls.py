"""The page server's throughput over TLS, beside plain TCP and the machine's limits.

    .venv/bin/python benchmarks/tls.py [MiB ...]      (default: 256 1024)

In one run, for each size: ``LazyDump`` of a C workload serving a bare client
in another process (benchmarks/_page_reader.py) over plain TCP (splice, the
pages never enter Python) and over TLS (certificates from a CA made for the
run; pages read from the scratch pipe into a buffer and encrypted by Python's
ssl on the event loop; the client decrypts with Python's ssl too). Beside it:
a loopback TCP stream, and a bare TLS stream between two Python ssl sockets
with the cipher the session negotiates (the ceiling for user-space TLS here).
kTLS is not measured: this kernel has no tls module (CONFIG_TLS is off) and
Python 3.11's ssl cannot enable it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import machine
from tls_pki import Pki, make_pki
from workloads import Workload, build_c_workload

from lazymig.dump import LazyDump

HERE = Path(__file__).resolve().parent
CHUNK = 256 * 1024


def tls_stream_gbps(pki: Pki, total: int = 1 << 30) -> tuple[float, str]:
    """GB/s of one TLS stream over loopback between two threads (encrypt + decrypt)."""
    server_ctx = pki.config(pki.server).context(server=True)
    client_ctx = pki.config(pki.client).context(server=False)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    cipher: list[str] = []

    def send() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            cipher.append(str((tls.cipher() or ("?",))[0]))
            data = memoryview(bytes(CHUNK))
            for _ in range(total // CHUNK):
                tls.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                server_hostname="127.0.0.1") as tls:
        buf = bytearray(CHUNK)
        started = time.perf_counter()
        left = total
        while left:
            left -= tls.recv_into(buf, min(left, CHUNK))
        elapsed = time.perf_counter() - started
    sender.join()
    listener.close()
    return total / elapsed / 1e9, cipher[0]


async def serve_once(binary: Path, mib: int, pki: Pki | None) -> tuple[float, float]:
    """(GB/s served, frozen seconds) of one LazyDump, plain or over TLS."""
    workload = Workload([str(binary), "--mib", str(mib), "--interval-ms", "3600000"],
                        ready_timeout=120)
    try:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as images_dir:
            dump = LazyDump(workload.pid, images_dir, address="127.0.0.1", port=0,
                            progress_interval=None,
                            tls=pki.config(pki.server) if pki else None)
            await dump.start()
            tls_args = ([str(pki.ca), str(pki.client.cert), str(pki.client.key)]
                        if pki else [])
            reader = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "_page_reader.py"), images_dir, str(workload.pid),
                str(dump.port), *tls_args, stdout=asyncio.subprocess.PIPE)
            serving = asyncio.create_task(dump.serve())
            assert reader.stdout is not None
            out = json.loads(await reader.stdout.readline())
            await reader.wait()
            await serving
            return out["bytes"] / out["seconds"] / 1e9, dump.frozen_seconds
    finally:
        workload.stop()


async def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [256, 1024]
    print(f"machine: {machine.describe()}")
    with tempfile.TemporaryDirectory() as scratch:
        pki = make_pki(Path(scratch) / "pki")
        tcp = machine.loopback_tcp_gbps()
        tls, cipher = tls_stream_gbps(pki)
        print(f"  limit  loopback TCP stream                       {tcp:.2f} GB/s")
        print(f"  limit  Python ssl stream over loopback       {tls:.2f} GB/s ({cipher})")
        binary = build_c_workload(scratch)
        for mib in sizes:
            machine.warm_memory(2 * mib << 20)
            plain, _ = await serve_once(binary, mib, None)
            machine.warm_memory(2 * mib << 20)
            over_tls, _ = await serve_once(binary, mib, pki)
            print(f"  {mib:5d} MiB served: plain {plain:.2f} GB/s, TLS {over_tls:.2f} GB/s "
                  f"({over_tls / tls:.0%} of the ssl stream)")


if __name__ == "__main__":
    asyncio.run(main())
