"""``lazymig page-server --lazy-pages -D DIR``: serve the lazy pages of a dump on disk.

It stands in for ``criu page-server --lazy-pages``: the images may come from
``criu dump`` or from lazymig.
"""

from __future__ import annotations

import argparse

from lazymig.cli._common import (
    add_images_dir_option,
    add_server_address_options,
    add_tls_options,
    add_wire_option,
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
                        help="write a zero byte to FD once listening")
    parser.set_defaults(func=page_server)


def page_server(args: argparse.Namespace) -> int:
    from lazymig.dump.server import PageServer
    from lazymig.dump.store import ImagesPageStore
    from lazymig.proto.images import ImagesDir
    if not args.lazy_pages:
        raise ConfigurationError("lazymig's page server only serves lazy pages: add --lazy-pages")
    tls = tls_config(args)
    store = ImagesPageStore(ImagesDir(args.images_dir))

    async def serve() -> bool:
        async with PageServer(store, address=args.address, port=args.port,
                              wire=args.wire, tls=tls) as server:
            signal_ready(args.status_fd)
            return await server.serve()

    try:
        return 0 if run_async(args, serve()) else 1
    finally:
        store.close()
