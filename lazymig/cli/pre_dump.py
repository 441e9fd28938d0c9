"""``lazymig pre-dump -t PID -D DIR --track-mem [--prev-images-dir ../PREV]``: CRIU's
``pre-dump``, where CRIU cannot (this kernel has no soft-dirty bits).

    lazymig pre-dump -t 1234 -D /srv/1 --track-mem
    lazymig pre-dump -t 1234 -D /srv/2 --track-mem --prev-images-dir ../1
    lazymig dump -t 1234 -D /srv/3 --track-mem --prev-images-dir ../2 [--lazy-pages ...]

With ``--page-server --address A --port P`` the pages go to a page server on the
destination instead (``lazymig page-server -D DIR --port P [--prev-images-dir
../PREV]``, or ``criu page-server``: :mod:`lazymig.dump.push`); DIR keeps the
tracking record and which pages the server holds, for the next pre-dump or the dump.

The process runs on. The first pre-dump copies every page of it into DIR;
each next one only the pages written since the one before (the others are
PE_PARENT entries, and ``DIR/parent`` links to PREV, as CRIU writes them). Its
writes are tracked with a userfaultfd in async write-protect mode
(:mod:`lazymig.dump.track`), held between commands by a small keeper process
(:mod:`lazymig.dump.keeper`) that the dump ends.
"""

from __future__ import annotations

import argparse

from lazymig.cli._common import (
    Parser,
    add_images_dir_option,
    add_server_address_options,
    add_wire_option,
    run_async,
    wire_version,
)

TYPE_CHECKING = False  # --help loads no typing (nor pathlib)
if TYPE_CHECKING:
    from pathlib import Path


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "pre-dump", help="copy a running process's memory, or what it wrote since the last "
                         "pre-dump",
        description="Copy the memory of a running process into an images directory, like "
                    "`criu pre-dump --track-mem`: the first time every page, then only the "
                    "pages written since the pre-dump given with --prev-images-dir. End the "
                    "chain with `lazymig dump --track-mem --prev-images-dir`.")
    parser.add_argument("-t", "--tree", type=int, required=True, metavar="PID",
                        help="the process (all its threads); it is not stopped")
    add_images_dir_option(parser)
    add_track_options(parser)
    parser.add_argument("--page-server", action="store_true",
                        help="push the pages to a page server (criu or lazymig page-server "
                             "-D DIR --port P on the destination) instead of into -D")
    add_server_address_options(parser, default_address="127.0.0.1")
    add_wire_option(parser)
    parser.set_defaults(func=pre_dump_command)


def add_track_options(parser: argparse.ArgumentParser) -> None:
    """``--track-mem`` and ``--prev-images-dir`` (``pre-dump`` and ``dump``)."""
    parser.add_argument("--track-mem", action="store_true",
                        help="track the pages the process writes (userfaultfd write-protect)")
    parser.add_argument("--prev-images-dir", metavar="DIR",
                        help="the previous pre-dump, relative to -D (as CRIU): only pages "
                             "written since it are copied")


def parent_dir(args: argparse.Namespace) -> Path | None:
    """The previous pre-dump's dir, after checking the options go together."""
    from pathlib import Path

    from lazymig.errors import ConfigurationError

    if args.prev_images_dir is not None and not args.track_mem:
        raise ConfigurationError("--prev-images-dir needs --track-mem: the pages written "
                                 "since the previous pre-dump are known only if tracked")
    if args.prev_images_dir is None:
        return None
    return Path(args.images_dir, args.prev_images_dir)


def pre_dump_command(args: argparse.Namespace) -> int:
    from lazymig.errors import ConfigurationError

    if not args.track_mem:
        raise ConfigurationError("lazymig pre-dump needs --track-mem: without it the next "
                                 "dump could not tell which pages changed since")
    return run_async(args, _pre_dump(args, parent_dir(args)))


async def _pre_dump(args: argparse.Namespace, parent: Path | None) -> int:
    from pathlib import Path

    from lazymig.dump.precopy import PreCopy
    from lazymig.dump.push import PushTarget

    images = Path(args.images_dir)
    push = PushTarget(args.address, args.port, wire_version(args)) if args.page_server else None
    if parent is None:
        precopy = await PreCopy.start(args.tree, images.parent)
    else:
        precopy = await PreCopy.resume(args.tree, parent)
    try:
        await precopy.round(images, push=push)
        await precopy.park()
    except BaseException:
        await precopy.aclose()
        raise
    return 0
