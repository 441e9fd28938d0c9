"""The shape every handle of the orchestrator API shares.

A handle is an async context manager that owns fds, processes and tasks
through one :class:`contextlib.AsyncExitStack` (and, for its background work,
one :class:`asyncio.TaskGroup` entered last, so its tasks end before what they
use is closed). Awaiting a handle directly runs it to its end. Its outcome is
an :class:`Outcome` that any number of tasks may await.

Exceptions keep asyncio's task-group semantics (a failing background task
cancels the body) but reach the caller as the single lazymig exception that
caused them, not as a one-member ExceptionGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

from lazymig.errors import BusyResourceError, ClosedResourceError

__all__ = ["Handle", "Outcome", "entered"]

T = TypeVar("T")


class Outcome(Generic[T]):
    """A one-shot result that many tasks may await; made before any loop runs.

    Awaiting it returns the result or raises the error (cancelling an awaiter
    does not cancel the outcome). The error counts as retrieved at once: a
    handle also raises it from its ``async with``, so nobody has to await it.
    """

    def __init__(self) -> None:
        self._future: asyncio.Future[T] | None = None
        self._settled: tuple[str, Any] | None = None

    def done(self) -> bool:
        return self._settled is not None

    def set_result(self, value: T) -> None:
        self._settle("result", value)

    def set_exception(self, exc: BaseException) -> None:
        self._settle("cancelled" if isinstance(exc, asyncio.CancelledError) else "error", exc)

    def future(self) -> asyncio.Future[T]:
        """The future behind it, on the running loop (for ``asyncio.wait``)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            self._apply()
        return self._future

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.shield(self.future()).__await__()

    def _settle(self, kind: str, value: Any) -> None:
        if self._settled is None:
            self._settled = (kind, value)
            self._apply()

    def _apply(self) -> None:
        fut, settled = self._future, self._settled
        if fut is None or settled is None or fut.done():
            return
        kind, value = settled
        if kind == "result":
            fut.set_result(value)
        elif kind == "cancelled":
            fut.cancel()
        else:
            fut.set_exception(value)
            fut.exception()  # retrieved: see the class docstring


class Handle(Generic[T]):
    """Base of the API's async context managers; ``done`` resolves to a ``T``.

    Subclasses implement :meth:`_setup`, entering what they own into the stack
    (and calling :meth:`_task_group` for background tasks). A handle is entered
    once.
    """

    def __init__(self) -> None:
        self.done: Outcome[T] = Outcome()
        """The outcome: the result once complete, or the error that ended it."""
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None

    async def _setup(self, stack: contextlib.AsyncExitStack) -> None:
        raise NotImplementedError

    async def _task_group(self) -> asyncio.TaskGroup:
        """The handle's task group (entered into its stack on first use)."""
        if self._tasks is None:
            assert self._stack is not None, "only while entering or entered"
            self._tasks = await self._stack.enter_async_context(asyncio.TaskGroup())
        return self._tasks

    async def _produce(self, work: Awaitable[T]) -> None:
        """Await ``work`` (a background task of the handle) and settle ``done`` with it."""
        try:
            value = await work
        except asyncio.CancelledError:
            raise  # stopped because the handle is left: its exit settles ``done``
        except BaseException as exc:
            self.done.set_exception(exc)
            raise
        self.done.set_result(value)

    async def __aenter__(self: _H) -> _H:
        if self._stack is not None:
            raise BusyResourceError(f"{self!r} was entered already: make a new one")
        self._stack = contextlib.AsyncExitStack()
        try:
            await self._setup(self._stack)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Leaving normally waits for the background work to end; an exception or a
        cancellation stops it (each handle says what that means for its processes)."""
        assert self._stack is not None
        try:
            try:
                await self._stack.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                single = _single(group)
                if single is group:
                    raise
                single.__suppress_context__ = True  # the group adds nothing; a cause stays
                raise single  # noqa: B904
        except BaseException as raised:
            self.done.set_exception(raised)
            raise
        if exc is not None:
            self.done.set_exception(exc)
        elif not self.done.done():
            self.done.set_exception(asyncio.CancelledError())

    def __await__(self) -> Generator[Any, None, T]:
        """``await handle``: enter it, wait for its outcome, leave it."""
        return self._run_to_end().__await__()

    async def _run_to_end(self) -> T:
        async with self:
            return await self.done


_H = TypeVar("_H", bound=Handle[Any])


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group collected, or the group if there were several."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return group


V = TypeVar("V")


def entered(value: V | None, what: str) -> V:
    """``value``, which exists once the handle is entered; else say so."""
    if value is None:
        raise ClosedResourceError(f"{what} does not exist yet: enter the handle first")
    return value
