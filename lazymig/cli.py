"""The ``lazymig`` command line: one client of the library.

Options keep CRIU's names and meanings where the same thing is meant
(``-t``, ``-D``, ``--lazy-pages``, ``--page-server``, ``--address``,
``--port``, ``--status-fd``, ``-d``, ``-v``); every command that speaks the
page-server protocol takes ``--wire v1|v2`` (v1 for CRIU up to 4.1, v2 for
CRIU 4.2 and later, the default).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from lazymig._version import __version__
from lazymig.errors import LazyMigError
from lazymig.proto.wire import WireVersion

__all__ = ["main"]

log = logging.getLogger("lazymig")

Command = Callable[[argparse.Namespace], int]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lazymig",
        description="Post-copy (lazy pages) process migration, compatible with CRIU.")
    parser.add_argument("--version", action="version", version=f"lazymig {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True,
                        help="run on uvloop (default when installed)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _COMMANDS:
        register(commands)
    return parser


# Each subcommand module exposes register(subparsers), which sets func=<Command>.
_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lazymig`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    func: Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except LazyMigError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
