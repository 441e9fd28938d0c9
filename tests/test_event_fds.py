"""Event-loop files across a migration: eventfds, epoll, timerfds, signalfds and
unix socketpairs (lazymig/dump/anon_files.py, lazymig/restore/anon_files.py).

* tests/workloads/event_fds.py is dumped (plainly) and restored; the restored
  process finds its eventfd's counter and semaphore mode, each epoll's
  registrations (epoll_wait reports the data values it did, an epoll watching
  another too), its timers (interval, no more time left than before, the
  unread expiration), its signalfd's mask, the data queued on each socket
  (a stream's bytes, two datagrams) and the shut down end.
* node running a setInterval loop (libuv: epoll and eventfds) and CPython's
  asyncio.run woken periodically through its self-pipe (epoll and a socketpair)
  are migrated with ``lazymig.migrate`` on loopback and keep ticking: the first
  tick of the restored process is the one after the source's last.
* crit decodes the new images (their schema is checked against crit's with
  the others' in tests/test_images_crit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import crit_decode, kill, output_pipe, parse, restore_with_output
from workloads import WORKLOAD_DIR

import lazymig
from lazymig.dump import dump
from lazymig.proto.images import ImageKind, ImagesDir
from lazymig.testing.workload import OutputLines

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and PR_SET_MM need root"),
]

EVENT_FDS = [sys.executable, str(WORKLOAD_DIR / "event_fds.py")]
NODE = shutil.which("node")
# The ticks come from a thread through call_soon_threadsafe: a byte on the loop's
# self-pipe socketpair wakes its epoll.
ASYNCIO_TICKER = """
import asyncio, itertools, threading, time

def wake(loop, ticks):
    while True:
        time.sleep(0.05)
        loop.call_soon_threadsafe(lambda: print("tick", next(ticks), flush=True))

async def main():
    loop = asyncio.get_running_loop()
    threading.Thread(target=wake, args=(loop, itertools.count()), daemon=True).start()
    await loop.create_future()

asyncio.run(main())
"""
# A coroutine sleeping: CPython 3.11's get_running_loop() compares getpid() with the
# pid the loop started under, so this runs on only under its dumped pid (on one
# machine, in a pid namespace of its own: see docs/operating.md, "Pids").
ASYNCIO_SLEEPER = """
import asyncio, itertools

async def main():
    for n in itertools.count():
        print("tick", n, flush=True)
        await asyncio.sleep(0.05)

asyncio.run(main())
"""
NODE_TICKER = 'let n = 0; setInterval(() => { console.log("tick " + n++); }, 50);\n'


@contextlib.contextmanager
def started(argv: list[str]) -> Iterator[tuple[subprocess.Popen[str], OutputLines]]:
    """``argv`` in its own session (see docs/operating.md), its stdout read line by line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines = OutputLines(proc.stdout)
    try:
        yield proc, lines
    finally:
        kill(proc.pid)
        proc.wait()
        lines.close()


@pytest.mark.asyncio
async def test_event_loop_files_come_back_as_they_were(tmp_path: Path) -> None:
    with started(EVENT_FDS) as (proc, lines):
        before = parse(await asyncio.to_thread(lines.next, 10.0))
        await dump(proc.pid, tmp_path)
    # New pids: the workload tells its restore by its pid changing.
    restorer, result, out = await restore_with_output(tmp_path, new_pids=True)
    try:
        line = await asyncio.to_thread(out.next, 10.0)
        assert await asyncio.to_thread(restorer.wait) == 0
    finally:
        restorer.kill()
        out.close()
    after = parse(line)
    assert int(after["pid"]) == result.pid
    assert {k: after[k] for k in ("inner", "outer", "efd_reads", "interval", "fired",
                                  "fired_again", "signal", "pipe", "stream_a", "stream_b",
                                  "dgram", "shut", "after")} == {
        "inner": "1111,2222,6666", "outer": "4444", "efd_reads": "7", "interval": "0.250",
        "fired": "1", "fired_again": "EAGAIN", "signal": str(int(signal.SIGUSR1)),
        "pipe": "piped", "stream_a": "stream-data", "stream_b": "back", "dgram": "one+two",
        "shut": "EPIPE", "after": "none"}
    assert 590 < float(after["left"]) <= float(before["left"])


async def _migrate_ticker(argv: list[str]) -> None:
    """Migrate the ticker ``argv`` on loopback; its ticks go on from where they were."""
    with started(argv) as (proc, lines):
        seen = [await asyncio.to_thread(lines.next, 20.0) for _ in range(3)]
        assert all(s.startswith("tick ") for s in seen), seen
        with output_pipe() as out:
            result = await asyncio.wait_for(lazymig.migrate(proc.pid, stdio=out.stdio), 60)
            out.handed_over()
            try:
                with contextlib.suppress(EOFError):  # what the source printed before it was
                    # killed (a source left running would time out here)
                    while True:
                        seen.append(await asyncio.to_thread(lines.next, 10.0))
                ticks = [int((await asyncio.to_thread(out.lines.next, 10.0)).split()[1])
                         for _ in range(5)]
            finally:
                kill(result.restored.pid)
    last = int(seen[-1].split()[1])
    assert ticks == list(range(last + 1, last + 6))


@pytest.mark.asyncio
async def test_an_asyncio_program_keeps_ticking_after_migrate() -> None:
    await _migrate_ticker([sys.executable, "-c", ASYNCIO_TICKER])


@pytest.mark.asyncio
async def test_an_asyncio_coroutine_keeps_sleeping_and_ticking_after_migrate() -> None:
    await _migrate_ticker([sys.executable, "-c", ASYNCIO_SLEEPER])


@pytest.mark.asyncio
@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_a_node_program_keeps_ticking_after_migrate(tmp_path: Path) -> None:
    script = tmp_path / "loop.js"
    script.write_text(NODE_TICKER)
    assert NODE is not None
    await _migrate_ticker([NODE, str(script)])


@pytest.mark.crit
@pytest.mark.skipif(shutil.which("crit") is None, reason="crit is not installed (package criu)")
@pytest.mark.asyncio
async def test_crit_decodes_the_event_loop_images(tmp_path: Path) -> None:
    with started(EVENT_FDS) as (proc, lines):
        await asyncio.to_thread(lines.next, 10.0)
        await dump(proc.pid, tmp_path)
    dumped = ImagesDir(tmp_path)
    files = crit_decode(dumped.image_path(ImageKind.FILES))["entries"]
    by_type: dict[str, list[dict[str, object]]] = {}
    for f in files:
        by_type.setdefault(f["type"], []).append(f)
    assert {"EVENTFD", "EVENTPOLL", "TIMERFD", "SIGNALFD", "UNIXSK"} <= set(by_type)
    assert by_type["EVENTFD"][0]["efd"]["counter"] == 7  # type: ignore[index]
    datas = sorted(t["data"] for e in by_type["EVENTPOLL"] for t in e["epfd"]["tfd"])  # type: ignore[index]
    assert datas == [0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666]
    assert sorted(e["tfd"]["isec"] * 10**9 + e["tfd"]["insec"]  # type: ignore[index]
                  for e in by_type["TIMERFD"]) == [0, 250_000_000]
    assert by_type["SIGNALFD"][0]["sgfd"]["sigmask"] == (  # type: ignore[index]
        1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGUSR2 - 1))
    queues = crit_decode(dumped.image_path(ImageKind.SK_QUEUES))
    assert queues["magic"] == "SK_QUEUES"
    assert [e["length"] for e in queues["entries"]] == [11, 4, 3, 3]
