"""Which process a handed-over userfaultfd serves, found once and off the event loop.

The handover names a process only by its pid as the images know it: under
``criu restore`` a pid in the restored tree's own pid namespace, with lazymig's
restorer or :func:`~lazymig.uffd.attach.attach` the dump's pid (any id the page
source knows). Faults name their thread only when the uffd has THREAD_ID, which
``criu restore`` does not ask for. Yet a daemon that must stop, or whose page
source failed, has to kill exactly that process: once its uffd closes, the pages
that never arrived read as zeros.

The kernel shows which mappings of a process are registered with a userfaultfd
(``um`` in smaps' VmFlags) and the process's pid in every pid namespace
(``NSpid``). The process a uffd serves is the one, among the restorer (the
peer of the handover socket: attach's caller) and its descendants (the tree
``criu restore`` forks), whose registered mappings cover every lazy range of its
image pid; where several do (a parent and its forked child share addresses),
the one whose innermost pid is the image pid. Only when the restorer's tree
holds none (a restorer gone, its tree reparented) are all processes searched,
and then only a unique match counts. The match is checked again after its
pidfd is opened, so the pidfd names that process even if its pid is reused.

A child forked during the lazy phase (UFFD_EVENT_FORK) asks under its parent's
image pid, but it is never the process that pid names: it is one of its
parent's own children (:func:`identify_forked`), the only one no other uffd
serves that covers the ranges. Its siblings look the same (same mappings, same
image pid), so the caller must name forked children one at a time, in the order
of their FORK events, each search seeing every process named before it as
claimed: a child searched for before it appears in /proc (its pid comes after
the FORK event is read) must not be given an older sibling's process, whose
exit would then close its uffd (its missing pages would read as zeros).

This reads /proc (every process's stat, candidates' smaps): it blocks, so the
daemon runs it in a thread (:func:`asyncio.to_thread`), once per process, when
its restorer says the restore finished (CRIU's restorer registers the ranges
after it handed the uffd over).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from lazymig.linux.procfs import (
    children,
    descendants,
    ns_pids,
    processes,
    read_stat,
    threads,
    userfaultfd_vmas,
)
from lazymig.proto.constants import PAGE_SIZE

__all__ = ["Identified", "identify", "identify_forked"]


@dataclass(frozen=True, slots=True)
class Identified:
    """The process a uffd serves: its pid as the daemon's own /proc shows it and a
    pidfd of it (owned by the caller)."""

    pid: int
    pidfd: int


def _merged(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _covers(pid: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Every lazy ``(vaddr, nr_pages)`` lies in a userfaultfd-registered mapping of ``pid``."""
    try:
        spans = _merged(userfaultfd_vmas(pid))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    if not spans:
        return False
    starts = [start for start, _ in spans]
    for vaddr, nr in ranges:  # the span that starts last at or below vaddr must hold it
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0 or vaddr + nr * PAGE_SIZE > spans[i][1]:
            return False
    return True


def _inner_pid(pid: int) -> int | None:
    try:
        return ns_pids(pid)[-1]
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        return None


def _pick(pids: Iterable[int], image_pid: int, ranges: Sequence[tuple[int, int]]
          ) -> tuple[int | None, list[int]]:
    """The one of ``pids`` the uffd serves (None if no or several fit), and every
    process that fits."""
    fitting = [p for p in pids if _covers(p, ranges)]
    named = [p for p in fitting if _inner_pid(p) == image_pid]
    if len(named) == 1:
        return named[0], fitting
    if not named and len(fitting) == 1:
        return fitting[0], fitting
    return None, fitting


def identify(image_pid: int, ranges: Sequence[tuple[int, int]], restorer_pid: int,
             claimed: Collection[int] = ()) -> Identified | str:
    """Find the process whose lazy ranges ``ranges`` (``(vaddr, nr_pages)``, those of
    ``image_pid``) a uffd handed over by ``restorer_pid`` covers; ``claimed`` are
    processes that other uffds serve. Blocking (it reads /proc).

    Returns:
        the process, or why it could not be told (no process fits, or several do).
    """
    if not ranges:
        return "it has no lazy range to recognise it by"
    tree = [restorer_pid, *descendants(restorer_pid)]
    pid, fitting = _pick((p for p in tree if p not in claimed), image_pid, ranges)
    if not fitting:
        # The restorer's tree has no such process (a restorer gone, its tree
        # reparented): any process named so may, if exactly one fits.
        everyone = [p for p in processes() if p not in claimed and _inner_pid(p) == image_pid]
        pid, fitting = _pick(everyone, image_pid, ranges)
    if pid is None:
        if not fitting:
            return (f"no process (of restorer {restorer_pid}'s tree or any other) has "
                    f"userfaultfd-registered mappings covering its lazy ranges")
        return (f"processes {sorted(fitting)} all have userfaultfd-registered mappings "
                f"covering its lazy ranges")
    return _pinned(pid, ranges)


def identify_forked(parent_pid: int, ranges: Sequence[tuple[int, int]],
                    claimed: Collection[int] = (), restored: Collection[int] = (),
                    order: tuple[int, int] | None = None) -> Identified | str:
    """Find the child that a FORK event's uffd serves: a child of process ``parent_pid``
    (the forking process, as the daemon's /proc names it) that is not ``claimed``
    (served by another uffd), whose innermost pid is none of ``restored`` (the image
    pids handed over: processes of the restored tree, which may map the same
    addresses) and whose userfaultfd-registered mappings cover ``ranges`` (its
    parent's lazy ranges). Blocking (it reads /proc).

    A unique match counts. Several match when siblings forked moments apart are all
    there before the older is named; ``order`` ``(i, n)`` then says that it is the
    i-th (from 0), in the order of their FORK events, of the ``n`` children of this
    parent the caller follows and has not named yet. A parent with one thread makes
    its children one at a time, and a child's pid is given only after its FORK event
    was read: the i-th of them by pid is it, if exactly ``n`` fit and their start
    times rise with their pids (no pid wrapped round).

    Returns:
        the process, or why it could not be told (none fits yet: it appears in /proc
        only once its parent's fork returned; or several do).
    """
    if not ranges:
        return "it has no lazy range to recognise it by"
    fitting = [p for p in children(parent_pid) if p not in claimed
               and _inner_pid(p) not in restored and _covers(p, ranges)]
    if not fitting:
        return (f"no child of process {parent_pid} that another uffd does not serve has "
                f"userfaultfd-registered mappings covering its lazy ranges")
    if len(fitting) == 1:
        return _pinned(fitting[0], ranges)
    if order is not None and len(fitting) == order[1] and len(threads(parent_pid)) == 1:
        ranked = _in_fork_order(fitting)
        if ranked is not None:
            return _pinned(ranked[order[0]], ranges)
    return (f"children {sorted(fitting)} of process {parent_pid} all have "
            f"userfaultfd-registered mappings covering its lazy ranges")


def _in_fork_order(pids: Sequence[int]) -> list[int] | None:
    """``pids`` in the order they were forked: by innermost pid, if their start times
    agree (None if not, or if one is gone)."""
    keyed = []
    for pid in pids:
        inner = _inner_pid(pid)
        try:
            _, fields = read_stat(pid)
        except (FileNotFoundError, ProcessLookupError):
            return None
        if inner is None:
            return None
        keyed.append((inner, fields[22], pid))
    keyed.sort()
    if any(a[1] > b[1] for a, b in itertools.pairwise(keyed)):
        return None
    return [pid for _, _, pid in keyed]


def _pinned(pid: int, ranges: Sequence[tuple[int, int]]) -> Identified | str:
    """A pidfd of ``pid``, if it is still the process that fitted."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return f"process {pid}, which it was, exited"
    # Still the process that fitted (not a new one with its pid), now pinned by the pidfd.
    if not _covers(pid, ranges):
        with contextlib.suppress(OSError):
            os.close(pidfd)
        return f"process {pid}, which it was, exited or changed its mappings"
    return Identified(pid, pidfd)
