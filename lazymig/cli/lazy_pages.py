"""``lazymig lazy-pages``: the restore-side daemon, in place of ``criu lazy-pages``.

    lazymig lazy-pages --page-server --address SRC --port 9876 -D /tmp/1 [--wire v1]
    lazymig lazy-pages -D /tmp/1          # local mode: lazy pages from pages-N.img

It listens on ``DIR/lazy-pages.socket`` (CRIU's name; the work dir is the
images dir unless ``-W`` says otherwise), takes the uffds restorers hand over
and fills them until every process is complete.

Start-up is part of a migration's downtime (``criu restore`` waits for the
daemon), so the command listens first and says so on ``--status-fd`` at once,
having loaded little more than argparse; only then does it import the daemon,
read the images (without protobuf's runtime) and connect to the page server
(docs/operating.md has the figures). A restorer that connects meanwhile waits
in the socket's backlog with its uffd; a fault of its process waits in the
kernel until the daemon reads it. Should the start-up then fail,
restorers already queued are not dropped (their processes would read missing
pages as zeros): a daemon whose source failed takes them and kills their
processes, so that their restores fail now (:func:`_failed_daemon`); only if
the images cannot be read either are they held, see
:func:`~lazymig.cli._common.hold_after_failed_start`.
"""

from __future__ import annotations

import argparse
import contextlib

from lazymig.cli._common import (
    Parser,
    accept_queued,
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
    cancelled_by_signals,
    hold_after_failed_start,
    run_async,
    signal_ready,
    tls_config,
    wire_version,
)

TYPE_CHECKING = False  # typing is not imported before the socket listens
if TYPE_CHECKING:
    import socket
    from pathlib import Path

    from lazymig.proto.images import ImagesDir
    from lazymig.uffd.daemon import LazyPagesDaemon
    from lazymig.uffd.source import ReconnectPolicy, RemotePageSource


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "lazy-pages", help="fill restored processes' memory on demand (restore side)",
        description="Receive userfaultfds from restorers over a UNIX socket and fill them "
                    "from a page server (--page-server) or from the images (local mode).")
    add_images_dir_option(parser)
    parser.add_argument("-W", "--work-dir", metavar="DIR",
                        help="where lazy-pages.socket lives (default: the images dir)")
    parser.add_argument("--socket", metavar="PATH",
                        help="the UNIX socket path (default: WORK_DIR/lazy-pages.socket)")
    parser.add_argument("--page-server", action="store_true",
                        help="get pages from a page server at --address/--port")
    add_server_address_options(parser, default_address="127.0.0.1")
    add_wire_option(parser)
    add_tls_options(parser)
    parser.add_argument("--wait-for-page-server", type=float, default=0.0, metavar="SECONDS",
                        help="try connecting to the page server again (every 20 ms) until it "
                             "answers, for up to SECONDS: the daemon may then start, and "
                             "restorers connect, before the dump (default 0: one try)")
    parser.add_argument("--channels", type=int, choices=[1, 2], default=1,
                        help="2 = faults on a connection of their own (lazymig's page server "
                             "only; CRIU's accepts one connection)")
    add_reconnect_options(parser)
    parser.add_argument("--no-background", dest="background", action="store_false",
                        help="fetch only what faults ask for")
    parser.add_argument("--fault-poll", type=float, default=None, metavar="SECONDS",
                        help="how long to spin for a fault's reply instead of sleeping "
                             "(default 0.0005; 0: never spin, e.g. on a host whose CPUs are "
                             "all busy)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep serving new restores after every process is complete")
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write a zero byte to FD once the socket listens (at once: the "
                             "rest of the start-up follows; restorers wait in the backlog)")
    parser.set_defaults(func=lazy_pages)


def add_reconnect_options(parser: argparse.ArgumentParser) -> None:
    """How the page-server client survives a lost connection (ReconnectPolicy)."""
    group = parser.add_argument_group(
        "connection loss", "a lost page-server connection is re-established and every "
        "unanswered request sent again; meanwhile faulting threads wait. Only when that "
        "fails are the restored processes killed.")
    group.add_argument("--reconnect-attempts", type=int, default=8, metavar="N",
                       help="connections in a row that bring no reply before giving up "
                            "(default 8; 0 = never reconnect)")
    group.add_argument("--reconnect-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="give up this long after the loss (default 30)")
    group.add_argument("--stall-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a connection whose requests get no byte back this long is "
                            "lost (a dead link sends no reset; default 10; 0 = off)")


def lazy_pages(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lazymig._listen import SOCKET_NAME, listen_unix

    images_dir = Path(args.images_dir)
    socket_path = Path(args.socket) if args.socket else \
        Path(args.work_dir or images_dir) / SOCKET_NAME
    listener = listen_unix(socket_path)
    signal_ready(args.status_fd)
    return run_async(args, _serve(args, images_dir, socket_path, listener))


async def _serve(args: argparse.Namespace, images_dir: Path, socket_path: Path,
                 listener: socket.socket) -> int:
    import asyncio

    with cancelled_by_signals("the lazy-pages daemon") as received:
        try:
            try:
                daemon = await _start(args, images_dir, socket_path, listener)
            except Exception as exc:
                failed = _failed_daemon(exc, images_dir, socket_path, listener)
                if failed is None:
                    await hold_after_failed_start(_take_restorers(listener, socket_path), exc,
                                                  "restorer(s) handed processes over")
                else:
                    await failed.run()
                raise
            except BaseException as exc:
                await hold_after_failed_start(_take_restorers(listener, socket_path), exc,
                                              "restorer(s) handed processes over")
                raise
            report = await daemon.run()
        except asyncio.CancelledError:
            if received:  # the daemon killed what it could not finish
                return 128 + received[0]
            raise
    return 0 if report.ok else 1


async def _start(args: argparse.Namespace, images_dir: Path, socket_path: Path,
                 listener: socket.socket) -> LazyPagesDaemon:
    """Everything after the socket listens: imports, the page source, the images (a
    prepared daemon waits for them to be complete)."""
    from lazymig.proto.images import ImagesDir
    from lazymig.uffd.daemon import LazyPagesDaemon
    from lazymig.uffd.source import LocalPageSource, PageSource, ReconnectPolicy

    reconnect = ReconnectPolicy(attempts=args.reconnect_attempts, timeout=args.reconnect_timeout,
                                stall_timeout=args.stall_timeout or None)
    source: PageSource
    if args.page_server:
        source = await _connect(args, reconnect)
        if args.wait_for_page_server:
            try:
                await _images_complete(ImagesDir(images_dir), args.wait_for_page_server,
                                       source)
            except BaseException:
                source.abort()
                raise
    else:
        source = LocalPageSource(ImagesDir(images_dir))
    try:
        return LazyPagesDaemon.from_images(
            source, images_dir, socket_path=socket_path, serve_forever=args.keep_running,
            background=args.background, listener=listener,
            **({} if args.fault_poll is None else {"fault_poll": args.fault_poll}))
    except BaseException:
        source.abort()
        raise


async def _images_complete(images: ImagesDir, seconds: float,
                           source: RemotePageSource) -> None:
    """Return once ``images`` holds a complete dump (its ``inventory.img``, which a dump
    writes last). A prepared daemon connects to ``lazymig dump``'s page server as soon
    as it listens, which is from the dump's start (peers wait in its backlog), before
    its images are written (:class:`~lazymig.proto.images.ImagesWait`, as
    lazymig/restore/prepared.py waits).

    Raises the source's error as soon as it failed: a dump that dies (or fails) before
    its images are written resets the connection queued in its backlog, and no image
    will come then."""
    import asyncio

    from lazymig.errors import BrokenResourceError
    from lazymig.proto.images import ImagesWait

    wait = ImagesWait(images, seconds)
    for pause in wait.pauses():
        if source.failure is not None:
            raise BrokenResourceError(
                f"the page server went away before a complete dump came to {images.path}: "
                f"{source.failure}") from source.failure
        await asyncio.sleep(pause)
    if not wait.complete:
        raise BrokenResourceError(
            f"the page server answered, but no complete dump came to {images.path} in "
            f"{seconds:g} s ({wait.inventory.name}, which a dump writes last): is the dump "
            "writing there (or its images being copied there)?")


def _failed_daemon(error: Exception, images_dir: Path, socket_path: Path,
                   listener: socket.socket) -> LazyPagesDaemon | None:
    """After a start-up that failed with ``error`` once the images are readable (the page
    server unreachable, or gone during the start-up): a daemon on a source that failed,
    for the restorers queued meanwhile. It takes their processes and kills each as soon
    as it can name it (the restore then fails at once), as a running daemon does when
    its source fails for good: none runs on pages that never arrived, none waits for
    them. None if nobody is queued (the socket is unlinked first: nobody else comes) or
    the images cannot be read (the processes could not be named: they are held, see
    :func:`~lazymig.cli._common.hold_after_failed_start`)."""
    import logging
    import select

    from lazymig.errors import ImageError, LazyMigError
    from lazymig.proto.images import ImagesDir
    from lazymig.uffd.daemon import LazyPagesDaemon
    from lazymig.uffd.source import FailedPageSource

    socket_path.unlink(missing_ok=True)
    if isinstance(error, ImageError) or not select.select([listener], [], [], 0)[0]:
        return None  # the images are what failed, or nobody is in the backlog
    try:  # read now: a process must be named by its lazy ranges before it is killed
        images = ImagesDir(images_dir)
        ranges = {pid: [(r.vaddr, r.nr_pages) for r in images.lazy_ranges(pid)]
                  for pid in images.pstree_pids() if images.has_memory(pid)}
    except (LazyMigError, OSError) as exc:
        logging.getLogger("lazymig").error("after the failed start-up, the images cannot be "
                                           "read either: %s", exc)
        return None
    daemon = LazyPagesDaemon(
        FailedPageSource(error), lambda pid: ranges.get(pid, []), socket_path=socket_path,
        listener=listener, expect_tasks=None)
    logging.getLogger("lazymig").error(
        "the start-up failed (%s) after restorers connected: their processes are killed "
        "as soon as they are named, so that their restores fail now", error)
    return daemon


_WAIT_RETRY = 0.02
"""Seconds between tries while waiting for the page server (``--wait-for-page-server``):
a refused connection costs a round trip, and the restore may be waiting."""


async def _connect(args: argparse.Namespace, reconnect: ReconnectPolicy) -> RemotePageSource:
    """The page-server connection; refused or unanswered, tried again every
    :data:`_WAIT_RETRY` until ``--wait-for-page-server`` seconds have passed (a TLS
    refusal is final)."""
    import asyncio
    import logging

    from lazymig.errors import BrokenResourceError
    from lazymig.uffd.source import RemotePageSource

    loop = asyncio.get_running_loop()
    give_up = loop.time() + args.wait_for_page_server
    told = False
    while True:
        try:
            return await RemotePageSource.connect(
                args.address, args.port, wire=wire_version(args), channels=args.channels,
                tls=tls_config(args), reconnect=reconnect)
        except BrokenResourceError as exc:
            if loop.time() + _WAIT_RETRY > give_up:
                raise
            if not told:
                told = True
                logging.getLogger(__name__).info(
                    "waiting up to %g s for the page server at %s:%d (%s)",
                    args.wait_for_page_server, args.address, args.port, exc.__cause__)
        await asyncio.sleep(_WAIT_RETRY)


def _take_restorers(listener: socket.socket, socket_path: Path) -> list[socket.socket]:
    """After a failed start-up: unlink the socket (no restorer finds it any more) and
    take those queued. Each is told GUARDED: when this command exits, lazymig's
    guardian then kills the processes (EOF without TRANSFER_COMPLETE); CRIU's restorer
    has none, so the log says to kill them."""
    from lazymig.errors import BrokenResourceError
    from lazymig.proto.handover import Guarded, Role
    from lazymig.uffd.handover import HandoverSession

    socket_path.unlink(missing_ok=True)
    queued = accept_queued(listener)
    for conn in queued:
        # 4 bytes into an empty buffer: never blocks. The socket stays the caller's.
        with contextlib.suppress(BrokenResourceError):  # a restorer gone already
            HandoverSession(conn, Role.DAEMON).send_nowait(Guarded())
    return queued
