"""``lazymig demo``: a lazy migration on loopback, with its numbers (see lazymig.demo)."""

from __future__ import annotations

import argparse
import sys

from lazymig.cli._common import Parser, add_wire_option, run_async, wire_version

TYPE_CHECKING = False  # --help and --version load no typing
if TYPE_CHECKING:
    from lazymig.orchestrate import TransferProgress


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "demo", help="migrate a live process lazily over 127.0.0.1 (needs root)",
        description="Start a process whose data region has a known checksum, dump it "
                    "with --lazy-pages, restore it through lazymig's lazy-pages daemon, "
                    "show the transfer's progress, check that the restored process prints "
                    "the same checksum, and print the numbers.")
    parser.add_argument("--size", type=int, default=256, metavar="MIB",
                        help="size of the process's data region (default 256 MiB)")
    parser.add_argument("--cold", action="store_true",
                        help="do not touch guest memory first, as the benchmarks do (on a VM "
                             "the host's first touch of each page is then measured too)")
    add_wire_option(parser)
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from lazymig.demo import format_result, run_demo
    from lazymig.demo.bar import progress_line

    live = sys.stderr.isatty()
    last: list[TransferProgress] = []

    def show(snapshot: TransferProgress) -> None:
        last[:] = [snapshot]
        if live:
            print(f"\r{progress_line(snapshot)}", end="", file=sys.stderr, flush=True)

    result = run_async(args, run_demo(args.size, wire=wire_version(args), warm=not args.cold,
                                       on_progress=show))
    if live:
        print(file=sys.stderr)  # keep the bar's last state on its line
    elif last:  # not a terminal: the bar's final state only
        print(progress_line(last[0]), file=sys.stderr)
    print(format_result(result))
    return 0 if result.ok else 1
