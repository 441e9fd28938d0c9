"""``lazymig demo``: a lazy migration on loopback, with its numbers (see lazymig.demo)."""

from __future__ import annotations

import argparse

from lazymig.cli._common import add_wire_option, run_async


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "demo", help="migrate a live process's memory lazily over 127.0.0.1 (needs root)",
        description="Start a process with a data region of known content, dump it with "
                    "lazymig's page server, and let a new process receive the region "
                    "lazily through lazymig's daemon; check the checksums and print the "
                    "numbers.")
    parser.add_argument("--size", type=int, default=64, metavar="MIB",
                        help="size of the migrated region (default 64 MiB)")
    add_wire_option(parser)
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from lazymig.demo import format_result, run_demo
    result = run_async(args, run_demo(args.size, wire=args.wire))
    print(format_result(result))
    return 0 if result.ok else 1
