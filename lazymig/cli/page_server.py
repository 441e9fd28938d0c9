"""``lazymig page-server --lazy-pages -D DIR``: serve the lazy pages of a dump on disk.

It stands in for ``criu page-server --lazy-pages``: the images may come from
``criu dump`` or from lazymig.

As ``lazymig lazy-pages``, it listens and says so on ``--status-fd`` before it
imports the server and reads the images: a daemon that connects meanwhile is
queued by the kernel, and its first request waits until the server reads it.
Should the start-up then fail, daemons already connected are held, unanswered
(see :func:`~lazymig.cli._common.hold_after_failed_start`).
"""

from __future__ import annotations

import argparse
import socket

from lazymig.cli._common import (
    accept_queued,
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
    hold_after_failed_start,
    run_async,
    signal_ready,
    tls_config,
)
from lazymig.errors import ConfigurationError


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "page-server", help="serve the lazy pages of a dump on disk over TCP",
        description="Serve the lazy pages of an images directory (CRIU's "
                    "`page-server --lazy-pages`) until a client has them all.")
    parser.add_argument("--lazy-pages", action="store_true",
                        help="serve lazy pages (the only mode lazymig's page server has)")
    add_images_dir_option(parser)
    add_server_address_options(parser, default_address="0.0.0.0")
    add_wire_option(parser)
    add_tls_options(parser)
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write a zero byte to FD once listening (at once: the images are "
                             "read afterwards; clients wait in the backlog)")
    parser.set_defaults(func=page_server)


def page_server(args: argparse.Namespace) -> int:
    from lazymig._listen import listen_tcp

    if not args.lazy_pages:
        raise ConfigurationError("lazymig's page server only serves lazy pages: add --lazy-pages")
    listener = listen_tcp(args.address, args.port)
    signal_ready(args.status_fd)
    try:
        return 0 if run_async(args, _serve(args, listener)) else 1
    finally:
        listener.close()  # the server's, once it took it; idempotent


async def _serve(args: argparse.Namespace, listener: socket.socket) -> bool:
    try:
        from lazymig.dump.server import PageServer
        from lazymig.dump.store import ImagesPageStore
        from lazymig.proto.images import ImagesDir

        store = ImagesPageStore(ImagesDir(args.images_dir))
        try:  # certificates are loaded here
            server = PageServer(store, address=args.address, port=args.port, wire=args.wire,
                                tls=tls_config(args), listener=listener)
        except BaseException:
            store.close()
            raise
    except BaseException as exc:
        await hold_after_failed_start(accept_queued(listener), exc,
                                      "lazy-pages daemon(s) connected")
        raise
    try:
        async with server:
            return await server.serve()
    finally:
        store.close()
