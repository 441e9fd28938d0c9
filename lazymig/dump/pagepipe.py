"""Page pipes: a frozen process's pages held in kernel pipes, like CRIU's page_pipe.

Each :class:`PipeBuffer` is one pipe plus the iovecs (address ranges) whose
pages it holds, in order, and a lazy flag. Lazy pages are served to the
lazy-pages daemon on request, any number of times, without ever leaving the
pipe (:class:`~lazymig.dump.store.PipePageStore` tees them into a scratch pipe,
drops the prefix and splices the rest out: CRIU ``page_pipe_read`` and
``page_server_get_pages``). Non-lazy pages are
drained once into pages-N.img (or anything else with an fd) by splice.

**How pages get in.** A frozen target vmsplices its own pages into the pipes
(:mod:`lazymig.dump.target_splice`): nothing is copied, and the pipes are valid
only while it stays frozen. Otherwise (the dumper's own memory in tests, a
target without a free fd, pages the target cannot vmsplice such as a present
page in a PROT_NONE mapping) each chunk is copied once: ``process_vm_readv``
from the target into a fresh anonymous mapping of ours (``/proc/PID/mem`` for
what it refuses: that forces access like a debugger), then ``vmsplice`` into
the pipe, then ``munmap``. ``splice()`` from /proc/PID/mem is not supported
(EINVAL on Linux 6.18). vmsplice without SPLICE_F_GIFT does not copy: the pipe
takes references to the pages, so a staging buffer is never reused: after
munmap its pages belong to the pipe alone.

**File descriptors.** A 1 MiB pipe (fs.pipe-max-size here) holds 256 pages; a
4 GiB process needs 4096 pipes. Pipes are filled in batches (one SCM_RIGHTS
message to the target) and each write end is closed once its pipe is filled,
so one fd per pipe remains. Before filling, :meth:`PagePipes.collect`
computes the fds it needs, raises RLIMIT_NOFILE's soft limit up to the hard one
if needed, and fails with the count if even that is too low.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import warnings
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

from lazymig.dump.scan import PageRun
from lazymig.dump.target_splice import IOVEC_ROOM, SCM_MAX_FD, UIO_MAXIOV, TargetSplicer
from lazymig.errors import (
    BrokenResourceError,
    ClosedResourceError,
    ConfigurationError,
    LazyMigError,
    LazyMigOSError,
)
from lazymig.linux.procfs import fds
from lazymig.linux.ptrace import TargetGoneError, process_alive
from lazymig.linux.vm import (
    AnonMapping,
    get_pipe_size,
    pipe_max_size,
    pipe_size_unlimited,
    process_vm_readv,
    read_memory_into,
    set_pipe_size,
    vmsplice,
)
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.runs import PageRuns

__all__ = ["LARGE_PIPE", "FdSink", "PagePipes", "PagesNotFoundError", "PipeBuffer",
           "default_pipe_size"]

log = logging.getLogger(__name__)

#: fds kept free for everything else the process does while pipes are open.
FD_HEADROOM: Final = 64


#: Page pipe size when fs.pipe-max-size does not bind us (CAP_SYS_RESOURCE): 4 MiB,
#: 1024 pages (CRIU's MAX_XFER_LEN), a quarter of the pipes and fds of 1 MiB ones.
#: Bigger would make GETs dearer: serving a page tees the pipe up to it and drops
#: the prefix, 20 us for a whole 1 MiB pipe here, so ~80 us at worst for 4 MiB.
LARGE_PIPE: Final = 4 << 20


def default_pipe_size() -> int:
    """fs.pipe-max-size, or :data:`LARGE_PIPE` if that is larger and we may exceed it."""
    limit = pipe_max_size()
    return max(limit, LARGE_PIPE) if pipe_size_unlimited() else limit


class PagesNotFoundError(LazyMigError, LookupError):
    """No lazy buffer holds the requested address (CRIU ends the session here)."""


class FdSink(Protocol):
    """Something that takes bytes from a file descriptor (a pipe) itself."""

    def write_from_fd(self, fd: int, nbytes: int) -> int:
        """Move ``nbytes`` from ``fd``; return the bytes moved (fewer only at EOF)."""
        ...


class PipeBuffer:
    """One pipe and the pages it holds, in order (CRIU's ``page_pipe_buf``).

    ``iovs`` are the address ranges whose pages fill the pipe, in pipe order;
    ``lazy`` says whether they are served on demand (PPB_LAZY) or drained once.
    A buffer is planned first (its iovs assigned, no pipe yet), then filled
    (pipe created, pages put in, write end closed), then closed.
    """

    __slots__ = ("_closed", "_iovs", "_rfd", "_wfd", "capacity", "lazy", "nr_pages")

    def __init__(self, lazy: bool, capacity: int) -> None:
        self.lazy = lazy
        self.capacity = capacity
        self.nr_pages = 0
        self._rfd = self._wfd = -1
        self._closed = False
        self._iovs: list[tuple[int, int, int]] = []  # (vaddr, nr_pages, first page in pipe)

    @property
    def read_fd(self) -> int:
        """The pipe's read end (-1 before it is filled, once drained, or closed)."""
        return self._rfd

    @property
    def sealed(self) -> bool:
        """True once the pipe is filled and its write end closed."""
        return self._rfd >= 0 and self._wfd < 0

    @property
    def closed(self) -> bool:
        """True once drained (non-lazy) or closed with the page pipes."""
        return self._closed

    @property
    def iovs(self) -> tuple[PageRun, ...]:
        """The address ranges held, in pipe order."""
        return tuple(PageRun(v, n, self.lazy) for v, n, _ in self._iovs)

    @property
    def free_pages(self) -> int:
        """Room left, in pages."""
        return self.capacity - self.nr_pages

    def _add_iov(self, vaddr: int, nr_pages: int) -> None:
        if self._iovs:
            last_v, last_n, last_off = self._iovs[-1]
            if last_v + (last_n << PAGE_SHIFT) == vaddr:
                self._iovs[-1] = (last_v, last_n + nr_pages, last_off)
                self.nr_pages += nr_pages
                return
        self._iovs.append((vaddr, nr_pages, self.nr_pages))
        self.nr_pages += nr_pages

    def _seal(self) -> None:
        if self._wfd >= 0:
            fd, self._wfd = self._wfd, -1
            os.close(fd)

    def _close(self) -> None:
        self._closed = True
        self._seal()
        if self._rfd >= 0:
            fd, self._rfd = self._rfd, -1
            os.close(fd)

    def __repr__(self) -> str:
        kind = "lazy" if self.lazy else "non-lazy"
        return f"<PipeBuffer {kind} {self.nr_pages}/{self.capacity} pages, {len(self._iovs)} iovs>"


class PagePipes:
    """The page pipes of one dumped process.

    Build it with :meth:`collect` while the target is frozen. :meth:`find` locates a
    lazy page in its pipe (:class:`~lazymig.dump.store.PipePageStore` serves them
    from there). Drain non-lazy pages with :meth:`drain_nonlazy`. :meth:`close`
    frees every fd; it is idempotent.

    Not thread-safe: one user at a time (the page server's task).
    """

    def __init__(self, *, pipe_size: int | None = None) -> None:
        size = default_pipe_size() if pipe_size is None else pipe_size
        if size < PAGE_SIZE:
            raise ConfigurationError(f"pipe_size must be at least {PAGE_SIZE}, got {size}")
        self._want = size & ~(PAGE_SIZE - 1)
        self._buffers: list[PipeBuffer] = []
        self._current: dict[bool, PipeBuffer | None] = {True: None, False: None}
        self._index = PageRuns(())  # the lazy iovecs, and where each one's pages are:
        self._index_at: list[tuple[PipeBuffer, int]] = []  # (its pipe, first page in it)
        self._index_dirty = False
        self._closed = False
        self._capacity = max(1, min(self._want, _grantable_pipe_size(self._want)) >> PAGE_SHIFT)

    # -- building ------------------------------------------------------------------

    @classmethod
    def collect(cls, pid: int, runs: Iterable[PageRun], *, pipe_size: int | None = None,
                splicer: TargetSplicer | None = None) -> PagePipes:
        """Put every page of ``runs`` of process ``pid`` into new page pipes.

        With a ``splicer`` the frozen target vmsplices its own pages into the
        pipes (no copy; the pipes are valid only while it stays frozen, see
        :mod:`lazymig.dump.target_splice`); pages it cannot vmsplice (EFAULT: a
        mapping without PROT_READ) are copied instead. Without one, every page is
        copied. The process must not change its memory meanwhile (freeze it
        first). Blocking: run it off the event loop. On any error every pipe is
        closed (and the splicer's fds in the target are closed by its owner).
        """
        self = cls.plan(runs, pipe_size=pipe_size,
                        write_ends=SCM_MAX_FD + 1 if splicer is not None else 0)
        try:
            self.fill(pid, self.unfilled(), splicer)
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def plan(cls, runs: Iterable[PageRun], *, pipe_size: int | None = None,
             write_ends: int = SCM_MAX_FD + 1) -> PagePipes:
        """Assign every page of ``runs`` to a page pipe, without creating the pipes.

        The lazy index (:meth:`find`, :meth:`lazy_runs`) is complete at once;
        :meth:`fill` then creates and fills the pipes, all at once or a few at a
        time. RLIMIT_NOFILE is checked (and raised) here, for every pipe plus
        ``write_ends`` open while filling, so that running out of fds fails now
        rather than in the middle of a late fill.
        """
        runs = list(runs)
        self = cls(pipe_size=pipe_size)
        try:
            self.reserve_fds(runs, batch=write_ends)
            for run in runs:
                self._plan_run(run)
            self._current = {True: None, False: None}
        except BaseException:
            self.close()
            raise
        return self

    def unfilled(self, *, lazy: bool | None = None) -> list[PipeBuffer]:
        """The buffers not filled yet (of one kind, if ``lazy`` is given), in plan order."""
        return [b for b in self._buffers if b.read_fd < 0 and not b.closed
                and (lazy is None or b.lazy is lazy)]

    def fill(self, pid: int, bufs: Sequence[PipeBuffer], splicer: TargetSplicer | None) -> None:
        """Create the pipes of ``bufs`` (planned, not filled) and put their pages in.

        With a ``splicer`` the target vmsplices its own pages (see :meth:`collect`),
        up to ``SCM_MAX_FD`` pipes per batch; otherwise they are copied. Each pipe
        is sealed (write end closed) once filled. Blocking. On error the pipes of
        ``bufs`` may be left half-filled: close the page pipes.
        """
        self._check_open()
        batch = SCM_MAX_FD if splicer is not None else 1
        for i in range(0, len(bufs), batch):
            part = list(bufs[i:i + batch])
            for buf in part:
                self._open_pipe(buf)
            self._fill(pid, part, splicer)

    def fds_needed(self, runs: Sequence[PageRun], *, batch: int = 0) -> int:
        """How many more fds collecting ``runs`` will hold at its peak, when up to
        ``batch`` pipes keep their write ends open until they are filled."""
        cap = self._capacity_pages()
        lazy = sum(r.nr_pages for r in runs if r.lazy)
        nonlazy = sum(r.nr_pages for r in runs if not r.lazy)
        pipes = -(-lazy // cap) + -(-nonlazy // cap)
        return pipes + 2 + batch  # each class's current pipe keeps its write end open

    def reserve_fds(self, runs: Sequence[PageRun], *, batch: int = 0) -> None:
        """Make sure RLIMIT_NOFILE allows the pipes for ``runs``; raise the soft
        limit towards the hard one if needed, or fail naming the count."""
        needed = self.fds_needed(runs, batch=batch)
        in_use = len(fds(os.getpid()))
        want = in_use + needed + FD_HEADROOM
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or want <= soft:
            return
        if hard != resource.RLIM_INFINITY and want > hard:
            pages = sum(r.nr_pages for r in runs)
            raise LazyMigOSError(
                errno.EMFILE,
                f"page pipes for {pages} pages ({self._capacity_pages()} pages per pipe) need "
                f"{needed} file descriptors on top of the {in_use} open (plus {FD_HEADROOM} "
                f"spare), but the RLIMIT_NOFILE hard limit is {hard}; raise it (ulimit -Hn) "
                "or fs.pipe-max-size")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    def _plan_run(self, run: PageRun) -> None:
        """Assign one run's pages to buffers of its kind (planned: no pipe yet)."""
        self._check_open()
        vaddr, left = run.vaddr, run.nr_pages
        while left > 0:
            buf = self._current[run.lazy]
            if buf is None or buf.free_pages == 0:
                buf = self._new_buffer(run.lazy)
            k = min(left, buf.free_pages)
            buf._add_iov(vaddr, k)
            if buf.lazy:
                self._index_dirty = True
            vaddr += k << PAGE_SHIFT
            left -= k
            if buf.free_pages == 0:
                self._current[run.lazy] = None

    def _fill(self, pid: int, bufs: list[PipeBuffer], splicer: TargetSplicer | None) -> None:
        """Put the pages of ``bufs`` (pipes created, empty) into their pipes and seal them."""
        if splicer is None:
            for buf in bufs:
                self._copy_rest(pid, buf, 0)
        else:
            while bufs:
                target_fds = splicer.receive([b._wfd for b in bufs])
                if not target_fds:
                    raise LazyMigOSError(errno.EMFILE, f"process {pid} has no free fd to take "
                                         "a page pipe (its RLIMIT_NOFILE)", pid=pid)
                part, bufs = bufs[:len(target_fds)], bufs[len(target_fds):]
                try:
                    self._splice_by_target(pid, part, target_fds, splicer)
                finally:
                    splicer.close_fds(target_fds)

    def _splice_by_target(self, pid: int, bufs: list[PipeBuffer], target_fds: list[int],
                          splicer: TargetSplicer) -> None:
        """The target vmsplices each buffer's pages into its pipe (fd ``target_fds[i]``);
        what it cannot is copied. Seals the buffers."""
        calls: list[tuple[PipeBuffer, int, list[tuple[int, int]]]] = []
        for buf, fd in zip(bufs, target_fds, strict=True):
            iovs = [(v, n << PAGE_SHIFT) for v, n, _ in buf._iovs]
            calls += [(buf, fd, iovs[i:i + UIO_MAXIOV]) for i in range(0, len(iovs), UIO_MAXIOV)]
        done: dict[PipeBuffer, int] = {}
        failed: set[PipeBuffer] = set()
        while calls:
            group, room = [], IOVEC_ROOM
            while calls and len(calls[0][2]) <= room:
                room -= len(calls[0][2])
                group.append(calls.pop(0))
            results = splicer.vmsplice([(fd, iovs) for _, fd, iovs in group])
            for (buf, _, iovs), res in zip(group, results, strict=False):
                want = sum(length for _, length in iovs)
                done[buf] = done.get(buf, 0) + max(res, 0)
                if res < 0 and res != -errno.EFAULT:
                    raise LazyMigOSError(-res, f"vmsplice in process {pid} at {iovs[0][0]:#x}",
                                         pid=pid)
                if res != want:  # EFAULT (unreadable page) then or right away
                    failed.add(buf)
                    why = os.strerror(-res) if res < 0 else f"{res} of {want} bytes queued"
                    log.info("process %d could not vmsplice the page at %#x (%s): copying the "
                             "rest of that pipe", pid, _address_at(iovs, max(res, 0)), why)
            calls = [c for c in group[len(results):] + calls if c[0] not in failed]
        for buf in failed:
            self._copy_rest(pid, buf, done[buf])
        for buf in bufs:
            buf._seal()

    def _copy_rest(self, pid: int, buf: PipeBuffer, skip: int) -> None:
        """Copy the pages of ``buf`` from byte ``skip`` on into its pipe."""
        if skip & (PAGE_SIZE - 1):
            raise BrokenResourceError(f"a page pipe got {skip} bytes, not whole pages")
        skip >>= PAGE_SHIFT
        for vaddr, nr, _ in buf._iovs:
            if skip >= nr:
                skip -= nr
                continue
            self._copy(pid, buf, vaddr + (skip << PAGE_SHIFT), nr - skip)
            skip = 0
        buf._seal()

    def _capacity_pages(self) -> int:
        return self._capacity

    @property
    def pipe_size(self) -> int:
        """Bytes a page pipe holds at most (a scratch pipe that serves one must hold as
        much)."""
        return self._capacity_pages() << PAGE_SHIFT

    def _new_buffer(self, lazy: bool) -> PipeBuffer:
        buf = PipeBuffer(lazy, self._capacity_pages())
        self._buffers.append(buf)
        self._current[lazy] = buf
        return buf

    def _open_pipe(self, buf: PipeBuffer) -> None:
        """Create the pipe of a planned buffer, sized for its pages."""
        try:
            rfd, wfd = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            raise LazyMigOSError(exc.errno or errno.EMFILE, "creating a page pipe") from exc
        try:
            size = _size_pipe(wfd, self._want)
            if size >> PAGE_SHIFT < buf.nr_pages:  # the probe got more: a user limit
                raise LazyMigOSError(
                    errno.EPERM, f"a page pipe could be sized to {size} bytes only, not the "
                    f"{buf.nr_pages << PAGE_SHIFT} it must hold (fs.pipe-user-pages-soft?)")
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        buf._rfd, buf._wfd = rfd, wfd

    def _copy(self, pid: int, buf: PipeBuffer, vaddr: int, nr_pages: int) -> None:
        """Copy pages into a fresh mapping, vmsplice them into ``buf``, unmap.

        The mapping is never reused: the pipe references its pages (see the
        module docstring), so after munmap only the pipe holds them.
        """
        length = nr_pages << PAGE_SHIFT
        with AnonMapping(length, populate=True) as staging:
            try:
                got = process_vm_readv(pid, staging.address, vaddr, length)
            except LazyMigOSError as exc:
                if exc.errno == errno.ESRCH or not process_alive(pid):
                    raise TargetGoneError(pid, f"reading pages at {vaddr:#x}") from exc
                if exc.errno != errno.EFAULT:
                    raise
                got = 0
            if got < length:
                got &= ~(PAGE_SIZE - 1)
                with staging.view() as view:
                    read_memory_into(pid, vaddr + got, view[got:])
            done = 0
            while done < length:
                done += vmsplice(buf._wfd, staging.address + done, length - done)

    # -- serving lazy pages ---------------------------------------------------------

    def find(self, vaddr: int) -> tuple[PipeBuffer, int, int] | None:
        """Locate a lazy page: ``(buffer, page offset in its pipe, pages until the end
        of the iovec holding it)``, or ``None`` if no lazy buffer holds ``vaddr``.

        Like CRIU's ``page_pipe_read(..., PPB_LAZY)``, non-lazy buffers are not
        searched. ``vaddr`` must be page-aligned.
        """
        self._check_open()
        if vaddr & (PAGE_SIZE - 1):
            raise ConfigurationError(f"address {vaddr:#x} is not page-aligned")
        if self._index_dirty:
            self._build_index()
        i = self._index.find(vaddr)
        if i < 0 or (buf := self._index_at[i][0]).closed:
            return None
        skip = (vaddr - self._index.start(i)) >> PAGE_SHIFT
        return buf, self._index_at[i][1] + skip, (self._index.end(i) - vaddr) >> PAGE_SHIFT

    def _build_index(self) -> None:
        entries = sorted(
            ((v, n, buf, off) for buf in self._buffers if buf.lazy for v, n, off in buf._iovs),
            key=lambda e: e[0])
        self._index = PageRuns((v, n) for v, n, _, _ in entries)
        self._index_at = [(buf, off) for _, _, buf, off in entries]
        self._index_dirty = False

    # -- non-lazy pages ----------------------------------------------------------------

    def drain_nonlazy(self, dst_fd: int | FdSink) -> list[PageRun]:
        """Splice every non-lazy buffer, in order, into ``dst_fd`` (e.g. pages-1.img)
        and close it; returns the runs written, in the order of their bytes.

        ``dst_fd`` is a file descriptor, or a sink that moves bytes from a pipe
        itself, such as :class:`~lazymig.proto.images.PagesWriter`.
        The pages are consumed: a second call writes nothing more.
        """
        self._check_open()
        out: list[PageRun] = []
        for buf in self._buffers:
            if buf.lazy or buf.closed:
                continue
            if buf.read_fd < 0:
                raise ClosedResourceError("non-lazy page pipes must be filled before draining")
            buf._seal()
            if self._current[False] is buf:
                self._current[False] = None
            length = buf.nr_pages << PAGE_SHIFT
            if isinstance(dst_fd, int):
                _splice_all(buf.read_fd, dst_fd, length)
            elif (moved := dst_fd.write_from_fd(buf.read_fd, length)) != length:
                raise BrokenResourceError(f"page pipe gave {moved} of {length} bytes")
            for run in buf.iovs:
                if out and out[-1].end == run.vaddr:
                    out[-1] = PageRun(out[-1].vaddr, out[-1].nr_pages + run.nr_pages, False)
                else:
                    out.append(run)
            buf._close()
        return out

    # -- introspection --------------------------------------------------------------------

    @property
    def buffers(self) -> tuple[PipeBuffer, ...]:
        """Every pipe buffer, in creation order."""
        return tuple(self._buffers)

    def lazy_runs(self) -> list[PageRun]:
        """The lazy address ranges, sorted by address (for pagemap entries and pushing)."""
        if self._index_dirty:
            self._build_index()
        return [PageRun(v, n, True) for v, n in self._index]

    def nonlazy_runs(self) -> list[PageRun]:
        """The non-lazy ranges still held, in pipe order."""
        return [run for buf in self._buffers if not buf.lazy and not buf.closed
                for run in buf.iovs]

    @property
    def nr_fds(self) -> int:
        """File descriptors currently held (the pipes' ends)."""
        return sum(1 for b in self._buffers for fd in (b._rfd, b._wfd) if fd >= 0)

    # -- lifetime --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def close(self) -> None:
        """Close every pipe (idempotent)."""
        self._closed = True
        for buf in self._buffers:
            buf._close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("these page pipes are closed")

    def __enter__(self) -> PagePipes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2)
            self.close()

    def __repr__(self) -> str:
        lazy = sum(b.nr_pages for b in self._buffers if b.lazy)
        other = sum(b.nr_pages for b in self._buffers if not b.lazy)
        return (f"<PagePipes {len(self._buffers)} pipes, {lazy} lazy + {other} non-lazy pages"
                f"{' closed' if self._closed else ''}>")


def _size_pipe(fd: int, want: int) -> int:
    """Ask for ``want`` bytes of pipe; the size it got (fs.pipe-max-size and the
    user's pipe quota may cap it)."""
    try:
        return set_pipe_size(fd, want)
    except LazyMigOSError as exc:
        if exc.errno not in (errno.EPERM, errno.EBUSY, errno.EINVAL):
            raise
        return get_pipe_size(fd)


def _grantable_pipe_size(want: int) -> int:
    """The size a new pipe gets when ``want`` bytes are asked."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        return _size_pipe(write_fd, want)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _address_at(iovs: list[tuple[int, int]], offset: int) -> int:
    """The address ``offset`` bytes into the iovecs (one past the end if beyond)."""
    for address, length in iovs:
        if offset < length:
            return address + offset
        offset -= length
    return iovs[-1][0] + iovs[-1][1]


def _wait_writable(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()


def _splice_all(src: int, dst: int, length: int) -> None:
    while length:
        try:
            moved = os.splice(src, dst, length)
        except BlockingIOError:
            _wait_writable(dst)
            continue
        if moved == 0:
            raise BrokenResourceError(f"splice into fd {dst} stopped with {length} bytes left")
        length -= moved
