"""``lazymig page-server --lazy-pages -D DIR``: serve the lazy pages of a dump on disk.

It stands in for ``criu page-server --lazy-pages``: the images may come from
``criu dump`` or from lazymig. Like CRIU's, it ends with its client's session
(CLOSE, or the connection's end once it asked for pages), whether or not every
page was fetched: a restored process that exits early never asks for the rest.
``--keep-serving`` serves one restore after another from the same dump
instead, until it is stopped (and lets a lazymig daemon whose link broke
reconnect).

Its start-up is part of a migration's downtime, and most of it is Python's:
the event loop alone takes several times what CRIU's whole start-up does. So
it listens first, reads the images (and loads the TLS certificates) with
nothing but the interpreter and argparse loaded, says ready on
``--status-fd``, and only then loads logging, asyncio, uvloop and the server:
a daemon that connects meanwhile is queued by the kernel and served once the
loop runs. Should the start-up fail (it can only fail before ready: on the
images, the options or the certificates), daemons already connected are
reset at once, so that their restores fail now instead of waiting for pages
that will never come. An orchestrator that waits for ``--status-fd`` before
it starts a restore never meets that case (a restore that already runs when
its daemon is reset would read its missing pages as zeros under CRIU's
daemon).
"""

from __future__ import annotations

import argparse

from lazymig.cli._common import (
    Parser,
    accept_queued,
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
    run_async,
    setup_logging,
    signal_ready,
    tls_config,
    wire_version,
)
from lazymig.errors import ConfigurationError
from lazymig.proto.constants import LINGER_RESET

TYPE_CHECKING = False  # typing is not imported before the socket listens
if TYPE_CHECKING:
    import socket

    from lazymig.dump.store import ImagesPageStore
    from lazymig.tls import ServerTls



def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "page-server", help="serve the lazy pages of a dump on disk over TCP, or take the "
                            "pages a pre-dump pushes",
        description="With --lazy-pages, serve the lazy pages of an images directory (CRIU's "
                    "`page-server --lazy-pages`) until the client closes its session. "
                    "Without, take the pages one `pre-dump --page-server` pushes into the "
                    "images directory (CRIU's `page-server`), then exit.")
    parser.add_argument("--lazy-pages", action="store_true",
                        help="serve the lazy pages of the dump in -D (else: receive pushed "
                             "pages into -D)")
    parser.add_argument("--prev-images-dir", metavar="DIR",
                        help="receiving: the dir that received the previous pre-dump, "
                             "relative to -D (as CRIU): -D/parent links to it")
    add_images_dir_option(parser)
    add_server_address_options(parser, default_address="0.0.0.0")
    add_wire_option(parser)
    add_tls_options(parser)
    parser.add_argument("--keep-serving", action="store_true",
                        help="serve on after a client's session ended, for the next restore "
                             "of the same dump or a lazymig daemon that reconnects, until "
                             "stopped (SIGTERM); by default the server ends with the first "
                             "session, as CRIU's does")
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write a zero byte to FD once ready to serve (the images read; "
                             "clients that connect earlier wait in the backlog)")
    parser.set_defaults(func=page_server, defer_logging=True)


def page_server(args: argparse.Namespace) -> int:
    from lazymig._listen import listen_tcp

    if not args.lazy_pages:
        return _receive_command(args)
    if args.prev_images_dir is not None:
        raise ConfigurationError("--prev-images-dir is for receiving pushed pages (without "
                                 "--lazy-pages)")
    listener = listen_tcp(args.address, args.port)
    try:
        try:
            store, tls = _read(args)
        except BaseException as exc:
            setup_logging(args.verbose)
            _reset_queued(listener, exc)
            raise
        try:
            # Ready: the images are read and the certificates loaded, so what is left of
            # the start-up (the event loop, the server; most of it) cannot fail on the
            # dump. A daemon that connects now waits in the backlog meanwhile.
            signal_ready(args.status_fd)
            setup_logging(args.verbose)
            run_async(args, _serve(args, listener, store, tls))
        finally:
            store.close()
        return 0
    finally:
        listener.close()  # the server's, once it took it; idempotent


def _receive_command(args: argparse.Namespace) -> int:
    """Receiving mode: one push session into -D (:mod:`lazymig.dump.receiver`)."""
    from lazymig._listen import listen_tcp

    setup_logging(args.verbose)

    if args.tls:
        raise ConfigurationError("receiving pushed pages over TLS is not implemented: drop --tls "
                                 "(or use `criu page-server --tls`)")
    if args.keep_serving:
        raise ConfigurationError("--keep-serving is for --lazy-pages: a receiving page server "
                                 "takes one pre-dump and exits, as CRIU's does")
    from lazymig.dump.receiver import link_prev_images, receive_pages

    if args.prev_images_dir is not None:
        link_prev_images(args.images_dir, args.prev_images_dir)
    listener = listen_tcp(args.address, args.port)
    try:
        signal_ready(args.status_fd)
        run_async(args, receive_pages(listener, args.images_dir, wire=wire_version(args)))
        return 0
    finally:
        listener.close()


def _read(args: argparse.Namespace) -> tuple[ImagesPageStore, ServerTls | None]:
    """What may fail on the dump or the options, before ``--status-fd`` says ready:
    the images (without asyncio, ctypes or protobuf) and the TLS certificates."""
    from lazymig.dump.store import ImagesPageStore
    from lazymig.proto.images import ImagesDir

    store = ImagesPageStore(ImagesDir(args.images_dir))
    try:
        config = tls_config(args)
        if config is None:
            return store, None
        from lazymig.tls import ServerTls

        return store, ServerTls.build(config, args.address)
    except BaseException:
        store.close()
        raise


async def _serve(args: argparse.Namespace, listener: socket.socket, store: ImagesPageStore,
                 tls: ServerTls | None) -> None:
    from lazymig.dump.server import PageServer, ServeUntil

    server = PageServer(store, address=args.address, port=args.port, wire=wire_version(args),
                        tls=tls, listener=listener,
                        until=ServeUntil.STOPPED if args.keep_serving else ServeUntil.SESSION)
    async with server:
        await server.serve()


def _reset_queued(listener: socket.socket, error: BaseException) -> None:
    """The start-up failed with ``error``: reset the daemons that connected meanwhile
    (their restores fail at once) and close the listener (later ones are refused)."""
    import logging
    import socket

    queued = accept_queued(listener)
    for conn in queued:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        conn.close()
    if queued:
        logging.getLogger("lazymig").error(
            "%d lazy-pages daemon(s) had connected before the start-up failed (%s): their "
            "connections were reset, so that their restores fail now", len(queued), error)
