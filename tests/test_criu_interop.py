"""lazymig against real CRIU 4.1.1 (in the chroot that scripts/criu-peer.sh sets up).

* lazymig's page server stands in for ``criu page-server --lazy-pages``: real
  ``criu lazy-pages`` pulls a real dump's pages from it while ``criu restore
  --lazy-pages`` runs the process, which must go on with its memory intact.
* lazymig dump's page server answers real ``criu lazy-pages`` for a live,
  frozen process: CRIU's lazy-pages client pulls every lazy page from it, faults
  first, and each page equals the source's memory. (criu restore cannot restore
  lazymig's images: a stand-in hands criu lazy-pages the task's uffd instead.)
* lazymig's lazy-pages daemon stands in for ``criu lazy-pages``: it fills the
  tree ``criu restore --lazy-pages`` restores, from ``criu dump --lazy-pages``
  (which serves the frozen source, then kills it after CLOSE) or, in local mode,
  from the pages-N.img of an ordinary ``criu dump``. When the restore fails,
  criu dump must resume the source rather than kill it. A restored process that
  forks while its pages are lazy has its children followed (UFFD_EVENT_FORK).
* lazymig reads the images ``criu dump`` writes as crit decodes them.

Timings are measured and reported (``record_property``, and printed), never asserted.
The first run installs the chroot (about a minute, network needed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from criu_peer import (
    LOOPS,
    PS_IOV_CLOSE,
    PS_IOV_GET,
    ChrootDir,
    CriuError,
    DaemonLogReport,
    StandInRestorer,
    WireLog,
    WireTap,
    Workload,
    build_forker,
    check_restored_ticks,
    child_ticks,
    chroot_argv,
    criu,
    dump_workload,
    failure_context,
    kill_restored,
    lazy_pages_in,
    lazymig_argv,
    log_errors,
    merge_regions,
    page_digest,
    page_pattern,
    restore_with_lazymig_daemon,
    restored_from_lazymig_page_server,
    source_pages,
    start_lazy_dump,
    start_with_status_fd,
    stop,
)
from google.protobuf import unknown_fields as protobuf_unknown
from google.protobuf.message import Message
from helpers import free_port, plain, process_state

from lazymig.proto.constants import PAGE_SIZE, PE
from lazymig.proto.images import ImagesDir

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="real CRIU needs root (chroot, ptrace, userfaultfd, namespaces)"),
]

CRIT = shutil.which("crit")
ADD_F_PRESENT = PE.PRESENT << 16 | 6


@pytest.fixture(scope="module")
def forker_binary(criu_root: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_forker(tmp_path_factory.mktemp("criu-forker") / "criu_forker")


# -- lazymig's page server in place of CRIU's -------------------------------------------------


def check_wire(wire: WireLog, images: ImagesDir, lazy_pages: int,
               measure: dict[str, Any]) -> None:
    """The v1 session as CRIU 4.1.1 runs it, on either end: GETs for lazy pages only
    (asking for a non-lazy page makes CRIU's server block), each answered with
    ADD_F|PE_PRESENT and at most the pages asked, every lazy page at least once, then
    CLOSE -> int32 0 and EOF."""
    assert wire.error is None, wire.error
    *gets, close = wire.requests
    assert close == (PS_IOV_CLOSE, 0, 0, 0)
    assert {cmd for cmd, *_ in gets} == {PS_IOV_GET}
    assert wire.close_status == struct.pack("=i", 0)
    assert wire.trailing_client_bytes == 0
    assert len(wire.replies) == len(gets)
    lazy = {(e.pid, r.vaddr + i * PAGE_SIZE) for e in images.pstree()
            for r in images.lazy_ranges(e.pid) for i in range(r.nr_pages)}
    served: set[tuple[int, int]] = set()
    for (_, asked, vaddr, pid), reply in zip(gets, wire.replies, strict=True):
        assert {(pid, vaddr + i * PAGE_SIZE) for i in range(asked)} <= lazy, \
            "a GET asked for pages that are not lazy (CRIU's server would block on them)"
        assert reply[0] == ADD_F_PRESENT and reply[2:] == (vaddr, pid)
        assert 0 < reply[1] <= asked
        pages = {(pid, vaddr + i * PAGE_SIZE) for i in range(reply[1])}
        assert pages <= lazy, "a reply carried pages that are not lazy"
        served |= pages
    assert served == lazy
    pages_sent = sum(r[1] for r in wire.replies)
    assert wire.bytes_to_client == len(wire.replies) * 24 + pages_sent * PAGE_SIZE + 4
    measure["wire"] = {
        "gets": len(gets), "pages_sent": pages_sent, "repeated_pages": pages_sent - lazy_pages,
        "max_pages_per_get": max(n for _, n, _, _ in gets),
        "one_page_gets": sum(1 for _, n, _, _ in gets if n == 1),
        "short_replies": sum(1 for g, r in zip(gets, wire.replies, strict=True) if r[1] < g[1]),
    }


@pytest.mark.parametrize("loop", LOOPS)
def test_criu_restores_lazily_from_lazymig_page_server(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    d = chroot_dir
    mib, children = 48, 1
    workload, dumped = dump_workload(d, workload_binary, mib=mib, children=children,
                                     measure=measure)
    images = ImagesDir(d.host)
    lazy_pages = sum(r.nr_pages for e in images.pstree() for r in images.lazy_ranges(e.pid))
    assert lazy_pages >= (1 + children) * mib * 256
    measure["lazy_pages"] = lazy_pages
    with restored_from_lazymig_page_server(d, loop, measure) as (_, wire):
        assert wire is not None
        check_wire(wire, images, lazy_pages, measure)
        check_restored_ticks(workload, dumped)


# -- lazymig dump's page server, pulled by criu lazy-pages ----------------------------------------

TOUCHED_PAGES = (3, 1000, 2047, 4000)
"""Pages of criu_pattern's area that the restored task touches before restore finishes."""


@pytest.mark.parametrize("loop", LOOPS)
def test_criu_lazy_pages_pulls_from_lazymig_dump(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """``lazymig dump --lazy-pages --wire v1`` freezes a live criu_pattern and serves its
    lazy pages; real ``criu lazy-pages --page-server`` pulls them all over a wire tap:
    first the task's faults, one page each in the order touched, then the background
    fetch, then CLOSE, after which lazymig dump kills the source. Every page on the wire,
    and every page CRIU copied into the task, equals the source's memory at the freeze
    (in the pattern area: criu_pattern's pattern).

    criu restore cannot restore lazymig's images, so a :class:`StandInRestorer` hands
    criu lazy-pages the task's uffd as criu restore does. What this covers is CRIU's
    lazy-pages client against lazymig's dump and page server, not a restore."""
    d = chroot_dir
    mib = 16
    workload = Workload(d, workload_binary, mib=mib)
    procs: list[subprocess.Popen[bytes]] = []
    restorer: StandInRestorer | None = None
    dump_log = d.host / "lazymig-dump.log"
    try:
        area = workload.start().started[0]
        workload.wait_ticks({}, 2, timeout=10)
        port = free_port()
        with dump_log.open("wb") as err:
            dump = start_with_status_fd(
                lazymig_argv("dump", "-t", str(workload.pid), "--lazy-pages", "--address",
                             "127.0.0.1", "--port", str(port), "--wire", "v1", "-D",
                             str(d.host), loop=loop),
                what="lazymig dump --lazy-pages", stderr=err.fileno(), timeout=30)
        procs.append(dump)
        # The dump fills its page pipes after it listens (lazymig.dump.late_fill): until
        # then the source runs its injected vmsplice calls now and then, and on each
        # return to user space the kernel may rewrite the source's rseq area (cpu_id,
        # in its first heap page here). Its memory is compared once that is over.
        deadline = time.monotonic() + 10
        while "lazy pages put into the page pipes" not in dump_log.read_text():
            assert time.monotonic() < deadline, dump_log.read_text()[-3000:]
            time.sleep(0.01)
        assert process_state(workload.pid) == "t", "the source is not held frozen"
        images = ImagesDir(d.host)
        (entry,) = images.pstree()
        ranges = images.lazy_ranges(entry.pid)
        lazy_pages = sum(r.nr_pages for r in ranges)
        regions = merge_regions([(r.vaddr, r.nr_pages) for r in ranges])
        expected = source_pages(workload.pid, regions)  # the frozen source's memory
        assert len(expected) == lazy_pages >= area.pages
        assert all(expected[area.addr + i * PAGE_SIZE] == page_digest(page_pattern(0, i))
                   for i in range(area.pages))
        measure["lazy_pages"] = lazy_pages

        tap = WireTap(port, capture_pages=True)  # criu lazy-pages -> tap -> lazymig dump
        lazy = start_with_status_fd(
            chroot_argv("criu", "lazy-pages", "--page-server", "--address", "127.0.0.1",
                        "--port", str(tap.port), "-D", d.inner),
            what="criu lazy-pages", log="lazy-pages.log")
        procs.append(lazy)
        touch = [area.addr + i * PAGE_SIZE for i in TOUCHED_PAGES]
        started = time.monotonic()
        restorer = StandInRestorer(d.host / "lazy-pages.socket", entry.pid, regions, touch)
        assert lazy.wait(30) == 0, log_errors(d.host / "lazy-pages.log")
        measure["all_pages_in_s"] = round(time.monotonic() - started, 3)
        assert f"UFFD transferred pages: ({lazy_pages}/{lazy_pages})" in \
            (d.host / "lazy-pages.log").read_text()
        assert dump.wait(30) == 0, dump_log.read_text()[-3000:]
        assert "source killed" in dump_log.read_text()
        measure["source_exit"] = workload.wait_gone()

        wire = tap.join()
        check_wire(wire, images, lazy_pages, measure)
        assert [(n, vaddr) for _, n, vaddr, _ in wire.requests[:len(touch)]] == \
            [(1, address) for address in touch], "the faults did not come first, one page each"
        assert len(wire.pages) == sum(n for _, n, _, _ in wire.replies)
        wrong = [(pid, hex(vaddr)) for pid, vaddr, digest in wire.pages
                 if pid != entry.pid or digest != expected.get(vaddr)]
        assert not wrong, f"{len(wrong)} pages on the wire differ from the source: {wrong[:5]}"
        assert restorer.touched.digests == {address: expected[address] for address in touch}
        copied = restorer.pages()
        differ = [hex(vaddr) for vaddr, digest in expected.items() if copied.get(vaddr) != digest]
        assert not differ, f"{len(differ)} pages CRIU copied differ from the source: {differ[:5]}"
        measure["fault_round_trip_us"] = [round(us) for us in restorer.touched.latencies_us]
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n--- lazy-pages.log:\n{log_errors(d.host / 'lazy-pages.log')}"
                             f"\n--- lazymig dump:\n{dump_log.read_text()[-3000:]}") from exc
    finally:
        if restorer is not None:
            restorer.close()
        for proc in reversed(procs):
            stop(proc)
        workload.kill()


# -- lazymig's lazy-pages daemon in place of CRIU's ---------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_lazymig_daemon_restores_from_criu_lazy_dump(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """``criu dump --lazy-pages`` serves a frozen source; lazymig lazy-pages fills the
    ``criu restore --lazy-pages`` tree from it, over a wire tap, then CLOSEs: criu dump
    exits 0 and kills the source, the restored copy runs on with its memory intact."""
    d = chroot_dir
    mib, children = 48, 1
    workload = Workload(d, workload_binary, mib=mib, children=children)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        workload.start()
        workload.wait_ticks({}, 2, timeout=10)
        started = time.monotonic()
        dump, port = start_lazy_dump(d, workload)
        procs.append(dump)
        measure["dump_until_listening_s"] = round(time.monotonic() - started, 3)
        # The source stays alive but frozen while criu dump serves its pages: it
        # prints no tick for longer than its 100 ms period.
        dumped = workload.output()
        time.sleep(0.3)
        assert workload.alive() and workload.output().ticks == dumped.ticks
        images = ImagesDir(d.host)
        lazy_pages = lazy_pages_in(images)
        assert lazy_pages >= (1 + children) * mib * 256
        measure["lazy_pages"] = lazy_pages

        tap = WireTap(port)  # lazymig -> tap -> criu dump, parsing the v1 stream
        restore_with_lazymig_daemon(
            d, images, ["--page-server", "--address", "127.0.0.1", "--port", str(tap.port),
                        "--wire", "v1"], loop=loop, measure=measure, procs=procs)
        started = time.monotonic()
        assert dump.wait(30) == 0, log_errors(d.host / "dump.log")
        measure["dump_exit_after_daemon_s"] = round(time.monotonic() - started, 3)
        measure["source_exit"] = workload.wait_gone()  # killed by criu dump after CLOSE
        check_wire(tap.join(), images, lazy_pages, measure)
        check_restored_ticks(workload, dumped)
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        kill_restored(d)
        workload.kill()


# node (one binary, its libraries the chroot's) printing criu_pattern's ticks: the sum of
# the first word of every page of a buffer and of the strings of 100,000 objects on the
# V8 heap, from a timer (libuv: epoll, eventfd, timerfd, threads of its own).
NODE_TICKS = """
const buf = Buffer.alloc(Number(process.argv[2]) << 20);
for (let i = 0; i < buf.length; i += 4096) buf.writeUInt32LE((i / 4096) ^ 0x5a5a, i);
const objs = [];
for (let i = 0; i < 100000; i++) objs.push({ i, s: "x" + i });
function sum() {
  let s = 0;
  for (let i = 0; i < buf.length; i += 4096) s = (s + buf.readUInt32LE(i)) >>> 0;
  for (const o of objs) s = (s + o.s.length) >>> 0;
  return s;
}
const want = sum();
let tick = 0;
setInterval(() => {
  const s = sum();
  console.log(`tick ${tick++} tag 0 sum 0x${s.toString(16)} bad ${s === want ? 0 : 1}`);
}, 100);
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_lazymig_daemon_restores_node_from_criu_lazy_dump(
        chroot_dir: ChrootDir, tmp_path: Path, measure: dict[str, Any], loop: str) -> None:
    """A real runtime through CRIU: ``criu dump --lazy-pages`` of node (its V8 heap,
    libuv's threads and event-loop fds), lazymig lazy-pages filling ``criu restore
    --lazy-pages``'s tree from it; node goes on ticking with its memory intact."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed on this machine")
    d = chroot_dir
    # node is copied into the chroot dir (removed with it), started by a wrapper there.
    shutil.copy(Path(node).resolve(), d.host / "node")
    (d.host / "ticks.js").write_text(NODE_TICKS)
    wrapper = tmp_path / "node_ticks"
    wrapper.write_text('#!/bin/sh\nexec "${0%/*}/node" "${0%/*}/ticks.js" "$@"\n')
    wrapper.chmod(0o755)
    workload = Workload(d, wrapper, mib=32, args=[])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        workload.start(timeout=30)
        workload.wait_ticks({}, 2, timeout=20)
        dump, port = start_lazy_dump(d, workload)
        procs.append(dump)
        dumped = workload.output()
        images = ImagesDir(d.host)
        measure["lazy_pages"] = lazy_pages = lazy_pages_in(images)
        assert lazy_pages >= 32 * 256
        restore_with_lazymig_daemon(
            d, images, ["--page-server", "--address", "127.0.0.1", "--port", str(port),
                        "--wire", "v1"], loop=loop, measure=measure, procs=procs)
        assert dump.wait(30) == 0, log_errors(d.host / "dump.log")
        measure["source_exit"] = workload.wait_gone()
        check_restored_ticks(workload, dumped)
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        kill_restored(d)
        workload.kill()


@pytest.mark.parametrize("loop", LOOPS)
def test_lazymig_daemon_local_mode_restores_criu_dump(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """Local lazy mode: an ordinary ``criu dump`` keeps lazy-capable pages as LAZY|PRESENT
    in pages-N.img; ``lazymig lazy-pages -D`` (no --page-server) fills the ``criu restore
    --lazy-pages`` tree from those files."""
    d = chroot_dir
    mib, children = 48, 1
    workload, dumped = dump_workload(d, workload_binary, mib=mib, children=children,
                                     measure=measure)
    images = ImagesDir(d.host)
    lazy_pages = lazy_pages_in(images)
    assert lazy_pages >= (1 + children) * mib * 256
    measure["lazy_pages"] = lazy_pages
    procs: list[subprocess.Popen[bytes]] = []
    try:
        restore_with_lazymig_daemon(d, images, [], loop=loop, measure=measure, procs=procs)
        check_restored_ticks(workload, dumped)
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in procs:
            stop(proc)
        kill_restored(d)


@pytest.mark.parametrize("loop", LOOPS)
def test_lazymig_daemon_follows_forks_of_a_lazily_restored_process(
        chroot_dir: ChrootDir, forker_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """The restored process forks at once (SIGUSR1 right after criu restore returns), while
    its pages are still lazy, and then at every tick: lazymig takes each child's uffd from
    CRIU's uffd (UFFD_EVENT_FORK), serves the child's faults under the parent's image pid
    from criu dump (which serves a page again) and retires children that exit. Every
    child sees the dump-time pattern."""
    d = chroot_dir
    mib = 48
    workload = Workload(d, forker_binary, mib=mib, args=[])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        workload.start()
        workload.wait_ticks({}, 2, timeout=10)
        dump, port = start_lazy_dump(d, workload)
        procs.append(dump)
        dumped = workload.output()
        images = ImagesDir(d.host)
        lazy_pages = lazy_pages_in(images)
        assert [e.pid for e in images.pstree()] == [1]
        measure["lazy_pages"] = lazy_pages

        tap = WireTap(port, rate=16e6)  # ~3 s for 48 MiB: the fork comes while pages are lazy
        restore_with_lazymig_daemon(
            d, images, ["--page-server", "--address", "127.0.0.1", "--port", str(tap.port),
                        "--wire", "v1"], loop=loop, measure=measure, procs=procs, forks=True,
            after_restore=lambda pid: os.kill(pid, signal.SIGUSR1))
        assert dump.wait(30) == 0, log_errors(d.host / "dump.log")
        measure["source_exit"] = workload.wait_gone()
        assert "forked: the child asks for its pages under pid 1" in \
            (d.host / "lazymig-lazy-pages.log").read_text()
        wire = tap.join()
        check_wire(wire, images, lazy_pages, measure)
        assert {pid for _, _, _, pid in wire.requests[:-1]} == {1}

        check_restored_ticks(workload, dumped)
        before = dumped.last(0)
        assert before is not None
        deadline = time.monotonic() + 20
        while len(children := child_ticks(workload.log)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) >= 3, children
        assert len({c.pid for c in children}) == len(children)
        assert {(c.checksum, c.bad_pages) for c in children} == {(before.checksum, 0)}, children
        assert min(c.tick for c in children) <= before.tick + 1, "the first fork came late"
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        kill_restored(d)
        workload.kill()


FAIL_POST_RESTORE = """#!/bin/sh
# criu --action-script: fail the restore after every uffd went to the daemon
# (post-restore runs before criu restore sends "restore finished").
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] && exit 1
exit 0
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_failed_restore_leaves_the_source_to_criu_dump(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """criu restore fails after handing both uffds to lazymig: lazymig must not end the
    session as a finished transfer (criu lazy-pages does, and criu dump then kills the
    source: README pitfall 8). Whether the daemon gives up on its own or is stopped
    (SIGTERM), criu dump must fail the transfer and resume the source, which goes on
    with its memory intact."""
    d = chroot_dir
    script = d.host / "fail-post-restore.sh"
    script.write_text(FAIL_POST_RESTORE)
    script.chmod(0o755)
    workload = Workload(d, workload_binary, mib=8, children=1)
    procs: list[subprocess.Popen[bytes]] = []
    daemon_log = d.host / "lazymig-lazy-pages.log"
    try:
        workload.start()
        workload.wait_ticks({}, 2, timeout=10)
        dump, port = start_lazy_dump(d, workload)
        procs.append(dump)
        dumped = workload.output()
        # No wire tap here: a proxy would turn lazymig's reset into a FIN.
        with daemon_log.open("wb") as err:
            daemon = start_with_status_fd(
                lazymig_argv("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                             str(port), "--wire", "v1", "-D", str(d.host), loop=loop),
                what="lazymig lazy-pages", stderr=err.fileno())
        procs.append(daemon)
        with pytest.raises(CriuError, match="restore"):
            criu(d, "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
                 "--action-script", d.inside(script.name), log="restore.log")
        assert "post-restore script" in (d.host / "restore.log").read_text()
        handed_over = DaemonLogReport.parse(daemon_log.read_text())
        # None: still waiting; False: it gave up and said FAILED. Never "complete".
        assert handed_over.complete is not True, "the daemon called a failed restore complete"

        try:  # the daemon may give up by itself; else the operator stops it
            rc = daemon.wait(2)
            measure["daemon_ended"] = f"by itself, rc {rc}"
        except subprocess.TimeoutExpired:
            daemon.terminate()
            rc = daemon.wait(10)
            measure["daemon_ended"] = f"SIGTERM, rc {rc}"
        assert rc != 0, daemon_log.read_text()[-3000:]

        assert dump.wait(30) != 0, "criu dump took the session for a finished transfer"
        assert "Lazy pages transfer FAILED" in (d.host / "dump.log").read_text()
        assert workload.alive(), "criu dump killed the source"
        check_restored_ticks(workload, dumped)  # the source itself, resumed
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        workload.kill()


def gone(pid: int) -> bool:
    """Process ``pid`` exited (a zombie, or reaped)."""
    return process_state(pid) in ("Z", "X", "")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_daemon_whose_page_server_never_came_fails_the_restore_it_holds(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any], loop: str) -> None:
    """``lazymig lazy-pages`` said ready at once, ``criu restore`` handed it its processes,
    then its start-up failed: the page server never came. The restored processes must
    neither run on pages that never arrived nor wait for them: the daemon kills them and
    exits with the error within seconds, and the restore fails. (It held them until a
    stop signal: criu restore hung on its first lazy page.)"""
    d = chroot_dir
    workload, _ = dump_workload(d, workload_binary, mib=8, children=1, measure=measure)
    daemon_log = d.host / "lazymig-lazy-pages.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with daemon_log.open("wb") as err:
            daemon = start_with_status_fd(  # no page server there, ever
                lazymig_argv("lazy-pages", "--page-server", "--address", "127.0.0.1", "--port",
                             str(free_port()), "--wire", "v1", "--wait-for-page-server", "3",
                             "-D", str(d.host), loop=loop),
                what="lazymig lazy-pages", stderr=err.fileno())
        procs.append(daemon)
        started = time.monotonic()
        restore = subprocess.Popen(
            chroot_argv("criu", "restore", "--lazy-pages", "-D", d.inner, "--restore-detached",
                        "--pidfile", d.inside("restored.pid"), "-o", "restore.log", "-v4"),
            cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        procs.append(restore)
        rc = daemon.wait(30)
        measure["daemon_exit_s"] = round(time.monotonic() - started, 3)
        text = daemon_log.read_text()
        assert rc == 1, text[-3000:]
        assert "cannot connect to the page server" in text, text[-3000:]
        assert "killed" in text, text[-3000:]
        restore.wait(30)
        measure["restore_exit_s"] = round(time.monotonic() - started, 3)
        measure["restore_rc"] = restore.returncode
        with contextlib.suppress(FileNotFoundError, ValueError):
            restored = int((d.host / "restored.pid").read_text())
            deadline = time.monotonic() + 10
            while not gone(restored):
                assert time.monotonic() < deadline, f"restored process {restored} still runs"
                time.sleep(0.05)
        ticked = workload.output().ticks
        assert all(t.bad_pages == 0 for t in ticked), "a restored process ran on holes"
    except (CriuError, subprocess.TimeoutExpired, TimeoutError) as exc:
        raise AssertionError(f"{exc}\n{failure_context(d)}") from exc
    finally:
        for proc in reversed(procs):
            stop(proc)
        kill_restored(d)


# -- lazymig reads what criu dump writes ---------------------------------------------------

NEWER_THAN_CRIT = {"dump_criu_run_id", "allow_uprobes"}
"""inventory fields of CRIU >= 3.18 that Debian's crit 3.17 does not know (it drops them)."""


def crit_decode(path: Path) -> list[dict[str, Any]]:
    """The entries ``crit decode`` (non-pretty: plain ints) reads from an image."""
    assert CRIT is not None
    out = subprocess.run([CRIT, "decode", "-i", str(path)], check=True, capture_output=True,
                         timeout=60).stdout
    entries: list[dict[str, Any]] = json.loads(out)["entries"]
    return entries


def unknown_fields(msg: Message, path: str = "") -> list[str]:
    """Fields of a parsed message that lazymig's schema does not name, as ``path#number``."""
    unknown = protobuf_unknown.UnknownFieldSet(msg)
    out = [f"{path}#{unknown[i].field_number}" for i in range(len(unknown))]
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            for sub in value if fd.is_repeated else [value]:
                out += unknown_fields(sub, f"{path}.{fd.name}")
    return sorted(set(out))


@pytest.mark.crit
@pytest.mark.skipif(CRIT is None, reason="crit is not installed (Debian package criu)")
def test_lazymig_reads_criu_dump_images(
        chroot_dir: ChrootDir, workload_binary: Path, measure: dict[str, Any]) -> None:
    d = chroot_dir
    mib, children = 8, 1
    _, out = dump_workload(d, workload_binary, mib=mib, children=children, measure=measure)
    images = ImagesDir(d.host)

    # inventory: crit 3.17 decodes the same values (it does not know the newest fields).
    inv = plain(images.inventory())
    (crit_inv,) = crit_decode(d.host / "inventory.img")
    assert {k: v for k, v in inv.items() if k in crit_inv} == crit_inv
    assert set(inv) - set(crit_inv) <= NEWER_THAN_CRIT
    measure["unknown_fields"] = {"inventory": unknown_fields(images.inventory())}

    # pstree: the workload's two processes, with the pids it printed (its namespace's).
    pstree = images.pstree()
    assert [plain(e) for e in pstree] == crit_decode(d.host / "pstree.img")
    assert sorted(e.pid for e in pstree) == sorted(s.pid for s in out.started.values())
    assert pstree[0].pid == 1 and pstree[0].ppid == 0

    pages_in_area = mib * 1024 * 1024 // PAGE_SIZE
    for entry in pstree:
        pid = entry.pid
        tag = next(s.tag for s in out.started.values() if s.pid == pid)
        area = out.started[tag]
        assert area.pages == pages_in_area

        # mm, core (one per thread), pagemap: the same as crit decodes them.
        mm = images.mm(pid)
        assert [plain(mm)] == crit_decode(d.host / f"mm-{pid}.img")
        assert any(v.start <= area.addr and area.addr + area.pages * PAGE_SIZE <= v.end
                   for v in mm.vmas), "the pattern area is one VMA of mm.img"
        for tid in entry.threads:
            core = images.core(tid)
            assert [plain(core)] == crit_decode(d.host / f"core-{tid}.img")
            measure["unknown_fields"][f"core-{tid}"] = unknown_fields(core)
        assert unknown_fields(mm) == [] and unknown_fields(entry) == []

        pagemap = images.pagemap(pid)
        head, *crit_entries = crit_decode(d.host / f"pagemap-{pid}.img")
        assert head == {"pages_id": pagemap.pages_id}
        assert [(e.vaddr, e.nr_pages, int(e.flags)) for e in pagemap.entries] == [
            (e["vaddr"], e["nr_pages"], e.get("flags", PE.PRESENT)) for e in crit_entries]

        # An ordinary dump keeps lazy-capable pages as LAZY|PRESENT: the whole pattern
        # area is lazy, and its data is in pages-N.img where page_index says.
        ranges = images.lazy_ranges(pid)
        assert ranges
        lazy = {r.vaddr + i * PAGE_SIZE for r in ranges for i in range(r.nr_pages)}
        area_pages = [area.addr + i * PAGE_SIZE for i in range(area.pages)]
        assert lazy.issuperset(area_pages)
        pages_path, index = images.page_index(pid)
        assert pages_path == d.host / f"pages-{pagemap.pages_id}.img"
        assert pages_path.stat().st_size == index.size
        with pages_path.open("rb") as pages:
            for i, vaddr in enumerate(area_pages):
                offset = index.offset(vaddr)
                assert offset is not None
                pages.seek(offset)
                assert pages.read(PAGE_SIZE) == page_pattern(tag, i), f"page {i} of pid {pid}"
        # the whole area is one run of the pages image
        assert index.offset(area.addr, area.pages) is not None
        measure[f"pid{pid}"] = {"pagemap_entries": len(pagemap.entries),
                                "lazy_ranges": len(ranges), "lazy_pages": len(lazy),
                                "pages_with_data": index.nr_pages}
