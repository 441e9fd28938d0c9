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
"""

from __future__ import annotations

import logging
import time

from lazymig.errors import LazyMigError
from lazymig.proto.images import ImagesDir, ImagesWait
from lazymig.proto.images._dir import POLL

__all__ = ["POLL", "ImagesNotCompleteError", "wait_for_images"]

log = logging.getLogger(__name__)


class ImagesNotCompleteError(LazyMigError, TimeoutError):
    """No complete dump (``inventory.img``) came to the images directory in time;
    nothing was restored."""


def wait_for_images(images: ImagesDir, timeout: float, *, poll: float = POLL) -> float:
    """Return once ``images`` holds a complete dump (its ``inventory.img``); the seconds
    waited. Blocking: called before the restore's loop runs (the CLI's), or off it.

    Raises:
        ImagesNotCompleteError: none after ``timeout`` seconds.
    """
    wait = ImagesWait(images, timeout, poll=poll)
    if wait.complete:
        log.info("%s is there already: restoring at once (it marks a complete dump; one of an "
                 "older dump would be restored too)", wait.inventory)
        return 0.0
    log.info("waiting up to %g s for the images in %s (complete once %s is there)", timeout,
             images.path, wait.inventory.name)
    for pause in wait.pauses():
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
