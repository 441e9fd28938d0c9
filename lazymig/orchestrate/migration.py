"""A whole lazy migration in one handle: :func:`migrate`.

On one machine (loopback) it is one call::

    result = await lazymig.migrate(pid)
    print(result.restored.pid, result.downtime)

or, to watch it::

    async with lazymig.migrate(pid) as migration:
        async for p in migration.progress():
            print(f"{p.fraction:.0%} at {p.bytes_per_second / 1e6:.0f} MB/s")
    result = await migration.done

Across two hosts, the two halves run one on each: :func:`~lazymig.orchestrate.source.serve`
on the source and :func:`~lazymig.orchestrate.destination.receive` on the
destination, given the source's address, with the images dir copied between
them by whatever the caller uses (``examples/two_hosts.py``). :func:`migrate`
is those two halves on one machine, with ``copy_images`` as the copy step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from lazymig.dump.dumper import DumpResult, check_target
from lazymig.dump.precopy import OnRound, PreCopy, PreCopyOptions, RoundReport
from lazymig.orchestrate._checks import check_images_dir, check_port
from lazymig.orchestrate._handle import Handle, entered
from lazymig.orchestrate.destination import Destination, RestoredProcess, Stdio, receive
from lazymig.orchestrate.progress import TransferProgress
from lazymig.orchestrate.source import Address, Source, serve
from lazymig.proto.wire import WireVersion
from lazymig.restore.restorer import Restorer, RestoreResult
from lazymig.uffd.daemon import DaemonReport

__all__ = ["CopyImages", "Migration", "MigrationResult", "migrate"]

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
AfterRound = Callable[[RoundReport], None]
CopyImages = Callable[[Path], Awaitable[StrPath]]
"""Copies the source's images dir where the destination reads it; returns that path."""


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What a complete migration did."""

    dump: DumpResult
    """The source side: pages written and served, what became of the source."""
    restored: RestoreResult
    """The destination side: its pid, pages restored from the images."""
    transfer: DaemonReport
    """The lazy-pages daemon's report."""
    progress: TransferProgress
    """The transfer's last snapshot: on-demand vs background pages, rate, fault latency."""
    downtime: float
    """Seconds from the freeze until the restored process ran."""
    precopy: tuple[RoundReport, ...] = ()
    """The pre-copy rounds done before the freeze (none without ``precopy``)."""


class Migration(Handle[MigrationResult]):
    """A migration in progress; see :func:`migrate`."""

    def __init__(self, images_dir: StrPath | None,
                 make_source: Callable[[Path, PreCopy | None], Source],
                 copy_images: CopyImages | None,
                 make_destination: Callable[[Path, Address, Restorer | None], Destination], *,
                 keep_stopped: bool = False,
                 start_precopy: Callable[[Path, AfterRound], Awaitable[PreCopy]] | None = None,
                 make_prepared: Callable[[Path], Restorer] | None = None) -> None:
        super().__init__()
        self._start_precopy = start_precopy
        self._make_prepared = make_prepared
        self._precopy: PreCopy | None = None
        self._keep_stopped = keep_stopped
        self._images_dir = None if images_dir is None else Path(images_dir)
        self._make_source = make_source
        self._copy_images = copy_images
        self._make_destination = make_destination
        self._source: Source | None = None
        self._destination: Destination | None = None
        self._downtime: float | None = None

    @property
    def downtime(self) -> float:
        """Seconds from the freeze until the restored process ran (known once entered)."""
        return entered(self._downtime, "the migration's downtime")

    @property
    def source(self) -> Source:
        return entered(self._source, "the source")

    @property
    def destination(self) -> Destination:
        return entered(self._destination, "the destination")

    @property
    def process(self) -> RestoredProcess:
        """The restored process."""
        return self.destination.process

    def progress(self, interval: float = 0.25) -> AsyncIterator[TransferProgress]:
        """The transfer's progress, as the destination's daemon sees it."""
        return self.destination.progress(interval)

    @property
    def precopy(self) -> tuple[RoundReport, ...]:
        """The pre-copy rounds done so far (each logged at INFO as it ends)."""
        return () if self._precopy is None else tuple(self._precopy.rounds)

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        images = self._images_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="lazymig-")))
        prepared: Restorer | None = None
        if self._start_precopy is not None:
            applying: list[asyncio.Future[int]] = []
            if self._make_prepared is not None:
                prepared = self._make_prepared(images)
                await prepared.prepare()
                stack.callback(prepared.unprepare)
                stack.callback(_drop, applying)

            def after_round(report: RoundReport) -> None:
                if prepared is not None:  # each round applied after the one before
                    applying.append(asyncio.ensure_future(
                        _apply(prepared, report.images_dir, applying[-1] if applying else None)))

            self._precopy = await self._start_precopy(images, after_round)
            stack.push_async_callback(self._precopy.aclose)  # the tracking ends with it
            await self._precopy.run()
            if prepared is not None and applying:
                # Before the freeze: the source runs on meanwhile, not the downtime.
                try:
                    waited = time.monotonic()
                    await applying[-1]
                    lag = time.monotonic() - waited
                    if lag > self._precopy.rounds[-1].seconds and \
                            len(self._precopy.rounds) < self._precopy.options.max_rounds:
                        # What it wrote while the destination caught up would be dropped
                        # there after the freeze and fetched lazily: one more round.
                        await self._precopy.round()
                        await applying[-1]
                except Exception as exc:  # any: the restore does without
                    log.warning("pid %d: the pre-copied pages could not be prepared on the "
                                "destination (%s): they are written during the restore",
                                self._precopy.pid, exc)
                    prepared.unprepare()
                    prepared = None
        started = time.monotonic()
        source = await stack.enter_async_context(self._make_source(images, self._precopy))
        self._source = source
        destination: Destination | None = None
        try:
            copy = images if self._copy_images is None else Path(
                await self._copy_images(images))
            destination = self._make_destination(copy, source.address, prepared)
            await stack.enter_async_context(destination)
        except Exception as exc:
            if destination is None or destination.never_ran:  # nothing can have diverged
                if self._keep_stopped:
                    exc.add_note(f"lazymig: the source, pid {source.pid}, is left stopped "
                                 "(keep_stopped): the restored copy never ran, so `kill -CONT "
                                 f"{source.pid}` resumes it safely")
                else:
                    source.resume_on_abort()
                    exc.add_note(f"lazymig: the source, pid {source.pid}, was resumed: the "
                                 "restored copy never ran (keep_stopped=True keeps it "
                                 "stopped)")
            raise
        self._destination = destination
        self._downtime = time.monotonic() - started
        tasks = await self._task_group()
        tasks.create_task(self._produce(self._collect(source, destination, self._downtime)))

    async def _collect(self, source: Source, destination: Destination,
                       downtime: float) -> MigrationResult:
        dumped = await source.done
        report = await destination.done
        return MigrationResult(dump=dumped, restored=destination.process.result,
                               transfer=report, progress=TransferProgress.of(report),
                               downtime=downtime, precopy=self.precopy)

    def __repr__(self) -> str:
        return f"<lazymig.Migration {self._source!r} -> {self._destination!r}>"


def _drop(applying: list[asyncio.Future[int]]) -> None:
    """Cancel the rounds still being applied; read the errors of those that failed
    (the migration failed first, or goes on without them)."""
    for a in applying:
        if a.done() and not a.cancelled():
            a.exception()
        else:
            a.cancel()


async def _apply(restorer: Restorer, round_dir: Path, after: asyncio.Future[int] | None) -> int:
    if after is not None:
        await after
    return await restorer.add_round(round_dir)


def migrate(pid: int, *, images_dir: StrPath | None = None,
            copy_images: CopyImages | None = None, address: str = "127.0.0.1",
            port: int = 0, wire: WireVersion = WireVersion.V2, channels: int = 1,
            leave_running: bool = False, keep_stopped: bool = False,
            stdio: Stdio | None = None, new_pids: bool = False,
            precopy: PreCopyOptions | bool = False,
            on_round: OnRound | None = None) -> Migration:
    """Migrate process ``pid`` lazily: dump and serve it, restore it, fill its memory.

    ``await lazymig.migrate(pid)`` runs the whole migration and returns a
    :class:`MigrationResult`; ``async with lazymig.migrate(pid) as m`` returns
    once the restored process runs (``m.process``, ``m.downtime``), with
    ``m.progress()`` and ``m.done`` to follow the transfer (leaving the block
    normally waits for it).

    The source is killed once every page was served (resumed instead with
    ``leave_running``). On a failure or a cancellation the restored process
    is killed and the source is kept, stopped, with its memory intact (see
    :func:`~lazymig.orchestrate.source.serve`); the error is raised. Except
    when the destination failed before the restored process ever ran (the
    daemon could not start, or the restore failed before letting the process
    go): nothing can have diverged then, so the source is resumed, and a note
    on the error says so (``keep_stopped=True`` keeps it stopped instead).

    Args:
        pid: a process of this machine (all its threads).
        images_dir: where the images go (default: a temporary dir, removed after).
        copy_images: ``async (source images dir) -> destination images dir``, called
            once the images are written; default: the destination reads them in place.
        address: where the page server listens (and the daemon connects).
        port: its port (0: any free one).
        wire: the page-server header layout.
        channels: 2 puts faults on a connection of their own.
        leave_running: resume the source after a complete transfer.
        keep_stopped: leave the source stopped even when the restored copy never ran.
        stdio: fds of this process that become fds 0, 1, 2 of the restored one
            (default: the dumped ones; a restore is refused where those stayed
            on the source host, a pipe to another process or a terminal).
        new_pids: restore under new pids. By default every process and thread
            gets its dumped pid back: on one machine, where the stopped source
            still holds them, in a new pid namespace of the restored tree's own
            (``result.restored.pid`` is then its pid here, ``pid_namespace`` the
            namespace's init; see :mod:`lazymig.restore.pids`).
        precopy: copy its memory in rounds while it runs before the freeze
            (True, or :class:`~lazymig.dump.precopy.PreCopyOptions` for the
            limits and for eager or lazy after the freeze); the rounds go into
            ``images_dir/precopy/N``, the dump's parents. The downtime is then
            counted from the freeze.
        on_round: called with each round's :class:`~lazymig.dump.precopy.RoundReport`
            (pages copied, pages written meanwhile, rate), awaited if a coroutine.

    Example::

        result = await lazymig.migrate(pid)
        print(f"pid {pid} is now {result.restored.pid}, down {result.downtime:.3f} s")
    """
    if images_dir is not None:
        check_images_dir(images_dir, "lazymig.migrate")
    check_port(port, "lazymig.migrate")

    options = PreCopyOptions() if precopy is True else precopy or None

    async def start_precopy(images: Path, after_round: AfterRound) -> PreCopy:
        if stdio is None:  # refused before any round, as before the freeze
            await asyncio.to_thread(check_target, pid, stdio_given=False)

        async def each_round(report: RoundReport) -> None:
            if on_round is not None:
                res = on_round(report)
                if inspect.isawaitable(res):
                    await res
            after_round(report)

        return await PreCopy.start(pid, images / "precopy", options=options,
                                   on_round=each_round)

    def make_prepared(images: Path) -> Restorer:
        return Restorer(images, lazy_pages=True, stdio=stdio, new_pids=new_pids)

    def make_source(images: Path, rounds: PreCopy | None) -> Source:
        if stdio is None:  # fds 0-2 staying behind: refused before the freeze, not after
            check_target(pid, stdio_given=False)
        return serve(pid, images, address=address, port=port, wire=wire,
                     leave_running=leave_running, precopy=rounds)

    def make_destination(images: Path, page_server: Address,
                         prepared: Restorer | None) -> Destination:
        return receive(images, page_server=page_server, wire=wire, channels=channels,
                       stdio=stdio, new_pids=new_pids, prepared=prepared)

    return Migration(images_dir, make_source, copy_images, make_destination,
                     keep_stopped=keep_stopped,
                     start_precopy=start_precopy if options is not None else None,
                     make_prepared=make_prepared if copy_images is None else None)
