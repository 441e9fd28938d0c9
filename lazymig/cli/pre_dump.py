"""``lazymig pre-dump -t PID -D DIR --track-mem [--prev-images-dir ../PREV]``: CRIU's
``pre-dump``, where CRIU cannot (this kernel has no soft-dirty bits).

    lazymig pre-dump -t 1234 -D /srv/1 --track-mem
    lazymig pre-dump -t 1234 -D /srv/2 --track-mem --prev-images-dir ../1
    lazymig dump -t 1234 -D /srv/3 --track-mem --prev-images-dir ../2 [--lazy-pages ...]

The process runs on. The first pre-dump copies every page of it into DIR;
each next one only the pages written since the one before (the others are
PE_PARENT entries, and ``DIR/parent`` links to PREV, as CRIU writes them). Its
writes are tracked with a userfaultfd in async write-protect mode
(:mod:`lazymig.dump.track`), held between commands by a small keeper process
(:mod:`lazymig.dump.keeper`) that the dump ends.
"""

from __future__ import annotations

import argparse

from lazymig.cli._common import Parser, add_images_dir_option, run_async

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

    images = Path(args.images_dir)
    if parent is None:
        precopy = await PreCopy.start(args.tree, images.parent)
    else:
        precopy = await PreCopy.resume(args.tree, parent)
    try:
        await precopy.round(images)
        await precopy.park()
    except BaseException:
        await precopy.aclose()
        raise
    return 0
