"""Cooperative attach: a process hands some of its own memory to a lazy-pages daemon.

For programs that manage their own memory (a VM-style snapshot restore, a test
workload): map the regions at the dump-time addresses, call :func:`attach`,
then touch the memory. Each region is registered on a new userfaultfd that
goes to the daemon with exactly the handshake of ``criu restore --lazy-pages``
(pid, the fd as SCM_RIGHTS, the restore-finished marker); the daemon then
fills the pages of image pid ``pid`` on demand and in the background.

The calling process must not touch the regions from a thread of the daemon's
own process: the daemon would deadlock on the GIL. Run the daemon in another
process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable

from lazymig.errors import BrokenResourceError, ConfigurationError
from lazymig.proto.constants import PAGE_SIZE
from lazymig.proto.handover import RestoreFinished, Role, TaskHandover
from lazymig.proto.uffd import DEFAULT_FEATURES, Feature
from lazymig.uffd.handover import HandoverSession

__all__ = ["ATTACH_FEATURES", "attach"]

ATTACH_FEATURES = DEFAULT_FEATURES | Feature.THREAD_ID
"""CRIU's features plus THREAD_ID, so the daemon learns which threads fault (what it
kills, should it fail to name the process, rather than let them run on pages that
cannot arrive)."""


def attach(socket_path: str | os.PathLike[str], pid: int,
           regions: Iterable[tuple[int, int]], *, finish: bool = True,
           timeout: float = 10.0, thread_ids: bool = True) -> None:
    """Register ``regions`` of the calling process for lazy filling by a daemon.

    Args:
        socket_path: the daemon's UNIX socket (``lazy-pages.socket`` in its work dir).
        pid: the image pid whose pages fill the regions (a dump's pid, or any id
            the daemon's page source knows).
        regions: ``(address, length)`` pairs, page-aligned, already mapped as
            private anonymous memory at the dump-time addresses.
        finish: also send the restore-finished marker, which starts the
            daemon's background fetch.
        timeout: seconds to wait for the daemon.
        thread_ids: faults carry the faulting thread's id when the kernel can; False
            hands over a uffd without them, as ``criu restore`` does. Either way the
            daemon names the calling process (the peer of its socket, whose regions
            are registered) and kills it if its pages can never arrive.

    Raises:
        ConfigurationError: a region is not page-aligned.
        BrokenResourceError: the daemon is not there or went away.
        UffdError: the kernel refused the userfaultfd or a registration.
    """
    # Here, not at the top: lazymig.uffd imports this module, and the guardian imports
    # lazymig.uffd.handover without asyncio (which uffd.py loads).
    from lazymig.uffd.uffd import Uffd, kernel_features  # noqa: PLC0415

    features = DEFAULT_FEATURES | (kernel_features() & Feature.THREAD_ID if thread_ids else 0)
    with Uffd.open(features, non_blocking=True) as uffd:
        for address, length in regions:
            if address % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
                raise ConfigurationError(f"region {address:#x}+{length:#x} is not page-aligned")
            uffd.register(address, length)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with HandoverSession(sock, Role.RESTORER) as daemon:
            sock.settimeout(timeout)
            try:
                _connect(sock, os.fspath(socket_path), timeout)
                daemon.send_nowait(TaskHandover(pid, uffd.fd))
                if finish:
                    daemon.send_nowait(RestoreFinished())
            except (OSError, BrokenResourceError) as exc:
                raise BrokenResourceError(
                    f"cannot hand the userfaultfd to the lazy-pages daemon at {socket_path}: "
                    f"{exc} (is `lazymig lazy-pages` running with that socket?)") from exc
        # Closing our copy leaves the daemon's the only one, as CRIU's restorer does.


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect to the daemon's socket, waiting up to ``timeout`` seconds while its
    backlog is full: a UNIX socket with a timeout fails at once with EAGAIN then
    (many restorers at once, the daemon busy naming processes), it does not wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.002)
