"""The source side: freeze and dump a process, then serve its lazy pages.

:func:`serve` is ``lazymig dump --lazy-pages`` as a handle (it is not called
``lazymig.dump`` because that name is the dump-side subpackage: a function
of that name would be shadowed as soon as the subpackage is imported)::

    async with lazymig.serve(pid, "/srv/dump", address="0.0.0.0", port=9876) as source:
        await copy_to_destination("/srv/dump")          # yours: scp, rsync, a volume...
        async for p in source.progress():
            print(f"{p.pages_served}/{p.pages_total} pages served")
        result = await source.done                      # every lazy page went out

:func:`serve_images` serves a dump on disk instead (``lazymig page-server
--lazy-pages``), e.g. a memory snapshot written by
:func:`~lazymig.orchestrate.snapshot.write_snapshot`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from lazymig.dump.dumper import DumpResult, LazyDump
from lazymig.dump.precopy import PreCopy
from lazymig.dump.server import PageServer, PageServerStats, ServeUntil
from lazymig.dump.store import ImagesPageStore, LazyPageStore
from lazymig.orchestrate._checks import check_images_dir, check_port
from lazymig.orchestrate._handle import Handle, Outcome, entered
from lazymig.orchestrate.progress import ServeProgress, poll
from lazymig.proto.images import ImagesDir
from lazymig.proto.wire import WireVersion

__all__ = ["Address", "ImagesServer", "PageServing", "Source", "serve", "serve_images"]

StrPath = str | os.PathLike[str]
R = TypeVar("R")


class Address(NamedTuple):
    """Where a page server listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class PageServing(Handle[R]):
    """A page server handle: :attr:`ready`, :attr:`address`, :meth:`progress`, ``done``."""

    def __init__(self) -> None:
        super().__init__()
        self.ready: Outcome[Address] = Outcome()
        """Resolves to the :class:`Address` once listening (at the latest when the
        ``async with`` is entered); raises what prevented it."""
        self._address: Address | None = None

    @property
    def address(self) -> Address:
        """The listening address (the real port when 0 was asked)."""
        return entered(self._address, "the page server's address")

    def progress(self, interval: float = 0.25) -> AsyncIterator[ServeProgress]:
        """Snapshots every ``interval`` seconds until the transfer ends, then a last one."""
        return poll(self._sample, self.done.future(), interval)

    def _sample(self) -> ServeProgress:
        stats = self._stats()
        return ServeProgress.of(stats if stats is not None else PageServerStats())

    def _stats(self) -> PageServerStats | None:
        raise NotImplementedError

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        try:
            address = await self._listen(stack)
        except BaseException as exc:
            self.ready.set_exception(exc)
            raise
        self._address = address
        self.ready.set_result(address)
        tasks = await self._task_group()
        tasks.create_task(self._produce(self._serve()), name=f"lazymig page server {address}")

    async def _listen(self, stack: contextlib.AsyncExitStack) -> Address:
        raise NotImplementedError

    async def _serve(self) -> R:
        raise NotImplementedError


class Source(PageServing[DumpResult]):
    """A frozen, dumped process whose lazy pages are being served; see :func:`serve`."""

    def __init__(self, dump: LazyDump) -> None:
        super().__init__()
        self._dump = dump

    @property
    def pid(self) -> int:
        return self._dump.pid

    @property
    def images_dir(self) -> Path:
        return self._dump.images.path

    @property
    def frozen_seconds(self) -> float:
        """From the freeze until the images were written and the server listened."""
        return self._dump.frozen_seconds

    def resume_on_abort(self) -> None:
        """Should the transfer be aborted, resume the source instead of leaving it
        stopped. Call it only when no restored copy can have run (its restore failed
        before the process ran, as :attr:`Destination.never_ran
        <lazymig.orchestrate.destination.Destination.never_ran>` says): then nothing
        can have diverged, and the source may go on. :func:`~lazymig.migrate` does."""
        self._dump.abort_resumes = True

    def _stats(self) -> PageServerStats | None:
        return self._dump.stats

    async def _listen(self, stack: contextlib.AsyncExitStack) -> Address:
        await self._dump.start()
        stack.push_async_callback(self._dump.aclose)  # an unfinished transfer: abort
        return Address(self._dump.address, self._dump.port)

    async def _serve(self) -> DumpResult:
        return await self._dump.serve()

    def __repr__(self) -> str:
        return f"<lazymig.Source {self._dump!r}>"


def serve(pid: int, images_dir: StrPath, *, address: str = "127.0.0.1", port: int = 0,
          wire: WireVersion = WireVersion.V2, leave_running: bool = False,
          pipe_size: int | None = None, fsync: bool = False,
          precopy: PreCopy | None = None) -> Source:
    """Freeze process ``pid``, dump it into ``images_dir`` and serve its lazy pages.

    Entering the handle freezes the process, writes its images (the non-lazy
    pages among them) and starts listening: the images may be copied to the
    destination and a lazy-pages daemon pointed at :attr:`~PageServing.address`.

    * Leaving the block normally waits until the transfer is complete (every
      lazy page sent, a client closed the session); then the source is killed,
      or resumed with ``leave_running``. ``await source.done`` gives the
      :class:`~lazymig.dump.DumpResult`.
    * Failing to start (the process cannot be dumped, the port is taken)
      resumes the process untouched and removes the images written.
    * An exception or cancellation after that aborts the transfer: part of the
      memory may run elsewhere already, so the source is left in a job-control
      stop with its memory intact (``kill -CONT`` resumes it).

    Args:
        pid: a process (all its threads).
        images_dir: an existing, writable directory.
        address: where to listen; the default only serves this host. Page
            traffic is not encrypted: give a private address.
        port: the TCP port (0: any free one, see ``address``).
        wire: the header layout (``WireVersion.V1`` for CRIU up to 4.1).
        leave_running: resume the source after a complete transfer.
        pipe_size: page pipe size in bytes (default: fs.pipe-max-size).
        fsync: fsync the images.
        precopy: pre-copy rounds done while it ran (``await PreCopy.start(pid, dir)``,
            then ``await precopy.run()``): the dump is a child of the last round,
            only what was written since it was copied has data or stays lazy.

    Example::

        async with lazymig.serve(pid, "/tmp/1", address="10.0.0.1", port=9876) as src:
            print("page server at", src.address)
        # here every lazy page was served and the source is gone
    """
    check_images_dir(images_dir, "lazymig.serve")
    check_port(port, "lazymig.serve")
    return Source(LazyDump(pid, images_dir, address=address, port=port, wire=wire,
                           leave_running=leave_running, pipe_size=pipe_size, fsync=fsync,
                           progress_interval=None, precopy=precopy))


class ImagesServer(PageServing[ServeProgress]):
    """A page server over a dump on disk; see :func:`serve_images`."""

    def __init__(self, images_dir: StrPath,
                 make_server: Callable[[LazyPageStore], PageServer]) -> None:
        super().__init__()
        self.images_dir = Path(images_dir)
        self._make_server = make_server
        self._server: PageServer | None = None

    def _stats(self) -> PageServerStats | None:
        return None if self._server is None else self._server.stats

    async def _listen(self, stack: contextlib.AsyncExitStack) -> Address:
        store = ImagesPageStore(ImagesDir(self.images_dir))
        stack.callback(store.close)
        server = self._make_server(store)
        server.listen()
        stack.callback(server.close)
        self._server = server
        return Address(server.address, server.port)

    async def _serve(self) -> ServeProgress:
        assert self._server is not None
        await self._server.serve()
        return ServeProgress.of(self._server.stats)

    def __repr__(self) -> str:
        return f"<lazymig.ImagesServer {self.images_dir}>"


def serve_images(images_dir: StrPath, *, address: str = "127.0.0.1", port: int = 0,
                 wire: WireVersion = WireVersion.V2, keep_serving: bool = False) -> ImagesServer:
    """Serve the lazy pages of a dump on disk until its client's session ends.

    The images may come from ``criu dump``, ``lazymig dump`` or
    :func:`~lazymig.orchestrate.snapshot.write_snapshot`. As CRIU's ``page-server
    --lazy-pages``, the server ends when a client that asked for pages closes its
    session (or its connection), whether or not it took every page: a restored
    process that exited needs no more, and a dump on disk has no source to keep.
    With ``keep_serving`` it serves one restore after another until cancelled.
    ``done`` resolves to the last :class:`ServeProgress`; leaving the block normally
    waits for it, an exception or cancellation stops serving (the images stay as
    they are).

    Example::

        async with lazymig.serve_images("/srv/snapshot", port=0) as server:
            async with lazymig.lazy_pages("/srv/snapshot", page_server=server.address):
                ...
    """
    check_images_dir(images_dir, "lazymig.serve_images")
    check_port(port, "lazymig.serve_images")
    until = ServeUntil.STOPPED if keep_serving else ServeUntil.SESSION
    return ImagesServer(images_dir, functools.partial(PageServer, address=address, port=port,
                                                      wire=wire, until=until))
