"""``lazymig`` commands as child processes on a test host, awaited until ready, killed on demand.

A page server and a daemon as separate processes, on loopback or in two
network namespaces (:mod:`lazymig.testing.netns`), so that a test can kill one
of them (:meth:`LazymigCommand.kill`) under the code it exercises::

    async with LazymigCommand(["lazy-pages", "--page-server", "--address", addr,
                               "--port", "27", "-D", images], host=hosts.destination,
                              log_path=tmp_path / "daemon.log") as daemon:
        ...                            # restore through it, then:
        daemon.kill()                  # the daemon dies mid-transfer
        assert await daemon.wait() == -signal.SIGKILL

Entering waits for the command's ``--status-fd`` byte (CRIU's readiness
signal) without blocking the loop; leaving kills the command if it still runs
and reaps it. Its stderr goes to ``log_path`` (quoted when it fails to start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from lazymig._aio import wait_fd
from lazymig.errors import BrokenResourceError
from lazymig.testing.netns import Host

__all__ = ["LazymigCommand"]

log = logging.getLogger(__name__)

_LOG_TAIL = 4000  # characters of the command's log quoted in an error


class LazymigCommand:
    """``python -m lazymig -v [--no-uvloop] ARGS --status-fd W`` on ``host``.

    Args:
        args: the subcommand and its options (``["dump", "-t", pid, ...]``).
        host: where to run it (default: this network namespace).
        log_path: a file for its stderr.
        uvloop: run it on uvloop (``--uvloop``) or asyncio's loop.
        ready: pass ``--status-fd`` and wait for its byte on entry (only
            ``dump``, ``lazy-pages`` and ``page-server`` have one).
        ready_timeout: seconds to wait for it.
        stdout: an fd for its stdout (default: inherited).
    """

    def __init__(self, args: Sequence[object], *, log_path: str | os.PathLike[str],
                 host: Host | None = None, uvloop: bool = True, ready: bool = True,
                 ready_timeout: float = 30.0, stdout: int | None = None) -> None:
        self.args = [str(a) for a in args]
        self.host = host or Host("127.0.0.1")
        self.log_path = Path(log_path)
        self._uvloop = uvloop
        self._ready = ready
        self._ready_timeout = ready_timeout
        self._stdout = stdout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The child process (once entered)."""
        if self._process is None:
            raise RuntimeError("LazymigCommand.process exists only inside 'async with'")
        return self._process

    @property
    def pid(self) -> int:
        """The command's pid (``ip netns exec`` execs it: it is lazymig's own)."""
        return self.process.pid

    def log(self) -> str:
        """What the command wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def __aenter__(self) -> LazymigCommand:
        status_read = self._start()
        if status_read is not None:
            try:
                await self._wait_ready(status_read)
            except BaseException:
                self.close()
                raise
            finally:
                os.close(status_read)
        return self

    def _start(self) -> int | None:
        """Start the child; returns the read end of its status pipe (if ``ready``)."""
        if self._process is not None:
            raise RuntimeError("a LazymigCommand runs once")
        status_read = status_write = -1
        extra: list[str] = []
        if self._ready:
            status_read, status_write = os.pipe()
            os.set_blocking(status_read, False)
            extra = ["--status-fd", str(status_write)]
        argv = self.host.command([sys.executable, "-m", "lazymig", "-v",
                                  "--uvloop" if self._uvloop else "--no-uvloop",
                                  *self.args, *extra])
        try:
            with self.log_path.open("wb") as log_file:
                self._process = subprocess.Popen(
                    argv, stderr=log_file, stdout=self._stdout, stdin=subprocess.DEVNULL,
                    pass_fds=(status_write,) if self._ready else ())
        except BaseException:
            if status_read >= 0:
                os.close(status_read)
            raise
        finally:
            if status_write >= 0:
                os.close(status_write)
        log.debug("started %s as pid %d", " ".join(argv), self._process.pid)
        return status_read if self._ready else None

    async def _wait_ready(self, fd: int) -> None:
        try:
            async with asyncio.timeout(self._ready_timeout):
                while True:
                    try:
                        byte = os.read(fd, 1)
                        break
                    except BlockingIOError:
                        await wait_fd(fd)
        except TimeoutError:
            raise BrokenResourceError(
                f"lazymig {self.args[0]} was not ready after {self._ready_timeout} s; its "
                f"log:\n{self.log()[-_LOG_TAIL:]}") from None
        if byte != b"\0":  # EOF: it exited (or closed the fd) before it was ready
            async with asyncio.timeout(10):
                status = await self.wait()
            raise BrokenResourceError(
                f"lazymig {self.args[0]} exited with status {status} before it was ready; "
                f"its log:\n{self.log()[-_LOG_TAIL:]}")

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def kill(self) -> None:
        """SIGKILL the command now (a crash, as far as its peers can tell)."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Its exit status, as ``Popen.returncode`` (negative: killed by that signal).

        Bound the wait with ``asyncio.timeout`` at the call site.
        """
        # In a thread, off the loop; it ends with the process (close() kills it).
        return await asyncio.to_thread(self.process.wait)

    def close(self) -> None:
        """Kill it unless it has exited, and reap it; idempotent."""
        if self._process is not None:
            self.kill()
            self._process.wait(timeout=10)

    def __repr__(self) -> str:
        pid = self._process.pid if self._process else None
        return f"<lazymig.testing.LazymigCommand {self.args[:1]} pid={pid}>"
