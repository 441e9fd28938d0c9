"""Options and helpers shared by the subcommands.

Every subcommand module imports this one to build the parser, so it loads
nothing a command does not need before its work: no asyncio, uvloop, ssl or
construct (``lazymig lazy-pages`` binds its socket before any of them, see
:mod:`lazymig._listen`), nor logging, typing or dataclasses (``--help`` and
``--version`` load little more than argparse). tests/test_imports.py checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from lazymig.proto.constants import DEFAULT_CACERT, DEFAULT_CACRL, DEFAULT_CERT, DEFAULT_KEY

TYPE_CHECKING = False  # typing itself is not imported: see above
if TYPE_CHECKING:
    import socket
    from collections.abc import Coroutine, Iterator
    from typing import Any, TypeVar

    from lazymig.proto.wire import WireVersion
    from lazymig.tls import TlsConfig

    _T = TypeVar("_T")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own, told the terminal's width: argparse would ask ``shutil``, whose
    import loads bz2 and lzma (0.6 MiB that a daemon would keep) as each argument is
    added."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.stdout.fileno()).columns
            except (AttributeError, ValueError, OSError):  # not a terminal, or no stdout
                columns = 80
        super().__init__(prog, width=columns - 2)


class Parser(argparse.ArgumentParser):
    """The command line's parsers: argparse's, with :class:`HelpFormatter`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=HelpFormatter, **kwargs)


def add_wire_option(parser: argparse.ArgumentParser) -> None:
    """``--wire v1|v2``: the page-server header layout."""
    parser.add_argument(
        "--wire", choices=["v1", "v2"], default="v2",
        help="page-server header layout: v1 = CRIU <= 4.1 (24 bytes), "
             "v2 = CRIU >= 4.2 (32 bytes, default)")


def wire_version(args: argparse.Namespace) -> WireVersion:
    """The ``--wire`` given."""
    from lazymig.proto.wire import WireVersion

    return WireVersion(args.wire)


def add_server_address_options(parser: argparse.ArgumentParser, *, default_address: str) -> None:
    """CRIU's ``--address`` and ``--port``."""
    parser.add_argument("--address", default=default_address,
                        help=f"page server address (default {default_address})")
    parser.add_argument("--port", type=tcp_port, default=27,
                        help="page server TCP port (CRIU's default is 27)")


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port number, 0 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port number (0 to 65535)")
    return port


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """CRIU's ``--tls`` and ``--tls-*`` options (mutual certificate checks)."""
    group = parser.add_argument_group("TLS (as CRIU's)")
    group.add_argument("--tls", action="store_true",
                       help="use TLS to secure the page-server connection; both ends present "
                            "and check certificates")
    group.add_argument("--tls-cacert", metavar="FILE",
                       help="trust certificates signed only by this CA (default: the system's "
                            f"CAs and {DEFAULT_CACERT} if present)")
    group.add_argument("--tls-cacrl", metavar="FILE",
                       help=f"certificate revocation list (default: {DEFAULT_CACRL} if present)")
    group.add_argument("--tls-cert", metavar="FILE", default=DEFAULT_CERT,
                       help=f"our certificate (default {DEFAULT_CERT})")
    group.add_argument("--tls-key", metavar="FILE", default=DEFAULT_KEY,
                       help=f"its private key (default {DEFAULT_KEY})")
    group.add_argument("--tls-no-cn-verify", action="store_true",
                       help="do not check that the peer's certificate names the address given "
                            "(--address); the chain is still checked")


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS options given, or None without ``--tls`` (CRIU then ignores ``--tls-*``)."""
    if not args.tls:
        return None
    from lazymig.tls import TlsConfig
    return TlsConfig(cacert=args.tls_cacert, cacrl=args.tls_cacrl, cert=args.tls_cert,
                     key=args.tls_key, verify_cn=not args.tls_no_cn_verify)


def add_images_dir_option(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """CRIU's ``-D/--images-dir``."""
    parser.add_argument("-D", "--images-dir", required=required, metavar="DIR",
                        help="directory of the images")


def setup_logging(verbosity: int) -> None:
    """Log to stderr at WARNING, INFO (-v) or DEBUG (-vv); once (idempotent)."""
    import logging

    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def run_async(args: argparse.Namespace, main: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine on uvloop (unless --no-uvloop) or asyncio's loop."""
    if args.uvloop:
        import uvloop
        return uvloop.run(main)
    import asyncio
    return asyncio.run(main)


def signal_ready(status_fd: int | None) -> None:
    """CRIU's --status-fd: write one zero byte when ready, then close the fd.

    A standard stream (fd 0-2) is pointed at /dev/null instead of closed: a socket
    opened later would otherwise take its number, and libuv aborts on closing it.
    """
    if status_fd is None:
        return
    try:
        os.write(status_fd, b"\0")
    finally:
        if status_fd > 2:
            os.close(status_fd)
        else:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, status_fd)
            os.close(null)


@contextlib.contextmanager
def cancelled_by_signals(what: str) -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM/SIGHUP into a cancellation of the current task, so that
    its clean-up runs (a dying process would drop fds that others depend on).
    Yields the list of signals received: exit with 128 + the first one."""
    import asyncio  # loaded already: a loop is running
    import logging
    import signal
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signo: int) -> None:
        if not received:
            logging.getLogger("lazymig").warning("got %s: stopping %s",
                                                 signal.Signals(signo).name, what)
            task.cancel()
        received.append(signo)

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for signo in stop_signals:
        loop.add_signal_handler(signo, on_signal, signo)
    try:
        yield received
    finally:
        for signo in stop_signals:
            loop.remove_signal_handler(signo)


def accept_queued(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection the kernel queued on non-blocking ``listener``, then close it
    (later peers are refused)."""
    queued: list[socket.socket] = []
    with listener:
        while True:
            try:
                queued.append(listener.accept()[0])
            except BlockingIOError:
                return queued


async def hold_after_failed_start(held: list[socket.socket], error: BaseException,
                                  who: str) -> None:
    """The start-up failed with ``error`` after ``--status-fd`` said ready, and ``held``
    peers (``who``) connected meanwhile: keep their connections open, unanswered, until
    a stop signal (not at all if a signal is what stopped the start-up), then close them.

    Their processes then stop at their first missing page instead of reading it as
    zeros (which is what closing the connections would do to a CRIU restorer's uffd,
    and to CRIU's lazy-pages daemon, which exits when its page server goes away).
    """
    import asyncio  # loaded already: a loop is running
    import logging

    if not held:
        return
    until_stopped = not isinstance(error, asyncio.CancelledError)
    try:
        logging.getLogger("lazymig").error(
            "%d %s before the start-up %s: their lazy pages will never come, so their "
            "processes stop at their first missing page. Kill them%s", len(held), who,
            f"failed ({error})" if until_stopped else "was stopped",
            ", then stop this command (SIGTERM)" if until_stopped else "")
        if until_stopped:
            await asyncio.Future()  # until a stop signal cancels us
    finally:
        for conn in held:
            conn.close()
