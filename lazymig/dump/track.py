"""Which pages a running process writes: dirty tracking for pre-copy, without
soft-dirty bits (this kernel has none: CRIU's ``pre-dump --track-mem`` cannot work).

Linux 6.7+ has another way: a userfaultfd in *async* write-protect mode
(``UFFD_FEATURE_WP_ASYNC``). A write to a protected page reaches no handler:
the kernel un-protects the page at once and the process never blocks.
``PAGEMAP_SCAN`` with ``PAGE_IS_WRITTEN`` and ``PM_SCAN_WP_MATCHING`` then
reports the pages written since the last scan and protects them again in the
same page-table walk, so no write between two scans is lost.

:meth:`DirtyTracker.start`:

1. refuses what cannot be tracked, reading only ``/proc``: memory the process
   registered with a userfaultfd of its own (the kernel allows one context per
   VMA); a kernel without ``WP_ASYNC``/``WP_UNPOPULATED``;
2. stops the main thread for a moment (ptrace), injects ``userfaultfd()`` (the
   kernel ties a uffd to the caller's memory), takes a copy of the fd out with
   ``pidfd_getfd``, closes it in the process and lets it run on. Everything
   else is done from here on our copy: the handshake, and registering its
   private writable mappings with ``UFFDIO_REGISTER_MODE_WP``.

:meth:`DirtyTracker.collect` is one round: mappings that appeared since the
last round are registered, then every registered range is scanned. The first
round reports every page present (none is protected yet); later ones what was
written since. A mapping replaced by another at the same place is not
registered, and the scan says so (EPERM, ``PM_SCAN_CHECK_WPASYNC``): it is
registered then and scanned again; its present pages all count as written.

Shared mappings are not tracked (another process may write them through its
own page tables): :attr:`DirtyTracker.untracked` lists them, for the caller to
copy while the process is frozen.

:meth:`DirtyTracker.close` unregisters every range and closes the fd; closing
alone would be enough (the kernel drops a context's registrations and
protections with its last fd), so a tracker whose process is killed leaves
nothing behind. The only window in which the process holds something of ours
is the injection, inside one ptrace stop: a tracker killed there leaves a uffd
fd without registrations in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import time
import warnings
from typing import Final

from lazymig.dump.freeze import UnsupportedTargetError
from lazymig.dump.scan import Vma, parse_smaps
from lazymig.errors import ClosedResourceError, LazyMigOSError
from lazymig.linux import uffd as sys_uffd
from lazymig.linux.procfs import children, open_pagemap, read_maps, userfaultfd_vmas
from lazymig.linux.ptrace import Tracee, TracerThread
from lazymig.linux.syscalls import SYS_CLOSE, SYS_USERFAULTFD
from lazymig.linux.vm import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
    copy_fd,
    pagemap_scan,
)
from lazymig.proto.constants import MAP_SHARED, PAGE_SHIFT, VmaStatus
from lazymig.proto.uffd import UFFD_USER_MODE_ONLY, Feature, RegisterMode

__all__ = ["DirtyRound", "DirtyTracker", "trackable"]

log = logging.getLogger(__name__)

#: What async write-protect dirty tracking needs of the kernel (Linux 6.7+).
#: WP_UNPOPULATED: PAGEMAP_SCAN protects anonymous memory only with it.
TRACK_FEATURES: Final = Feature.WP_ASYNC | Feature.WP_UNPOPULATED

_UFFD_FLAGS: Final = os.O_CLOEXEC | os.O_NONBLOCK
_SPECIAL: Final = VmaStatus.VDSO | VmaStatus.VVAR | VmaStatus.VSYSCALL
_RESCANS: Final = 8
# Written, and neither the file's own page (a private file mapping not written yet)
# nor the zero page: what a dump copies. Pages left out are left unprotected: a
# write to one makes a new page, not protected, which the next scan reports.
_NOT_DUMPED: Final = PAGE_IS_FILE | PAGE_IS_PFNZERO
_WRITTEN: Final = PAGE_IS_WRITTEN | _NOT_DUMPED
# And there: the kernel reports the empty entries of a page table in a mapping
# registered since the last scan as written too (seen on 6.18).
_THERE: Final = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
_WP_SCAN: Final = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
_CHECK_SCAN: Final = PM_SCAN_CHECK_WPASYNC
_HINT: Final = "migrate it without pre-copy (all its memory is then copied after the freeze)"

Range = tuple[int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class DirtyRound:
    """One round of :meth:`DirtyTracker.collect`."""

    ranges: tuple[Range, ...]
    """``[start, end)`` of the pages written since the last round (every page
    present, the first time), sorted, neighbours joined."""
    seconds: float
    """How long the round took (the process ran meanwhile)."""

    @property
    def pages(self) -> int:
        """Pages in :attr:`ranges`."""
        return sum(end - start for start, end in self.ranges) >> PAGE_SHIFT


def _tracked(vma: Vma) -> bool:
    """Private writable memory, except the kernel's special mappings (not dumped)."""
    return not vma.flags & MAP_SHARED and vma.prot & 0x2 != 0 and not vma.status & _SPECIAL


def _own_uffd(pid: int) -> list[Range]:
    try:
        return userfaultfd_vmas(pid, (b"um", b"uw", b"ui"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise LazyMigOSError(errno.ESRCH, f"process {pid} is gone", pid=pid) from exc


def trackable(pid: int) -> None:
    """Refuse (:class:`~lazymig.dump.freeze.UnsupportedTargetError`, naming the
    cause) what dirty tracking cannot handle, reading only ``/proc`` and probing
    the kernel on a throwaway userfaultfd of ours."""
    fd = sys_uffd.userfaultfd(_UFFD_FLAGS | UFFD_USER_MODE_ONLY)
    try:
        supported = Feature(sys_uffd.api(fd, 0)[1])
    finally:
        os.close(fd)
    if ~supported & TRACK_FEATURES:
        missing = Feature(TRACK_FEATURES & ~supported)
        raise UnsupportedTargetError(pid, [f"this kernel has no userfaultfd {missing!r} "
                                           "(Linux 6.7+) to track its writes"], _HINT)
    if kids := children(pid):
        raise UnsupportedTargetError(
            pid, [f"it has {len(kids)} child process(es) ({', '.join(map(str, kids[:4]))}): "
                  "pre-copy tracks the writes of one process, and pre-copy of a process tree "
                  "is not implemented"], _HINT)
    if own := _own_uffd(pid):
        spans = ", ".join(f"{s:#x}-{e:#x}" for s, e in own[:4])
        raise UnsupportedTargetError(
            pid, [f"it registered {len(own)} mapping(s) with a userfaultfd of its own "
                  f"({spans}): a mapping takes one userfaultfd, so its writes cannot be "
                  "tracked"], _HINT)


class DirtyTracker:
    """Tracks the pages a running process writes (see the module docstring).

    Get one with ``await DirtyTracker.start(pid)``; call :meth:`collect` once
    per round; end with :meth:`close` (or ``async with``), which leaves the
    process exactly as it was before :meth:`start`. Blocking calls run in a
    worker thread, never on the event loop; one call at a time.
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self._registered: dict[Range, Vma] = {}
        self._untracked: tuple[Vma, ...] = ()
        self._pagemap = open_pagemap(pid)

    # -- starting ----------------------------------------------------------------------

    @classmethod
    async def start(cls, pid: int, *, stop_timeout: float = 10.0) -> DirtyTracker:
        """Create the write-protect userfaultfd in ``pid`` and take it out.

        Raises :class:`~lazymig.dump.freeze.UnsupportedTargetError` (the cause
        named) or :class:`~lazymig.errors.LazyMigOSError`; in every case the
        process is left as it was. No page is protected before the first
        :meth:`collect`.
        """
        await asyncio.to_thread(trackable, pid)
        tracer = TracerThread(name=f"lazymig-track-{pid}")
        try:
            fd = await tracer.run(_take_uffd, pid, stop_timeout)
        finally:
            tracer.close()
        try:
            sys_uffd.api(fd, int(TRACK_FEATURES), pid=pid)
            return cls(pid, fd)
        except BaseException:
            os.close(fd)
            raise

    # -- rounds ------------------------------------------------------------------------

    @property
    def untracked(self) -> tuple[Vma, ...]:
        """Writable mappings seen at the last round whose writes are not tracked
        (shared memory): copy them while the process is frozen."""
        return self._untracked

    @property
    def registered(self) -> list[Range]:
        """The ranges registered for write-protect, in address order."""
        return sorted(self._registered)

    async def collect(self, *, protect: bool = True) -> DirtyRound:
        """One round: the pages written since the last one (every page present,
        the first time), protected again (not with ``protect=False``: the last
        scan, of a frozen process, spares re-protecting what no later round reads).
        The process runs on meanwhile.

        Only the pages a dump copies count: a private file mapping's pages
        that are still the file's, and the zero page, do not."""
        self._check()
        return await asyncio.to_thread(self._collect, _WP_SCAN if protect else _CHECK_SCAN)

    def _collect(self, flags: int) -> DirtyRound:
        began = time.monotonic()
        out: list[Range] = []
        for _ in range(_RESCANS):
            vmas = self._refresh()
            retry = False
            for start, end in _joined(self.registered):
                try:
                    out += pagemap_scan(self._pagemap, start, end, required=_WRITTEN,
                                        inverted=_NOT_DUMPED, anyof=_THERE, flags=flags)
                except LazyMigOSError as exc:
                    if exc.errno != errno.EPERM:
                        raise
                    # A mapping in there is not ours (replaced since the last round):
                    # register it, then scan again (what was scanned stays reported).
                    self._forget(start, end)
                    retry = True
            if not retry:
                self._untracked = tuple(v for v in vmas if v.flags & MAP_SHARED
                                        and v.prot & 0x2)
                return DirtyRound(tuple(_joined(sorted(out))), time.monotonic() - began)
        raise LazyMigOSError(errno.EAGAIN, f"the mappings of process {self.pid} kept changing "
                             f"under {_RESCANS} scans in a row", pid=self.pid)

    def _refresh(self) -> list[Vma]:
        """Register the private writable mappings not registered yet; returns the VMAs."""
        try:
            vmas = parse_smaps(read_maps(self.pid))
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise LazyMigOSError(errno.ESRCH, f"process {self.pid} is gone",
                                 pid=self.pid) from exc
        current = {(v.start, v.end): v for v in vmas if _tracked(v)}
        for span in [s for s, v in self._registered.items() if current.get(s) != v]:
            del self._registered[span]  # unmapped, or changed: registered again below
        for span, vma in current.items():
            if span in self._registered:
                continue
            try:
                sys_uffd.register(self._fd, span[0], span[1] - span[0], RegisterMode.WP,
                                  pid=self.pid)
            except sys_uffd.UffdError as exc:
                if exc.errno == errno.EBUSY:
                    raise UnsupportedTargetError(self.pid, [
                        f"its mapping {span[0]:#x}-{span[1]:#x} ({vma.path or 'anonymous'}) "
                        "is registered with a userfaultfd of its own since the tracking "
                        "began"], _HINT) from exc
                if exc.errno in (errno.ENOMEM, errno.EINVAL) and not _still_mapped(self.pid,
                                                                                   span):
                    continue  # unmapped since we read the maps: the next round sees it
                raise
            self._registered[span] = vma
        return vmas

    def _forget(self, start: int, end: int) -> None:
        for span in [s for s in self._registered if start <= s[0] < end]:
            del self._registered[span]

    # -- ending ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd < 0

    async def close(self) -> None:
        """Unregister every range and close the userfaultfd: the process's memory
        is as it was before :meth:`start` (idempotent; never raises for a process
        that exited meanwhile)."""
        if self._fd >= 0:
            await asyncio.to_thread(self._close)

    async def detach(self) -> None:
        """Close our fds but leave every range registered, for a copy of the uffd
        held elsewhere (:mod:`lazymig.dump.keeper`) to carry the tracking on."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            os.close(self._pagemap)

    @property
    def fd(self) -> int:
        """The userfaultfd (-1 once closed)."""
        return self._fd

    def _close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            for start, end in _joined(self.registered):
                try:
                    sys_uffd.unregister(fd, start, end - start, pid=self.pid)
                except sys_uffd.UffdError as exc:
                    # Unmapped or remapped since: closing the fd below still clears
                    # whatever registration is left (the kernel does it on release).
                    log.debug("process %d: unregister %#x-%#x: %s", self.pid, start, end, exc)
            self._registered.clear()
        finally:
            os.close(fd)
            os.close(self._pagemap)

    def _check(self) -> None:
        if self._fd < 0:
            raise ClosedResourceError(f"the dirty tracker of process {self.pid} is closed")

    async def __aenter__(self) -> DirtyTracker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"DirtyTracker({self.pid}) was never closed", ResourceWarning,
                          stacklevel=2)
            self._close()

    def __repr__(self) -> str:
        return f"<DirtyTracker pid={self.pid}{' closed' if self.closed else ''}>"


def _take_uffd(pid: int, timeout: float) -> int:
    """On the tracer thread: stop the main thread, have it create a userfaultfd,
    copy the fd to us, close it there, let it run. Returns our copy."""
    tracee = Tracee.seize(pid, timeout=timeout)
    try:
        with tracee.syscalls() as session:
            fd = session.syscall(SYS_USERFAULTFD, _UFFD_FLAGS)
            if fd == -errno.EPERM:  # vm.unprivileged_userfaultfd=0: user-mode faults only
                # (async write-protect faults never reach the handler: nothing is lost).
                fd = session.syscall(SYS_USERFAULTFD, _UFFD_FLAGS | UFFD_USER_MODE_ONLY)
            if fd < 0:
                raise LazyMigOSError(-fd, "userfaultfd() run by the process", pid=pid)
            try:
                return copy_fd(pid, fd)
            finally:
                session.syscall(SYS_CLOSE, fd)
    finally:
        with contextlib.suppress(LazyMigOSError):
            tracee.detach()
        tracee.abandon()


def _still_mapped(pid: int, span: Range) -> bool:
    try:
        maps = read_maps(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return f"{span[0]:x}-{span[1]:x} " in maps


def _joined(spans: list[Range]) -> list[Range]:
    out: list[Range] = []
    for start, end in spans:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
