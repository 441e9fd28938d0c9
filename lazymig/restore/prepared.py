"""A prepared restore: loaded before the dump ends, restoring as soon as its images are complete.

``lazymig restore --wait-for-images SECONDS`` is started on the destination
before the dump, as ``lazymig lazy-pages --wait-for-page-server`` is: it
imports the restore machinery (the start-up, which a restore started after the
dump adds to the downtime), says so on ``--status-fd``, then waits for the
images (:func:`wait_for_images`) and restores at once. ``criu restore`` has no
such mode.

How it knows the images are complete: ``inventory.img`` is there
(:class:`~lazymig.proto.images.ImagesWait`, the one wait for it). The images
directory must therefore hold no ``inventory.img`` of an older dump when the
wait starts: it would be restored at once (that is logged).

The wait polls for the file every :data:`POLL` seconds: one ``stat`` each time,
a bound on the delay it adds, and it works on any filesystem the images come in
on (inotify would miss a file written by another host on NFS).

After a pre-copy, ``--pre-dumps DIR`` also builds the process's memory while it
waits (:func:`follow_rounds`): each pre-dump round that arrives in a
subdirectory of DIR (``lazymig page-server -D DIR/N`` writes one per ``pre-dump
--page-server``; a copied ``pre-dump`` dir does too) is written into the
prepared process-to-be as soon as it is complete (its ``pagemap-PID.img``,
which both write last), in chain order (its ``parent`` link names the round
before), and the restore then only moves those pages into place
(:mod:`lazymig.restore.premap`).

A lazy restore also watches its daemon's socket meanwhile: a daemon that fails
(its page server went away before the images came, see ``lazymig lazy-pages
--wait-for-page-server``) unlinks it, and the restore, which could only fail
on it once the images come, fails at once instead (:class:`DaemonGoneError`).
A daemon killed by SIGKILL leaves its socket file behind: that is noticed only
when the restore connects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lazymig.errors import BrokenResourceError, LazyMigError
from lazymig.proto.constants import PARENT_LINK
from lazymig.proto.images import ImagesDir, ImagesWait
from lazymig.proto.images._dir import POLL

if TYPE_CHECKING:
    from lazymig.restore.restorer import Restorer

__all__ = ["POLL", "DaemonGoneError", "ImagesNotCompleteError", "follow_rounds",
           "wait_for_images"]

log = logging.getLogger(__name__)


class ImagesNotCompleteError(LazyMigError, TimeoutError):
    """No complete dump (``inventory.img``) came to the images directory in time;
    nothing was restored."""


class DaemonGoneError(BrokenResourceError):
    """The lazy-pages daemon's socket, there while the restore waited for the images, is
    gone: the daemon failed or ended, and the restore would fail on it; nothing was
    restored."""


def wait_for_images(images: ImagesDir, timeout: float, *, poll: float = POLL,
                    daemon_socket: Path | None = None) -> float:
    """Return once ``images`` holds a complete dump (its ``inventory.img``); the seconds
    waited. Blocking: called before the restore's loop runs (the CLI's), or off it.

    ``daemon_socket``: the lazy-pages daemon's socket (a lazy restore); once seen, its
    disappearance ends the wait.

    Raises:
        ImagesNotCompleteError: none after ``timeout`` seconds.
        DaemonGoneError: the daemon's socket was there and is gone.
    """
    wait = ImagesWait(images, timeout, poll=poll)
    if wait.complete:
        log.info("%s is there already: restoring at once (it marks a complete dump; one of an "
                 "older dump would be restored too)", wait.inventory)
        return 0.0
    log.info("waiting up to %g s for the images in %s (complete once %s is there)", timeout,
             images.path, wait.inventory.name)
    daemon_seen = False
    for pause in wait.pauses():
        if daemon_socket is not None:
            if daemon_socket.exists():
                daemon_seen = True
            elif daemon_seen:
                raise DaemonGoneError(
                    f"the lazy-pages daemon's socket {daemon_socket} went away while the "
                    f"restore waited for the images in {images.path}: the daemon failed or "
                    "ended (see its log); nothing was restored")
        time.sleep(pause)
    if not wait.complete:
        raise ImagesNotCompleteError(
            f"no complete dump in {images.path} after {timeout:g} s ({wait.inventory.name}, "
            "which a dump writes last, never came): is the dump writing there (or the "
            "copy of its images coming there)? Restore once it is, or wait longer "
            "(--wait-for-images SECONDS)")
    waited = wait.waited
    log.info("images complete after %.3f s of waiting: restoring", waited)
    return waited


async def follow_rounds(restorer: Restorer, rounds_dir: Path, seconds: float, *,
                        poll: float = POLL) -> int:
    """Prepare ``restorer`` (:meth:`~lazymig.restore.Restorer.prepare`) and give it
    each pre-dump round that arrives in a subdirectory of ``rounds_dir``, complete
    and in chain order, until its images dir holds a complete dump; returns the
    rounds applied. The prepared process-to-be is ended on any failure.

    Raises:
        ImagesNotCompleteError: no complete dump after ``seconds``.
    """
    wait = ImagesWait(restorer.images, seconds, poll=poll)
    final = restorer.images.path.resolve()
    await restorer.prepare()
    try:
        applied = 0
        last: Path | None = None
        pauses = wait.pauses()
        while not wait.complete:
            ready = await asyncio.to_thread(_next_round, rounds_dir, final, last)
            if ready is not None:
                pages = await restorer.add_round(ready)
                log.info("pre-dump %s put in place (%d pages)", ready, pages)
                last, applied = ready, applied + 1
                continue
            pause = next(pauses, None)
            if pause is None:
                break
            await asyncio.sleep(pause)
        if not wait.complete:
            raise ImagesNotCompleteError(
                f"no complete dump in {restorer.images.path} after {seconds:g} s "
                f"({wait.inventory.name}, which a dump writes last, never came; {applied} "
                f"pre-dump round(s) came to {rounds_dir})")
    except BaseException:
        restorer.unprepare()
        raise
    log.info("images complete after %d pre-dump round(s) put in place: restoring", applied)
    return applied


def _next_round(rounds_dir: Path, final: Path, last: Path | None) -> Path | None:
    """The complete round of ``rounds_dir`` whose parent is ``last`` (none: the
    first), other than the final dump ``final``; None if it has not come yet."""
    try:
        subdirs = sorted(rounds_dir.iterdir())
    except FileNotFoundError:
        return None
    for entry in subdirs:
        d = entry.resolve()
        if d in (final, last) or not d.is_dir() or not _complete(d):
            continue
        link = d / PARENT_LINK
        parent = link.resolve() if link.is_symlink() else None
        if parent == last:
            return d
    return None


def _complete(round_dir: Path) -> bool:
    """A process's pagemap is there (written last, and whole: written under another
    name, then renamed)."""
    return any(p.name[len("pagemap-"):-len(".img")].isdigit()
               for p in round_dir.glob("pagemap-*.img"))
