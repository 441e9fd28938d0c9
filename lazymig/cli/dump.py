"""``lazymig dump -t PID -D DIR [--lazy-pages --port P]``: CRIU's ``dump`` for one process.

    lazymig dump -t 1234 -D /srv/dump --lazy-pages --port 9876 [--address A] [--wire v1]
    lazymig dump -t 1234 -D /srv/dump [--leave-running]      # plain: every page on disk
    lazymig dump -t 1234 -D /srv/3 --track-mem --prev-images-dir ../2 [--lazy-pages ...]

After ``lazymig pre-dump`` (``--prev-images-dir``, relative to -D as with CRIU)
only the pages written since that pre-dump have data or stay lazy; the others
are PE_PARENT entries, read by the restore through the ``parent`` links.

With ``--lazy-pages`` the lazy pages stay in the frozen source and a page
server hands them out until a client has them all and says CLOSE; then the
source is killed (or resumed, ``--leave-running``) and the command exits 0.
``--status-fd`` gets a zero byte once the images are written and the server
listens. Its socket listens from the command's start, before anything heavy is
imported: a daemon that connects early waits in the backlog, and nothing is
served before the images are written. SIGINT/SIGTERM abort the transfer: the
source is left stopped with its memory intact, and the exit status is 128 + the
signal number.
"""

from __future__ import annotations

import argparse

from lazymig.cli._common import (
    Parser,
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
    cancelled_by_signals,
    run_async,
    signal_ready,
    tls_config,
    wire_version,
)
from lazymig.cli.pre_dump import add_track_options, parent_dir

TYPE_CHECKING = False  # --help loads no typing (nor pathlib)
if TYPE_CHECKING:
    import socket
    from pathlib import Path


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "dump", help="freeze a process and dump it (lazily with --lazy-pages)",
        description="Dump a process into an images directory, like `criu dump`. With "
                    "--lazy-pages its lazy pages are served from the frozen source over TCP "
                    "until a lazy-pages daemon has them all.")
    parser.add_argument("-t", "--tree", type=int, required=True, metavar="PID",
                        help="the process to dump (all its threads)")
    add_images_dir_option(parser)
    parser.add_argument("--lazy-pages", action="store_true",
                        help="leave lazy-capable pages in the source and serve them")
    add_server_address_options(parser, default_address="0.0.0.0")
    add_wire_option(parser)
    add_tls_options(parser)
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write a zero byte to FD once the images are written (and, with "
                             "--lazy-pages, the page server listens)")
    parser.add_argument("-R", "--leave-running", action="store_true",
                        help="resume the process after the dump instead of killing it")
    add_track_options(parser)
    parser.set_defaults(func=dump_command)


def dump_command(args: argparse.Namespace) -> int:
    listener = None
    if args.lazy_pages:
        # Listening before anything heavy is imported: a lazy-pages daemon started
        # beside the dump connects at once and waits in the backlog, served once the
        # images are written (and ready reported), never earlier.
        from lazymig._listen import listen_tcp

        listener = listen_tcp(args.address, args.port)
    try:
        return run_async(args, _dump(args, parent_dir(args), listener))
    finally:
        if listener is not None:
            listener.close()  # the page server's once it took it; idempotent


async def _dump(args: argparse.Namespace, parent: Path | None,
                listener: socket.socket | None) -> int:
    """The command on the event loop; a stop signal cancels it (the source is kept)."""
    import asyncio

    from lazymig.dump.dumper import LazyDump, dump

    with cancelled_by_signals("the dump") as received:
        precopy = None
        if parent is not None:  # pre-copy's machinery is loaded only after a pre-dump
            from lazymig.dump.precopy import PreCopy

            precopy = await PreCopy.resume(args.tree, parent)
        try:
            if args.lazy_pages:
                async with LazyDump(args.tree, args.images_dir, address=args.address,
                                    port=args.port, wire=wire_version(args), tls=tls_config(args),
                                    leave_running=args.leave_running, precopy=precopy,
                                    listener=listener) as lazy:
                    signal_ready(args.status_fd)
                    await lazy.serve()
            else:
                await dump(args.tree, args.images_dir, leave_running=args.leave_running,
                           precopy=precopy)
                signal_ready(args.status_fd)
        except asyncio.CancelledError:
            if received:
                return 128 + received[0]
            raise
        finally:
            if precopy is not None:  # the tracking ends (the keeper with it)
                await precopy.aclose()
    return 0
