"""``lazymig restore``: restore a process dumped by ``lazymig dump`` (``criu restore``).

    lazymig restore -D /tmp/1 [--lazy-pages] [-d]

With ``--lazy-pages`` the pages the dump left on its page server are handed to
the lazy-pages daemon listening on ``DIR/lazy-pages.socket`` (``-W`` or
``--socket`` to look elsewhere); start ``lazymig lazy-pages`` first.

The restored process gets its dumped pid back, its threads and children
theirs: where those are taken here (on the machine of a stopped source) in a
new pid namespace of the restored tree's own, where they see their dumped pids
and this host others; ``--new-pids`` gives new pids instead. It gets its fds
back, 0, 1 and 2 included (a log file at its offset, /dev/null...). Where fds
0-2 were something that stayed on the source host (a terminal, a socket, a
pipe to another process), ``--shell-job`` gives it the restorer's own fds 0-2
there, and ``--inherit-fd fd[N]:NAME`` this restorer's fd N in place of the
dumped file NAME (the refusal names it); without them such a restore is
refused. With ``-d`` the restorer prints the restored pid (as this host sees
it) on stdout and exits once the process runs;
otherwise it waits for the process and exits with its status (128 + the
signal number if it was killed).
``--pidfile FILE`` (CRIU's) writes that pid to FILE once the process runs.
A restored process that writes to fds the restorer gave it (``--shell-job``)
goes on writing there after ``-d`` exits: ``PID=$(lazymig restore -d ...)``
would wait for it too, as it holds that stdout pipe; redirect the output and
read the pid file instead.

A prepared destination (``--wait-for-images SECONDS``, see
:mod:`lazymig.restore.prepared`): started before the dump ends, the command
loads everything, says so on ``--status-fd``, waits for the images to be
complete (their ``inventory.img``, which a dump writes last) and restores at
once, so that its start-up is not part of the downtime::

    lazymig lazy-pages --page-server --wait-for-page-server 60 ... -D /tmp/1 &
    lazymig restore --lazy-pages -D /tmp/1 -d --wait-for-images 60 &
    # then, on the source: lazymig dump --lazy-pages ... (images to /tmp/1)

After a pre-copy, ``--pre-dumps DIR`` (with ``--wait-for-images``) builds the
process's memory from the pre-dump rounds while it waits: each one that comes
to a subdirectory of DIR (a ``lazymig page-server -D DIR/N`` per ``pre-dump
--page-server``) is written into the process-to-be as it arrives, and the
restore only moves those pages into place (:mod:`lazymig.restore.premap`)::

    lazymig restore --lazy-pages -D /dst/3 -d --wait-for-images 600 --pre-dumps /dst &
"""

from __future__ import annotations

import argparse
import os
import sys

from lazymig.cli._common import Parser, add_images_dir_option, run_async, signal_ready


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    parser = commands.add_parser(
        "restore", help="restore a process dumped by `lazymig dump` (destination side)",
        description="Rebuild a dumped process, its threads too, in a new process and let it run; "
                    "with --lazy-pages its lazy memory comes through a lazy-pages daemon. "
                    "Its fds come back as they were; fds 0-2 that stayed on the source host "
                    "(a terminal, a pipe) become this command's with --shell-job: its "
                    "output then goes where this command's goes, after -d exits too.")
    add_images_dir_option(parser)
    parser.add_argument("--lazy-pages", action="store_true",
                        help="hand the lazy pages to the lazy-pages daemon")
    parser.add_argument("-W", "--work-dir", metavar="DIR",
                        help="where lazy-pages.socket lives (default: the images dir)")
    parser.add_argument("--socket", metavar="PATH",
                        help="the daemon's UNIX socket (default: WORK_DIR/lazy-pages.socket)")
    parser.add_argument("-j", "--shell-job", action="store_true",
                        help="fds 0-2 that stayed on the source host (a terminal, a socket, a "
                             "pipe to another process) become the restorer's own")
    parser.add_argument("--inherit-fd", action="append", default=[], metavar="fd[N]:NAME",
                        help="this restorer's fd N takes the place of the dumped file NAME "
                             "(pipe:[INO], socket:[INO] or a path; repeatable)")
    parser.add_argument("--new-pids", action="store_true",
                        help="restore under new pids (default: the dumped ones, in a new pid "
                             "namespace of the tree's own where they are taken here)")
    parser.add_argument("-d", "--restore-detached", dest="detach", action="store_true",
                        help="print the restored pid and exit once it runs")
    parser.add_argument("--pidfile", metavar="FILE",
                        help="write the restored pid to FILE once it runs (the restored "
                             "process's fds 0-2 are this command's: with -d it goes on "
                             "writing to this stdout, so `$(lazymig restore -d)` would wait "
                             "for it; redirect the output and read FILE instead)")
    parser.add_argument("--wait-for-images", type=float, default=0.0, metavar="SECONDS",
                        help="a prepared destination: start before the dump ends, load "
                             "everything, then restore as soon as the images are complete "
                             "(inventory.img, which a dump writes last, is in the images "
                             "dir), waiting up to SECONDS for them")
    parser.add_argument("--pre-dumps", metavar="DIR",
                        help="with --wait-for-images, after a pre-copy: put the pages of each "
                             "pre-dump round that comes to a subdirectory of DIR (a page "
                             "server's -D DIR/N) in place while waiting, so that the restore "
                             "only moves them")
    parser.add_argument("--status-fd", type=int, metavar="FD",
                        help="write one zero byte to FD once loaded and ready to restore "
                             "(with --wait-for-images: waiting for the images), then close it")
    parser.set_defaults(func=restore)


def restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lazymig._listen import SOCKET_NAME
    from lazymig.restore import InheritFd, Restorer, RestoreResult  # only when it runs

    images_dir = Path(args.images_dir)
    socket_path = Path(args.socket) if args.socket else \
        Path(args.work_dir or images_dir) / SOCKET_NAME
    inherit = [InheritFd.parse(text) for text in args.inherit_fd]
    restorer = Restorer(images_dir, lazy_pages=args.lazy_pages, socket_path=socket_path,
                        inherit_fds=inherit, shell_job=args.shell_job, new_pids=args.new_pids)
    if args.pre_dumps and args.wait_for_images <= 0:
        print("lazymig restore: --pre-dumps needs --wait-for-images SECONDS (a prepared "
              "destination, started before the pre-dumps)", file=sys.stderr)
        return 2
    if args.pre_dumps:
        from lazymig.restore.prepared import follow_rounds

        async def prepared() -> RestoreResult:
            await follow_rounds(restorer, Path(args.pre_dumps), args.wait_for_images)
            return await restorer.run()

        signal_ready(args.status_fd)
        result = run_async(args, prepared())
    else:
        if args.wait_for_images > 0:
            from lazymig.restore.prepared import wait_for_images

            if args.uvloop:
                import uvloop  # noqa: F401  (now, not once the images are there: run_async's)
            signal_ready(args.status_fd)  # loaded: what is left is the restore itself
            wait_for_images(restorer.images, args.wait_for_images,
                            daemon_socket=socket_path if args.lazy_pages else None)
        else:
            signal_ready(args.status_fd)
        result = run_async(args, restorer.run())
    if args.pidfile:
        write_pidfile(args.pidfile, result.pid)
    if args.detach:
        # One write(2): the restored process shares this stdout and already runs, and
        # print() may write the pid and its newline apart (PYTHONUNBUFFERED).
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), f"{result.pid}\n".encode())
        return 0
    status = restorer.wait()
    return 128 - status if status < 0 else status


def write_pidfile(path: str, pid: int) -> None:
    """``pid`` and a newline into ``path``, whole or not at all (a reader that polls for
    the file never sees it empty)."""
    from pathlib import Path

    partial = Path(f"{path}.{os.getpid()}.tmp")
    try:
        partial.write_text(f"{pid}\n")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
