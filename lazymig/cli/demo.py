"""``lazymig demo``: a lazy migration on loopback, with its numbers (see lazymig.demo)."""

from __future__ import annotations

import argparse

from lazymig.cli._common import add_wire_option, run_async


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo", help="migrate a live process lazily over 127.0.0.1 (needs root)",
        description="Start a process whose data region has a known checksum, dump it "
                    "with --lazy-pages, restore it through lazymig's lazy-pages daemon, "
                    "check that the restored process prints the same checksum, and print "
                    "the numbers.")
    parser.add_argument("--size", type=int, default=64, metavar="MIB",
                        help="size of the process's data region (default 64 MiB)")
    add_wire_option(parser)
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from lazymig.demo import format_result, run_demo
    result = run_async(args, run_demo(args.size, wire=args.wire))
    print(format_result(result))
    return 0 if result.ok else 1
