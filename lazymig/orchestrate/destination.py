"""The destination side: a lazy-pages daemon, restored processes, and both at once.

* :func:`lazy_pages` runs the daemon (``lazymig lazy-pages``) as a handle;
  restorers and :func:`~lazymig.uffd.attach.attach` hand it their
  userfaultfds over :attr:`LazyPages.socket_path`.
* :meth:`LazyPages.restore` (or :func:`restore_process` for any daemon
  socket) rebuilds a dumped process whose lazy pages that daemon fills.
* :func:`receive` is the two together: the destination half of a migration::

    async with lazymig.receive("/tmp/1", page_server=("10.0.0.1", 9876)) as dst:
        print("running as pid", dst.process.pid)
        async for p in dst.progress():
            print(f"{p.fraction:.0%}, {p.faults} faults")
        report = await dst.done
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from lazymig._aio import wait_fd
from lazymig.errors import BrokenResourceError, ConfigurationError
from lazymig.orchestrate._checks import PageServerAddress, check_images_dir, page_server_address
from lazymig.orchestrate._handle import Handle, entered
from lazymig.orchestrate.progress import TransferProgress, poll
from lazymig.proto.images import ImagesDir
from lazymig.proto.wire import WireVersion
from lazymig.restore.restorer import Restorer, RestoreResult
from lazymig.uffd.daemon import SOCKET_NAME, DaemonReport, LazyPagesDaemon
from lazymig.uffd.source import LocalPageSource, PageSource, RemotePageSource

__all__ = ["Destination", "LazyPages", "RestoredProcess", "TransferError", "lazy_pages",
           "receive", "restore_process"]

StrPath = str | os.PathLike[str]
Stdio = tuple[int, int, int]


class TransferError(BrokenResourceError):
    """A lazy transfer ended without every page arriving.

    ``report`` says what became of each process: the daemon killed those it
    could (they must not run on pages that never came) and held the others.
    """

    def __init__(self, report: DaemonReport) -> None:
        states = ", ".join(f"pid {p.pid} {p.state}" + (f" ({p.reason})" if p.reason else "")
                           for p in report.processes) or "no process was handed over"
        why = report.source_error or report.restore_error
        super().__init__(f"lazy transfer failed{f': {why}' if why else ''}; {states}")
        self.report = report


class RestoredProcess:
    """A process rebuilt from a dump, running under its dumped pid (in a pid namespace
    of its own where that is taken here; see :mod:`lazymig.restore.pids`).

    An async context manager: leaving it by an exception or a cancellation kills
    and reaps the process (it may be running on memory that is still arriving);
    leaving it normally leaves it running, it is the migrated workload.
    """

    def __init__(self, restorer: Restorer) -> None:
        self._restorer = restorer
        self._result: RestoreResult | None = None
        self.failed_before_running = False
        """The restore failed (an error, not a cancellation) before the process ran:
        the half-built process was killed without running an instruction of its own."""

    @property
    def result(self) -> RestoreResult:
        """What the restore did (pids, pages, seconds)."""
        return entered(self._result, "the restored process")

    @property
    def pid(self) -> int:
        return self.result.pid

    async def __aenter__(self) -> RestoredProcess:
        try:
            self._result = await self._restorer.run()
        except Exception:  # the restorer's errors all come before it lets the process go
            self.failed_before_running = True
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and self._result is not None:
            await asyncio.shield(self.kill())

    async def wait(self) -> int:
        """Wait until the process ends; its status as ``Popen.returncode`` (negative:
        killed by that signal)."""
        entered(self._result, "the restored process")
        process = self._restorer.process
        assert process is not None, "made by the restore"
        while (status := process.poll()) is None:
            # Still our unreaped child, so its pid cannot have been reused.
            pidfd = os.pidfd_open(process.pid)
            try:
                await wait_fd(pidfd)  # readable once it has exited
            finally:
                os.close(pidfd)
        return status

    async def kill(self) -> int:
        """SIGKILL the process (unless it has ended), and every process of its pid
        namespace if it has one of its own; wait for it; its status."""
        for process in (self._restorer.process, self._restorer.pid_namespace):
            if process is not None and process.poll() is None:  # not reaped: still its pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        return await self.wait()

    def __repr__(self) -> str:
        return f"<lazymig.RestoredProcess pid={self._result.pid if self._result else None}>"


def restore_process(images_dir: StrPath, *, lazy_pages: bool = True,
                    socket_path: StrPath | None = None,
                    stdio: Stdio | None = None, new_pids: bool = False) -> RestoredProcess:
    """Restore the process dumped in ``images_dir`` (``lazymig restore``).

    Args:
        images_dir: the dump (a copy of the source's images dir).
        lazy_pages: hand its lazy pages to the daemon at ``socket_path``.
        socket_path: the daemon's socket (default ``images_dir/lazy-pages.socket``).
        stdio: fds of this process that become fds 0, 1, 2 of the restored one
            (default: the dumped ones; a restore is refused where those stayed
            on the source host, a pipe to another process or a terminal).
        new_pids: restore under new pids (default: the dumped ones, in a pid
            namespace of the restored tree's own where they are taken here).

    A failed restore kills the half-built process and leaves the images as they
    were. Example::

        async with lazymig.restore_process("/tmp/1", socket_path=daemon.socket_path) as p:
            print("restored as", p.pid)
    """
    check_images_dir(images_dir, "lazymig.restore_process")
    return RestoredProcess(Restorer(images_dir, lazy_pages=lazy_pages, socket_path=socket_path,
                                    stdio=stdio, new_pids=new_pids))


class LazyPages(Handle[DaemonReport]):
    """A running lazy-pages daemon; see :func:`lazy_pages`."""

    def __init__(self, images_dir: StrPath, connect: Callable[[], Awaitable[PageSource]],
                 options: dict[str, Any]) -> None:
        super().__init__()
        self.images_dir = Path(images_dir)
        self._connect = connect
        self._options = options
        self._daemon: LazyPagesDaemon | None = None

    @property
    def socket_path(self) -> Path:
        """The UNIX socket restorers and :func:`~lazymig.uffd.attach.attach` connect to."""
        return Path(self._options.get("socket_path") or self.images_dir / SOCKET_NAME)

    @property
    def report(self) -> DaemonReport:
        """The daemon's live report (final once ``done``)."""
        return entered(self._daemon, "the daemon").report

    def progress(self, interval: float = 0.25) -> AsyncIterator[TransferProgress]:
        """Snapshots every ``interval`` seconds until the daemon ends, then a last one."""
        return poll(self._sample, self.done.future(), interval)

    def _sample(self) -> TransferProgress:
        if self._daemon is not None:
            return TransferProgress.of(self._daemon.report)
        now = time.monotonic()
        return TransferProgress.of(DaemonReport([], started=now, finished=now))

    def restore(self, images_dir: StrPath | None = None, *, stdio: Stdio | None = None,
                new_pids: bool = False) -> RestoredProcess:
        """Restore a process whose lazy pages this daemon fills (its own images by default;
        see :func:`restore_process`)."""
        return restore_process(images_dir if images_dir is not None else self.images_dir,
                               socket_path=self.socket_path, stdio=stdio, new_pids=new_pids)

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        source = await self._connect()
        stack.callback(source.abort)  # after the daemon's own orderly end: a no-op
        daemon = LazyPagesDaemon.from_images(source, self.images_dir, **self._options)
        self._daemon = daemon
        tasks = await self._task_group()
        running = tasks.create_task(self._produce(self._run(daemon)),
                                    name=f"lazymig daemon {self.socket_path}")
        listening = asyncio.ensure_future(daemon.ready.wait())
        try:  # if the daemon fails first, the task group cancels this wait
            await asyncio.wait([listening, running], return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()

    @staticmethod
    async def _run(daemon: LazyPagesDaemon) -> DaemonReport:
        report = await daemon.run()
        if not report.ok:
            raise TransferError(report) from report.source_exception
        return report

    def __repr__(self) -> str:
        return f"<lazymig.LazyPages {self.socket_path}>"


def lazy_pages(images_dir: StrPath, *, page_server: PageServerAddress | None = None,
               wire: WireVersion = WireVersion.V2, channels: int = 1,
               socket_path: StrPath | None = None, background: bool = True,
               keep_running: bool = False, fault_prefetch: int = 16,
               expect_tasks: int | None = None) -> LazyPages:
    """Run a lazy-pages daemon for the dump in ``images_dir`` (``lazymig lazy-pages``).

    Entering the handle connects to the page server and listens on
    :attr:`~LazyPages.socket_path`. Leaving it normally waits until every
    process handed over has all its pages (``done`` gives the
    :class:`~lazymig.uffd.DaemonReport`; a transfer that failed raises
    :class:`TransferError`). An exception or cancellation stops the daemon: it
    kills the processes it was filling (they must not run on missing pages)
    and resets the page-server session, so that the source keeps its memory.

    Args:
        images_dir: the dump (its pagemaps say which pages are lazy).
        page_server: ``(host, port)`` of the page server (e.g. ``source.address``),
            or ``"host:port"``; None takes the lazy pages from the images
            themselves (local mode).
        wire: the header layout (``WireVersion.V1`` for CRIU up to 4.1).
        channels: 2 puts faults on a connection of their own (lazymig's page
            server only).
        socket_path: where restorers connect (default ``images_dir/lazy-pages.socket``).
        background: also pull the pages nobody faulted on.
        keep_running: keep serving new restores after every process is complete
            (``done`` then only resolves when the handle is left).
        fault_prefetch: pages each fault asks for (the aligned block around it).
        expect_tasks: processes to wait for (default: every one in pstree.img).

    Example::

        async with lazymig.lazy_pages("/tmp/1", page_server=("10.0.0.1", 9876)) as d:
            async with d.restore() as process:
                ...
    """
    if channels not in (1, 2):
        raise ConfigurationError(f"channels must be 1 or 2, not {channels}")
    check_images_dir(images_dir, "lazymig.lazy_pages")
    server = None if page_server is None else page_server_address(page_server,
                                                                  "lazymig.lazy_pages")

    async def connect() -> PageSource:
        if server is None:
            return LocalPageSource(ImagesDir(images_dir))
        host, port = server
        return await RemotePageSource.connect(host, port, wire=wire, channels=channels)

    options: dict[str, Any] = {"serve_forever": keep_running, "background": background,
                               "fault_prefetch": fault_prefetch}
    if socket_path is not None:
        options["socket_path"] = socket_path
    if expect_tasks is not None:
        options["expect_tasks"] = expect_tasks
    return LazyPages(images_dir, connect, options)


class Destination(Handle[DaemonReport]):
    """A daemon and the process it fills; see :func:`receive`."""

    def __init__(self, daemon: LazyPages, stdio: Stdio | None, new_pids: bool = False,
                 prepared: Restorer | None = None) -> None:
        super().__init__()
        self.daemon = daemon
        self._prepared = prepared
        self.done = daemon.done
        self._stdio = stdio
        self._new_pids = new_pids
        self._restoring: RestoredProcess | None = None
        self._process: RestoredProcess | None = None
        self._entry_failed = False

    @property
    def process(self) -> RestoredProcess:
        """The restored process (running once the handle is entered)."""
        return entered(self._process, "the restored process")

    @property
    def never_ran(self) -> bool:
        """True if entering failed with an error before the restored process ran (the
        daemon failed before the restore, or the restore before letting it go), so
        the source may be resumed (:meth:`Source.resume_on_abort
        <lazymig.orchestrate.source.Source.resume_on_abort>`). False once it runs,
        and after a cancellation, which may have come after it ran."""
        if not self._entry_failed or self._process is not None:
            return False
        return self._restoring is None or self._restoring.failed_before_running

    def progress(self, interval: float = 0.25) -> AsyncIterator[TransferProgress]:
        """The daemon's progress (see :meth:`LazyPages.progress`)."""
        return self.daemon.progress(interval)

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            await stack.enter_async_context(self.daemon)
            if self._prepared is not None:
                self._prepared.socket_path = self.daemon.socket_path
                self._restoring = RestoredProcess(self._prepared)
            else:
                self._restoring = self.daemon.restore(stdio=self._stdio, new_pids=self._new_pids)
            self._process = await stack.enter_async_context(self._restoring)
        except Exception:  # an error, not a cancellation (which may come after it ran)
            self._entry_failed = True
            raise

    def __repr__(self) -> str:
        return f"<lazymig.Destination {self.daemon!r} {self._process!r}>"


def receive(images_dir: StrPath, *, page_server: PageServerAddress,
            wire: WireVersion = WireVersion.V2, channels: int = 1,
            socket_path: StrPath | None = None, stdio: Stdio | None = None,
            new_pids: bool = False, prepared: Restorer | None = None) -> Destination:
    """The destination half of a migration: a daemon, and the dump restored through it.

    ``images_dir`` is the destination's copy of the source's images dir;
    ``page_server`` is the source's :attr:`~lazymig.orchestrate.source.PageServing.address`
    (or ``"host:port"``).
    Entering returns once the process runs (:attr:`Destination.process`);
    leaving normally waits until all its memory has arrived (``done``), an
    exception or cancellation kills it (see :func:`lazy_pages`). The restored
    process outlives a normal exit: it is the migrated workload. ``stdio`` and
    ``new_pids`` are :func:`restore_process`'s.

    ``prepared``: a pre-copy's prepared destination, a
    :class:`~lazymig.restore.Restorer` of ``images_dir`` made with
    ``lazy_pages=True`` (and the ``stdio`` and ``new_pids`` wanted), on which
    :meth:`~lazymig.restore.Restorer.prepare` was called before the dump and
    :meth:`~lazymig.restore.Restorer.add_round` with each pre-dump round as it
    arrived: the pre-copied pages are in place already, and the restore only
    moves them (:mod:`lazymig.restore.premap`). Its ``stdio`` and ``new_pids``
    are used; :meth:`~lazymig.restore.Restorer.unprepare` it if this handle is
    never entered.

    Example::

        async with lazymig.receive("/tmp/1", page_server=("10.0.0.1", 9876)) as dst:
            print("running again as pid", dst.process.pid)
        print((await dst.done).bytes_copied, "bytes arrived lazily")
    """
    check_images_dir(images_dir, "lazymig.receive")
    page_server = page_server_address(page_server, "lazymig.receive")
    return Destination(lazy_pages(images_dir, page_server=page_server, wire=wire,
                                  channels=channels, socket_path=socket_path), stdio, new_pids,
                       prepared)
