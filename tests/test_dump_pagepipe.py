"""Page pipes with real pipes and real memory (this process's own, read through
process_vm_readv exactly as a frozen target's would be)."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
from helpers import SEED, pipe_layout
from lazydump import PipeServer

from lazymig.dump.pagepipe import LARGE_PIPE, PagePipes, PagesNotFoundError
from lazymig.dump.scan import PageRun
from lazymig.dump.store import PageSegment, PipePageStore
from lazymig.errors import ClosedResourceError, ConfigurationError, LazyMigOSError
from lazymig.linux.vm import (
    AnonMapping,
    pipe_max_size,
    pipe_size_unlimited,
    set_pipe_size,
)
from lazymig.proto.constants import PAGE_SIZE
from lazymig.testing.workload import expected_page

SMALL_PIPE = 16 * PAGE_SIZE  # force many pipes and split iovecs


def open_fds() -> int:
    return sum(1 for _ in os.scandir("/proc/self/fd"))


def read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        assert chunk
        out += chunk
    return out


def test_find_and_serve_twice(memory: AnonMapping) -> None:
    base = memory.address
    with PagePipes.collect(os.getpid(), pipe_layout(base), pipe_size=SMALL_PIPE) as pp, \
            PipeServer(pp) as server:
        assert all(b.sealed for b in pp.buffers)  # every write end closed
        lazy = [b for b in pp.buffers if b.lazy]
        assert [b.nr_pages for b in lazy] == [16, 16, 16, 2]
        # The second lazy pipe holds pages 16..19, then 23..34: two iovecs.
        assert [(r.vaddr - base) // PAGE_SIZE for r in lazy[1].iovs] == [16, 23]

        buf, off, left = pp.find(base + 17 * PAGE_SIZE) or pytest.fail("not found")
        assert (buf, off, left) == (lazy[1], 1, 3)
        assert pp.find(base + 20 * PAGE_SIZE) is None  # non-lazy pages are not served
        assert pp.find(base + 53 * PAGE_SIZE) is None  # never dumped
        assert pp.find(base - PAGE_SIZE) is None
        with pytest.raises(ConfigurationError):
            pp.find(base + 1)

        for page in (0, 15, 16, 19, 23, 40, 52):
            vaddr = base + page * PAGE_SIZE
            for _ in range(2):  # the same page can be served again and again
                assert server.serve(vaddr, 1) == (1, expected_page(vaddr, SEED))
        # A request runs on to the end of its run (into the next pipe when that one
        # starts with the next page), not past it.
        assert server.serve(base + 18 * PAGE_SIZE, 100) == (
            2, b"".join(expected_page(base + i * PAGE_SIZE, SEED) for i in (18, 19)))
        assert server.serve(base + 14 * PAGE_SIZE, 4) == (
            4, b"".join(expected_page(base + i * PAGE_SIZE, SEED) for i in range(14, 18)))
        with pytest.raises(PagesNotFoundError):
            server.serve(base + 21 * PAGE_SIZE, 1)
        assert [r.vaddr for r in pp.lazy_runs()] == sorted(r.vaddr for r in pp.lazy_runs())
        assert sum(r.nr_pages for r in pp.lazy_runs()) == 50


def test_drain_nonlazy_to_file(memory: AnonMapping) -> None:
    base = memory.address
    with PagePipes.collect(os.getpid(), pipe_layout(base), pipe_size=SMALL_PIPE) as pp, \
            tempfile.TemporaryFile() as f:
        written = pp.drain_nonlazy(f.fileno())
        assert written == [PageRun(base + 20 * PAGE_SIZE, 3, False),
                           PageRun(base + 60 * PAGE_SIZE, 4, False)]
        f.seek(0)
        data = f.read()
        with memory.view() as v:
            assert data == bytes(v[20 * PAGE_SIZE:23 * PAGE_SIZE]) + bytes(v[60 * PAGE_SIZE:])
        assert pp.drain_nonlazy(f.fileno()) == []  # consumed
        assert pp.nonlazy_runs() == []
        # Lazy pages are untouched by draining.
        assert pp.find(base) is not None


def test_pages_are_a_snapshot(memory: AnonMapping) -> None:
    """After collection, changing the source does not change what is served."""
    base = memory.address
    with PagePipes.collect(os.getpid(), [PageRun(base, 4, True)]) as pp, \
            PipeServer(pp) as server:
        with memory.view() as v:
            v[0:PAGE_SIZE] = b"\xff" * PAGE_SIZE
        assert server.serve(base, 1) == (1, expected_page(base, SEED))


def test_unreadable_pages_fall_back_to_proc_mem(memory: AnonMapping) -> None:
    """process_vm_readv cannot read PROT_NONE pages; /proc/PID/mem can."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    base = memory.address
    assert libc.mprotect(base + 4 * PAGE_SIZE, 2 * PAGE_SIZE, 0) == 0
    try:
        with PagePipes.collect(os.getpid(), [PageRun(base, 8, True)]) as pp, \
                PipeServer(pp) as server:
            n, got = server.serve(base, 8)
            assert n == 8
    finally:
        libc.mprotect(base + 4 * PAGE_SIZE, 2 * PAGE_SIZE, 3)
    assert got == b"".join(expected_page(base + i * PAGE_SIZE, SEED) for i in range(8))


def test_close_is_idempotent_and_frees_every_fd(memory: AnonMapping) -> None:
    before = open_fds()
    pp = PagePipes.collect(os.getpid(), pipe_layout(memory.address), pipe_size=SMALL_PIPE)
    assert pp.nr_fds == len(pp.buffers)  # one read end each
    assert open_fds() == before + pp.nr_fds
    pp.close()
    pp.close()
    assert pp.closed and pp.nr_fds == 0 and open_fds() == before
    with pytest.raises(ClosedResourceError):
        pp.find(memory.address)


def test_one_fd_per_full_pipe() -> None:
    pages = 4096  # 16 MiB in pipes of 16 pages: 256 pipes
    with AnonMapping(pages * PAGE_SIZE, populate=True) as m:
        before = open_fds()
        with PagePipes.collect(os.getpid(), [PageRun(m.address, pages, True)],
                               pipe_size=SMALL_PIPE) as pp:
            assert len(pp.buffers) == 256
            assert open_fds() - before == 256


def test_bad_arguments() -> None:
    with pytest.raises(ConfigurationError):
        PagePipes(pipe_size=100)


RLIMIT_SCRIPT = textwrap.dedent("""
    import os, resource, sys
    from lazymig.dump.pagepipe import PagePipes
    from lazymig.dump.scan import PageRun
    from lazymig.errors import LazyMigOSError
    from lazymig.linux.vm import AnonMapping
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with AnonMapping(1000 * 4096, populate=True) as m:
        try:
            pp = PagePipes.collect(os.getpid(), [PageRun(m.address, 1000, True)],
                                   pipe_size=4096)
        except LazyMigOSError as exc:
            print("ERROR", exc.errno, exc)
        else:
            print("OK", len(pp.buffers), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            pp.close()
""")


def run_with_rlimit(soft: int, hard: int) -> str:
    res = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(soft), str(hard)],
                         capture_output=True, text=True, timeout=60, check=True)
    return res.stdout.strip()


def test_fd_limit_too_low_is_a_clear_error() -> None:
    out = run_with_rlimit(200, 200)
    assert out.startswith(f"ERROR {errno.EMFILE} ")
    assert "need 1002 file descriptors" in out and "hard limit is 200" in out


def test_soft_fd_limit_is_raised_when_the_hard_one_allows() -> None:
    out = run_with_rlimit(200, 4000).split()
    assert out[:2] == ["OK", "1000"] and 1000 < int(out[2]) <= 4000


def test_page_pipes_exceed_pipe_max_size_only_when_the_kernel_lets_them() -> None:
    """pipe_size_unlimited() says what F_SETPIPE_SZ does beyond fs.pipe-max-size, and
    page pipes (and the scratch pipes that serve them) take LARGE_PIPE only then."""
    r, w = os.pipe()
    try:
        try:
            set_pipe_size(w, pipe_max_size() * 2)
            allowed = True
        except LazyMigOSError as exc:
            assert exc.errno == errno.EPERM
            allowed = False
    finally:
        os.close(r)
        os.close(w)
    assert pipe_size_unlimited() == allowed
    with PagePipes() as pp:
        assert pp.pipe_size == (max(LARGE_PIPE, pipe_max_size()) if allowed else pipe_max_size())


def test_the_store_sees_a_region_over_many_pipes_as_one_range(memory: AnonMapping) -> None:
    """The page server walks the store's lazy ranges on every GET: neighbours in
    different pipes are joined. A GET runs on into the next pipe (a run's pages
    go on there) up to the end of the run or a scratch pipe's worth (16 pages)."""
    base = memory.address
    with PagePipes.collect(os.getpid(), pipe_layout(base), pipe_size=SMALL_PIPE) as pp:
        store = PipePageStore(os.getpid(), pp)
        try:
            assert len([b for b in pp.buffers if b.lazy]) == 4
            assert store.lazy_ranges(os.getpid()) == [(base, 20), (base + 23 * PAGE_SIZE, 30)]
            # page: (pages served of 100 asked): 10..15 + 16..19 (end of the run);
            # 25..34 (after a prefix in the second pipe) + 35..40 (16 in all).
            for page, served in ((10, 10), (25, 16), (50, 3)):
                vaddr = base + page * PAGE_SIZE
                segment = store.lookup(os.getpid(), vaddr, 100)
                assert isinstance(segment, PageSegment)  # every pipe is filled: no wait
                assert segment.length == served * PAGE_SIZE
                try:
                    assert read_exact(segment.fd, served * PAGE_SIZE) == b"".join(
                        expected_page(vaddr + i * PAGE_SIZE, SEED) for i in range(served))
                finally:
                    segment.close(drained=True)
        finally:
            store.close()
