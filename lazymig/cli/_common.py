"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from lazymig.proto.wire import WireVersion

_T = TypeVar("_T")


def add_wire_option(parser: argparse.ArgumentParser) -> None:
    """``--wire v1|v2``: the page-server header layout."""
    parser.add_argument(
        "--wire", type=WireVersion, choices=list(WireVersion), default=WireVersion.V2,
        metavar="{v1,v2}",
        help="page-server header layout: v1 = CRIU <= 4.1 (24 bytes), "
             "v2 = CRIU >= 4.2 (32 bytes, default)")


def add_server_address_options(parser: argparse.ArgumentParser, *, default_address: str) -> None:
    """CRIU's ``--address`` and ``--port``."""
    parser.add_argument("--address", default=default_address,
                        help=f"page server address (default {default_address})")
    parser.add_argument("--port", type=int, default=27,
                        help="page server TCP port (CRIU's default is 27)")


def add_images_dir_option(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """CRIU's ``-D/--images-dir``."""
    parser.add_argument("-D", "--images-dir", required=required, metavar="DIR",
                        help="directory of the images")


def run_async(args: argparse.Namespace, main: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on uvloop (unless --no-uvloop) or asyncio's loop."""
    if args.uvloop:
        return uvloop.run(main)
    return asyncio.run(main)


def signal_ready(status_fd: int | None) -> None:
    """CRIU's --status-fd: write one zero byte when ready, then close the fd."""
    if status_fd is not None:
        try:
            os.write(status_fd, b"\0")
        finally:
            os.close(status_fd)
