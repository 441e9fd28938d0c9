"""The ``lazymig`` command line: one client of the library.

Options keep CRIU's names and meanings where the same thing is meant
(``-t``, ``-D``, ``--lazy-pages``, ``--page-server``, ``--address``,
``--port``, ``--status-fd``, ``-d``, ``-v``); every command that speaks the
page-server protocol takes ``--wire v1|v2`` (v1 for CRIU up to 4.1, v2 for
CRIU 4.2 and later, the default).
"""

from __future__ import annotations

import argparse

from lazymig._version import __version__
from lazymig.cli import demo, dump, lazy_pages, page_server, pre_dump, restore
from lazymig.cli._common import Parser, setup_logging

TYPE_CHECKING = False  # --help and --version load no typing (nor logging)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["main"]


def build_parser() -> Parser:
    parser = Parser(
        prog="lazymig",
        description="Post-copy (lazy pages) process migration, compatible with CRIU.")
    parser.add_argument("--version", action="version", version=f"lazymig {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True,
                        help="run on uvloop (the default) or on asyncio's own loop")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for register in _COMMANDS:
        register(commands)
    for sub in commands.choices.values():  # `lazymig dump -v ...` works too, as with criu
        sub.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                         help="more log output (-v info, -vv debug)")
    return parser


_COMMANDS = [demo.register, dump.register, lazy_pages.register, page_server.register,
             pre_dump.register, restore.register]
"""Each subcommand module has register(subparsers), which sets func=<command>.

A subcommand imports its machinery only when it runs: `lazymig lazy-pages` must
start fast, since criu restore waits for it (it is part of the downtime)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lazymig`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and --version exit here, having loaded little
    if not getattr(args, "defer_logging", False):  # else the command sets it up when ready
        setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from lazymig.errors import LazyMigError

    try:
        return func(args)
    except (LazyMigError, OSError) as exc:  # OSError: e.g. an image that is not there
        import logging

        setup_logging(args.verbose)  # a command that defers it may fail before
        logging.getLogger("lazymig").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
