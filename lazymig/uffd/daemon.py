"""The lazy-pages daemon: every uffd it holds, multiplexed on one event loop.

Restorers (``criu restore --lazy-pages``, lazymig's restorer, or
:func:`lazymig.uffd.attach.attach`) connect to a UNIX socket (mode 0600,
peers checked by SO_PEERCRED) and hand over, per process, a pid and its
userfaultfd. The daemon then:

* serves faults: each uffd has a reader on the loop; a fault in a lazy range
  becomes an urgent GET, the reply is UFFDIO_COPYed and the faulting thread
  wakes; the GET asks for the fault's own page, or for its whole 64 KiB block
  when the fault follows the process's previous one closely (a sequential
  reader: its next faults are covered; readahead as the kernel's); a fault
  outside every lazy range gets the zero page. The daemon does not sleep while
  a fault waits: it spins on the page-server socket for the reply
  (``fault_poll``), then, for a random reader whose background is not done, on
  its uffd for its next fault, for up to 1 ms in a row (on a VM whose idle
  vCPUs halt, a wake-up from epoll_wait costs more than the round trip; CRIU's
  daemon polls epoll with timeout 0 throughout its background phase);
* once that restorer said "restore finished", pulls every page still lazy in
  the background, in chunks that grow from 64 KiB to 1 MiB, and none started
  while a fault waits; it starts past the last fault (spatial locality). A
  fault that needs a request of its own shrinks the chunks back to 64 KiB
  (CRIU: every fault) and, for a random reader, until they have grown back to
  1 MiB, only one is in flight (CRIU: always): its next fault then queues
  behind one small chunk at most (on one connection to a page server, replies
  come in order). Otherwise two are in flight. A fault on a page already
  coming (a busy reader catching up with the background) leaves the chunks
  growing.
  (CRIU grows to 4 MiB; measured here, 1 MiB chunks gave the same background
  throughput and a third of the fault p99.);
* follows the processes: FORK (the child gets the parent's pending ranges and
  asks under the parent's image pid), REMAP, REMOVE, UNMAP and exit;
* when every process is complete, ends the page-server session (CLOSE) and
  returns a :class:`DaemonReport`.

A lost page-server connection is not a failure:
:class:`~lazymig.uffd.source.RemotePageSource` connects again and sends every
unanswered request again (its :class:`~lazymig.uffd.source.ReconnectPolicy`),
while faulting threads wait.
Each restorer's connection stays open after "restore finished" until its
processes are settled, for the restorer's guardian (:mod:`lazymig.guardian`):
the daemon writes GUARDED on accept and TRANSFER_COMPLETE when they got every
page; if the daemon dies without it, the guardian kills them. Those words, and
the handover itself, are :class:`~lazymig.uffd.handover.RestorerConnection`'s:
the daemon only hears of processes handed over, and tells it which it adopted
and which settled.

If the page source fails for good before a process is complete, that process
must not run on pages that never arrived (they would read as zeros): the daemon
kills it. Which process a uffd serves is found once, when its restorer says the
restore finished, off the event loop (:mod:`lazymig.uffd.identify`: the mappings
registered with a userfaultfd and the pids in every namespace, for ``criu
restore``'s uffds too, which carry no thread ids); threads seen faulting (with
THREAD_ID) are the fallback. A process it cannot name keeps its uffd open, so it
stops at its next missing page; the log says what to do. Stopping the daemon
(cancelling :meth:`LazyPagesDaemon.run`) kills every process still missing pages
first, and does not return while one it cannot name is held. Should the daemon
die without a word (SIGKILL), its own guardian (:class:`~lazymig.guardian.DaemonGuardian`),
which holds a duplicate of every uffd, kills them. A restore that fails, or the
daemon being stopped, ends the session with a reset so that the dump side keeps
its source.

Each process's state (:class:`ProcessState`) moves only along
:data:`TRANSITIONS`; :class:`ProcessReport` is a snapshot of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lazymig._listen import SOCKET_NAME, listen_unix
from lazymig.errors import LazyMigError
from lazymig.guardian import DaemonGuardian
from lazymig.linux.procfs import lowest_mappable, read_stat, registered_with_userfaultfd
from lazymig.linux.uffd import UffdError, memory_alive
from lazymig.proto.constants import PAGE_SHIFT, PAGE_SIZE
from lazymig.proto.handover import TaskHandover
from lazymig.proto.images import ImagesDir
from lazymig.proto.uffd import (
    MSG_SIZE,
    PAGEFAULT_STRUCT,
    EventCode,
    Fork,
    Remap,
    Remove,
    Unmap,
    decode_events,
)
from lazymig.uffd.handover import RestorerConnection
from lazymig.uffd.identify import Identified, identify, identify_forked
from lazymig.uffd.latency import LatencyHistogram
from lazymig.uffd.ranges import LazyRanges
from lazymig.uffd.source import FailedPageSource, PageSource, RemotePageSource
from lazymig.uffd.uffd import Uffd

__all__ = ["SOCKET_NAME", "TRANSITIONS", "DaemonReport", "LazyPagesDaemon", "ProcessReport",
           "ProcessState"]

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PAGEFAULT = EventCode.PAGEFAULT.value
_PAGE_MASK = ~(PAGE_SIZE - 1)
_unpack_pagefault = PAGEFAULT_STRUCT.unpack_from

MIN_CHUNK_PAGES = (64 << 10) // PAGE_SIZE
MAX_CHUNK_PAGES = (1 << 20) // PAGE_SIZE  # see the module docstring
FAULT_POLL = 0.0005
"""Default seconds the daemon spins for a fault's reply (``fault_poll``)."""
NEXT_FAULT_SPIN = 0.0003
"""Seconds it then spins for a random reader's next fault, while its background is not
done: the next fault costs no wake-up, and finds no background chunk sent meanwhile ahead
of its request (CRIU's daemon, polling with timeout 0, sends one only when no event
waits; its background then barely moves while a reader faults)."""
SPIN_LIMIT = 0.001
"""Seconds of one process's faults served in a row before the loop gets its turn (other
uffds, the background)."""
HOLD_RETRY = 1.0
"""Seconds between tries to name a held process the daemon must kill before it stops."""


class ProcessState(enum.StrEnum):
    """Where a handed-over process stands (the values are what the log says)."""

    RUNNING = "running"
    """Being filled."""
    COMPLETE = "complete"
    """Every lazy page arrived."""
    EXITED = "exited"
    """Gone before completion, on its own."""
    FAILED = "failed"
    """Held: its pages will never come, and it could not be killed yet (it stops at its
    next missing page)."""
    KILLED = "killed"
    """Killed by the daemon: its pages will never come, or the daemon was stopped."""
    ABANDONED = "abandoned"
    """Its restore failed (its restorer kills it)."""


TRANSITIONS: Mapping[ProcessState, frozenset[ProcessState]] = {
    ProcessState.RUNNING: frozenset({ProcessState.COMPLETE, ProcessState.EXITED,
                                     ProcessState.FAILED, ProcessState.KILLED,
                                     ProcessState.ABANDONED}),
    ProcessState.FAILED: frozenset({ProcessState.KILLED, ProcessState.EXITED,
                                    ProcessState.ABANDONED}),
    ProcessState.COMPLETE: frozenset(),
    ProcessState.EXITED: frozenset(),
    ProcessState.KILLED: frozenset(),
    ProcessState.ABANDONED: frozenset(),
}
"""The states each state may move to (h11's ``_state.py`` way): the final ones none."""
_FINAL = frozenset(state for state, following in TRANSITIONS.items() if not following)
_SETTLED_OK = frozenset({ProcessState.COMPLETE, ProcessState.EXITED})


@dataclass(frozen=True, slots=True)
class ProcessReport:
    """How one process fared: a snapshot (see :attr:`LazyPagesDaemon.report`)."""

    pid: int
    """The image pid its pages are requested under."""
    pages_total: int
    pages_copied: int = 0
    pages_on_demand: int = 0
    """Of ``pages_copied``, those that came with a fault's request (the rest came in the
    background)."""
    faults: int = 0
    prefetched_faults: int = 0
    """Faults close behind the previous one (a sequential reader), which fetched their
    whole ``fault_prefetch`` block; the others fetched their own page only."""
    faults_behind_background: int = 0
    """Faults whose request went out while background requests were in flight (on one
    connection to a page server, their replies come first)."""
    zero_pages: int = 0
    state: ProcessState = ProcessState.RUNNING
    reason: str | None = None
    handed_over: float = field(default_factory=time.monotonic)
    """When the daemon got its uffd (time.monotonic)."""
    host_pid: int | None = None
    """The process as the daemon's /proc names it, once identified (None: not, or not yet)."""
    fault_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    """Its faults' round trips (fault read until its pages were copied)."""


@dataclass(slots=True)
class DaemonReport:
    """The outcome of a daemon run."""

    processes: list[ProcessReport]
    started: float
    finished: float | None = None
    source_error: str | None = None
    source_exception: BaseException | None = field(default=None, repr=False, compare=False)
    """The exception behind ``source_error`` (to chain as the cause of an API error)."""
    restore_error: str | None = None

    @property
    def ok(self) -> bool:
        """Every process got all its pages (or exited on its own)."""
        return self.source_error is None and self.restore_error is None and all(
            p.state in _SETTLED_OK for p in self.processes)

    @property
    def bytes_copied(self) -> int:
        return PAGE_SIZE * sum(p.pages_copied for p in self.processes)

    def throughput(self) -> float:
        """Bytes/s copied into processes, from the first handover until now or the end."""
        if not self.processes:
            return 0.0
        start = min(p.handed_over for p in self.processes)
        end = self.finished if self.finished is not None else time.monotonic()
        return self.bytes_copied / max(end - start, 1e-9)

    def fault_latency(self) -> LatencyHistogram:
        """Every process's fault round trips together."""
        merged = LatencyHistogram()
        for p in self.processes:
            merged.merge(p.fault_latency)
        return merged


class _Process:
    """One restored process the daemon fills: its uffd, its ranges, its counters. It is
    the :class:`~lazymig.uffd.source.PageSink` of its requests."""

    def __init__(self, daemon: LazyPagesDaemon, key: int, pid: int, uffd: Uffd,
                 ranges: LazyRanges, image_ranges: list[tuple[int, int]],
                 restorer: int) -> None:
        self.daemon = daemon
        self.key = key  # its number for the daemon's guardian
        self.pid = pid
        self.uffd = uffd
        self.ranges = ranges
        self.image_ranges = image_ranges  # its lazy ranges as handed over (to identify it)
        self.restorer = restorer  # the pid that handed it over (its tree holds it)
        self.state = ProcessState.RUNNING
        self.reason: str | None = None
        self.pages_total = ranges.pages_pending
        self.pages_copied = 0
        self.pages_on_demand = 0
        self.faults = 0
        self.prefetched_faults = 0
        self.faults_behind_background = 0
        self.zero_pages = 0
        self.handed_over = time.monotonic()
        self.fault_latency = LatencyHistogram()
        self.host_pid: int | None = None  # identified (identify.py): its pid and pidfd
        self.pidfd: int | None = None
        self.identifying = False
        self.unidentified: str | None = None  # why it could not be identified
        self.background = False  # its restorer said "restore finished"
        self.chunk_pages = MIN_CHUNK_PAGES
        self.random_reader = False  # its last fault that needed a request was an isolated one
        self.cursor: int | None = None  # where the background goes next (after a fault)
        self.last_fault: int | None = None  # the address of its last fault (readahead)
        self.fault_started: dict[int, float] = {}  # page address -> when its fault came
        self.threads: dict[int, int] = {}  # host tid seen faulting -> its start time
        self.readers: set[int] = set()  # tids of other processes that read its memory
        self.learning: set[int] = set()  # tids being told apart (see _learn_thread)
        self.connection: RestorerConnection | None = None  # of the restorer it came from
        self.forked = False  # a FORK event's child
        self.parent: _Process | None = None  # the process it forked from (FORK event)

    @property
    def active(self) -> bool:
        return self.state is ProcessState.RUNNING

    def pages_arrived(self, vaddr: int, nr_pages: int, got: int, address: int,
                      urgent: bool) -> None:
        self.daemon._arrived(self, vaddr, nr_pages, got, address, urgent)

    def pages_failed(self, vaddr: int, nr_pages: int, urgent: bool,
                     error: BaseException) -> None:
        self.daemon._fetch_failed(urgent, error)

    def to(self, state: ProcessState, reason: str | None) -> None:
        """Move to ``state`` (only along :data:`TRANSITIONS`)."""
        if state not in TRANSITIONS[self.state]:
            raise AssertionError(f"pid {self.pid}: {self.state} -> {state} is not a transition")
        self.state, self.reason = state, reason

    @property
    def missing(self) -> int:
        return self.ranges.pages_pending + self.ranges.pages_in_flight

    def who(self) -> str:
        """The process as the log names it: its pid as the operator sees it, if known."""
        if self.host_pid is None:
            return f"pid {self.pid}"
        if self.host_pid == self.pid:
            return f"process {self.pid}"
        return f"process {self.host_pid} (image pid {self.pid})"

    def snapshot(self) -> ProcessReport:
        latency = LatencyHistogram()
        latency.merge(self.fault_latency)
        return ProcessReport(
            self.pid, self.pages_total, self.pages_copied, self.pages_on_demand, self.faults,
            self.prefetched_faults, self.faults_behind_background, self.zero_pages,
            self.state, self.reason, self.handed_over, self.host_pid, latency)


class LazyPagesDaemon:
    """Fill restored processes' memory from a page source (see the module docstring).

    Args:
        source: where pages come from (a connected :class:`RemotePageSource`
            or a :class:`LocalPageSource`).
        lazy_ranges: image pid -> its lazy ranges ``[(vaddr, nr_pages), ...]``;
            usually ``ImagesDir(dir).lazy_ranges`` (see :meth:`from_images`).
        socket_path: the UNIX socket restorers connect to.
        serve_forever: keep accepting restorers after every process is done.
        background: pull the remaining pages in the background (else only faults).
        background_in_flight: background requests outstanding at once.
        allowed_uids: the users whose processes may hand over uffds (SO_PEERCRED);
            by default root and the daemon's own user.
        fault_prefetch: pages a fault asks for (the aligned block around it) when
            it follows the previous fault closely: one round trip then covers a
            sequential reader's next faults. An isolated fault asks for its page.
        fault_poll: seconds the daemon spins (reads its page-server socket without
            sleeping) for the reply to a fault's request, then for a random reader's
            next fault (:data:`NEXT_FAULT_SPIN`), at most :data:`SPIN_LIMIT` in a row:
            on a VM whose idle vCPUs halt, each sleep in epoll_wait costs a wake-up
            dearer than the work (CRIU's daemon never sleeps once the background
            began: epoll_wait with timeout 0). 0: never spin. Plain TCP sources only.
        expect_tasks: finish only once this many tasks (zombies included) were
            handed over; CRIU's daemon expects every task of pstree.img. None:
            finish as soon as the processes handed over so far are complete.
        listener: a socket already listening at ``socket_path``
            (:func:`lazymig._listen.listen_unix`), which the daemon then owns:
            restorers that connected before :meth:`run` are accepted then.

    Example::

        source = await RemotePageSource.connect("10.0.0.1", 9876)
        daemon = LazyPagesDaemon.from_images(source, "/tmp/1")
        report = await daemon.run()
    """

    def __init__(self, source: PageSource, lazy_ranges: Callable[[int], Iterable[tuple[int, int]]],
                 *, socket_path: str | os.PathLike[str] = SOCKET_NAME,
                 serve_forever: bool = False, background: bool = True,
                 background_in_flight: int = 2, fault_prefetch: int = 16,
                 fault_poll: float = FAULT_POLL,
                 expect_tasks: int | None = None,
                 allowed_uids: Iterable[int] | None = None,
                 listener: socket.socket | None = None) -> None:
        self.source = source
        self._lazy_ranges = lazy_ranges
        self.socket_path = Path(socket_path)
        self.serve_forever = serve_forever
        self.background = background
        self.background_in_flight = background_in_flight
        self.expect_tasks = expect_tasks
        self.fault_prefetch = fault_prefetch
        self.fault_poll = fault_poll
        self.allowed_uids = frozenset(allowed_uids if allowed_uids is not None
                                      else (0, os.geteuid()))
        self._tasks_received = 0
        self._listener = listener
        self.ready = asyncio.Event()
        """Set once the socket listens (restorers may connect)."""
        self._outcome = DaemonReport([], time.monotonic())  # all but its processes
        self._processes: list[_Process] = []
        self._guardian: DaemonGuardian | None = None  # started with the first process
        self._tg: asyncio.TaskGroup | None = None
        self._wakeup = asyncio.Event()  # background work may be available
        self._bg_in_flight = 0
        self._urgent_in_flight = 0
        self._restores_finished = 0
        self._failed = False
        self._done = asyncio.Event()
        self._poll = source.poll if fault_poll > 0 else None
        self._naming = asyncio.Lock()  # one search for processes at a time (see _identify)
        self._probe = lowest_mappable()  # a page no process maps (memory_alive)
        if isinstance(source, RemotePageSource):
            # Fetching on faults only, nothing else would tell: the processes must not
            # wait for a page that can no longer come (their next fault would find out).
            source.on_failure = self._source_failed
        elif isinstance(source, FailedPageSource):
            self._source_failed(source.error)  # every process handed over is failed at once

    @classmethod
    def from_images(cls, source: PageSource, images_dir: str | os.PathLike[str],
                    **options: object) -> LazyPagesDaemon:
        """A daemon whose lazy ranges come from ``DIR/pagemap-PID.img`` cut at ``mm-PID.img``.

        The socket defaults to ``DIR/lazy-pages.socket``, as CRIU's with
        ``--work-dir`` = ``-D``, and it expects every task of ``pstree.img``.
        """
        images = ImagesDir(images_dir)
        options.setdefault("socket_path", Path(images_dir) / SOCKET_NAME)
        options.setdefault("expect_tasks", len(images.pstree_pids()))
        return cls(source, lambda pid: [(r.vaddr, r.nr_pages) for r in images.lazy_ranges(pid)],
                   **options)  # type: ignore[arg-type]

    @property
    def report(self) -> DaemonReport:
        """A snapshot of the run so far (final once :meth:`run` returned)."""
        r = self._outcome
        return DaemonReport([p.snapshot() for p in self._processes], r.started, r.finished,
                            r.source_error, r.source_exception, r.restore_error)

    # ------------------------------------------------------------------ running

    async def run(self) -> DaemonReport:
        """Serve until every handed-over process is complete (or forever, if asked).

        Returns the report; ``report.ok`` tells whether every page arrived.
        Cancelled, it first kills every process still missing pages; one it cannot
        name keeps it holding (see :meth:`_stop`) until it can, or until cancelled again.
        """
        listener = self._listen()
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    helpers = [tg.create_task(self._accept(listener)),
                               tg.create_task(self._watch_exits())]
                    if self.background:
                        helpers.append(tg.create_task(self._background()))
                    await self._done.wait()
                    for helper in helpers:
                        helper.cancel()
            finally:
                self._tg = None
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
        except asyncio.CancelledError:
            await self._stop("the lazy-pages daemon was stopped")
            raise
        except BaseException:  # a bug: the daemon goes away now
            self._stop_abruptly("the lazy-pages daemon failed")
            raise
        await self._end_session()
        self._outcome.finished = time.monotonic()
        self._log_summary()
        return self.report

    def _listen(self) -> socket.socket:
        sock = self._listener if self._listener is not None else listen_unix(self.socket_path)
        self._listener = None
        log.info("lazy-pages daemon listening on %s", self.socket_path)
        self.ready.set()
        return sock

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self._tg is not None
        while True:
            conn, _ = await loop.sock_accept(listener)
            pid, uid, _gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            if uid not in self.allowed_uids:
                log.warning("refused a restorer connection from pid %d, uid %d (allowed "
                            "uids: %s)", pid, uid, sorted(self.allowed_uids))
                conn.close()
                continue
            self._tg.create_task(self._restorer(conn, pid))

    async def _restorer(self, conn: socket.socket, peer: int) -> None:
        """Take the processes one restorer hands over, until it says it is finished;
        then serve its connection until they are settled (its guardian's words:
        :class:`~lazymig.uffd.handover.RestorerConnection`)."""
        mine: list[_Process] = []
        with RestorerConnection(conn, peer) as connection:
            try:
                async with contextlib.aclosing(connection.handovers()) as handovers:
                    async for task in handovers:
                        self._tasks_received += 1
                        if isinstance(task, TaskHandover):
                            mine.append(self._adopt(task, peer, connection))
                        else:
                            log.info("pid %d is a zombie: nothing to fill", task.pid)
            except (LazyMigError, OSError) as exc:
                # The restore failed (CRIU's restorer kills what it restored): its
                # processes will never complete. Give up on them so that the daemon
                # ends, reports the failure and resets the page-server connection,
                # which tells the dump side to keep its source.
                log.error("restorer connection dropped before restore finished: %s", exc)
                self._outcome.restore_error = str(exc)
                for proc in mine:
                    self._fail(proc, f"its restore failed: {exc}", hold=False)
                self._restores_finished += 1
                self._check_done()
                return
            self._restores_finished += 1
            for proc in mine:
                proc.background = True
            self._wakeup.set()
            self._check_done()
            # Only now are the ranges registered (criu restore hands the uffd over first).
            await self._identify(mine)
            await connection.until_settled()

    def _adopt(self, task: TaskHandover, restorer: int,
               connection: RestorerConnection) -> _Process:
        uffd = Uffd.from_fd(task.fd, pid=task.pid)
        try:
            image_ranges = list(self._lazy_ranges(task.pid))
            ranges = LazyRanges(image_ranges, prefetch=self.fault_prefetch)
        except BaseException:
            uffd.close()
            raise
        return self._start(task.pid, uffd, ranges, image_ranges, restorer, connection)

    def _start(self, pid: int, uffd: Uffd, ranges: LazyRanges,
               image_ranges: list[tuple[int, int]], restorer: int,
               connection: RestorerConnection | None, *,
               parent: _Process | None = None) -> _Process:
        proc = _Process(self, len(self._processes) + 1, pid, uffd, ranges, image_ranges,
                        restorer)
        proc.parent = parent
        self._processes.append(proc)
        proc.connection, proc.forked = connection, parent is not None
        if connection is not None:
            # A forked child's uffd goes to the restorer's guardian too: should we die,
            # its holes trap.
            connection.adopted(proc.key, uffd if parent is not None else None)
        asyncio.get_running_loop().add_reader(uffd.fd, self._on_uffd_readable, proc)
        log.info("pid %d handed over: %d lazy pages", pid, proc.pages_total)
        if ranges.done:
            self._finish(proc, ProcessState.COMPLETE)
            return proc
        if self._guardian is None:
            self._guardian = DaemonGuardian()
            log.info("guardian %d holds every uffd too: should this daemon die, it kills the "
                     "processes still missing pages", self._guardian.process.pid)
        self._guardian.hold(proc.key, pid, uffd.fd, restorer=restorer, ranges=image_ranges,
                            parent=parent.key if parent else 0)
        if self._failed:  # handed over after the source failed: its pages will never come
            self._fail(proc, f"page source failed: {self._outcome.source_error}")
        return proc

    # ------------------------------------------------------------------ identifying

    async def _identify(self, procs: list[_Process], *, tries: int = 1) -> None:
        """Name the process each of ``procs`` serves (:mod:`lazymig.uffd.identify`), in
        a thread: it reads /proc. ``tries``: a forked child appears in /proc only once
        its parent's fork returned, after the daemon read the FORK event.

        One search at a time, in the order asked (FORK events' order), each seeing every
        process named before it as claimed: two siblings forked moments apart look the
        same, and a search that ran beside another once gave the younger child's uffd
        its older sibling's process, whose exit then closed the uffd of a child still
        missing pages (they read as zeros). A forked child is searched for among its
        parent's children, its parent named first if it is not yet; siblings all there
        at once are told apart by the order of their FORK events
        (:func:`~lazymig.uffd.identify.identify_forked`)."""
        async with self._naming:
            await self._identify_now(procs, tries)

    async def _identify_now(self, procs: list[_Process], tries: int) -> None:
        wanted: list[_Process] = []
        for proc in procs:
            if proc.parent is not None and proc.parent.host_pid is None:
                wanted.append(proc.parent)  # a forked child is found among its children
            wanted.append(proc)
        todo = [p for p in dict.fromkeys(wanted) if p.host_pid is None and not p.identifying
                and p.state not in _FINAL]
        for proc in todo:
            proc.identifying = True
        try:
            for proc in todo:
                result = await self._search(proc, tries)
                if isinstance(result, Identified):
                    self._identified(proc, result)
                elif result is not None:
                    self._unidentified(proc, result)
        finally:
            for proc in todo:
                proc.identifying = False

    async def _search(self, proc: _Process, tries: int) -> Identified | str | None:
        """One search for ``proc``'s process, in a thread, tried again every 20 ms up to
        ``tries`` times; each try sees the daemon as it is then (who is named, which of
        a parent's forked children are not yet). None: it settled meanwhile."""
        result: Identified | str | None = None
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(0.02)
                if not proc.uffd.closed and not memory_alive(proc.uffd.fd, self._probe):
                    return "it exited"  # a child that exits at once: no more tries
            if proc.state in _FINAL:
                return None
            claimed = {p.host_pid for p in self._processes if p.host_pid is not None}
            parent = proc.parent
            if parent is None:
                search = functools.partial(identify, proc.pid, proc.image_ranges,
                                           proc.restorer, claimed)
            elif parent.host_pid is None:
                return f"its parent (pid {parent.pid}) could not be identified"
            else:
                restored = {p.pid for p in self._processes if p.parent is None}
                # Its siblings not named yet, in the order of their FORK events.
                siblings = [p.key for p in self._processes if p.parent is parent
                            and p.host_pid is None and p.state not in _FINAL]
                search = functools.partial(
                    identify_forked, parent.host_pid, proc.image_ranges, claimed, restored,
                    (siblings.index(proc.key), len(siblings)))
            result = await asyncio.to_thread(search)
            if isinstance(result, Identified):
                return result
        return result

    def _unidentified(self, proc: _Process, reason: str) -> None:
        first, proc.unidentified = proc.unidentified is None, reason
        # A forked child that exits at once is common, and a small process has all its
        # pages before it is looked for: no warning for those.
        if first and (proc.forked or not proc.ranges.pages_pending):
            log.info("pid %d: its process could not be identified (%s), with %d pages "
                     "missing", proc.pid, reason, proc.ranges.pages_pending)
        elif first:
            log.warning("pid %d: its process could not be identified (%s); should its pages "
                        "never arrive, it is held rather than killed", proc.pid, reason)

    def _identified(self, proc: _Process, found: Identified) -> None:
        if proc.state in _FINAL:  # settled meanwhile
            os.close(found.pidfd)
            return
        proc.host_pid, proc.pidfd = found.pid, found.pidfd
        log.info("pid %d is process %d", proc.pid, found.pid)
        if self._guardian is not None:
            self._guardian.identified(proc.key, found.pidfd)
        # A pidfd turns readable when its process exits: no polling for it.
        asyncio.get_running_loop().add_reader(found.pidfd, self._on_exit, proc)
        if proc.state is ProcessState.FAILED:  # held until now: its pages will never come
            self._kill(proc, proc.reason or "its pages will never arrive")

    def _on_exit(self, proc: _Process) -> None:
        """Its pidfd turned readable: the process the daemon took it for exited. Its
        uffd has the last word: should the memory it fills still be in use, the name was
        wrong (or a /proc reader holds that memory a moment longer), and closing the uffd
        would leave a running process reading zeros where pages are missing."""
        if proc.state not in _FINAL and not proc.uffd.closed and \
                memory_alive(proc.uffd.fd, self._probe):
            self._unname(proc)
            return
        self._finish(proc, ProcessState.EXITED, "the process exited", force=True)

    def _unname(self, proc: _Process) -> None:
        """Forget the process ``proc`` was taken for: its exit is watched through its uffd
        (:meth:`_watch_exits`), and should its pages never come it is held, not killed.
        (The daemon's guardian let go of it when that process exited: should the daemon
        die now, nothing holds its uffd.)"""
        pidfd, proc.pidfd = proc.pidfd, None
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)
        proc.unidentified = f"process {proc.host_pid}, taken for it, exited while its memory " \
                            "is still in use"
        log.warning("pid %d: %s; it is watched through its userfaultfd instead", proc.pid,
                    proc.unidentified)
        proc.host_pid = None

    # ------------------------------------------------------------------ faults

    def _on_uffd_readable(self, proc: _Process) -> None:
        """The loop's reader callback for one uffd: handle every queued event at once.

        A reader that stays registered, rather than a task awaiting each read:
        on the fault path every loop round trip and epoll_ctl is latency. Page
        faults are unpacked in place (plain ints, no event object); the rarer
        events go through the codec. With ``fault_poll``, a fault's reply is waited
        for here, spinning on the source, and a random reader's next fault too
        (:data:`NEXT_FAULT_SPIN`), up to :data:`SPIN_LIMIT` in a row."""
        try:
            clock = time.perf_counter
            poll = self._poll
            uffd = proc.uffd
            spin_until = 0.0
            stop_at = clock() + SPIN_LIMIT
            while not uffd.closed:
                data = uffd.read_raw()
                if not data:
                    if clock() < spin_until:
                        os.sched_yield()  # the reader itself may be waiting for this vCPU
                        continue  # a random reader faults again soon: stay awake
                    break
                if len(data) % MSG_SIZE:
                    decode_events(data)  # raises: says what is wrong with it
                urgent = self._urgent_in_flight
                for off in range(0, len(data), MSG_SIZE):
                    if data[off] == _PAGEFAULT:
                        # No wake-up of the background for it: its request holds the
                        # background back until the reply, whose callback wakes it.
                        _, _, address, tid = _unpack_pagefault(data, off)
                        self._on_fault(proc, address & _PAGE_MASK, tid)
                        continue
                    self._wakeup.set()  # a forked child to fill; the others, to be safe
                    for event in decode_events(data[off:off + MSG_SIZE]):
                        if isinstance(event, Fork):
                            self._on_fork(proc, event)
                        elif isinstance(event, Remap):
                            proc.ranges.remap(event.from_, event.to, event.length)
                        elif isinstance(event, Remove):
                            proc.ranges.remove(event.start, event.end)
                        elif isinstance(event, Unmap):
                            proc.ranges.unmap(event.start, event.end)
                # Spin for the reply (served from here), then for a random reader's next
                # fault; the loop's turn comes when either is late or SPIN_LIMIT passed.
                if poll is None or self._urgent_in_flight == urgent or \
                        not poll(self.fault_poll) or not proc.active:
                    break
                now = clock()
                if now > stop_at or not (proc.random_reader and proc.background
                                         and self.background and proc.ranges.pages_pending):
                    break
                spin_until = now + NEXT_FAULT_SPIN
        except Exception as exc:  # a bug here must not leave the process running on holes
            log.exception("pid %d: handling its userfaultfd failed", proc.pid)
            self._fail(proc, f"internal error: {exc!r}")
            return
        if proc.active and proc.ranges.done:
            self._finish(proc, ProcessState.COMPLETE)

    def _learn_thread(self, proc: _Process, tid: int, address: int) -> None:
        # A process reading this one's memory (process_vm_readv, a debugger) faults on
        # its pages too, with its own tid: only a thread whose own mapping is the lazy
        # one belongs to ``proc`` (killed on failure, watched for exit). Telling them
        # apart reads smaps: in a thread, never on the fault path.
        if self._tg is not None:
            proc.learning.add(tid)
            self._tg.create_task(self._classify_thread(proc, tid, address))

    async def _classify_thread(self, proc: _Process, tid: int, address: int) -> None:
        try:
            own, started = await asyncio.to_thread(_thread_facts, tid, address)
        finally:
            proc.learning.discard(tid)
        if not own:
            proc.readers.add(tid)
            log.info("pid %d: thread %d of another process reads its memory", proc.pid, tid)
        elif started is not None:
            proc.threads[tid] = started
            if proc.state is ProcessState.FAILED:  # it faulted after the source failed
                self._kill(proc, proc.reason or "its pages will never arrive")

    def _close_uffd(self, proc: _Process) -> None:
        if not proc.uffd.closed:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                asyncio.get_running_loop().remove_reader(proc.uffd.fd)
            proc.uffd.close()

    def _on_fault(self, proc: _Process, address: int, tid: int) -> None:
        # ``address``: the faulting page. The request goes out first; what only
        # reports need (the fault's start time) is noted after it.
        if tid and tid not in proc.threads and tid not in proc.readers \
                and tid not in proc.learning:
            self._learn_thread(proc, tid, address)
        if proc.state is ProcessState.FAILED:
            if not self._kill(proc, f"faulted on {address:#x} after the page source failed") \
                    and self._tg is not None:
                # Not named yet (criu restore's uffds carry no thread ids, and its restore
                # may fault before it says finished): name it now, so that it is killed
                # rather than held on a fault that never ends.
                self._tg.create_task(self._identify([proc]))
            return
        proc.faults += 1
        ranges = proc.ranges
        prefetch = self._prefetch(proc, address)
        nr_pages = ranges.claim_fault(address, prefetch)
        if nr_pages:
            began = time.monotonic()
            if self._bg_in_flight:
                proc.faults_behind_background += 1
            self._urgent_in_flight += 1
            self.source.fetch(proc.pid, ranges.claimed_vaddr, nr_pages, proc, urgent=True)
            # Only a fault that must wait for a request of its own shrinks the background
            # chunks (those queued ahead of the next one); one on a page already coming
            # (a busy reader catching up with the background) leaves them growing.
            proc.chunk_pages = MIN_CHUNK_PAGES
            proc.random_reader = prefetch == 1
            proc.cursor = ranges.claimed_dst + (nr_pages << PAGE_SHIFT)
            # A fault woken to retry (see _wake) keeps the time it first came.
            proc.fault_started.setdefault(address, began)
        elif ranges.in_flight(address):
            # Already coming (a background chunk or an earlier fault): the copy wakes it.
            proc.fault_started.setdefault(address, time.monotonic())
        else:
            # Not lazy (never was, or dropped by REMOVE/UNMAP): the zero page.
            try:
                proc.uffd.zeropage(address, PAGE_SIZE)
                proc.zero_pages += 1
            except UffdError as exc:
                self._uffd_error(proc, exc, address, 1, address)

    def _prefetch(self, proc: _Process, address: int) -> int:
        """Pages the fault at ``address`` fetches: its whole block when it follows the
        previous fault of ``proc`` closely (a sequential reader, as the kernel's
        readahead judges), else its own page only: a random reader would wait for
        15 pages it does not want (a 64 KiB reply costs about twice a 4 KiB one, end
        to end, most of it the server's splice and our UFFDIO_COPY)."""
        last, proc.last_fault = proc.last_fault, address
        if last is not None and abs(address - last) <= self.fault_prefetch * PAGE_SIZE:
            proc.prefetched_faults += 1
            return self.fault_prefetch
        return 1

    def _on_fork(self, parent: _Process, event: Fork) -> None:
        child_uffd = Uffd.from_fd(event.ufd, pid=parent.pid)
        # The child is found among its parent's children (once the fork returned).
        child = self._start(parent.pid, child_uffd, parent.ranges.fork_copy(),
                            parent.image_ranges, parent.host_pid or parent.restorer,
                            parent.connection, parent=parent)
        child.background = parent.background
        log.info("pid %d forked: the child asks for its pages under pid %d", parent.pid,
                 parent.pid)
        if self._tg is not None and child.state is ProcessState.RUNNING:
            self._tg.create_task(self._identify([child], tries=50))

    # ------------------------------------------------------------------ fetching

    def _arrived(self, proc: _Process, vaddr: int, nr_pages: int, got: int, src: int,
                 urgent: bool) -> None:
        """``got`` of the ``nr_pages`` pages asked for at ``vaddr`` are at address ``src``
        (the source's reply buffer, until this returns): the fault path's other half.
        UFFDIO_COPY first (it wakes the faulting thread); counters, latency and the
        background after."""
        if urgent:
            self._urgent_in_flight -= 1
        else:
            self._bg_in_flight -= 1
        ranges = proc.ranges
        try:
            if got < nr_pages:  # a short reply: the rest is still owed
                ranges.requeue(vaddr + got * PAGE_SIZE, nr_pages - got)
            # The usual reply: its pages are one in-flight interval's, one UFFDIO_COPY.
            dst = ranges.complete_whole(vaddr, got)
            if dst >= 0:
                if proc.active:
                    self._copy_run(proc, dst, vaddr, src, got << PAGE_SHIFT, urgent)
            else:
                for copy in ranges.complete(vaddr, got):
                    if not proc.active:
                        break
                    self._copy_run(proc, copy.dst, copy.vaddr, src + copy.offset,
                                   copy.nr_pages << PAGE_SHIFT, urgent)
        except Exception as exc:  # a bug here must not leave the process running on holes
            self._wakeup.set()
            log.exception("pid %d: copying %#x failed", proc.pid, vaddr)
            self._fail(proc, f"internal error: {exc!r}")
            return
        self._wakeup.set()  # after the copy: the faulting thread runs first
        if proc.active and ranges.done:
            self._finish(proc, ProcessState.COMPLETE)

    def _fetch_failed(self, urgent: bool, error: BaseException) -> None:
        if urgent:
            self._urgent_in_flight -= 1
        else:
            self._bg_in_flight -= 1
        self._wakeup.set()
        self._source_failed(error)

    def _copy_run(self, proc: _Process, dst: int, vaddr: int, src: int, length: int,
                  urgent: bool) -> None:
        while True:
            try:
                done = proc.uffd.copy_pages(dst, src, length)
                break
            except UffdError as exc:
                if exc.errno != errno.EEXIST or length == PAGE_SIZE:
                    self._uffd_error(proc, exc, vaddr, length >> PAGE_SHIFT, dst)
                    return
                # EEXIST names the first page only (a forked child has its parent's
                # present pages; a fault's copy may have won): the rest may be missing.
                dst, src, vaddr, length = (dst + PAGE_SIZE, src + PAGE_SIZE,
                                           vaddr + PAGE_SIZE, length - PAGE_SIZE)
        pages = done >> PAGE_SHIFT
        proc.pages_copied += pages
        if urgent:
            proc.pages_on_demand += pages
        if done < length:  # the kernel stopped early (an event is queued): later
            proc.ranges.requeue(vaddr + done, (length - done) >> PAGE_SHIFT)
            self._wake_later(proc, dst + done, length - done)
        self._fault_served(proc, dst, done)

    def _fault_served(self, proc: _Process, dst: int, length: int) -> None:
        started = proc.fault_started
        if not started:
            return
        if length == PAGE_SIZE:  # a random reader's fault: one page, no scan
            if (began := started.pop(dst, None)) is not None:
                proc.fault_latency.add(time.monotonic() - began)
            return
        now = time.monotonic()
        for address in [a for a in started if dst <= a < dst + length]:
            proc.fault_latency.add(now - started.pop(address))

    def _uffd_error(self, proc: _Process, exc: UffdError, vaddr: int, nr_pages: int,
                    dst: int | None = None) -> None:
        if exc.process_gone:
            self._finish(proc, ProcessState.EXITED, f"the process went away ({exc})")
        elif exc.recoverable:
            # EEXIST: already there; ENOENT/EAGAIN: the layout is changing. The
            # pages go back to pending; the threads waiting there fault again.
            if exc.errno != errno.EEXIST:
                proc.ranges.requeue(vaddr, nr_pages)
                if dst is not None:
                    self._wake_later(proc, dst, nr_pages << PAGE_SHIFT)
            self._wakeup.set()
        else:
            log.error("pid %d: %s", proc.pid, exc)
            self._fail(proc, str(exc))

    def _wake_later(self, proc: _Process, dst: int, length: int) -> None:
        """A copy into ``[dst, +length)`` failed (EAGAIN, ENOENT) or stopped short, its
        pages back to pending: nothing would fetch them for the threads waiting there
        (with the background off, nothing at all). Once the loop has read the event
        that is changing the memory map, wake them: they fault again, and their new
        faults fetch the pages (or get the zero page if the event dropped them). The
        faults keep their first start time."""
        asyncio.get_running_loop().call_soon(self._wake, proc, dst, length)

    def _wake(self, proc: _Process, dst: int, length: int) -> None:
        if not proc.active or proc.uffd.closed:
            return
        try:
            proc.uffd.wake(dst, length)
        except UffdError as exc:
            if exc.process_gone:
                self._finish(proc, ProcessState.EXITED, f"the process went away ({exc})")
            else:
                log.warning("pid %d: waking the threads waiting at %#x: %s", proc.pid, dst,
                            exc)

    # ------------------------------------------------------------------ background

    async def _background(self) -> None:
        """Pull what is still lazy, round robin over processes, bounded in flight."""
        turn = 0
        while True:
            self._wakeup.clear()
            started = False
            candidates = [p for p in self._processes if p.active and p.background]
            for i in range(len(candidates)):
                # Faults first: no new background request while one is waiting.
                if (self._bg_in_flight >= self.background_in_flight or self._failed
                        or self._urgent_in_flight):
                    break
                proc = candidates[(turn + i) % len(candidates)]
                if self._bg_in_flight and proc.random_reader and \
                        proc.chunk_pages < MAX_CHUNK_PAGES:
                    # A random reader that faulted lately (its chunks grow back after
                    # each fault): one chunk at a time, as CRIU, so its next fault waits
                    # behind one small chunk at most; two once it has not faulted for 15
                    # chunks. A sequential reader's chunks run ahead of it: not held back.
                    continue
                request = proc.ranges.take_background(proc.chunk_pages, near=proc.cursor)
                if request is None:
                    continue
                proc.cursor = request.dst + request.nr_pages * PAGE_SIZE
                proc.chunk_pages = min(MAX_CHUNK_PAGES, proc.chunk_pages + MIN_CHUNK_PAGES)
                self._bg_in_flight += 1
                self.source.fetch(proc.pid, request.vaddr, request.nr_pages, proc)
                started = True
            turn += 1
            if not started:
                await self._wakeup.wait()

    async def _watch_exits(self, period: float = 0.25) -> None:
        """Retire processes whose every known thread is gone.

        A uffd says nothing when its process exits; copies then fail with ESRCH,
        but a process with nothing being copied (no background, or held after a
        failure) would wait forever. An identified process's pidfd tells (see
        :meth:`_identified`); for the others, the thread ids that came with faults,
        or the uffd itself (:func:`~lazymig.linux.uffd.memory_alive`).
        """
        probe = self._probe
        while True:
            await asyncio.sleep(period)
            for proc in self._processes:
                if proc.pidfd is not None or proc.state not in (
                        ProcessState.RUNNING, ProcessState.FAILED):
                    continue
                if proc.threads and not any(_thread_start_time(tid) == started
                                            for tid, started in proc.threads.items()):
                    self._finish(proc, ProcessState.EXITED,
                                 "every thread that faulted has exited", force=True)
                elif not proc.uffd.closed and not memory_alive(proc.uffd.fd, probe):
                    self._finish(proc, ProcessState.EXITED, "the process exited", force=True)

    # ------------------------------------------------------------------ ends

    def _finish(self, proc: _Process, state: ProcessState, reason: str | None = None, *,
                force: bool = False) -> None:
        if not proc.active and not (force and proc.state is ProcessState.FAILED):
            return
        proc.to(state, reason)
        log.info("pid %d: %s, UFFD transferred pages: (%d/%d)%s", proc.pid, state,
                 proc.pages_copied, proc.pages_total, f" ({reason})" if reason else "")
        self._settle(proc)  # nothing is lazy any more: faults become ordinary

    def _settle(self, proc: _Process, *, close: bool = True) -> None:
        """``proc`` reached a final state: let go of its uffd, its pidfd and its guard."""
        if close:
            self._close_uffd(proc)
        if proc.pidfd is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                asyncio.get_running_loop().remove_reader(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = None
        if self._guardian is not None:
            self._guardian.release(proc.key)
        if proc.connection is not None:
            proc.connection.settled(proc.key, ok=proc.state in _SETTLED_OK)
        self._check_done()

    def _fail(self, proc: _Process, reason: str, *, hold: bool = True) -> None:
        """Pages of ``proc`` will never arrive: kill it if it is known, else hold it
        (``hold``: keep its uffd open so it stops at its next missing page)."""
        if not proc.active:
            return
        if not hold:
            # Its restorer kills it; its uffd stays open until the daemon ends meanwhile.
            proc.to(ProcessState.ABANDONED, reason)
            log.error("pid %d: %s", proc.pid, reason)
            self._settle(proc, close=False)
            return
        proc.to(ProcessState.FAILED, reason)
        if self._kill(proc, reason):
            return
        log.error("%s: %s; %d pages never arrived: the process is held (it stops at its next "
                  "missing page) until it is killed%s", proc.who(), reason, proc.missing,
                  "" if proc.unidentified is None else
                  " (it could not be identified: kill it, a process of the tree of restorer "
                  f"{proc.restorer} whose userfaultfd-registered mappings, 'um' in "
                  "/proc/PID/smaps, hold its lazy ranges)")
        self._check_done()

    def _kill(self, proc: _Process, reason: str) -> bool:
        """SIGKILL ``proc``: through its pidfd once identified, else the threads seen
        faulting (THREAD_ID). False (and its uffd left open, so it stays held at its next
        missing page) if neither is known."""
        killed: list[int] = []
        if proc.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(proc.pidfd, signal.SIGKILL)
            how = ""
        else:
            for tid, started in proc.threads.items():
                if _thread_start_time(tid) == started:  # not a reused tid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(tid, signal.SIGKILL)
                        killed.append(tid)
            if not killed:
                return False
            how = f" (threads {killed})"
        proc.to(ProcessState.KILLED, reason)
        log.error("%s killed%s: %s, with %d pages missing; it must not run on pages that "
                  "never arrived", proc.who(), how, reason, proc.missing)
        self._settle(proc)
        return True

    def _source_failed(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            self._outcome.source_error = str(exc)
            self._outcome.source_exception = exc
            log.error("page source failed: %s", exc)
        for proc in self._processes:
            self._fail(proc, f"page source failed: {exc}")

    def _check_done(self) -> None:
        if self.serve_forever or self._restores_finished == 0:
            return
        if self.expect_tasks is not None and self._tasks_received < self.expect_tasks:
            return
        # Failed processes not yet killed keep the daemon (and their uffd) alive.
        if all(p.state in _FINAL for p in self._processes):
            self._done.set()

    def _unsettled(self) -> list[_Process]:
        return [p for p in self._processes if p.state not in _FINAL]

    async def _stop(self, reason: str) -> None:
        """The daemon was cancelled with work undone: once it closes a uffd, missing
        pages would read as zeros. So every process still missing pages is killed
        first (named now if not yet); one that cannot be named keeps the daemon
        holding its uffd, trying again every :data:`HOLD_RETRY` s, until it can be
        killed or the daemon is cancelled again (its guardian then holds it). The
        page-server session ends with a reset (the dump side keeps its source)."""
        probe = self._probe
        told: set[int] = set()
        try:
            while unsettled := self._unsettled():
                for proc in unsettled:
                    if not proc.uffd.closed and not memory_alive(proc.uffd.fd, probe):
                        self._finish(proc, ProcessState.EXITED, "the process exited",
                                     force=True)
                for proc in self._unsettled():
                    if not proc.background and proc.pidfd is None and not proc.threads:
                        # Its restorer has not said "restore finished": it is still there,
                        # and kills what it restored when it finds the daemon gone.
                        proc.to(ProcessState.ABANDONED, f"{reason} before its restore finished")
                        log.error("pid %d: %s", proc.pid, proc.reason)
                        self._settle(proc, close=False)
                await self._identify(self._unsettled())
                held = [p for p in self._unsettled() if not self._kill(p, reason)]
                if not held:
                    break
                for proc in held:
                    if proc.key in told:
                        continue
                    told.add(proc.key)
                    log.error("%s was not killed: %s, with %d pages missing, and its process "
                              "cannot be identified; the daemon keeps holding it (it stops at "
                              "its next missing page) and does not exit until it exits or can "
                              "be killed. "
                              "Kill it yourself: a process of the tree of restorer %d whose "
                              "userfaultfd-registered mappings ('um' in /proc/PID/smaps) hold "
                              "its lazy ranges", proc.who(), reason, proc.missing,
                              proc.restorer)
                await asyncio.sleep(HOLD_RETRY)
        finally:
            self._stop_abruptly(reason)
        await self._end_guardian()

    def _stop_abruptly(self, reason: str) -> None:
        """Going away now: kill what can be killed (without naming anyone new: that
        blocks), reset the page-server session and close the uffds. What is left the
        daemon's guardian keeps holding."""
        left = [p for p in self._unsettled() if not self._kill(p, reason)]
        for proc in left:
            log.error("%s: %s with %d pages missing; it could not be identified: the "
                      "daemon's guardian keeps holding it; kill it", proc.who(), reason,
                      proc.missing)
        self.source.abort()
        for proc in self._processes:
            self._close_uffd(proc)
        if self._guardian is not None and left:
            self._guardian.close()  # it holds them, as if we had died
            self._guardian = None

    async def _end_session(self) -> None:
        # An orderly CLOSE only when every page arrived: anything else resets the
        # connection, which tells the dump side to keep its source (see source.py).
        # Every process is settled: a connection lost now fails no one.
        if isinstance(self.source, RemotePageSource):
            self.source.on_failure = None
        try:
            if self.report.ok:
                await self.source.aclose()
            else:
                self.source.abort()
        except (LazyMigError, OSError) as exc:
            log.warning("closing the page-server session: %s", exc)
            self.source.abort()
        for proc in self._processes:
            self._close_uffd(proc)
        await self._end_guardian()

    async def _end_guardian(self) -> None:
        guardian, self._guardian = self._guardian, None
        if guardian is not None:
            guardian.complete()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(guardian.process.wait, 10)

    def _log_summary(self) -> None:
        r = self.report
        latency = r.fault_latency()
        p50, p99 = ((latency.percentile(q) or 0.0) * 1e6 for q in (0.5, 0.99))
        log.info("lazy pages %s: %d processes, %.1f MiB copied, %.1f MB/s, %d faults "
                 "(p50 %.0f us, p99 %.0f us), %d sent behind background requests",
                 "complete" if r.ok else "FAILED", len(r.processes), r.bytes_copied / 2**20,
                 r.throughput() / 1e6, len(latency), p50, p99,
                 sum(p.faults_behind_background for p in r.processes))


def _thread_facts(tid: int, address: int) -> tuple[bool, int | None]:
    """Whether thread ``tid``'s own mapping at ``address`` is registered with a
    userfaultfd (it belongs to the process faulting there, not to a reader of its
    memory), and its start time. Blocking: it reads smaps."""
    return registered_with_userfaultfd(tid, address), _thread_start_time(tid)


def _thread_start_time(tid: int) -> int | None:
    """The start time of live thread ``tid`` (None if gone or a zombie, whose memory is
    already released); comparing it tells a thread from a later one with its tid."""
    try:
        state, fields = read_stat(tid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if state in ("Z", "X") else fields[22]
