"""Filling the lazy page pipes after the page server listens.

The source stays frozen until the transfer is complete anyway, so its lazy
pages need not be in the page pipes before the restore may start: only the
images (which list the lazy pages, from the scan) must be. Filling 4 GiB of
pipes takes ~0.2 s here; done while the restore runs, that is off the
downtime. :class:`LateFill` fills the planned lazy buffers of a
:class:`~lazymig.dump.pagepipe.PagePipes` a batch at a time on the frozen
process's tracer thread, in plan (address) order, except that a buffer a GET
waits for is filled next: a fault never waits behind gigabytes of filling.

Threads: :meth:`LateFill.next_batch` and :meth:`LateFill.filled` are called on
the tracer thread (by :meth:`~lazymig.dump.freeze.FrozenProcess.fill_pages`);
everything else on the event loop. A buffer's pipe is used by the loop only
after the loop has learnt that it is filled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final

from lazymig.errors import BrokenResourceError

if TYPE_CHECKING:  # the restore side imports the store: no ptrace machinery for it
    from lazymig.dump.freeze import FrozenProcess
    from lazymig.dump.pagepipe import PagePipes, PipeBuffer

__all__ = ["FILL_BATCH_BYTES", "LateFill"]

log = logging.getLogger(__name__)

FILL_BATCH_BYTES: Final = 32 << 20
"""Pages put into pipes per batch: a GET for a buffer not filled yet waits for
at most the batch in progress (~2 ms here) before its own."""


class LateFill:
    """The lazy page pipes of ``pipes`` (planned, not filled), filled in the background.

    Run it with :meth:`run`; a GET waits with :meth:`wait`. If filling fails,
    :meth:`run` raises and every waiting (and later) :meth:`wait` raises
    :class:`~lazymig.errors.BrokenResourceError`: the dump must abort.
    """

    def __init__(self, pipes: PagePipes, *, batch_bytes: int = FILL_BATCH_BYTES) -> None:
        self._pipes = pipes
        self._order = pipes.unfilled(lazy=True)
        self._position = {id(buf): i for i, buf in enumerate(self._order)}
        self._batch = max(1, batch_bytes // pipes.pipe_size)
        self._lock = threading.Lock()  # guards _taken, _cursor, _urgent
        self._taken = [False] * len(self._order)
        self._cursor = 0
        self._urgent: list[int] = []
        self._stop = threading.Event()
        self._ready: set[int] = set()  # id() of filled buffers (loop thread only)
        self._fill_order: list[int] = []
        self.hurried = 0
        """Buffers filled ahead of their turn because a GET waited for them."""
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def complete(self) -> bool:
        """Every lazy buffer is filled (as far as the event loop knows)."""
        return len(self._ready) == len(self._order)

    @property
    def waiting(self) -> int:
        """Buffers that GETs wait for now."""
        return len(self._waiters)

    @property
    def fill_order(self) -> tuple[int, ...]:
        """The buffers filled so far, as indices in plan (address) order, in the
        order they were filled."""
        return tuple(self._fill_order)

    # -- the event loop's side

    def wait(self, buf: PipeBuffer) -> Awaitable[None] | None:
        """None if ``buf`` is filled; else an awaitable that ends when it is, and
        ``buf`` is filled next. Raises if filling failed."""
        key = id(buf)
        if key in self._ready or key not in self._position:
            return None
        if self._error is not None:
            raise BrokenResourceError(f"filling the page pipes failed: {self._error}")
        fut = self._waiters.get(key)
        if fut is None:
            fut = self._waiters[key] = asyncio.get_running_loop().create_future()
            with self._lock:
                self._urgent.append(self._position[key])
        return asyncio.shield(fut)  # one waiter cancelled must not fail the others

    async def run(self, fp: FrozenProcess) -> None:
        """Fill every lazy buffer on ``fp``'s tracer thread. Cancelling it stops the
        filling after the batch in progress (waited for: it uses the pipes)."""
        self._loop = asyncio.get_running_loop()
        filling = asyncio.ensure_future(fp.fill_pages(self._pipes, self))
        try:
            await asyncio.shield(filling)
        except asyncio.CancelledError:
            self._stop.set()
            while not filling.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(filling)
            self._fail(BrokenResourceError("filling the page pipes was cancelled"))
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(BrokenResourceError(f"filling the page pipes failed: {exc}"))
                fut.exception()  # retrieved: a waiter may have been cancelled

    def _mark(self, keys: list[int]) -> None:
        self._ready.update(keys)
        self._fill_order += (self._position[key] for key in keys)
        for key in keys:
            fut = self._waiters.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- the tracer thread's side

    def next_batch(self) -> list[PipeBuffer]:
        """The next buffers to fill: those GETs wait for first, then the ones that
        follow (in address order: the next faults and background GETs are likely
        there). Empty when everything is taken or :meth:`run` was cancelled."""
        out: list[PipeBuffer] = []
        with self._lock:
            while self._urgent and len(out) < self._batch:
                i = self._urgent.pop(0)
                if not self._taken[i]:
                    self._taken[i] = True
                    self._cursor = i + 1
                    self.hurried += 1
                    out.append(self._order[i])
            n = len(self._order)
            for _ in range(n):
                if len(out) >= self._batch or self._stop.is_set():
                    break
                i = self._cursor % n
                self._cursor = i + 1
                if not self._taken[i]:
                    self._taken[i] = True
                    out.append(self._order[i])
        return [] if self._stop.is_set() else out

    def filled(self, bufs: list[PipeBuffer]) -> None:
        """Tell the event loop that ``bufs`` are filled (thread-safe)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._mark, [id(b) for b in bufs])
