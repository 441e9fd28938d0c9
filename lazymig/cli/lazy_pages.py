"""``lazymig lazy-pages``: the restore-side daemon, in place of ``criu lazy-pages``.

    lazymig lazy-pages --page-server --address SRC --port 9876 -D /tmp/1 [--wire v1]
    lazymig lazy-pages -D /tmp/1          # local mode: lazy pages from pages-N.img

It listens on ``DIR/lazy-pages.socket`` (CRIU's name; the work dir is the
images dir unless ``-W`` says otherwise), takes the uffds restorers hand over
and fills them until every process is complete.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from lazymig.cli._common import (
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
    cancelled_by_signals,
    run_async,
    signal_ready,
    tls_config,
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    parser.add_argument("--channels", type=int, choices=[1, 2], default=1,
                        help="2 = faults on a connection of their own (lazymig's page server "
                             "only; CRIU's accepts one connection)")
    add_reconnect_options(parser)
    parser.add_argument("--no-background", dest="background", action="store_false",
                        help="fetch only what faults ask for")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep serving new restores after every process is complete")
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write a zero byte to FD once the socket listens")
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
    from lazymig.errors import ConfigurationError
    from lazymig.proto.images import ImagesDir
    from lazymig.uffd.daemon import SOCKET_NAME, LazyPagesDaemon
    from lazymig.uffd.source import (
        LocalPageSource,
        PageSource,
        ReconnectPolicy,
        RemotePageSource,
    )

    images_dir = Path(args.images_dir)
    socket_path = Path(args.socket) if args.socket else \
        Path(args.work_dir or images_dir) / SOCKET_NAME

    try:
        reconnect = ReconnectPolicy(attempts=args.reconnect_attempts,
                                    timeout=args.reconnect_timeout,
                                    stall_timeout=args.stall_timeout or None)
    except ConfigurationError as exc:
        raise SystemExit(f"lazymig lazy-pages: {exc}") from exc

    async def serve() -> int:
        source: PageSource
        if args.page_server:
            source = await RemotePageSource.connect(args.address, args.port, wire=args.wire,
                                                    channels=args.channels, tls=tls_config(args),
                                                    reconnect=reconnect)
        else:
            source = LocalPageSource(ImagesDir(images_dir))
        daemon = LazyPagesDaemon.from_images(
            source, images_dir, socket_path=socket_path, serve_forever=args.keep_running,
            background=args.background)
        with cancelled_by_signals("the lazy-pages daemon") as received:
            try:
                async with asyncio.TaskGroup() as tg:
                    running = tg.create_task(daemon.run())
                    await daemon.ready.wait()
                    signal_ready(args.status_fd)
            except asyncio.CancelledError:
                if received:  # the daemon killed what it could not finish
                    return 128 + received[0]
                raise
        return 0 if running.result().ok else 1

    return run_async(args, serve())
