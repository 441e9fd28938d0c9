"""The dump side in one call: freeze, write the images, serve the lazy pages, end.

:class:`LazyDump` is ``criu dump --lazy-pages``::

    async with LazyDump(pid, "/srv/dump", address="0.0.0.0", port=9876) as dump:
        print("restore may start; page server on port", await dump.ready)
        result = await dump.serve()     # returns once every lazy page went out
    # the source was killed (or resumed, with leave_running=True)

:func:`dump` is a plain ``criu dump``: every page into ``pages-1.img``.

What happens to the source process:

* **before the page server listens** (refused target, images dir not
  writable, port taken, a failed image write, cancellation): it is resumed
  as if nothing happened and the images written so far are removed;
* **while it serves**, its lazy pages are put into the page pipes (it stays
  frozen anyway until the transfer is complete; see
  :mod:`lazymig.dump.late_fill`): the images only list them, so a restore
  need not wait for gigabytes of pipes. A GET for pages not in a pipe yet
  waits for them, and they are filled next. Should filling fail, the
  transfer is aborted (below) and the daemon, cut off, stops the restored
  process. Filling runs injected vmsplice calls in the source, 32 MiB a
  batch, as collecting did before listening: between batches the source
  holds its own registers in an interrupt stop, and a dumper killed with
  SIGKILL then leaves it running on; killed during a batch (~2 ms each), it
  leaves the source to a SIGTRAP (the kernel detaches it mid-call);
* **after a complete transfer**: it is killed (CRIU's default) or, with
  ``leave_running``, resumed;
* **after an aborted transfer** (an exception or cancellation while serving,
  or leaving the ``async with`` block without a complete :meth:`LazyDump.serve`):
  part of its memory may already run elsewhere, so it must neither run on
  nor be lost. It is detached into a job-control stop (SIGSTOP, then
  PTRACE_DETACH) with its memory intact, and a warning says so: ``kill -CONT``
  resumes it, or it can be dumped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from lazymig.dump.files import collect_files, external_stdio, inspect_files
from lazymig.dump.freeze import (
    FrozenProcess,
    TargetLayout,
    UnsupportedTargetError,
    inspect_target,
)
from lazymig.dump.images import DumpImages, write_images
from lazymig.dump.late_fill import LateFill
from lazymig.dump.pagepipe import PagePipes
from lazymig.dump.scan import MemoryScan, PageRun
from lazymig.dump.store import LazyPageStore, PipePageStore
from lazymig.dump.tree import FrozenTree, LiveTree, dump_tree, has_children, start_lazy_tree
from lazymig.dump.waiters import check_not_waited_for
from lazymig.errors import ClosedResourceError, ConfigurationError, LazyMigError, LazyMigOSError
from lazymig.linux.procfs import children, read_status
from lazymig.linux.ptrace import TargetGoneError, process_alive
from lazymig.proto.constants import PAGE_SIZE, PARENT_LINK
from lazymig.proto.images import ImagesDir
from lazymig.proto.wire import WireVersion

if TYPE_CHECKING:  # pre-copy (its dirty tracking, a userfaultfd) is loaded when used
    from lazymig.dump.precopy import PreCopy
    from lazymig.dump.server import PageServer, PageServerStats
    from lazymig.tls import ServerTls, TlsOption

__all__ = ["DumpResult", "LazyDump", "SourceFate", "check_target", "dump"]

log = logging.getLogger(__name__)

T = TypeVar("T")
StrPath = str | os.PathLike[str]


class SourceFate(enum.Enum):
    """What became of the dumped process."""

    KILLED = "killed"
    RUNNING = "running"
    """Resumed (``leave_running``)."""
    STOPPED = "stopped"
    """Left in a job-control stop after an aborted transfer."""


@dataclasses.dataclass(frozen=True, slots=True)
class DumpResult:
    """The outcome of a dump."""

    pid: int
    images_dir: Path
    nonlazy_pages: int
    """Pages written to ``pages-1.img``."""
    lazy_pages: int
    """Pages served by the page server (0 for a plain dump)."""
    pages_sent: int
    """Pages the page server sent, repeats included."""
    frozen_seconds: float
    """From the freeze until the images were written (and the server listened)."""
    transfer_seconds: float
    """From the server's start until the transfer was complete."""
    source: SourceFate

    @property
    def bytes_per_second(self) -> float:
        """Average page-server throughput (pages sent over the transfer time)."""
        return self.pages_sent * PAGE_SIZE / max(self.transfer_seconds, 1e-9)


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    LISTENING = "listening"
    SERVING = "serving"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


class LazyDump:
    """Dump process ``pid`` into ``images_dir`` and serve its lazy pages over TCP.

    Args:
        pid: the process to migrate, all its threads (see
            :meth:`~lazymig.dump.freeze.FrozenProcess.freeze`).
        images_dir: an existing directory for the images.
        address: where the page server listens (CRIU's ``--address``).
        port: its TCP port (CRIU's ``--port``; 0 picks a free one, see :attr:`port`).
        wire: the page-server header layout (V1 for CRIU up to 4.1).
        tls: serve over TLS (CRIU's ``--tls``): a :class:`~lazymig.tls.TlsConfig`
            or a server ``ssl.SSLContext``; certificates are loaded here,
            before the process is frozen.
        leave_running: resume the source after a complete transfer instead
            of killing it.
        pipe_size: page pipe size in bytes (default: fs.pipe-max-size).
        fsync: fsync the images.
        progress_interval: seconds between progress log lines (INFO) while
            serving; None for none.
        precopy: pre-copy rounds already done (:class:`~lazymig.dump.precopy.PreCopy`):
            the images are a child of its last round, with the pages it holds
            current as PE_PARENT entries (a single process only). Its owner
            closes it after the dump (the tracking ends then).
        listener: a socket already listening at ``address``/``port``
            (:func:`lazymig._listen.listen_tcp`), which the dump then owns: the
            command line binds it before anything heavy is imported, so a client
            may connect while the process is being dumped. It waits in the
            backlog: nothing is served before the images are written. The page
            server itself is then made (and its module loaded) by :meth:`serve`,
            after :attr:`ready`, not on the way to it: :attr:`stats` is None
            until then.

    Use it as an async context manager (:meth:`start` on entry; an exit
    without a complete :meth:`serve` aborts), or call :meth:`run`.
    """

    def __init__(self, pid: int, images_dir: StrPath, *, address: str = "0.0.0.0",
                 port: int = 27, wire: WireVersion = WireVersion.V2,
                 tls: TlsOption | None = None,
                 leave_running: bool = False, pipe_size: int | None = None,
                 fsync: bool = False, progress_interval: float | None = 5.0,
                 precopy: PreCopy | None = None,
                 listener: socket.socket | None = None) -> None:
        self.pid = pid
        self.precopy = precopy
        self.images = ImagesDir(images_dir, fsync=fsync)
        self.address = address
        self.port = port if listener is None else listener.getsockname()[1]
        """The page server's port (the real one once listening, when 0 was asked)."""
        self._listener = listener
        self.wire = wire
        self.tls: ServerTls | None = None
        if tls is not None:
            from lazymig.tls import ServerTls  # noqa: PLC0415 (start-up: only with TLS)

            self.tls = ServerTls.build(tls, address)
        self.leave_running = leave_running
        self.pipe_size = pipe_size
        self.progress_interval = progress_interval
        self.abort_resumes = False
        """Set when no restored copy can have run (its restore failed before it ran):
        an abort then resumes the source instead of leaving it stopped."""
        self._state = _State.NEW
        self._ready: asyncio.Future[int] | None = None
        self._start_error: BaseException | None = None
        self._fp: FrozenProcess | FrozenTree | None = None
        self._written: DumpImages | None = None
        self._store: LazyPageStore | None = None
        self._server: PageServer | None = None
        self._filling: asyncio.Task[None] | None = None
        self._frozen_at = 0.0
        self._frozen_seconds = 0.0

    # -- public state

    @property
    def ready(self) -> asyncio.Future[int]:
        """Resolves to the page server's port once the images are written and the
        server listens (restore may start then); raises what :meth:`start` raised."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._settle_ready()
        return self._ready

    def _settle_ready(self) -> None:
        """Resolve :attr:`ready` if it exists and :meth:`start` has ended."""
        fut = self._ready
        if fut is None or fut.done():
            return
        if self._start_error is not None:
            if isinstance(self._start_error, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(self._start_error)
                fut.exception()  # retrieved: nobody has to await it
        elif self._state in (_State.LISTENING, _State.SERVING, _State.DONE, _State.ABORTED):
            fut.set_result(self.port)

    @property
    def stats(self) -> PageServerStats | None:
        """The page server's counters (pages served, bytes/s), once it listens (given a
        ``listener``: once :meth:`serve` made it)."""
        return None if self._server is None else self._server.stats

    @property
    def frozen_seconds(self) -> float:
        """From the freeze until the images were written and the server listened."""
        return self._frozen_seconds

    @property
    def written(self) -> DumpImages | None:
        """The images written (with page counts), once :meth:`start` is done."""
        return self._written

    # -- lifecycle

    async def start(self) -> None:
        """Freeze the process, write its images and start listening.

        On any failure (or cancellation) the process is resumed unchanged, the
        images written are removed and the error propagates.
        """
        if self._state is not _State.NEW:
            raise ClosedResourceError(f"this dump of pid {self.pid} was started already")
        self._state = _State.STARTING
        try:
            _check_images_dir(self.images)
            if self._listener is None:
                _check_port(self.address, self.port)
            check_not_waited_for(self.pid)
            started = time.monotonic()
            fp: FrozenProcess | FrozenTree
            store: LazyPageStore | None = None
            pipes: PagePipes | None = None
            fill: Callable[[], Coroutine[Any, Any, None]]
            tree = await asyncio.to_thread(has_children, self.pid)
            if tree and self.precopy is not None:
                raise ConfigurationError(f"process {self.pid} has children: pre-copy of a "
                                         "process tree is not implemented")
            if not tree:  # else lazymig.dump.tree
                try:
                    alone, written, pipes = await _freeze_and_write(
                        self.pid, self.images, lazy=True, pipe_size=self.pipe_size,
                        precopy=self.precopy)
                except _ForkedWhileFrozen as forked:
                    if self.precopy is not None:
                        raise ConfigurationError(f"{forked}: pre-copy of a process tree is "
                                                 "not implemented") from None
                    log.info("%s: dumping it with its tree", forked)
                else:
                    fp, late_fill = alone, LateFill(pipes)
                    fill = functools.partial(self._fill, late_fill, alone)
            if pipes is None:
                lazy_tree = await start_lazy_tree(self.pid, self.images,
                                                  pipe_size=self.pipe_size)
                fp, written, store = lazy_tree.tree, lazy_tree.written, lazy_tree.store
                fill = lazy_tree.fill
            try:
                if pipes is not None:
                    store = PipePageStore(self.pid, pipes, late_fill)
                assert store is not None
                # Given a listening socket, the page server is made by serve(), after
                # ready: its clients wait in the backlog meanwhile.
                server = None if self._listener is not None else self._make_server(store)
            except BaseException:
                if store is not None:
                    store.close()
                if pipes is not None:
                    pipes.close()
                written.remove()
                await fp.resume()
                raise
        except BaseException as exc:
            self._state = _State.FAILED
            self._start_error = exc
            if self._listener is not None:  # clients queued meanwhile are refused
                self._listener.close()
                self._listener = None
            self._settle_ready()
            raise
        self._fp, self._written, self._store, self._server = fp, written, store, server
        self._frozen_at = started
        self._frozen_seconds = time.monotonic() - started
        if server is not None:
            self.port = server.port
        self._state = _State.LISTENING
        self._filling = asyncio.create_task(fill())
        self._settle_ready()
        log.info("pid %d frozen and dumped into %s in %.3f s: %d pages in pages-%d.img, %d lazy "
                 "pages served on %s:%d", self.pid, self.images.path, self._frozen_seconds,
                 written.nonlazy_pages, 1, written.lazy_pages, self.address, self.port)

    async def serve(self) -> DumpResult:
        """Serve lazy pages until the transfer is complete, then end the source.

        Complete means every lazy page was sent at least once and a client ended
        its session with CLOSE. Then the source is killed, or resumed with
        ``leave_running``. If serving fails or is cancelled the source is left
        stopped (see the module docstring) and the error propagates.
        """
        if self._state is not _State.LISTENING:
            raise ClosedResourceError(f"dump of pid {self.pid} is {self._state.value}, not "
                                      "listening: start() it first, and serve() once")
        assert self._fp is not None and self._written is not None and self._store is not None
        self._state = _State.SERVING
        try:
            if self._server is None:
                self._server = self._make_server(self._store)
        except BaseException as exc:
            await self._abort(f"the page server could not start: {exc!r}")
            raise
        server = self._server
        progress = None
        if self.progress_interval:
            progress = asyncio.create_task(self._log_progress(self.progress_interval))
        try:
            await self._serve_while_filling(server)
        except BaseException as exc:
            await self._abort(f"serving failed: {exc!r}" if not isinstance(
                exc, asyncio.CancelledError) else "cancelled")
            raise
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
        transfer = time.monotonic() - server.stats.started
        self._close_server()
        self._state = _State.DONE
        await self._fp.release(kill=not self.leave_running)
        fate = SourceFate.RUNNING if self.leave_running else SourceFate.KILLED
        result = DumpResult(
            pid=self.pid, images_dir=self.images.path, nonlazy_pages=self._written.nonlazy_pages,
            lazy_pages=self._written.lazy_pages, pages_sent=server.stats.pages_sent,
            frozen_seconds=self._frozen_seconds, transfer_seconds=transfer, source=fate)
        log.info("pid %d migrated: %d lazy pages served (%d sent) in %.3f s, %.1f MB/s; "
                 "frozen %.3f s before serving; source %s", self.pid, result.lazy_pages,
                 result.pages_sent, transfer, result.bytes_per_second / 1e6,
                 result.frozen_seconds, fate.value)
        return result

    async def run(self) -> DumpResult:
        """:meth:`start` and :meth:`serve` (await :attr:`ready` meanwhile for the port)."""
        async with self:
            return await self.serve()

    async def aclose(self) -> None:
        """Abort an unfinished dump: the source is left stopped (see the module docstring).

        A no-op once the transfer is complete (or if it never started)."""
        if self._listener is not None:  # never started: its clients are refused
            self._listener.close()
            self._listener = None
        if self._state in (_State.LISTENING, _State.SERVING):
            await self._abort("the dump was closed before the transfer was complete")

    async def __aenter__(self) -> LazyDump:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals

    def _make_server(self, store: LazyPageStore) -> PageServer:
        """The page server over ``store``, listening (on the socket given, if any)."""
        from lazymig.dump.server import PageServer  # noqa: PLC0415 (start-up, see listener)

        server = PageServer(store, address=self.address, port=self.port, wire=self.wire,
                            tls=self.tls, listener=self._listener)
        self._listener = None  # the server's now
        server.listen()
        return server

    async def _fill(self, late_fill: LateFill, fp: FrozenProcess) -> None:
        started = time.monotonic()
        await late_fill.run(fp)
        log.info("pid %d: lazy pages put into the page pipes in %.3f s while serving (%d "
                 "pipes filled ahead for waiting GETs)", self.pid, time.monotonic() - started,
                 late_fill.hurried)

    async def _serve_while_filling(self, server: PageServer) -> None:
        """``server.serve()``, cut short if filling the page pipes fails."""
        assert self._filling is not None
        filling = self._filling
        serving = asyncio.ensure_future(server.serve())
        try:
            await asyncio.wait({serving, filling}, return_when=asyncio.FIRST_EXCEPTION)
            if filling.done() and not filling.cancelled() and (exc := filling.exception()):
                raise exc
            await serving
            await filling  # done: every page was served, so every pipe was filled
        finally:
            if not serving.done():
                serving.cancel()
                await asyncio.wait({serving})

    async def _stop_filling(self) -> None:
        """End the late fill (after its batch in progress) before the pipes are closed."""
        filling = self._filling
        if filling is None:
            return
        if not filling.done():
            filling.cancel()
            await asyncio.wait({filling})
        if not filling.cancelled() and filling.exception() is not None:
            log.error("pid %d: filling the page pipes failed: %s", self.pid, filling.exception())

    async def _abort(self, why: str) -> None:
        if self._state in (_State.DONE, _State.ABORTED):
            return
        self._state = _State.ABORTED
        if self._server is not None:
            self._server.close()
        await self._stop_filling()
        self._close_server()
        assert self._fp is not None
        fatal = _pending_fatal(self.pid)  # while frozen: detached, it takes them
        if self.abort_resumes and not fatal:
            await self._fp.release(kill=False)
            log.warning("transfer of pid %d aborted (%s): pid %d resumed, since no restored "
                        "copy ran", self.pid, why, self.pid)
            return
        try:
            await self._fp.leave_stopped()
        finally:
            if process_alive(self.pid):
                log.warning("transfer of pid %d aborted (%s): pid %d left stopped with its "
                            "memory intact: `kill -CONT %d` to resume it, or dump again%s",
                            self.pid, why, self.pid, self.pid,
                            _pending_hint(_pending_fatal(self.pid) or fatal))
            elif fatal:
                log.error("transfer of pid %d aborted (%s), and the process is gone: it "
                          "died of the %s it got while frozen (%s)", self.pid, why,
                          " and ".join(fatal), _SAME_GROUP)
            else:
                log.error("transfer of pid %d aborted (%s), and the process is gone",
                          self.pid, why)

    def _close_server(self) -> None:
        if self._listener is not None:  # the server was never made: its clients refused
            self._listener.close()
            self._listener = None
        if self._server is not None:
            self._server.close()
        if self._store is not None:
            self._store.close()

    async def _log_progress(self, interval: float) -> None:
        assert self._server is not None
        stats = self._server.stats
        while True:
            await asyncio.sleep(interval)
            log.info("pid %d: %d of %d lazy pages served (%d sent), %.1f MB/s, %d requests on "
                     "%d connections", self.pid, stats.lazy_pages - stats.pages_unserved,
                     stats.lazy_pages, stats.pages_sent, stats.throughput() / 1e6,
                     stats.requests, stats.connections)

    def __repr__(self) -> str:
        return f"<LazyDump pid={self.pid} {self._state.value} port={self.port}>"


async def dump(pid: int, images_dir: StrPath, *, leave_running: bool = False,
               pipe_size: int | None = None, fsync: bool = False,
               tree: bool | None = None, precopy: PreCopy | None = None) -> DumpResult:
    """A plain dump (``criu dump``): every page of ``pid`` into ``pages-1.img``.

    Then the process is killed, or resumed with ``leave_running``. On failure
    it is resumed unchanged and the images written are removed. A process with
    children is dumped with all its descendants (``criu dump -t``, see
    :mod:`lazymig.dump.tree`); ``tree`` forces the one way or the other.
    After ``precopy``'s rounds the images are a child of its last round (see
    :class:`LazyDump`).
    """
    images = ImagesDir(images_dir, fsync=fsync)
    _check_images_dir(images)
    check_not_waited_for(pid)
    chosen = tree is None
    if tree is None:
        tree = await asyncio.to_thread(has_children, pid)
    if tree and precopy is not None:
        raise ConfigurationError(f"process {pid} has children: pre-copy of a process tree "
                                 "is not implemented")
    if not tree:
        started = time.monotonic()
        try:
            fp, written, pipes = await _freeze_and_write(pid, images, lazy=False,
                                                         pipe_size=pipe_size, precopy=precopy)
        except _ForkedWhileFrozen as forked:
            if not chosen:  # tree=False: its children are not to be dumped
                raise UnsupportedTargetError(pid, [f"{forked} (tree=False)"],
                                             REFUSAL_HINT) from None
            if precopy is not None:
                raise ConfigurationError(f"{forked}: pre-copy of a process tree is not "
                                         "implemented") from None
            log.info("%s: dumping it with its tree", forked)
            tree = True
    if tree:
        written, frozen_for = await dump_tree(pid, images, leave_running=leave_running,
                                              pipe_size=pipe_size)
        return DumpResult(pid=pid, images_dir=images.path, nonlazy_pages=written.nonlazy_pages,
                          lazy_pages=0, pages_sent=0, frozen_seconds=frozen_for,
                          transfer_seconds=0.0, source=SourceFate.RUNNING if leave_running
                          else SourceFate.KILLED)
    pipes.close()
    frozen = time.monotonic() - started
    await fp.release(kill=not leave_running)
    fate = SourceFate.RUNNING if leave_running else SourceFate.KILLED
    log.info("pid %d dumped into %s in %.3f s: %d pages; source %s", pid, images.path, frozen,
             written.nonlazy_pages, fate.value)
    return DumpResult(pid=pid, images_dir=images.path, nonlazy_pages=written.nonlazy_pages,
                      lazy_pages=0, pages_sent=0, frozen_seconds=frozen, transfer_seconds=0.0,
                      source=fate)


# -- shared steps -----------------------------------------------------------------------


async def _freeze_and_write(pid: int, images: ImagesDir, *, lazy: bool,
                            pipe_size: int | None, precopy: PreCopy | None = None,
                            ) -> tuple[FrozenProcess, DumpImages, PagePipes]:
    """Freeze, read, scan, collect the pages and write the images.

    Returns the frozen process, the images written and the page pipes (the
    lazy pages, for ``lazy``: planned, not filled yet). On failure or
    cancellation: pipes closed, images removed, process resumed. After
    ``precopy``'s rounds, the pages its chain holds current are PE_PARENT
    entries, and ``images/parent`` links to its last round.
    """
    layout = await asyncio.to_thread(_inspect, pid)
    fp = await FrozenProcess.freeze(pid, layout=layout)
    pipes: PagePipes | None = None
    try:
        await asyncio.to_thread(_check_no_children, pid)
        current = None if precopy is None else await precopy.finish()
        files = await asyncio.to_thread(collect_files, pid)
        scan = await fp.scan()
        in_parent: list[PageRun] = []
        if precopy is not None and current is not None:
            from lazymig.dump.precopy import split_scan  # noqa: PLC0415 (start-up: pre-copy only)

            scan, in_parent = split_scan(scan, current, lazy=lazy and precopy.options.lazy)
        collect = scan if lazy else MemoryScan(
            scan.pid, scan.vmas, tuple(PageRun(r.vaddr, r.nr_pages, False) for r in scan.runs))
        pipes = await fp.collect_pages(collect, pipe_size=pipe_size, defer_lazy=lazy)
        state, frozen_pipes, final = fp.state, pipes, scan
        written = await _run_blocking(
            lambda: write_images(images, state, final, frozen_pipes, lazy_pages=lazy,
                                 open_files=files, in_parent=in_parent),
            cleanup=DumpImages.remove, what=f"writing images into {images.path}")
        if precopy is not None and precopy.last_dir is not None:
            from lazymig.dump.precopy import link_parent  # noqa: PLC0415

            link_parent(images.path, precopy.last_dir)
            written.paths.append(images.path / PARENT_LINK)
    except BaseException:
        if pipes is not None:
            pipes.close()
        await fp.resume()
        raise
    return fp, written, pipes


#: What an UnsupportedTargetError from a dump says to do.
REFUSAL_HINT: Final = (
    "The process was not touched. `criu dump --lazy-pages -t PID` with `criu restore "
    "--lazy-pages` and lazymig's daemon (`lazymig lazy-pages --page-server`) migrates what "
    "CRIU supports (docs/criu-interop.md)")


#: What to do about fds 0-2 that would stay behind (:func:`check_target`).
STDIO_HINT: Final = ("Pass stdio=(in, out, err), fds of this process for the restored one "
                     "(--inherit-fd or --shell-job to `lazymig restore`)")


def check_target(pid: int, *, stdio_given: bool = True) -> TargetLayout:
    """Refuse an unsupported target (its threads, mappings, open files, those of its
    descendants;
    without ``stdio_given``, fds 0-2 that would stay on the source host too) from
    /proc alone, before it is touched: one UnsupportedTargetError naming every
    cause and what to do. Returns the VMAs read, for
    :meth:`~lazymig.dump.freeze.FrozenProcess.freeze`."""
    reasons: list[str] = []
    tree = LiveTree(pid)  # pipes shared within it are dumped with it
    layout: TargetLayout | None = None
    try:
        layout = inspect_target(pid)
    except UnsupportedTargetError as exc:
        reasons += exc.reasons
    checks: tuple[Callable[[int], object], ...] = (
        lambda p: inspect_files(p, tree), lambda p: _inspect_descendants(p, tree))
    for check in checks:
        try:
            check(pid)
        except UnsupportedTargetError as exc:
            reasons += exc.reasons
    stdio: list[str] = []
    if not stdio_given:
        stdio = [f"fd {fd} is {name}, which would stay on this host"
                 for fd, name in external_stdio(pid, tree).items()]
    if reasons or stdio:
        hint = REFUSAL_HINT if reasons else "The process was not touched"
        raise UnsupportedTargetError(pid, reasons + stdio,
                                     f"{hint}. {STDIO_HINT}" if stdio else hint)
    assert layout is not None  # else inspect_target gave reasons, raised just above
    return layout


def _inspect(pid: int) -> TargetLayout:
    layout = check_target(pid)
    _check_rlimits_readable(pid)
    return layout


def _inspect_descendants(pid: int, tree: Collection[int]) -> None:
    """The checks of :func:`check_target` (but stdio: a child's is its parent's) for
    every live descendant of ``pid``: a process with children is dumped with its
    tree (:mod:`lazymig.dump.tree`, its pids ``tree``)."""
    reasons: list[str] = []
    todo = list(children(pid))
    while todo:
        kid = todo.pop(0)
        if not process_alive(kid):
            continue  # a zombie: only its exit status is dumped
        for check in (inspect_target, lambda p: inspect_files(p, tree)):
            try:
                check(kid)
            except UnsupportedTargetError as exc:
                reasons += [f"its child process {kid}: {r}" for r in exc.reasons]
            except TargetGoneError:
                pass  # it exited meanwhile: a zombie at the freeze
        todo += children(kid)
    if reasons:
        raise UnsupportedTargetError(pid, reasons)


class _ForkedWhileFrozen(Exception):
    """A process frozen alone had forked a child meanwhile (it had none when its way
    of dumping was chosen): it was resumed untouched, to be dumped with its tree."""


def _check_no_children(pid: int) -> None:
    if kids := sorted(children(pid)):
        raise _ForkedWhileFrozen(f"pid {pid} forked {', '.join(map(str, kids))} while it "
                                 "was being frozen alone")


def _check_rlimits_readable(pid: int) -> None:
    """The dump records the target's rlimits (prlimit): refuse, before the freeze, a
    target whose limits this process may not read (another user's, without
    ``CAP_SYS_RESOURCE``)."""
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE)
    except PermissionError as exc:
        raise LazyMigOSError(
            errno.EPERM, f"dumping pid {pid}: reading its resource limits (prlimit) was "
            "refused: it runs as another user, and reading another user's limits needs "
            "CAP_SYS_RESOURCE (run lazymig as root with its capabilities)", pid=pid) from exc
    except ProcessLookupError as exc:
        raise TargetGoneError(pid, "prlimit") from exc


async def _run_blocking(fn: Callable[[], T], *, cleanup: Callable[[T], None], what: str) -> T:
    """Run ``fn`` in a worker thread. If cancelled, wait for it to end anyway
    (it uses fds the caller will close), ``cleanup`` its result, re-raise.
    OSErrors become :class:`~lazymig.errors.LazyMigOSError` naming ``what``."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fut)
        if not fut.cancelled() and fut.exception() is None:
            cleanup(fut.result())
        raise
    except LazyMigError:
        raise
    except OSError as exc:
        raise LazyMigOSError(exc.errno or errno.EIO, f"{what}: {exc}") from exc


def _pending_fatal(pid: int) -> list[str]:
    """The signals pending for ``pid`` that would kill it (neither caught nor ignored)."""
    try:
        status = read_status(pid)
        pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
        handled = int(status["SigCgt"], 16) | int(status["SigIgn"], 16)
    except (OSError, KeyError, ValueError):
        return []
    return [signal.Signals(n).name for n in _FATAL_BY_DEFAULT
            if pending >> (n - 1) & 1 and not handled >> (n - 1) & 1]


def _pending_hint(fatal: list[str]) -> str:
    """What the stop hint adds for signals pending that would kill the source."""
    if not fatal:
        return ""
    return (f". But {' and '.join(fatal)} is pending for it, and would kill it as soon as it "
            f"runs again (a debugger attached to it can discard the signal): {_SAME_GROUP}")


_SAME_GROUP = ("a terminal's Ctrl-C or hang-up reaches its whole foreground process group, "
               "the source too when it shares the dumper's: start a workload to migrate in a "
               "session of its own, `setsid`")

_FATAL_BY_DEFAULT = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM)


def _check_images_dir(images: ImagesDir) -> None:
    if images.path.exists() and not images.path.is_dir():
        raise ConfigurationError(f"images directory {images.path} is not a directory: give "
                                 "an existing directory to write the images into")
    if not images.path.is_dir():
        raise ConfigurationError(f"images directory {images.path} does not exist")
    if not os.access(images.path, os.W_OK | os.X_OK):
        raise ConfigurationError(f"images directory {images.path} is not writable")


def _check_port(address: str, port: int) -> None:
    """Fail before freezing anything if the page server could not listen."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen on {address}:{port}: {exc.strerror}") from exc
