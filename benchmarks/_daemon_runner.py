"""Benchmark child: run the lazy-pages daemon on uvloop, print its report as JSON.

    python _daemon_runner.py IMAGES_DIR PORT BACKGROUND(0|1) CHANNELS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import uvloop

from lazymig.uffd import LazyPagesDaemon, RemotePageSource


async def main() -> None:
    images, port, background, channels = (sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1",
                                          int(sys.argv[4]))
    source = await RemotePageSource.connect("127.0.0.1", port, channels=channels)
    daemon = LazyPagesDaemon.from_images(source, images, background=background)
    before = os.times()
    report = await daemon.run()
    after = os.times()
    print(json.dumps({
        "ok": report.ok, "bytes": report.bytes_copied, "finished": report.finished,
        "first_handover": min(p.handed_over for p in report.processes),
        "rss_kib": peak_rss_kib(), "daemon_p50": report.fault_latency().percentile(0.5),
        "cpu_s": after.user + after.system - before.user - before.system,
    }), flush=True)


def peak_rss_kib() -> int:
    """VmHWM of this process (the daemon's peak resident memory)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


if __name__ == "__main__":
    uvloop.run(main())
